//! Per-queue block statistics: requests by type, bytes, errors by status and a latency
//! histogram. Each queue's worker is the only writer of its [`BlkQueueStats`] (see
//! `bulkhead_common::control::counters`); the control thread reads them.
//!
//! Latency is measured inside the daemon, from the pass that took a request off the ring to the
//! moment its completion was seen, with one clock read per pass, per io_uring reap and per
//! synchronous file request (never per null request), so counting stays off the critical path.

use bulkhead_common::control::counters::{Counter, LatencyHistogram};
use bulkhead_common::control::metrics::{Family, Kind, Metrics};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

use crate::request::Op;

/// A request's type as counted. `Invalid` is a chain or header that failed validation;
/// `Unsupported` a type the device does not implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported,
    Invalid,
}

impl OpKind {
    pub const ALL: [OpKind; 8] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::GetId,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::Unsupported,
        OpKind::Invalid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::GetId => "get_id",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::Unsupported => "unsupported",
            OpKind::Invalid => "invalid",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a request in flight carries for its statistics.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    pub op: OpKind,
    /// Disk bytes it moves (reads and writes; 0 otherwise).
    pub bytes: u64,
    /// When it was taken, in nanoseconds of the queue's [`Clock`].
    pub started: u64,
}

/// A queue's clock: nanoseconds since the queue started, read only where `crate::stats` says
/// (integers, so that a latency is a subtraction).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: std::time::Instant,
    /// The time as last read.
    pub now: u64,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            now: 0,
        }
    }

    #[inline]
    pub fn read(&mut self) {
        self.now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Tally {
    pub fn of(op: &Op, started: u64) -> Self {
        let (op, bytes) = match op {
            Op::Read { len, .. } => (OpKind::Read, *len),
            Op::Write { len, .. } => (OpKind::Write, *len),
            Op::Flush => (OpKind::Flush, 0),
            Op::GetId { .. } => (OpKind::GetId, 0),
            Op::Discard(_) => (OpKind::Discard, 0),
            Op::WriteZeroes(_) => (OpKind::WriteZeroes, 0),
        };
        Self { op, bytes, started }
    }

    pub fn refused(op: OpKind, started: u64) -> Self {
        Self {
            op,
            bytes: 0,
            started,
        }
    }
}

/// Completion statuses counted as errors.
const ERROR_STATUSES: [(&str, Option<u8>); 3] = [
    ("ioerr", Some(VIRTIO_BLK_S_IOERR as u8)),
    ("unsupp", Some(VIRTIO_BLK_S_UNSUPP as u8)),
    // A chain with nowhere to put a status (completed with nothing written).
    ("none", None),
];

#[derive(Debug, Default)]
#[repr(align(128))]
pub struct BlkQueueStats {
    requests: [Counter; OpKind::ALL.len()],
    bytes_read: Counter,
    bytes_written: Counter,
    errors: [Counter; ERROR_STATUSES.len()],
    latency: LatencyHistogram,
}

impl BlkQueueStats {
    /// Counts a completed request that ended with `status` (`None`: none could be written).
    #[inline]
    pub fn completed(&self, t: &Tally, status: Option<u8>, now: u64) {
        if let Some(c) = self.requests.get(t.op.index()) {
            c.inc();
        }
        if status == Some(VIRTIO_BLK_S_OK as u8) {
            match t.op {
                OpKind::Read => self.bytes_read.add(t.bytes),
                OpKind::Write => self.bytes_written.add(t.bytes),
                _ => {}
            }
        } else if let Some(i) = ERROR_STATUSES.iter().position(|(_, s)| *s == status) {
            if let Some(c) = self.errors.get(i) {
                c.inc();
            }
        }
        self.latency.record(now.saturating_sub(t.started));
    }

    fn total(&self) -> u64 {
        self.requests.iter().map(Counter::get).sum()
    }
}

/// Adds every queue that has served a request (and always queue 0) to `out`.
pub fn metrics(queues: &[std::sync::Arc<BlkQueueStats>], out: &mut Metrics) {
    let shown: Vec<(String, &BlkQueueStats)> = queues
        .iter()
        .enumerate()
        .filter(|(i, q)| *i == 0 || q.total() > 0)
        .map(|(i, q)| (i.to_string(), q.as_ref()))
        .collect();
    let mut requests = Family::new(
        "bulkhead_blk_requests_total",
        "Requests completed, by queue and type.",
        Kind::Counter,
    );
    let mut bytes = Family::new(
        "bulkhead_blk_bytes_total",
        "Disk bytes moved by successful requests, by queue and direction.",
        Kind::Counter,
    );
    let mut errors = Family::new(
        "bulkhead_blk_errors_total",
        "Requests completed with an error status, by queue and status.",
        Kind::Counter,
    );
    let mut latency = Family::new(
        "bulkhead_blk_request_duration_seconds",
        "Time from the pass that took a request to its completion, by queue.",
        Kind::Histogram,
    );
    for (q, s) in &shown {
        for (kind, c) in OpKind::ALL.iter().zip(&s.requests) {
            requests.number(
                vec![("queue", q.clone()), ("type", kind.name().into())],
                c.get(),
            );
        }
        bytes.number(
            vec![("queue", q.clone()), ("direction", "read".into())],
            s.bytes_read.get(),
        );
        bytes.number(
            vec![("queue", q.clone()), ("direction", "written".into())],
            s.bytes_written.get(),
        );
        for ((name, _), c) in ERROR_STATUSES.iter().zip(&s.errors) {
            errors.number(
                vec![("queue", q.clone()), ("status", (*name).into())],
                c.get(),
            );
        }
        latency.histogram(vec![("queue", q.clone())], &s.latency.snapshot());
    }
    out.push(requests);
    out.push(bytes);
    out.push(errors);
    out.push(latency);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successful_reads_count_bytes_and_failures_count_by_status() {
        let s = BlkQueueStats::default();
        let t0 = 1_000;
        let read = Tally::of(
            &Op::Read {
                offset: 0,
                len: 4096,
            },
            t0,
        );
        s.completed(&read, Some(VIRTIO_BLK_S_OK as u8), t0);
        s.completed(&read, Some(VIRTIO_BLK_S_IOERR as u8), t0);
        s.completed(&Tally::refused(OpKind::Invalid, t0), None, t0);
        assert_eq!(s.requests[OpKind::Read.index()].get(), 2);
        assert_eq!(s.requests[OpKind::Invalid.index()].get(), 1);
        assert_eq!(s.bytes_read.get(), 4096);
        assert_eq!(s.errors[0].get(), 1);
        assert_eq!(s.errors[2].get(), 1);
        assert_eq!(s.latency.snapshot().count, 3);
    }
}
