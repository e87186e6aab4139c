//! bulkhead-bench: what moving a driver out of the VMM costs, measured side by side in one run.
//!   bulkhead-bench --out DIR            the default suite (a few minutes)
//!   bulkhead-bench --quick --out DIR    a smoke run (seconds)
//!   bulkhead-bench --ring-pairs --no-guest --out DIR   split vs packed virtqueues only
//!   bulkhead-bench --render DIR/report.json --out DIR   re-render report.md and the plots
//! Writes DIR/report.json, DIR/report.md and DIR/*.svg. Needs root (TAP, namespaces), the built
//! daemons next to this binary, qemu-storage-daemon for the peer comparison, and QEMU with the
//! guest kit (tests/setup.sh) for the guest's view.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bulkhead_tests::bench::{run_suite, Options, Report};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Directory for report.json, report.md and the plots.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Short points, one repetition: keeps the harness working, proves nothing.
    #[arg(long)]
    quick: bool,
    /// Repetitions per point (medians are reported).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per point.
    #[arg(long)]
    seconds: Option<f64>,
    /// Do not measure: re-render report.md and the plots in --out from this report.json.
    #[arg(long, value_name = "FILE")]
    render: Option<PathBuf>,
    /// Skip the guest's view (QEMU guests on QEMU's built-in devices, the daemons and
    /// qemu-storage-daemon; about two minutes under TCG, seconds with --quick).
    #[arg(long)]
    no_guest: bool,
    /// Run only these sections (comma-separated), e.g. `--only net` to compare a change.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SECTION")]
    only: Vec<Section>,
    /// Keep only the points whose description (as printed while running, e.g.
    /// `OutOfProcess Null Default qd32 4096B TwoPinned`) contains every one of these words.
    #[arg(long, value_delimiter = ',', value_name = "WORD")]
    filter: Vec<String>,
    /// Keep only the points measured on both ring layouts, each split point with its packed
    /// twin (`ring=split` / `ring=packed` in the descriptions; combine with --filter, e.g.
    /// `--ring-pairs --filter TwoPinned`).
    #[arg(long)]
    ring_pairs: bool,
    /// Pass this argument to the daemons in the out-of-process placements (repeatable), e.g.
    /// `--daemon-arg=--completions --daemon-arg=batched` to compare a policy.
    #[arg(long = "daemon-arg", value_name = "ARG", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Blk,
    Net,
    Guest,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(json) = &a.render {
        let text = std::fs::read_to_string(json)
            .with_context(|| format!("cannot read {}", json.display()))?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bulkhead-bench report", json.display()))?;
        std::fs::create_dir_all(&a.out)?;
        bulkhead_tests::bench::report::write_all(&report, &a.out)?;
        eprintln!("rendered into {}", a.out.display());
        return Ok(());
    }
    let opts = Options {
        quick: a.quick,
        reps: a.reps.unwrap_or(if a.quick { 1 } else { 3 }),
        seconds: a.seconds.unwrap_or(if a.quick { 0.2 } else { 1.0 }),
        blk: a.only.is_empty() || a.only.contains(&Section::Blk),
        net: a.only.is_empty() || a.only.contains(&Section::Net),
        guest: !a.no_guest && (a.only.is_empty() || a.only.contains(&Section::Guest)),
        filter: a.filter,
        ring_pairs: a.ring_pairs,
        daemon_args: a.daemon_args,
    };
    let report = run_suite(opts, &a.out)?;
    print!("{}", bulkhead_tests::bench::report::markdown(&report));
    eprintln!("written to {}", a.out.display());
    Ok(())
}
