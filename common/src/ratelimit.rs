//! Rate limiting for log lines a guest or frontend can trigger at will.
//!
//! Each call site gets its own budget ([`guest_warn!`](crate::guest_warn) declares a static
//! [`RateLimit`]); past the budget lines are counted, and the next line that gets through reports
//! how many were suppressed. Lock-free so it is safe on the data path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines allowed per window and call site.
const BURST: u64 = 10;
/// Window length.
const WINDOW_MS: u64 = 5_000;

#[derive(Debug)]
pub struct RateLimit {
    window_start_ms: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    pub const fn new() -> Self {
        Self {
            window_start_ms: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` if a line may be logged now.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    // Offset by one window so that the first check always opens a fresh window.
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(WINDOW_MS)
}

/// Logs a warning that a guest or frontend can trigger, at most a few times per window.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            // The one sanctioned way to warn on behalf of a guest (warn! itself is disallowed).
            ::tracing::event!(::tracing::Level::WARN, suppressed, $($arg)+);
        }
    }};
}

/// Like [`guest_warn!`], at info level: for events a guest may cause at will that are worth
/// telling (the blk write-cache mode), rate-limited the same way.
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            ::tracing::event!(::tracing::Level::INFO, suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_passes_then_lines_are_suppressed_and_counted() {
        let r = RateLimit::new();
        let t = 10_000;
        for _ in 0..BURST {
            assert_eq!(r.check_at(t), Some(0));
        }
        assert_eq!(r.check_at(t + 1), None);
        assert_eq!(r.check_at(t + 2), None);
        assert_eq!(r.check_at(t + WINDOW_MS), Some(2));
    }
}
