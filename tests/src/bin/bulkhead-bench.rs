//! bulkhead-bench: what moving a driver out of the VMM costs, measured side by side in one run.
//!   bulkhead-bench --out DIR            the default suite (a few minutes)
//!   bulkhead-bench --quick --out DIR    a smoke run (seconds)
//! Writes DIR/report.json, DIR/report.md and DIR/*.svg. Needs root (TAP, namespaces), the built
//! daemons next to this binary, qemu-storage-daemon for the peer comparison, and QEMU with the
//! guest kit (tests/setup.sh) for the guest's view.

use std::path::PathBuf;

use anyhow::Result;
use bulkhead_tests::bench::{run_suite, Options};
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
    /// Skip the guest's view (QEMU guests on QEMU's built-in devices, the daemons and
    /// qemu-storage-daemon; about two minutes under TCG, seconds with --quick).
    #[arg(long)]
    no_guest: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let opts = Options {
        quick: a.quick,
        reps: a.reps.unwrap_or(if a.quick { 1 } else { 3 }),
        seconds: a.seconds.unwrap_or(if a.quick { 0.2 } else { 1.0 }),
        guest: !a.no_guest,
    };
    let report = run_suite(opts, &a.out)?;
    print!("{}", bulkhead_tests::bench::report::markdown(&report));
    eprintln!("written to {}", a.out.display());
    Ok(())
}
