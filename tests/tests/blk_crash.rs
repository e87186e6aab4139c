//! Restart on crash with nothing lost: many requests in flight on several queues, completing out
//! of order (io_uring; a flush stuck behind dirty data while small writes finish), the daemon
//! SIGKILLed at a random moment, restarted, and the frontend replaying the handshake as QEMU does
//! (same inflight region, split rings restarted at their used index, packed ones at the last base
//! QEMU knows). Every request must complete exactly once and the image must hold every write. The
//! same run without inflight tracking is the negative control: it must go wrong. Each test runs
//! on split and packed rings (`<test>::split`, `<test>::packed`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bulkhead_tests::fixture::{pattern, BlkFixture};
use bulkhead_tests::frontend::blk::S_OK;
use bulkhead_tests::frontend::{BlkOp, Setup};

const QUEUES: u16 = 4;
const BIG: usize = 64 * 1024;
const SMALL: usize = 4096;
const GIB: u64 = 1 << 30;

bulkhead_tests::on_both_layouts!(
    requests_in_flight_at_a_crash_complete_exactly_once_with_inflight_tracking,
    without_inflight_tracking_the_same_crashes_lose_or_repeat_requests,
    write_cache_choice_survives_a_daemon_restart,
);

#[derive(Debug, Default)]
struct Outcome {
    /// Attempts where the daemon died with requests taken but not completed.
    owed_at_kill: usize,
    /// Requests owed across all attempts.
    owed_total: usize,
    duplicates: usize,
    lost: usize,
    corrupt: usize,
}

/// One request of the workload: where it writes and what.
#[derive(Debug, Clone)]
struct Write {
    sector: u64,
    seed: u64,
    len: usize,
}

fn workload(attempt: u64, q: u16) -> Vec<Option<Write>> {
    // Per queue: dirty 512 KiB, a flush that has to write it back, then small writes that
    // complete long before the flush does. Every write has its own area of the disk.
    let area = (attempt * u64::from(QUEUES) + u64::from(q)) * 8 * 1024 * 2; // 8 MiB in sectors
    let mut v = Vec::new();
    for i in 0..8u64 {
        v.push(Some(Write {
            sector: area + i * 128,
            seed: area + i,
            len: BIG,
        }));
    }
    v.push(None); // flush
    for i in 0..24u64 {
        v.push(Some(Write {
            sector: area + 2048 + i * 8,
            seed: area + 1000 + i,
            len: SMALL,
        }));
    }
    v
}

fn run(ring: &Setup, inflight: bool, attempts: u64) -> Result<Outcome> {
    let mut out = Outcome::default();
    for attempt in 0..attempts {
        let mut fx = BlkFixture::start(GIB, &["--queues", "4", "--io-engine", "io-uring"])?;
        let setup = Setup {
            queues: QUEUES,
            queue_size: 128,
            inflight,
            ram_layout: vec![(0, 256 << 20)],
            ..ring.clone()
        };
        let mut d = fx.driver(setup, 48, BIG as u32)?;
        ensure!(
            d.fe.inflight().is_some() == inflight,
            "inflight negotiation"
        );
        let mut heads: Vec<HashMap<u16, Option<Write>>> = vec![HashMap::new(); usize::from(QUEUES)];
        for q in 0..QUEUES {
            let old = d.fe.queue(q).avail_idx();
            for w in workload(attempt, q) {
                let op = match &w {
                    Some(w) => BlkOp::Write {
                        sector: w.sector,
                        data: pattern(w.seed, w.len),
                    },
                    None => BlkOp::Flush,
                };
                let h = d.submit(q, &op)?.expect("slot");
                heads[usize::from(q)].insert(h, w);
            }
            d.kick(q, old)?;
        }
        std::thread::sleep(Duration::from_micros(attempt * 397 % 3000));
        fx.crash_and_restart()?;
        // What completed before the crash.
        let mut done: Vec<Vec<u16>> = vec![Vec::new(); usize::from(QUEUES)];
        for q in 0..QUEUES {
            while let Some(c) = d.poll(q)? {
                ensure!(c.status == S_OK, "status {}", c.status);
                done[usize::from(q)].push(c.head);
            }
        }
        let owed: usize = (0..QUEUES).map(|q| d.in_flight(q)).sum();
        out.owed_total += owed;
        if owed > 0 && owed < heads.iter().map(HashMap::len).sum::<usize>() {
            out.owed_at_kill += 1;
        }
        d.fe.reconnect(fx.connect()?)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        for q in 0..QUEUES {
            while d.in_flight(q) > 0 && Instant::now() < deadline {
                match d.poll(q) {
                    Ok(Some(c)) => {
                        ensure!(c.status == S_OK, "status {}", c.status);
                        if done[usize::from(q)].contains(&c.head) {
                            out.duplicates += 1;
                        }
                        done[usize::from(q)].push(c.head);
                    }
                    // A completion for a head that is not in flight: completed twice.
                    Err(_) => out.duplicates += 1,
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            out.lost += d.in_flight(q);
        }
        let image = std::fs::File::open(&fx.image)?;
        for q in 0..QUEUES {
            for (head, w) in &heads[usize::from(q)] {
                let Some(w) = w else { continue };
                if !done[usize::from(q)].contains(head) {
                    continue;
                }
                let mut got = vec![0u8; w.len];
                image.read_exact_at(&mut got, w.sector * 512)?;
                if got != pattern(w.seed, w.len) {
                    out.corrupt += 1;
                }
            }
        }
    }
    Ok(out)
}

fn requests_in_flight_at_a_crash_complete_exactly_once_with_inflight_tracking(
    ring: &Setup,
) -> Result<()> {
    let o = run(ring, true, 12)?;
    eprintln!("with inflight tracking: {o:?}");
    ensure!(
        o.owed_at_kill >= 3,
        "too few crashes hit requests in flight to prove anything: {o:?}"
    );
    ensure!(o.duplicates == 0 && o.lost == 0 && o.corrupt == 0, "{o:?}");
    Ok(())
}

fn without_inflight_tracking_the_same_crashes_lose_or_repeat_requests(ring: &Setup) -> Result<()> {
    let o = run(ring, false, 12)?;
    eprintln!("without inflight tracking: {o:?}");
    ensure!(
        o.owed_at_kill >= 3,
        "too few crashes hit requests in flight: {o:?}"
    );
    ensure!(
        o.duplicates + o.lost + o.corrupt > 0,
        "negative control did not fail: {o:?}"
    );
    Ok(())
}

/// `wce` in the virtio-blk config space (struct virtio_blk_config).
const WCE_OFFSET: u32 = 32;

/// A guest that turned its write cache off expects every write durable before it completes; QEMU
/// does not send the config again after a backend restart, so the choice has to come back with
/// the state QEMU hands back (the inflight region).
fn write_cache_choice_survives_a_daemon_restart(ring: &Setup) -> Result<()> {
    let mut fx = BlkFixture::start(16 << 20, &[])?;
    let mut fe = bulkhead_tests::frontend::Frontend::start(fx.connect()?, ring.clone())?;
    assert!(fe.inflight().is_some(), "inflight tracking negotiated");
    assert_eq!(
        fe.conn.get_config(WCE_OFFSET, 1)?,
        Some(vec![1]),
        "write-back at first"
    );
    fe.conn.set_config(WCE_OFFSET, &[0])?;
    fx.crash_and_restart()?;
    fe.reconnect(fx.connect()?)?;
    assert_eq!(
        fe.conn.get_config(WCE_OFFSET, 1)?,
        Some(vec![0]),
        "write-through after the restart, as the guest asked"
    );
    // A new VM (a fresh inflight region) starts at the default again.
    drop(fe);
    let fe = bulkhead_tests::frontend::Frontend::start(fx.connect()?, ring.clone())?;
    let mut fe = fe;
    assert_eq!(fe.conn.get_config(WCE_OFFSET, 1)?, Some(vec![1]));
    Ok(())
}
