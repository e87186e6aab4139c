//! Turning a [`Report`] into `report.json`, `report.md` and SVG plots, with the isolation tax as
//! ratios and the project's performance targets checked.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::blk::{Backend, BlkPlacement, BlkPoint};
use super::net::{NetPlacement, NetPoint};
use super::svg::{bars, lines, Series};
use super::Report;

const PLACEMENTS: [(BlkPlacement, &str); 4] = [
    (BlkPlacement::InProcessDirect, "in-process, direct"),
    (BlkPlacement::InProcessThreaded, "in-process, threaded"),
    (
        BlkPlacement::OutOfProcess,
        "out-of-process (vhost-user-blk)",
    ),
    (BlkPlacement::QemuStorageDaemon, "qemu-storage-daemon"),
];

const NET_PLACEMENTS: [(NetPlacement, &str); 4] = [
    (NetPlacement::RawTapWrite, "raw TAP write"),
    (NetPlacement::InProcessDirect, "in-process, direct"),
    (NetPlacement::InProcessThreaded, "in-process, threaded"),
    (
        NetPlacement::OutOfProcess,
        "out-of-process (vhost-user-net)",
    ),
];

fn blk(
    r: &Report,
    p: BlkPlacement,
    backend: Backend,
    qd: u32,
    block: u32,
    same: bool,
    event_idx: bool,
) -> Option<&BlkPoint> {
    r.blk.iter().find(|x| {
        x.placement == p
            && x.backend == backend
            && x.depth == qd
            && x.block == block
            && x.same_cpu == same
            && x.event_idx == event_idx
            && x.poll_us == 0
    })
}

fn tx(r: &Report, p: NetPlacement, size: usize, same: bool) -> Option<&NetPoint> {
    r.net_tx.iter().find(|x| {
        x.placement == p
            && x.frame == size
            && x.poll_us == 0
            && (x.same_cpu == same || p == NetPlacement::RawTapWrite)
    })
}

/// A target and where it stands.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    pub what: String,
    pub measured: String,
    pub met: Option<bool>,
}

pub fn targets(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let null = |p, qd| blk(r, p, Backend::Null, qd, 4096, true, true);
    let (th32, out32, qsd32) = (
        null(BlkPlacement::InProcessThreaded, 32),
        null(BlkPlacement::OutOfProcess, 32),
        null(BlkPlacement::QemuStorageDaemon, 32),
    );
    if let (Some(th), Some(out)) = (th32, out32) {
        let ratio = out.ops_per_sec / th.ops_per_sec;
        t.push(Target {
            what: "blk null 4 KiB QD32 same CPU: out-of-process ≥ 0.9 × in-process threaded".into(),
            measured: format!(
                "{:.0} vs {:.0} ops/s = {ratio:.2}×",
                out.ops_per_sec, th.ops_per_sec
            ),
            met: Some(ratio >= 0.9),
        });
    }
    if let (Some(q), Some(out)) = (qsd32, out32) {
        let ratio = out.ops_per_sec / q.ops_per_sec;
        let (ours, theirs) = (
            out.cpu_us_per_op_frontend + out.cpu_us_per_op_device,
            q.cpu_us_per_op_frontend + q.cpu_us_per_op_device,
        );
        t.push(Target {
            what: "blk null 4 KiB QD32 same CPU: ≥ 1.5 × qemu-storage-daemon ops/s at lower CPU per op".into(),
            measured: format!("{ratio:.2}× ({:.0} vs {:.0} ops/s); CPU/op {ours:.2} vs {theirs:.2} µs (device {:.2} vs {:.2})", out.ops_per_sec, q.ops_per_sec, out.cpu_us_per_op_device, q.cpu_us_per_op_device),
            met: Some(ratio >= 1.5 && out.cpu_us_per_op_device < q.cpu_us_per_op_device),
        });
    }
    if let (Some(th), Some(out)) = (
        null(BlkPlacement::InProcessThreaded, 1),
        null(BlkPlacement::OutOfProcess, 1),
    ) {
        let extra = out.p50_us - th.p50_us;
        t.push(Target {
            what: "blk QD1 same CPU: out-of-process adds at most one notification round trip over threaded".into(),
            measured: format!("p50 {:.1} vs {:.1} µs: +{extra:.1} µs; one round trip {:.1} µs", out.p50_us, th.p50_us, r.notify_rtt_same_cpu_us),
            met: Some(extra <= r.notify_rtt_same_cpu_us),
        });
    }
    if let (Some(raw), Some(out)) = (
        tx(r, NetPlacement::RawTapWrite, 64, true),
        tx(r, NetPlacement::OutOfProcess, 64, true),
    ) {
        let ratio = out.frames_per_sec / raw.frames_per_sec;
        t.push(Target {
            what: "net TX 64 B, one pair: ≥ 70 % of the raw TAP write rate".into(),
            measured: format!(
                "{:.0} vs {:.0} frames/s = {:.0} %",
                out.frames_per_sec,
                raw.frames_per_sec,
                ratio * 100.0
            ),
            met: Some(ratio >= 0.7),
        });
    }
    if let Some(out) = tx(r, NetPlacement::OutOfProcess, 65536, true) {
        t.push(Target {
            what: "net TX 64 KiB offloaded frames: ≥ 15 Gbit/s".into(),
            measured: format!("{:.1} Gbit/s", out.gbit_per_sec),
            met: Some(out.gbit_per_sec >= 15.0),
        });
    }
    t
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "n/a",
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "# Bulkhead isolation harness{}\n",
        if r.quick {
            " (quick run: short, one repetition — not for conclusions)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "{} · {} CPUs ({}) · kernel {} · {} repetition(s) of {:.2} s per point, medians.\n",
        m.date, m.cpus, m.cpu_model, m.kernel, r.reps, r.seconds_per_point
    );
    let _ = writeln!(s, "Notification round trip (eventfd ping-pong between two threads): same CPU {:.1} µs, across CPUs {:.1} µs.\n", r.notify_rtt_same_cpu_us, r.notify_rtt_cross_cpu_us);
    let _ = writeln!(
        s,
        "## Targets\n\n| target | measured | |\n| --- | --- | --- |"
    );
    for t in targets(r) {
        let _ = writeln!(s, "| {} | {} | {} |", t.what, t.measured, verdict(t.met));
    }
    for same in [true, false] {
        let rows: Vec<&BlkPoint> = r
            .blk
            .iter()
            .filter(|p| {
                p.backend == Backend::Null
                    && p.block == 4096
                    && p.same_cpu == same
                    && p.event_idx
                    && p.poll_us == 0
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "\n## Block, null device, 4 KiB random reads, {}\n",
            if same {
                "frontend and device on one CPU"
            } else {
                "frontend and device on different CPUs"
            }
        );
        let _ = writeln!(s, "| placement | QD | ops/s | p50 µs | p99 µs | p99.9 µs | CPU µs/op (frontend + device) | vs direct | vs threaded | vs qemu-storage-daemon |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let mut depths: Vec<u32> = rows.iter().map(|p| p.depth).collect();
        depths.sort_unstable();
        depths.dedup();
        for qd in depths {
            for (pl, name) in PLACEMENTS {
                let Some(p) = blk(r, pl, Backend::Null, qd, 4096, same, true) else {
                    continue;
                };
                let ratio = |other: BlkPlacement| {
                    blk(r, other, Backend::Null, qd, 4096, same, true).map_or("".to_owned(), |o| {
                        format!("{:.2}×", p.ops_per_sec / o.ops_per_sec)
                    })
                };
                let _ = writeln!(
                    s,
                    "| {name} | {qd} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} + {:.2} | {} | {} | {} |",
                    p.ops_per_sec, p.p50_us, p.p99_us, p.p999_us, p.cpu_us_per_op_frontend, p.cpu_us_per_op_device,
                    ratio(BlkPlacement::InProcessDirect), ratio(BlkPlacement::InProcessThreaded), ratio(BlkPlacement::QemuStorageDaemon)
                );
            }
        }
    }
    let other: Vec<&BlkPoint> = r
        .blk
        .iter()
        .filter(|p| {
            p.backend == Backend::Tmpfs || p.block != 4096 || !p.event_idx || p.poll_us != 0
        })
        .collect();
    if !other.is_empty() {
        let _ = writeln!(s, "\n## Block, other points\n\n| placement | backend | block | QD | CPUs | EVENT_IDX | busy-poll µs | ops/s | MiB/s | p50 µs | p99 µs | CPU µs/op |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for p in other {
            let name = PLACEMENTS
                .iter()
                .find(|(x, _)| *x == p.placement)
                .map_or("?", |(_, n)| n);
            let _ = writeln!(
                s,
                "| {name} | {:?} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} |",
                p.backend,
                p.block,
                p.depth,
                if p.same_cpu { "one" } else { "two" },
                p.event_idx,
                p.poll_us,
                p.ops_per_sec,
                p.mib_per_sec,
                p.p50_us,
                p.p99_us,
                p.cpu_us_per_op_frontend + p.cpu_us_per_op_device
            );
        }
    }
    let _ = writeln!(s, "\n## Net transmit, one queue pair\n\n| placement | frame | CPUs | busy-poll µs | frames/s | Gbit/s | CPU µs/frame (frontend + device) | vs raw TAP write |\n| --- | --- | --- | --- | --- | --- | --- | --- |");
    for p in &r.net_tx {
        let name = NET_PLACEMENTS
            .iter()
            .find(|(x, _)| *x == p.placement)
            .map_or("?", |(_, n)| n);
        let raw = tx(r, NetPlacement::RawTapWrite, p.frame, true).map_or("".to_owned(), |raw| {
            format!("{:.0} %", 100.0 * p.frames_per_sec / raw.frames_per_sec)
        });
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {:.0} | {:.2} | {:.2} + {:.2} | {raw} |",
            p.frame,
            if p.same_cpu { "one" } else { "two" },
            p.poll_us,
            p.frames_per_sec,
            p.gbit_per_sec,
            p.cpu_us_per_frame_frontend,
            p.cpu_us_per_frame_device
        );
    }
    let _ = writeln!(s, "\n## Net receive through vhost-user-net (frames injected into the TAP by a sender in the same VM)\n\n| frame | frames/s | Gbit/s | injected frames/s |\n| --- | --- | --- | --- |");
    for p in &r.net_rx {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} | {:.0} |",
            p.point.frame, p.point.frames_per_sec, p.point.gbit_per_sec, p.injected_frames_per_sec
        );
    }
    if let Some(v) = &r.guest {
        s.push_str(&super::guest_report::markdown(v));
    }
    let _ = writeln!(s, "\nPlots: `blk_qd_one_cpu.svg`, `blk_qd_two_cpus.svg`, `blk_latency_qd1.svg`, `net_tx.svg`{}.", if r.guest.is_some() { ", `guest_blk.svg`" } else { "" });
    s
}

fn qd_chart(r: &Report, same: bool) -> Option<String> {
    let mut depths: Vec<u32> = r
        .blk
        .iter()
        .filter(|p| p.backend == Backend::Null && p.block == 4096 && p.same_cpu == same)
        .map(|p| p.depth)
        .collect();
    depths.sort_unstable();
    depths.dedup();
    if depths.is_empty() {
        return None;
    }
    let xs: Vec<String> = depths.iter().map(u32::to_string).collect();
    let series: Vec<Series> = PLACEMENTS
        .iter()
        .map(|(pl, name)| Series {
            name: (*name).to_owned(),
            values: depths
                .iter()
                .map(|qd| blk(r, *pl, Backend::Null, *qd, 4096, same, true).map(|p| p.ops_per_sec))
                .collect(),
        })
        .filter(|s| s.values.iter().any(Option::is_some))
        .collect();
    let title = format!(
        "Null block device, 4 KiB reads, {}",
        if same { "one CPU" } else { "two CPUs" }
    );
    Some(lines(&title, "queue depth", "operations/s", &xs, &series))
}

pub fn write_all(r: &Report, out: &Path) -> Result<()> {
    #[derive(serde::Serialize)]
    struct WithTargets<'a> {
        #[serde(flatten)]
        report: &'a Report,
        targets: Vec<Target>,
    }
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&WithTargets {
            report: r,
            targets: targets(r),
        })?,
    )?;
    std::fs::write(out.join("report.md"), markdown(r))?;
    if let Some(svg) = qd_chart(r, true) {
        std::fs::write(out.join("blk_qd_one_cpu.svg"), svg)?;
    }
    if let Some(svg) = r.guest.as_ref().and_then(super::guest_report::blk_svg) {
        std::fs::write(out.join("guest_blk.svg"), svg)?;
    }
    if let Some(svg) = qd_chart(r, false) {
        std::fs::write(out.join("blk_qd_two_cpus.svg"), svg)?;
    }
    let lat: Vec<&BlkPoint> = PLACEMENTS
        .iter()
        .filter_map(|(pl, _)| blk(r, *pl, Backend::Null, 1, 4096, true, true))
        .collect();
    let names: Vec<String> = lat
        .iter()
        .map(|p| {
            PLACEMENTS
                .iter()
                .find(|(x, _)| *x == p.placement)
                .map_or("?", |(_, n)| n)
                .to_owned()
        })
        .collect();
    let series = vec![
        Series {
            name: "p50".into(),
            values: lat.iter().map(|p| Some(p.p50_us)).collect(),
        },
        Series {
            name: "p99".into(),
            values: lat.iter().map(|p| Some(p.p99_us)).collect(),
        },
    ];
    std::fs::write(
        out.join("blk_latency_qd1.svg"),
        bars(
            "Latency at QD 1, null device, one CPU",
            "placement",
            "µs",
            &names,
            &series,
        ),
    )?;
    let mut sizes: Vec<usize> = r.net_tx.iter().map(|p| p.frame).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let xs: Vec<String> = sizes.iter().map(|s| format!("{s} B")).collect();
    let series: Vec<Series> = NET_PLACEMENTS
        .iter()
        .map(|(pl, name)| Series {
            name: (*name).to_owned(),
            values: sizes
                .iter()
                .map(|s| {
                    tx(r, *pl, *s, true).and_then(|raw| {
                        tx(r, NetPlacement::RawTapWrite, *s, true)
                            .map(|base| 100.0 * raw.frames_per_sec / base.frames_per_sec)
                    })
                })
                .collect(),
        })
        .collect();
    std::fs::write(
        out.join("net_tx.svg"),
        bars(
            "Net transmit rate relative to raw TAP writes",
            "frame size",
            "% of raw TAP write rate",
            &xs,
            &series,
        ),
    )?;
    Ok(())
}
