//! Closed-loop load on a block device through the synthetic frontend: keep `depth` requests in
//! flight on one queue, complete them as a guest would (sleeping on the interrupt eventfd), and
//! record per-request latency. Used by `blk-load` and the harness.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::frontend::{BlkDriver, BlkOp};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub ops: u64,
    pub elapsed: Duration,
    /// Per-request latencies in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
}

impl LoadResult {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency percentile (0..=100) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        let idx = ((p / 100.0) * (self.latencies_ns.len() - 1) as f64).round() as usize;
        self.latencies_ns[idx.min(self.latencies_ns.len() - 1)] as f64 / 1000.0
    }
}

/// Random 4 KiB-aligned reads (or writes) of `block` bytes over the first `span` bytes.
pub fn run_blk(
    d: &mut BlkDriver,
    q: u16,
    depth: u32,
    block: u32,
    span: u64,
    write: bool,
    duration: Duration,
) -> Result<LoadResult> {
    let blocks = (span / u64::from(block)).max(1);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_op = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let sector = (rng % blocks) * u64::from(block) / 512;
        if write {
            BlkOp::Write {
                sector,
                data: vec![0x42; block as usize],
            }
        } else {
            BlkOp::Read { sector, len: block }
        }
    };
    let mut started = std::collections::HashMap::new();
    let mut lat = Vec::new();
    let begin = Instant::now();
    let end = begin + duration;
    let mut ops = 0u64;
    loop {
        let now = Instant::now();
        let old = d.fe.queue(q).avail_idx();
        let mut added = false;
        while now < end && d.in_flight(q) < depth as usize {
            let head = d.submit(q, &next_op())?.context("no free slot")?;
            started.insert(head, Instant::now());
            added = true;
        }
        if added {
            d.kick(q, old)?;
        }
        if d.in_flight(q) == 0 {
            break;
        }
        let c = d.wait(q)?;
        anyhow::ensure!(c.status == 0, "request failed with status {}", c.status);
        if let Some(t) = started.remove(&c.head) {
            lat.push(t.elapsed().as_nanos() as u64);
        }
        ops += 1;
        while let Some(c) = d.poll(q)? {
            anyhow::ensure!(c.status == 0, "request failed with status {}", c.status);
            if let Some(t) = started.remove(&c.head) {
                lat.push(t.elapsed().as_nanos() as u64);
            }
            ops += 1;
        }
    }
    let elapsed = begin.elapsed();
    lat.sort_unstable();
    Ok(LoadResult {
        ops,
        elapsed,
        latencies_ns: lat,
    })
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t; CPU_SET ignores CPUs beyond its size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: passes a valid set of the advertised size for the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}
