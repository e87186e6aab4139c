//! Latency histogram with log-linear buckets (16 per power of two, so any value is within ~4.5%
//! of its bucket's bounds): recording is one array increment, so a driver at millions of
//! requests per second can time every request without storing each sample.

const SUB_BUCKETS: u32 = 16;
/// Values up to 2^40 ns (18 minutes) have their own bucket; larger ones land in the last.
const OCTAVES: u32 = 40;

#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; (OCTAVES * SUB_BUCKETS) as usize],
            total: 0,
        }
    }

    fn bucket(ns: u64) -> usize {
        if ns < u64::from(SUB_BUCKETS) {
            return ns as usize;
        }
        let octave = 63 - ns.leading_zeros(); // >= 4
        let sub = (ns >> (octave - 4)) & u64::from(SUB_BUCKETS - 1);
        let b = (octave - 3) * SUB_BUCKETS + sub as u32;
        (b as usize).min((OCTAVES * SUB_BUCKETS) as usize - 1)
    }

    /// Lowest value that lands in bucket `b`.
    fn lower_bound(b: usize) -> u64 {
        let b = b as u64;
        let s = u64::from(SUB_BUCKETS);
        if b < s {
            return b;
        }
        let octave = b / s + 3;
        let sub = b % s;
        (1 << octave) | (sub << (octave - 4))
    }

    /// Records `n` requests of latency `ns`.
    #[inline]
    pub fn record_n(&mut self, ns: u64, n: u64) {
        let b = Self::bucket(ns);
        if let Some(c) = self.counts.get_mut(b) {
            *c += n;
        }
        self.total += n;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.total = 0;
    }

    /// Percentile `p` (0..=100) in microseconds: the midpoint of the bucket holding that rank.
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * (self.total - 1) as f64).round() as u64;
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                let lo = Self::lower_bound(b) as f64;
                let hi = Self::lower_bound(b + 1) as f64;
                return (lo + hi) / 2.0 / 1000.0;
            }
        }
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_whose_bounds_hold_it() {
        for ns in (0..100_000u64).chain([1 << 20, (1 << 33) + 12345, u64::MAX / 2]) {
            let b = Histogram::bucket(ns);
            if b + 1 < (OCTAVES * SUB_BUCKETS) as usize {
                assert!(Histogram::lower_bound(b) <= ns, "{ns} below bucket {b}");
                assert!(ns < Histogram::lower_bound(b + 1), "{ns} above bucket {b}");
            }
        }
    }

    #[test]
    fn percentiles_are_within_the_bucket_precision() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record_n(us * 1000, 1);
        }
        let p50 = h.percentile_us(50.0);
        let p99 = h.percentile_us(99.0);
        assert!((p50 - 500.0).abs() / 500.0 < 0.05, "p50 {p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.05, "p99 {p99}");
        assert_eq!(h.count(), 1000);
    }
}
