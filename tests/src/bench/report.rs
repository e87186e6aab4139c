//! Turning a [`Report`] into `report.json`, `report.md` and SVG plots, with the isolation tax as
//! ratios and the project's performance targets checked.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::Report;

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
    super::report_net::targets(r, &mut t);
    super::report_rings::targets(r, &mut t);
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
        "{} · {} CPUs ({}) · kernel {} · {} repetition(s) of {:.2} s per point, taken round-robin among the points one ratio compares (same backend, depth and CPUs; same frame size and CPUs), medians.\n",
        m.date, m.cpus, m.cpu_model, m.kernel, r.reps, r.seconds_per_point
    );
    if !r.daemon_args.is_empty() {
        let _ = writeln!(s, "Daemons ran with `{}`.\n", r.daemon_args.join(" "));
    }
    let _ = writeln!(s, "Notification round trip (eventfd ping-pong between two threads): same CPU {:.1} µs, across CPUs {:.1} µs.\n", r.notify_rtt_same_cpu_us, r.notify_rtt_cross_cpu_us);
    let _ = writeln!(
        s,
        "## Targets\n\n| target | measured | |\n| --- | --- | --- |"
    );
    for t in targets(r) {
        let _ = writeln!(s, "| {} | {} | {} |", t.what, t.measured, verdict(t.met));
    }
    super::report_blk::markdown(r, &mut s);
    super::report_net::markdown(r, &mut s);
    if let Some(v) = &r.guest {
        s.push_str(&super::guest_report::markdown(v));
    }
    let mut plots: Vec<String> = super::report_blk::charts(r)
        .into_iter()
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    plots.extend(
        super::report_net::charts(r)
            .into_iter()
            .map(|(name, _)| format!("`{name}`")),
    );
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
    for (name, svg) in super::report_net::charts(r) {
        std::fs::write(out.join(name), svg)?;
    }
    Ok(())
}
