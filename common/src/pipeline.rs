//! When completions become visible to the driver: as they happen (pipelined) or once a pass ends
//! (batched), and how the engine chooses between the two.
//!
//! With the driver on another CPU, publishing each completion and interrupting as soon as the
//! driver asks (EVENT_IDX's `used_event`) lets it reap and refill while the device works on the
//! rest of the pass: both CPUs stay busy and neither sleeps, so no cross-CPU wake-up (25–140 µs
//! on these machines) sits on the critical path. On one CPU the same early interrupt wakes the
//! driver onto our CPU, which preempts us: it reaps one request, refills one, sleeps, and we
//! pay two context switches per request instead of one per pass.
//!
//! The engine cannot see where the driver runs, but it can see the symptom: an interrupt that
//! cost the worker its CPU (an involuntary context switch across the eventfd write). Signals are
//! sampled for that; once seen, the queue batches for [`BATCH_PASSES`] passes, then probes again,
//! so a placement change (the scheduler moving a vCPU) is followed within milliseconds.

use crate::notify::Signal;

/// Passes to stay batched after an interrupt preempted the worker.
const BATCH_PASSES: u32 = 256;
/// Pipelined interrupts between two preemption probes (the first after a switch is probed).
const PROBE_EVERY: u32 = 16;

/// The policy asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Completions {
    #[default]
    Adaptive,
    Pipelined,
    Batched,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Publish every completion and interrupt as soon as the driver asks.
    Pipelined,
    /// Publish and interrupt once per pass.
    Batched,
}

/// The publishing policy of one queue (lives as long as its worker).
#[derive(Debug)]
pub struct Pipeline {
    mode: Mode,
    /// Pipelined signals left until the next probe.
    until_probe: u32,
    /// Batched passes left before pipelining again.
    batched_left: u32,
    /// Whether the policy may switch at all (fixed modes are for tests and in-process use).
    adaptive: bool,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::adaptive()
    }
}

impl Pipeline {
    /// Starts pipelined and adapts.
    pub fn adaptive() -> Self {
        Self {
            mode: Mode::Pipelined,
            until_probe: 0,
            batched_left: 0,
            adaptive: true,
        }
    }

    pub fn new(policy: Completions) -> Self {
        match policy {
            Completions::Adaptive => Self::adaptive(),
            Completions::Pipelined => Self::fixed(Mode::Pipelined),
            Completions::Batched => Self::fixed(Mode::Batched),
        }
    }

    /// Always `mode`.
    pub fn fixed(mode: Mode) -> Self {
        Self {
            mode,
            until_probe: u32::MAX,
            batched_left: u32::MAX,
            adaptive: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether each completion is published at once.
    pub fn publish_each(&self) -> bool {
        self.mode == Mode::Pipelined
    }

    /// A pass ended.
    pub fn pass_done(&mut self) {
        if self.adaptive && self.mode == Mode::Batched {
            self.batched_left = self.batched_left.saturating_sub(1);
            if self.batched_left == 0 {
                self.mode = Mode::Pipelined;
                self.until_probe = 0;
            }
        }
    }

    /// Interrupts the driver in the middle of a pass, probing now and then whether that handed
    /// our CPU to it.
    pub fn signal_mid_pass(&mut self, call: &Signal) {
        if !self.adaptive || self.until_probe > 0 {
            self.until_probe = self.until_probe.saturating_sub(1);
            call.signal();
            return;
        }
        let before = involuntary_switches();
        call.signal();
        let after = involuntary_switches();
        self.until_probe = PROBE_EVERY;
        if after > before {
            self.mode = Mode::Batched;
            self.batched_left = BATCH_PASSES;
        }
    }
}

/// Involuntary context switches of the calling thread so far (0 if unknown).
pub(crate) fn involuntary_switches() -> i64 {
    // SAFETY: all-zero is a valid rusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage for the calling thread into `u`.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return 0;
    }
    u.ru_nivcsw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_mode_lasts_a_fixed_number_of_passes_then_pipelines_again() {
        let mut p = Pipeline::adaptive();
        p.mode = Mode::Batched;
        p.batched_left = 3;
        for _ in 0..2 {
            p.pass_done();
            assert_eq!(p.mode(), Mode::Batched);
        }
        p.pass_done();
        assert_eq!(p.mode(), Mode::Pipelined);
        assert_eq!(
            p.until_probe, 0,
            "the first signal after a switch is probed"
        );
    }

    #[test]
    fn fixed_modes_never_switch() {
        let mut p = Pipeline::fixed(Mode::Batched);
        for _ in 0..1000 {
            p.pass_done();
        }
        assert_eq!(p.mode(), Mode::Batched);
        let mut p = Pipeline::fixed(Mode::Pipelined);
        let s = Signal::new();
        for _ in 0..100 {
            p.signal_mid_pass(&s);
        }
        assert_eq!(p.mode(), Mode::Pipelined);
    }

    #[test]
    fn a_signal_that_costs_the_cpu_switches_to_batching() {
        // Two threads on one CPU: the waiter wakes on the eventfd and preempts the signaller.
        let cpu = {
            // SAFETY: sched_getcpu has no side effects.
            let c = unsafe { libc::sched_getcpu() };
            usize::try_from(c).unwrap_or(0)
        };
        let pin = move || {
            // SAFETY: all-zero is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is a valid cpu_set_t.
            unsafe { libc::CPU_SET(cpu, &mut set) };
            // SAFETY: a valid set of the advertised size, for the calling thread.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        };
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let waiter_fd = fd.try_clone().unwrap();
        let stop_fd = fd.try_clone().unwrap();
        const STOP: u64 = 1 << 40;
        let waiter = std::thread::spawn(move || {
            pin();
            while let Ok(v) = waiter_fd.read() {
                if v >= STOP {
                    break;
                }
                // Do a little work, as a driver reaping would.
                std::hint::black_box((0..2000).sum::<u64>());
            }
        });
        pin();
        let signal = Signal::new();
        signal.set(Some(fd));
        let mut p = Pipeline::adaptive();
        let mut switched = false;
        for _ in 0..200 {
            // Let the waiter block first.
            std::thread::sleep(std::time::Duration::from_micros(200));
            p.until_probe = 0;
            p.signal_mid_pass(&signal);
            if p.mode() == Mode::Batched {
                switched = true;
                break;
            }
        }
        signal.set(None);
        stop_fd.write(STOP).unwrap();
        waiter.join().unwrap();
        assert!(switched, "a preempting signal was never detected");
    }
}
