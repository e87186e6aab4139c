//! Dirty-page logging against the real daemons: while LOG_ALL is on, every page the daemon
//! writes (data read into guest buffers, status bytes, received frames, the used ring) is marked
//! in the log the frontend shared, pages it only reads are not, and nothing is marked once
//! logging is off. A daemon started with the test-only `--test-break-dirty-log` marks its rings
//! but none of the buffers it fills: the negative control that shows these checks can fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::fixture::{pattern, BlkFixture, NetFixture};
use bulkhead_tests::frontend::device::DirtyLogShm;
use bulkhead_tests::frontend::net::ethernet;
use bulkhead_tests::frontend::{BlkOp, Setup};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn pages(addr: u64, len: u32) -> impl Iterator<Item = u64> {
    let first = addr / PAGE;
    let last = (addr + u64::from(len).max(1) - 1) / PAGE;
    (first..=last).map(|p| p * PAGE)
}

/// Ample time for a worker to end the pass it is in (and its busy-polling window, at most 64 µs).
const PASS_END: Duration = Duration::from_millis(100);

/// One read and one write through `fx`, with logging on; returns what should and should not
/// be marked, and the log.
fn blk_round(ring: &Setup, extra: &[&str]) -> Result<(DirtyLogShm, Vec<u64>, Vec<u64>)> {
    let fx = BlkFixture::start(16 * MIB, extra)?;
    let mut d = fx.driver(ring.clone(), 8, 64 * 1024)?;
    d.write(0, 64, &pattern(3, 64 * 1024))?;
    // No pause: a worker takes up logging at its next completion, even one still in the pass
    // that completed the write.
    let log = d.fe.start_dirty_log()?;
    let mut must = Vec::new();
    let mut must_not = Vec::new();
    for op in [
        BlkOp::Read {
            sector: 64,
            len: 64 * 1024,
        },
        BlkOp::Write {
            sector: 256,
            data: pattern(4, 8192),
        },
    ] {
        let old = d.fe.queue(0).avail_idx();
        d.submit(0, &op)?.context("slot")?;
        let bufs = d.last_bufs.clone();
        d.kick(0, old)?;
        let c = d.wait(0)?;
        ensure!(c.status == 0, "{op:?} failed");
        for b in bufs {
            if b.writable {
                must.extend(pages(b.addr.0, b.len));
            } else if matches!(op, BlkOp::Write { .. }) && b.len > 16 {
                // The data of a write: read by the device, never written.
                must_not.extend(pages(b.addr.0, b.len));
            }
        }
    }
    // Where completions are written: the used ring, or a packed ring's descriptor ring.
    let layout = d.fe.queue(0).layout;
    let used = if ring.packed {
        layout.desc.0
    } else {
        layout.used.0
    };
    must.push(used - used % PAGE);
    must_not.retain(|p| !must.contains(p));
    Ok((log, must, must_not))
}

bulkhead_tests::on_both_layouts!(
    blk_writes_into_guest_memory_and_the_used_ring_are_logged_and_reads_of_it_are_not,
    a_daemon_that_skips_the_log_fails_the_same_checks,
);

fn blk_writes_into_guest_memory_and_the_used_ring_are_logged_and_reads_of_it_are_not(
    ring: &Setup,
) -> Result<()> {
    let (log, must, must_not) = blk_round(ring, &[])?;
    for p in &must {
        ensure!(log.is_dirty(*p), "page {p:#x} was written but not logged");
    }
    for p in &must_not {
        ensure!(!log.is_dirty(*p), "page {p:#x} was only read but is logged");
    }
    Ok(())
}

fn a_daemon_that_skips_the_log_fails_the_same_checks(ring: &Setup) -> Result<()> {
    let (log, mut must, _) = blk_round(ring, &["--test-break-dirty-log"])?;
    // The used ring's page, pushed last: still logged, so a guest migrated from a broken daemon
    // sees consistent rings and stale data.
    let used = must.pop().context("no used ring page")?;
    ensure!(
        log.is_dirty(used),
        "the broken daemon stopped logging its used ring"
    );
    let missing = must.iter().filter(|p| !log.is_dirty(**p)).count();
    ensure!(
        missing == must.len(),
        "the broken daemon logged {} of {} buffer pages",
        must.len() - missing,
        must.len()
    );
    Ok(())
}

#[test]
fn nothing_is_logged_once_logging_stops_and_a_replaced_log_takes_over() -> Result<()> {
    let fx = BlkFixture::start(16 * MIB, &[])?;
    let mut d = fx.driver(Setup::default(), 8, 64 * 1024)?;
    let first = d.fe.start_dirty_log()?;
    d.read(0, 0, 4096)?;
    ensure!(!first.dirty_pages().is_empty(), "nothing logged");
    // A second log replaces the first while the queue runs.
    let ram =
        d.fe.ram
            .regions()
            .iter()
            .map(|r| r.guest_addr + r.size)
            .max()
            .unwrap();
    let second = DirtyLogShm::new(ram)?;
    d.fe.set_log_base(&second)?;
    // The worker takes the new log up at its next completion, but the pass that completed the
    // last read may still write its used ring's event index into the old one after the driver
    // saw the completion: let that pass end before the old log is checked for silence.
    std::thread::sleep(PASS_END);
    first.clear();
    d.read(0, 8, 4096)?;
    ensure!(!second.dirty_pages().is_empty(), "the new log got nothing");
    ensure!(
        first.dirty_pages().is_empty(),
        "the old log still got marks"
    );
    d.fe.stop_dirty_log()?;
    second.clear();
    d.read(0, 16, 4096)?;
    ensure!(second.dirty_pages().is_empty(), "logged with LOG_ALL off");
    Ok(())
}

#[test]
fn net_received_frames_and_the_used_ring_are_logged() -> Result<()> {
    let fx = NetFixture::start(&[])?;
    fx.ns.ip(&["link", "set", "tap0", "up"])?;
    let sock = fx.packet_socket(false)?;
    let setup = Setup {
        queues: 2,
        queue_size: 256,
        device_features: 1 << 15 | 1 << 32,
        ram_layout: vec![(0, 64 * MIB)],
        queue_num_is_pairs: true,
        inflight: false,
        ..Setup::default()
    };
    let mut d = fx.driver(setup, 4096, 32, 8)?;
    let log = d.fe.start_dirty_log()?;
    d.post_rx(0, 32)?;
    let frame = ethernet([0x52, 0x54, 0, 0xdd, 0, 1], 0x88b5, &pattern(9, 1400));
    // Frames the kernel sends into the TAP may come first: wait for ours.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        sock.send(&frame)?;
        let got = d.recv(0, Duration::from_secs(5))?.context("no frame")?;
        if got.data == frame {
            break;
        }
        ensure!(Instant::now() < deadline, "our frame never arrived");
    }
    let rx_used = d.fe.queue(0).layout.used.0;
    ensure!(log.is_dirty(rx_used), "receive used ring not logged");
    // The buffers the frame landed in: every posted receive buffer that is now free was used.
    let marked = log.dirty_pages();
    ensure!(
        marked.len() >= 2,
        "a frame (header and num_buffers included) and the used ring marked only {marked:?}"
    );
    Ok(())
}
