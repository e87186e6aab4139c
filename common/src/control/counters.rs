//! Counters the data path writes and the control thread reads.
//!
//! Each queue owns its counters (one writer: the queue's worker; a restarted queue's worker
//! starts only after the old one was joined), so an update is a plain load and store, no locked
//! instruction, and the structures holding them are aligned so that no two queues write the
//! same cache line.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonic counter with a single writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning queue's thread may call this (see the module comment).
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed).wrapping_add(n);
        self.0.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in microseconds (the last bucket, +Inf, is implicit).
/// From an in-memory request (~10 µs) to a stalled disk (1 s).
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// A latency histogram with fixed buckets and a single writer.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last one counts everything above the largest bound.
    buckets: [Counter; LATENCY_BOUNDS_US.len() + 1],
    sum_ns: Counter,
}

/// A histogram as read: cumulative counts per bound, as Prometheus wants them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(bound in µs, requests at or below it)`, for every bound.
    pub cumulative: Vec<(u64, u64)>,
    pub count: u64,
    pub sum_ns: u64,
}

/// The bounds in nanoseconds, so that recording needs no division.
const LATENCY_BOUNDS_NS: [u64; LATENCY_BOUNDS_US.len()] = {
    let mut ns = [0u64; LATENCY_BOUNDS_US.len()];
    let mut i = 0;
    while i < ns.len() {
        ns[i] = LATENCY_BOUNDS_US[i] * 1_000;
        i += 1;
    }
    ns
};

impl LatencyHistogram {
    #[inline]
    pub fn record(&self, nanos: u64) {
        // Most requests of a fast device land in the first bucket: one compare for them.
        let i = if nanos <= LATENCY_BOUNDS_NS[0] {
            0
        } else {
            LATENCY_BOUNDS_NS.partition_point(|b| *b < nanos)
        };
        if let Some(b) = self.buckets.get(i) {
            b.inc();
        }
        self.sum_ns.add(nanos);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0u64;
        let cumulative = LATENCY_BOUNDS_US
            .iter()
            .zip(&self.buckets)
            .map(|(bound, c)| {
                running = running.saturating_add(c.get());
                (*bound, running)
            })
            .collect();
        let inf = self.buckets.last().map_or(0, Counter::get);
        HistogramSnapshot {
            cumulative,
            count: running.saturating_add(inf),
            sum_ns: self.sum_ns.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        let h = LatencyHistogram::default();
        h.record(5_000); // 5 µs
        h.record(10_000); // exactly 10 µs: the first bucket
        h.record(11_000);
        h.record(2_000_000_000); // 2 s: only +Inf
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], (10, 2));
        assert_eq!(s.cumulative[1], (25, 3));
        assert_eq!(s.cumulative.last(), Some(&(1_000_000, 3)));
        assert_eq!(s.count, 4);
        assert_eq!(s.sum_ns, 2_000_026_000);
    }

    #[test]
    fn counter_adds() {
        let c = Counter::default();
        c.add(3);
        c.inc();
        assert_eq!(c.get(), 4);
    }
}
