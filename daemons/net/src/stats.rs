//! Per-queue counters, readable without a debugger: SIGUSR1 logs them (one line per queue).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct QueueStats {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Frames lost for lack of resources (TAP full, guest buffers too small).
    pub drops: AtomicU64,
    /// Malformed chains and failed TAP I/O.
    pub errors: AtomicU64,
}

impl QueueStats {
    pub fn packet(&self, bytes: usize) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn drop_one(&self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// (packets, bytes, drops, errors)
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.drops.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}
