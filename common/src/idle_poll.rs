//! How long a queue's worker busy-polls its ring after the ring runs dry, before it sleeps.
//!
//! Across CPUs a sleeping worker costs the guest a kick and itself a wake-up, 25–140 µs on
//! these machines: more than a fast device spends on a whole batch. A driver and a device that
//! both sleep between batches then alternate instead of overlapping, a round of requests per
//! two wake-ups (null device, QD32, two pinned CPUs: 0.64–0.69 M ops/s sleeping at once,
//! 3.9 M with a fixed 30 µs window, at less device CPU per request). But a window that is too
//! short buys nothing, and one that is too long burns a CPU while no work comes. So by default
//! the window adapts as QEMU's AioContext polling does (`poll-max-ns`): when a sleep ends, the
//! worker looks at how long the queue was idle; if polling that long would have caught the
//! work, the window grows (doubling from [`START`], up to the maximum); if the idle time was
//! beyond the maximum, the window halves, down to nothing.
//!
//! The poll loop yields the CPU at every turn (`sched_yield`). When a yield hands the CPU to
//! another thread (a driver on our CPU, or anything else that wants it), the CPU is contended:
//! polling only takes time from whoever needs it, so the worker sleeps at once and does not
//! poll again for [`CONTENDED_IDLES`] idle periods, then tries again (placements change).

use std::time::Duration;

/// The first window adaptive polling tries.
pub const START: Duration = Duration::from_micros(4);

/// The adaptive maximum by default: above a cross-CPU wake-up and the driver's refill on these
/// machines (25–60 µs), below what a trickle of requests would keep the CPU busy for.
pub const DEFAULT_MAX: Duration = Duration::from_micros(64);

/// Idle periods without polling after a poll found the CPU contended.
pub const CONTENDED_IDLES: u32 = 256;

/// How a queue polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollPolicy {
    /// Sleep as soon as the ring is empty.
    Off,
    /// Always poll this long (`--poll-us`).
    Fixed(Duration),
    /// Poll for a window that adapts, up to this long (`--poll-max-us`).
    Adaptive(Duration),
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy::Adaptive(DEFAULT_MAX)
    }
}

/// One queue's polling window.
#[derive(Debug, Clone, Copy)]
pub struct IdlePoll {
    policy: PollPolicy,
    window: Duration,
    /// Idle periods left without polling after contention (adaptive only).
    backoff: u32,
}

impl IdlePoll {
    pub fn new(policy: PollPolicy) -> Self {
        let window = match policy {
            PollPolicy::Fixed(w) => w,
            PollPolicy::Off | PollPolicy::Adaptive(_) => Duration::ZERO,
        };
        Self {
            policy,
            window,
            backoff: 0,
        }
    }

    /// How long to poll before sleeping now.
    pub fn window(&self) -> Duration {
        if self.backoff > 0 {
            Duration::ZERO
        } else {
            self.window
        }
    }

    /// A poll gave the CPU to another thread: stop polling for a while (adaptive only; a fixed
    /// window is what the operator asked for).
    pub fn contended(&mut self) {
        if let PollPolicy::Adaptive(_) = self.policy {
            self.backoff = CONTENDED_IDLES;
            self.window = Duration::ZERO;
        }
    }

    /// A sleep ended with work (or an event) after the queue was idle for `idle`, polling
    /// included.
    pub fn idle_ended(&mut self, idle: Duration) {
        let PollPolicy::Adaptive(max) = self.policy else {
            return;
        };
        if self.backoff > 0 {
            self.backoff -= 1;
            return;
        }
        if idle <= self.window {
            // Polling a little longer would have done; the window is about right.
        } else if idle > max {
            // Nothing came within the longest window: polling only burnt the CPU.
            self.window /= 2;
            if self.window < START {
                self.window = Duration::ZERO;
            }
        } else {
            // Work came after the window but within reach: poll longer next time.
            self.window = self.window.saturating_mul(2).max(START).min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(64);

    #[test]
    fn work_arriving_soon_after_each_sleep_grows_the_window_to_cover_it_and_no_further() {
        let mut p = IdlePoll::new(PollPolicy::Adaptive(MAX));
        assert_eq!(p.window(), Duration::ZERO);
        let driver_refill = Duration::from_micros(30);
        let mut sleeps = 0;
        // The worker sleeps only while its window is shorter than the driver's refill.
        while p.window() < driver_refill {
            p.idle_ended(driver_refill);
            sleeps += 1;
            assert!(sleeps < 10, "the window never reached {driver_refill:?}");
        }
        assert!(p.window() <= MAX);
        assert_eq!(p.window(), Duration::from_micros(32));
        // Caught by polling from now on: the window stays.
        p.idle_ended(Duration::from_micros(5));
        assert_eq!(p.window(), Duration::from_micros(32));
    }

    #[test]
    fn long_idle_periods_shrink_the_window_to_nothing() {
        let mut p = IdlePoll::new(PollPolicy::Adaptive(MAX));
        for _ in 0..8 {
            p.idle_ended(Duration::from_micros(50));
        }
        assert_eq!(p.window(), MAX, "the window never exceeds the maximum");
        let mut sleeps = 0;
        while p.window() > Duration::ZERO {
            p.idle_ended(Duration::from_millis(10));
            sleeps += 1;
        }
        assert!(
            sleeps <= 5,
            "an idle queue kept polling for {sleeps} sleeps"
        );
    }

    #[test]
    fn a_contended_cpu_stops_polling_for_a_while_then_it_adapts_again() {
        let mut p = IdlePoll::new(PollPolicy::Adaptive(MAX));
        for _ in 0..4 {
            p.idle_ended(Duration::from_micros(20));
        }
        assert!(p.window() > Duration::ZERO);
        p.contended();
        for _ in 0..CONTENDED_IDLES {
            assert_eq!(p.window(), Duration::ZERO);
            p.idle_ended(Duration::from_micros(20));
        }
        p.idle_ended(Duration::from_micros(20));
        assert_eq!(p.window(), START, "adapting again from the start");
    }

    #[test]
    fn fixed_and_off_never_adapt() {
        let fixed = Duration::from_micros(50);
        let mut p = IdlePoll::new(PollPolicy::Fixed(fixed));
        let mut off = IdlePoll::new(PollPolicy::Off);
        for idle in [1, 30, 10_000] {
            p.idle_ended(Duration::from_micros(idle));
            off.idle_ended(Duration::from_micros(idle));
        }
        p.contended();
        assert_eq!(p.window(), fixed);
        assert_eq!(off.window(), Duration::ZERO);
    }
}
