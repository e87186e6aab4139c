//! Frontends that vanish at awkward moments: in the middle of the handshake, in the middle of
//! memory-table setup, with I/O in flight. After each, the daemon accepts the next frontend
//! within a second, and over 100 such reconnects its descriptors, mappings and threads return to
//! their baseline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bulkhead_tests::daemon::{eventually, Daemon};
use bulkhead_tests::fixture::{pattern, BlkFixture};
use bulkhead_tests::frontend::{BlkOp, Connection, GuestRam, Setup};
use vhost::vhost_user::message::FrontendReq;

fn counts(d: &Daemon) -> Result<(usize, usize, usize)> {
    Ok((d.fd_count()?, d.map_count()?, d.thread_count()?))
}

/// Connects, and checks that the daemon answers within a second.
fn connect_quickly(fx: &BlkFixture) -> Result<Connection> {
    let start = Instant::now();
    let mut c = fx.connect()?;
    c.get_u64(FrontendReq::GET_FEATURES)?;
    ensure!(
        start.elapsed() < Duration::from_secs(1),
        "daemon took {:?} to serve a new frontend",
        start.elapsed()
    );
    Ok(c)
}

#[test]
fn frontends_vanishing_at_any_point_leak_nothing_over_100_reconnects() -> Result<()> {
    let fx = BlkFixture::start(16 << 20, &["--queues", "2", "--io-engine", "io-uring"])?;
    // Warm up once with real I/O, so that lazily created state is part of the baseline.
    {
        let mut d = fx.driver(
            Setup {
                queues: 2,
                ..Setup::default()
            },
            16,
            4096,
        )?;
        d.write(1, 0, &pattern(1, 4096))?;
    }
    let mut baseline = (0, 0, 0);
    eventually(Duration::from_secs(5), "daemon to settle", || {
        let now = counts(&fx.daemon)?;
        let settled = now == baseline;
        baseline = now;
        Ok(settled)
    })?;
    for i in 0..100u64 {
        match i % 4 {
            // Gone after the first message of the handshake.
            0 => drop(connect_quickly(&fx)?),
            // Gone in the middle of memory-table setup: one region of two added.
            1 => {
                let mut c = connect_quickly(&fx)?;
                c.set_u64(FrontendReq::SET_PROTOCOL_FEATURES, 0x8209)?;
                c.reply_ack = true;
                c.send(FrontendReq::SET_OWNER, &[], &[])?;
                let ram = GuestRam::with_layout(&[(0, 1 << 20), (1 << 30, 1 << 20)])?;
                c.add_mem_reg(&ram.regions()[0], ram.fd())?;
            }
            // Gone with writes in flight on both queues.
            2 => {
                let _ = connect_quickly(&fx)?;
                let mut d = fx.driver(
                    Setup {
                        queues: 2,
                        ..Setup::default()
                    },
                    16,
                    65536,
                )?;
                for q in 0..2 {
                    let old = d.fe.queue(q).avail_idx();
                    for k in 0..16 {
                        d.submit(
                            q,
                            &BlkOp::Write {
                                sector: (i * 32 + k) * 128 % 30000,
                                data: pattern(k, 65536),
                            },
                        )?;
                    }
                    d.kick(q, old)?;
                }
            }
            // Gone after the inflight region and memory were set up, before the rings.
            _ => {
                let _ = connect_quickly(&fx)?;
                let mut d = fx.driver(
                    Setup {
                        queues: 1,
                        ..Setup::default()
                    },
                    4,
                    4096,
                )?;
                d.fe.stop_queue(0)?;
            }
        }
    }
    // Back to serving normally...
    let mut d = fx.driver(
        Setup {
            queues: 2,
            ..Setup::default()
        },
        16,
        4096,
    )?;
    d.write(0, 8, &pattern(9, 4096))?;
    ensure!(d.read(1, 8, 4096)? == pattern(9, 4096));
    drop(d);
    // ...and nothing accumulated.
    let mut last = (0, 0, 0);
    let settled = eventually(
        Duration::from_secs(5),
        "descriptors, mappings and threads back to baseline",
        || {
            last = counts(&fx.daemon)?;
            Ok(last == baseline)
        },
    );
    ensure!(
        settled.is_ok(),
        "baseline (fds, maps, threads) {baseline:?}, after 100 reconnects {last:?}"
    );
    eventually(Duration::from_secs(5), "101 connections in the log", || {
        Ok(fx.daemon.log().matches("frontend connected").count() >= 101)
    })?;
    Ok(())
}
