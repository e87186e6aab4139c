//! The network part of the report: transmit per CPU placement against one thread's raw TAP
//! writes and the driver's ceiling, receive against what the injector offered, the network
//! targets and plots (all on split rings; packed ones are compared in `report_rings.rs`).

use std::fmt::Write as _;

use super::cpu::Cpus;
use super::net::{NetPlacement, NetPoint};
use super::report::Target;
use super::svg::{bars, Series};
use super::Report;

const TX_PLACEMENTS: [NetPlacement; 5] = [
    NetPlacement::RawTapWrite,
    NetPlacement::InProcessDirect,
    NetPlacement::InProcessThreaded,
    NetPlacement::OutOfProcess,
    NetPlacement::DriverCeiling,
];

fn tx(r: &Report, p: NetPlacement, size: usize, cpus: Cpus) -> Option<&NetPoint> {
    r.net_tx.iter().find(|x| {
        x.placement == p
            && x.frame == size
            && x.poll_us == 0
            && !x.packed
            && (x.cpus == cpus || p == NetPlacement::RawTapWrite)
    })
}

fn sizes(points: &[NetPoint]) -> Vec<usize> {
    let mut s: Vec<usize> = points.iter().map(|p| p.frame).collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// Whether a receive point has a twin with fewer injector threads (the targets are read from
/// that one; reports from before the flood rows have one injector setting per point).
fn is_flood(points: &[NetPoint], p: &NetPoint) -> bool {
    points.iter().any(|x| {
        x.frame == p.frame && x.cpus == p.cpus && x.packed == p.packed && x.injectors < p.injectors
    })
}

/// How a receive point's injector is named: its sender threads.
fn injector_words(threads: usize) -> String {
    match threads {
        1 => "one thread".into(),
        n => format!("{n} threads"),
    }
}

/// Share of the injected bytes that were received (frames above the MTU may arrive segmented,
/// so frame counts do not compare).
fn received_share(p: &NetPoint) -> f64 {
    let injected_gbit = p.injected_frames_per_sec * p.frame as f64 * 8.0 / 1e9;
    p.gbit_per_sec / injected_gbit.max(1e-12)
}

pub fn targets(r: &Report, t: &mut Vec<Target>) {
    for cpus in Cpus::ALL {
        if let (Some(raw), Some(out)) = (
            tx(r, NetPlacement::RawTapWrite, 64, cpus),
            tx(r, NetPlacement::OutOfProcess, 64, cpus),
        ) {
            let ratio = out.frames_per_sec / raw.frames_per_sec;
            t.push(Target {
                what: format!(
                    "net TX 64 B, {}: ≥ 80 % of one thread's raw TAP writes",
                    cpus.label()
                ),
                measured: format!(
                    "{:.0} vs {:.0} frames/s = {:.0} %",
                    out.frames_per_sec,
                    raw.frames_per_sec,
                    ratio * 100.0
                ),
                met: Some(ratio >= 0.8),
            });
        }
    }
    if let Some(out) = tx(r, NetPlacement::OutOfProcess, 65536, Cpus::One) {
        t.push(Target {
            what: "net TX 64 KiB offloaded frames, one CPU: ≥ 15 Gbit/s".into(),
            measured: format!("{:.1} Gbit/s", out.gbit_per_sec),
            met: Some(out.gbit_per_sec >= 15.0),
        });
    }
    for p in r
        .net_rx
        .iter()
        .filter(|p| p.frame == 64 && !p.packed && !is_flood(&r.net_rx, p))
    {
        let ratio = p.frames_per_sec / p.injected_frames_per_sec.max(1.0);
        t.push(Target {
            what: format!(
                "net RX 64 B, {}: ≥ 70 % of what the injector ({}) offers",
                p.cpus.label(),
                injector_words(p.injectors)
            ),
            measured: format!(
                "{:.0} of {:.0} frames/s = {:.0} % (injector alone {:.0})",
                p.frames_per_sec,
                p.injected_frames_per_sec,
                ratio * 100.0,
                p.injector_alone_frames_per_sec
            ),
            met: Some(ratio >= 0.7),
        });
    }
    let mut worst: Option<(f64, String)> = None;
    let mut checked = 0;
    for cpus in Cpus::ALL {
        for size in sizes(&r.net_tx) {
            let Some(ceiling) = tx(r, NetPlacement::DriverCeiling, size, cpus) else {
                continue;
            };
            let best = [
                NetPlacement::InProcessDirect,
                NetPlacement::InProcessThreaded,
                NetPlacement::OutOfProcess,
            ]
            .iter()
            .filter_map(|p| tx(r, *p, size, cpus))
            .max_by(|a, b| a.frames_per_sec.total_cmp(&b.frames_per_sec));
            let Some(best) = best else { continue };
            checked += 1;
            let ratio = ceiling.frames_per_sec / best.frames_per_sec;
            if worst.as_ref().is_none_or(|(w, _)| ratio < *w) {
                worst = Some((
                    ratio,
                    format!(
                        "{size} B {}: ceiling {:.0} vs best {:.0} ({})",
                        cpus.label(),
                        ceiling.frames_per_sec,
                        best.frames_per_sec,
                        best.placement.label()
                    ),
                ));
            }
        }
    }
    if let Some((ratio, at)) = worst {
        t.push(Target {
            what:
                "the harness's driver reaches ≥ 2 × the best device's transmit rate at every point"
                    .into(),
            measured: format!("lowest ratio {ratio:.2}× over {checked} points, at {at}"),
            met: Some(ratio >= 2.0),
        });
    }
}

pub fn markdown(r: &Report, s: &mut String) {
    for cpus in Cpus::ALL {
        if !r
            .net_tx
            .iter()
            .any(|p| p.cpus == cpus && p.placement != NetPlacement::RawTapWrite && !p.packed)
        {
            continue;
        }
        let _ = writeln!(s, "\n## Net transmit, one queue pair, {}\n\n| placement | frame | frames/s | Gbit/s | CPU µs/frame driver + device | kicks/frame | interrupts/frame | vs raw TAP write | driver ceiling ÷ this |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |", cpus.label());
        for size in sizes(&r.net_tx) {
            let raw = tx(r, NetPlacement::RawTapWrite, size, cpus);
            let ceiling = tx(r, NetPlacement::DriverCeiling, size, cpus);
            for pl in TX_PLACEMENTS {
                let Some(p) = tx(r, pl, size, cpus) else {
                    continue;
                };
                let vs_raw = raw.map_or(String::new(), |raw| {
                    format!("{:.0} %", 100.0 * p.frames_per_sec / raw.frames_per_sec)
                });
                let headroom = ceiling
                    .filter(|_| pl != NetPlacement::DriverCeiling)
                    .map_or(String::new(), |c| {
                        format!("{:.1}×", c.frames_per_sec / p.frames_per_sec)
                    });
                let _ = writeln!(
                    s,
                    "| {} | {size} | {:.0} | {:.2} | {:.2} + {:.2} | {:.3} | {:.3} | {vs_raw} | {headroom} |",
                    pl.label(),
                    p.frames_per_sec,
                    p.gbit_per_sec,
                    p.cpu_us_per_frame_driver,
                    p.cpu_us_per_frame_device,
                    p.kicks_per_frame,
                    p.interrupts_per_frame
                );
            }
        }
    }
    let polled: Vec<&NetPoint> = r.net_tx.iter().filter(|p| p.poll_us != 0).collect();
    if !polled.is_empty() {
        let _ = writeln!(s, "\n## Net transmit with busy polling\n\n| placement | frame | CPUs | busy-poll µs | frames/s | CPU µs/frame driver + device |\n| --- | --- | --- | --- | --- | --- |");
        for p in polled {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.0} | {:.2} + {:.2} |",
                p.placement.label(),
                p.frame,
                p.cpus.label(),
                p.poll_us,
                p.frames_per_sec,
                p.cpu_us_per_frame_driver,
                p.cpu_us_per_frame_device
            );
        }
    }
    if r.net_rx.iter().any(|p| !p.packed) {
        let _ = writeln!(
            s,
            "\n## Net receive through vhost-user-net (frames injected into the TAP with sendmmsg)"
        );
        // Reports from before the one-thread injector ran two unpinned threads across CPUs.
        if r.net_rx.iter().any(|p| p.injectors == 1) {
            let _ = writeln!(s, "\nThe injector is one sender thread, pinned where the placement pins (one CPU: on the other CPU; two CPUs: on the driver's CPU, the device keeping its own), unpinned otherwise. The flood rows add a second thread: it adds no rate on a CPU it shares, but takes CPU time from the driver or the device, so they show what a competing sender costs, not the device's own rate.");
        }
        let _ = writeln!(s, "\n| frame | CPUs | injector | frames/s | Gbit/s | injected frames/s | received ÷ injected (bytes) | injector alone frames/s | CPU µs/frame driver + device | interrupts/frame |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for p in r.net_rx.iter().filter(|p| !p.packed) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.0} % | {:.0} | {:.2} + {:.2} | {:.3} |",
                p.frame,
                p.cpus.label(),
                injector_words(p.injectors),
                p.frames_per_sec,
                p.gbit_per_sec,
                p.injected_frames_per_sec,
                100.0 * received_share(p),
                p.injector_alone_frames_per_sec,
                p.cpu_us_per_frame_driver,
                p.cpu_us_per_frame_device,
                p.interrupts_per_frame
            );
        }
    }
    super::report_rings::net_markdown(r, s);
}

/// `(file name, svg)`: transmit rate relative to raw TAP writes, per CPU placement.
pub fn charts(r: &Report) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let xs_sizes = sizes(&r.net_tx);
    let xs: Vec<String> = xs_sizes.iter().map(|s| format!("{s} B")).collect();
    for cpus in Cpus::ALL {
        let series: Vec<Series> = TX_PLACEMENTS
            .iter()
            .filter(|p| **p != NetPlacement::RawTapWrite)
            .map(|pl| Series {
                name: pl.label().to_owned(),
                values: xs_sizes
                    .iter()
                    .map(|s| {
                        tx(r, *pl, *s, cpus).and_then(|p| {
                            tx(r, NetPlacement::RawTapWrite, *s, cpus)
                                .map(|raw| 100.0 * p.frames_per_sec / raw.frames_per_sec)
                        })
                    })
                    .collect(),
            })
            .filter(|s| s.values.iter().any(Option::is_some))
            .collect();
        if series.is_empty() {
            continue;
        }
        let c = match cpus {
            Cpus::One => "one_cpu",
            Cpus::TwoPinned => "two_cpus",
            Cpus::Unpinned => "unpinned",
        };
        out.push((
            format!("net_tx_{c}.svg"),
            bars(
                &format!("Net transmit relative to raw TAP writes, {}", cpus.label()),
                "frame size",
                "% of raw TAP write rate",
                &xs,
                &series,
            ),
        ));
    }
    out
}
