//! Turning a [`Report`] into `report.json`, `report.md` and SVG plots, with the isolation tax as
//! ratios and the project's performance targets checked.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::net::{NetPlacement, NetPoint};
use super::svg::{bars, Series};
use super::Report;

const NET_PLACEMENTS: [(NetPlacement, &str); 4] = [
    (NetPlacement::RawTapWrite, "raw TAP write"),
    (NetPlacement::InProcessDirect, "in-process, direct"),
    (NetPlacement::InProcessThreaded, "in-process, threaded"),
    (
        NetPlacement::OutOfProcess,
        "out-of-process (vhost-user-net)",
    ),
];

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
    super::report_blk::targets(r, &mut t);
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
    super::report_blk::markdown(r, &mut s);
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
    let mut plots: Vec<String> = super::report_blk::charts(r)
        .into_iter()
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    plots.push("`net_tx.svg`".into());
    if r.guest.is_some() {
        plots.push("`guest_blk.svg`".into());
    }
    let _ = writeln!(s, "\nPlots: {}.", plots.join(", "));
    s
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
    for (name, svg) in super::report_blk::charts(r) {
        std::fs::write(out.join(name), svg)?;
    }
    if let Some(svg) = r.guest.as_ref().and_then(super::guest_report::blk_svg) {
        std::fs::write(out.join("guest_blk.svg"), svg)?;
    }
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
