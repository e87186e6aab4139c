//! Frames/s and Gbit/s through vhost-user-net from the synthetic frontend, one queue pair, TX and
//! RX, beside the raw cost of writing the same frames to a TAP, all in one run. Creates its own
//! network namespace (no traffic leaves it). Needs root and a built vhost-user-net.
//!   net-load --seconds 3 --sizes 64,1514,65536

use std::time::Duration;

use anyhow::Result;
use bulkhead_tests::fixture::NetFixture;
use bulkhead_tests::frontend::Setup;
use bulkhead_tests::netload::{raw_tap_write, rx, tx};
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Frame sizes in bytes (Ethernet header included; above 1514: TSO segments).
    #[arg(long, value_delimiter = ',', default_value = "64,1514,65536")]
    sizes: Vec<usize>,
    /// Frames kept queued on TX.
    #[arg(long, default_value_t = 128)]
    batch: usize,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let t = Duration::from_secs(a.seconds);
    println!(
        "{:>7}  {:>14}  {:>14}  {:>14}  {:>14}",
        "size", "raw TAP write", "TX daemon", "RX daemon", "RX injected"
    );
    for size in a.sizes {
        let fx = NetFixture::start(&[])?;
        fx.ns.ip(&["link", "set", "tap0", "up"])?;
        let setup = Setup {
            queues: 2,
            queue_size: 256,
            // CSUM, GUEST_CSUM, GUEST_TSO4/6, HOST_TSO4/6, MRG_RXBUF.
            device_features: [0u32, 1, 7, 8, 11, 12, 15]
                .iter()
                .fold(0, |a, b| a | 1u64 << b),
            ram_layout: vec![(0, 256 << 20)],
            queue_num_is_pairs: true,
            ..Setup::default()
        };
        let mut d = fx.driver(setup, 4096, 256, a.batch as u32)?;
        let raw = raw_tap_write(&fx.ns, size, t)?;
        let txr = tx(&mut d, size, a.batch, t)?;
        let (rxr, inj) = rx(&fx, &mut d, size, t)?;
        let fmt = |r: &bulkhead_tests::netload::Rate| {
            if size > 1514 {
                format!("{:.2} Gbit/s", r.gbit_per_sec())
            } else {
                format!("{:.0} fr/s", r.frames_per_sec())
            }
        };
        println!(
            "{size:>7}  {:>14}  {:>14}  {:>14}  {:>14}",
            fmt(&raw),
            fmt(&txr),
            fmt(&rxr),
            fmt(&inj)
        );
    }
    Ok(())
}
