//! Completions published as they happen (pipelined), once per pass (batched) or as the adaptive
//! policy decides: whatever the policy, engine and CPU placement, every request completes exactly
//! once and the guest is interrupted only when it asked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Result;
use bulkhead_tests::bench::cpu::{pin, pin_process, unpin_self, Cpus};
use bulkhead_tests::bench::lean_blk::{Completions, LeanBlk};
use bulkhead_tests::fixture::BlkFixture;
use bulkhead_tests::frontend::blk::S_OK;
use bulkhead_tests::frontend::{BlkOp, Frontend, Setup};

const MIB: u64 = 1 << 20;
const POLICIES: [&str; 3] = ["adaptive", "pipelined", "batched"];
const ENGINES: [&str; 2] = ["sync", "io-uring"];
const DEPTH: u16 = 64;

fn cpus() -> usize {
    // SAFETY: sysconf has no side effects.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1)
}

#[test]
fn every_request_completes_exactly_once_under_each_completion_policy() -> Result<()> {
    for policy in POLICIES {
        for engine in ENGINES {
            for (event_idx, placement) in [
                (true, Cpus::One),
                (true, Cpus::TwoPinned),
                (false, Cpus::TwoPinned),
            ] {
                let fx =
                    BlkFixture::start(16 * MIB, &["--io-engine", engine, "--completions", policy])?;
                let fe = Frontend::start(
                    fx.connect()?,
                    Setup {
                        queue_size: 256,
                        event_idx,
                        ram_layout: vec![(0, 64 * MIB)],
                        ..Setup::default()
                    },
                )?;
                placement.place_driver(cpus())?;
                placement.place_device_process(fx.daemon.pid())?;
                // The driver fails the run on a completion of a request not in flight (a double
                // completion or a made-up id) or a bad status, and ends only when every request
                // came back (none lost).
                let mut d = LeanBlk::new(fe, DEPTH, 4096, 16 * MIB, false)?;
                let s = d.run(Duration::from_millis(200), Completions::Interrupt);
                unpin_self(cpus())?;
                let s = s.map_err(|e| {
                    e.context(format!(
                        "{policy} {engine} event_idx={event_idx} {placement:?}"
                    ))
                })?;
                assert!(
                    s.ops > 1000,
                    "{policy} {engine} event_idx={event_idx} {placement:?}: only {} requests",
                    s.ops
                );
            }
        }
    }
    Ok(())
}

/// Submits `n` reads at once, then polls (never sleeps) until all are back; returns the
/// interrupts the device sent, counted after the queue stopped (so none is still on its way).
fn interrupts_for_a_batch(d: &mut bulkhead_tests::frontend::BlkDriver, n: u16) -> Result<u64> {
    let old = d.fe.queue(0).avail_idx();
    for i in 0..n {
        d.submit(
            0,
            &BlkOp::Read {
                sector: u64::from(i) * 8,
                len: 4096,
            },
        )?
        .expect("slot");
    }
    d.kick(0, old)?;
    let mut done = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while done < n {
        if let Some(c) = d.poll(0)? {
            assert_eq!(c.status, S_OK);
            done += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "requests did not complete"
        );
    }
    d.fe.stop_queue(0)?;
    Ok(d.fe.queue(0).call.read().unwrap_or(0))
}

#[test]
fn pipelined_completions_interrupt_only_when_the_driver_asks() -> Result<()> {
    for engine in ENGINES {
        // One CPU: the device takes the whole batch in one pass and publishes each completion.
        pin(bulkhead_tests::bench::cpu::gettid(), 0)?;
        let fx = BlkFixture::start(
            16 * MIB,
            &["--io-engine", engine, "--completions", "pipelined"],
        )?;
        pin_process(fx.daemon.pid(), 0)?;
        // EVENT_IDX: the interrupt is wanted only once the used index passes 63 (the last of 64).
        let mut d = fx.driver(
            Setup {
                queue_size: 256,
                ..Setup::default()
            },
            64,
            4096,
        )?;
        let mem = d.fe.ram.mem().clone();
        d.fe.queue(0).set_used_event(&mem, 63)?;
        assert_eq!(
            interrupts_for_a_batch(&mut d, 64)?,
            1,
            "{engine}: EVENT_IDX"
        );
        drop(d);
        // Without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT: none at all.
        let mut d = fx.driver(
            Setup {
                queue_size: 256,
                event_idx: false,
                ..Setup::default()
            },
            64,
            4096,
        )?;
        let mem = d.fe.ram.mem().clone();
        d.fe.queue(0).suppress_interrupts(&mem)?;
        assert_eq!(
            interrupts_for_a_batch(&mut d, 64)?,
            0,
            "{engine}: NO_INTERRUPT"
        );
        unpin_self(cpus())?;
    }
    Ok(())
}
