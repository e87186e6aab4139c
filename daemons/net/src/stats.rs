//! Per-queue counters: SIGUSR1 logs them (one line per queue) and the control socket's `stats`
//! reports them. Each queue's worker is their only writer (see
//! `bulkhead_common::control::counters`), and each queue's counters have their own cache line.

use bulkhead_common::control::counters::Counter;
use bulkhead_common::control::metrics::{Family, Kind, Metrics};

#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueStats {
    pub packets: Counter,
    pub bytes: Counter,
    /// Frames lost for lack of resources (TAP full, guest buffers too small).
    pub drops: Counter,
    /// Malformed chains and failed TAP I/O.
    pub errors: Counter,
}

impl QueueStats {
    pub fn packet(&self, bytes: usize) {
        self.packets.inc();
        self.bytes.add(bytes as u64);
    }

    pub fn drop_one(&self) {
        self.drops.inc();
    }

    pub fn error(&self) {
        self.errors.inc();
    }

    /// (packets, bytes, drops, errors)
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.packets.get(),
            self.bytes.get(),
            self.drops.get(),
            self.errors.get(),
        )
    }
}

/// Queue 2n receives and 2n+1 transmits for pair n.
fn direction(queue: usize) -> &'static str {
    if queue.is_multiple_of(2) {
        "rx"
    } else {
        "tx"
    }
}

/// A metric family: name, help, and how to read it off a queue's counters.
type CounterFamily = (&'static str, &'static str, fn(&QueueStats) -> u64);

/// Adds every queue's counters to `out`, labelled by queue, pair and direction.
pub fn metrics(queues: &[std::sync::Arc<QueueStats>], out: &mut Metrics) {
    let families: [CounterFamily; 4] = [
        (
            "bulkhead_net_frames_total",
            "Frames moved between the guest and the TAP, by queue.",
            |s| s.packets.get(),
        ),
        (
            "bulkhead_net_bytes_total",
            "Frame bytes moved (without the virtio-net header), by queue.",
            |s| s.bytes.get(),
        ),
        (
            "bulkhead_net_drops_total",
            "Frames lost for lack of room (TAP full, guest buffers too small), by queue.",
            |s| s.drops.get(),
        ),
        (
            "bulkhead_net_errors_total",
            "Malformed chains and failed TAP I/O, by queue.",
            |s| s.errors.get(),
        ),
    ];
    for (name, help, read) in families {
        let mut f = Family::new(name, help, Kind::Counter);
        for (i, s) in queues.iter().enumerate() {
            f.number(
                vec![
                    ("queue", i.to_string()),
                    ("pair", (i / 2).to_string()),
                    ("direction", direction(i).into()),
                ],
                read(s),
            );
        }
        out.push(f);
    }
}
