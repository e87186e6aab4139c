//! Drives a running vhost-user-blk socket with the synthetic frontend and prints requests/s and
//! latency percentiles. Example:
//!   blk-load --socket /tmp/blk.sock --depth 32 --block 4096 --seconds 5

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use bulkhead_tests::frontend::{BlkDriver, Connection, Frontend, Setup};
use bulkhead_tests::load::{pin_to_cpu, run_blk};
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// vhost-user socket of the daemon.
    #[arg(long)]
    socket: PathBuf,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1)]
    depth: u32,
    /// Bytes per request.
    #[arg(long, default_value_t = 4096)]
    block: u32,
    /// Bytes of the disk the requests spread over.
    #[arg(long, default_value_t = 64 << 20)]
    span: u64,
    /// Write instead of read.
    #[arg(long)]
    write: bool,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Disable EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
    /// Pin the frontend to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(cpu) = a.cpu {
        pin_to_cpu(cpu)?;
    }
    let setup = Setup {
        queue_size: 256,
        event_idx: !a.no_event_idx,
        ram_layout: vec![(0, 512 << 20)],
        ..Setup::default()
    };
    let fe = Frontend::start(Connection::connect(&a.socket)?, setup)?;
    let mut d = BlkDriver::new(fe, a.depth.max(1), a.block)?;
    // Warm up, then measure.
    run_blk(
        &mut d,
        0,
        a.depth,
        a.block,
        a.span,
        a.write,
        Duration::from_millis(500),
    )?;
    let r = run_blk(
        &mut d,
        0,
        a.depth,
        a.block,
        a.span,
        a.write,
        Duration::from_secs(a.seconds),
    )?;
    println!(
        "{} {} B QD{}: {:.0} requests/s, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} requests in {:.2} s)",
        if a.write { "write" } else { "read" },
        a.block,
        a.depth,
        r.ops_per_sec(),
        r.percentile_us(50.0),
        r.percentile_us(99.0),
        r.percentile_us(99.9),
        r.ops,
        r.elapsed.as_secs_f64()
    );
    Ok(())
}
