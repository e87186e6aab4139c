//! One thread per started queue. It sleeps in epoll on the queue's kick eventfd, a stop eventfd
//! and the handler's own event sources, and runs the handler when any fires. Nothing is shared
//! with other queues' workers except the (lock-free) guest memory snapshot.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Progress, QueueCtx, QueueHandler};
use crate::guest_access::GuestAccess;
use crate::guest_warn;
use crate::log_cursor::LogCursor;
use crate::memory::GuestMemory;
use crate::notify::Signal;
use crate::pipeline::Pipeline;
use crate::queue_ctx::Tracking;
use crate::vring::{Ring, RingError};

/// What woke the worker, as carried in the epoll event data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    Kick,
    Stop,
    Source,
}

impl Wake {
    fn token(self) -> u64 {
        self as u64
    }
    fn from_token(t: u64) -> Self {
        match t {
            0 => Wake::Kick,
            1 => Wake::Stop,
            _ => Wake::Source,
        }
    }
}

/// Everything a worker needs to run a queue.
#[derive(Debug)]
pub(crate) struct WorkerSpec<H> {
    pub index: u16,
    pub handler: H,
    pub ring: Ring,
    pub kick: EventFd,
    pub call: Arc<Signal>,
    pub err: Arc<Signal>,
    pub mem: GuestMemoryAtomic<GuestMemory>,
    pub tracking: Tracking,
    /// Busy-poll this long after the last work before sleeping (zero: never poll).
    pub poll: Duration,
    /// When completions are published.
    pub pipeline: Pipeline,
    /// The fast view of the current guest memory snapshot, rebuilt when the snapshot changes.
    pub view: Option<Arc<GuestAccess>>,
    /// Where completions are marked while the frontend migrates.
    pub log: LogCursor,
    /// Where the ring stands, for the control socket's `status`.
    pub progress: Arc<crate::control::state::QueueProgress>,
}

/// The view of the snapshot `spec.mem` holds now (rebuilt only when the table changed), with the
/// ring set up to log if the frontend is migrating.
fn view<H>(spec: &mut WorkerSpec<H>) -> Arc<GuestAccess> {
    spec.log.refresh(&mut spec.ring);
    let mem = spec.mem.memory().into_inner();
    match &spec.view {
        Some(v) if v.is_of(&mem) => Arc::clone(v),
        _ => {
            let v = Arc::new(GuestAccess::new(mem));
            spec.view = Some(Arc::clone(&v));
            v
        }
    }
}

/// A running worker.
#[derive(Debug)]
pub(crate) struct Worker {
    stop: EventFd,
    thread: JoinHandle<(Ring, EventFd)>,
}

impl Worker {
    pub fn spawn<H: QueueHandler>(spec: WorkerSpec<H>) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_for_thread = stop.try_clone()?;
        let epoll = Epoll::new()?;
        // Edge-triggered: every write to an eventfd wakes its edge-triggered waiters, whatever
        // its counter holds, so the kick never needs reading. That saves a system call per
        // wake-up, a fifth of the device's cost at queue depth 1. The counter only grows by one
        // per kick; a frontend that fills it up (writing 2^64-2 itself) only blocks its own kicks.
        add(
            &epoll,
            spec.kick.as_raw_fd(),
            Wake::Kick,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        add(&epoll, stop.as_raw_fd(), Wake::Stop, EventSet::IN)?;
        for fd in spec.handler.event_sources() {
            add(
                &epoll,
                fd,
                Wake::Source,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )?;
        }
        let thread = std::thread::Builder::new()
            .name(format!("queue-{}", spec.index))
            .spawn(move || run(spec, epoll, stop_for_thread))?;
        Ok(Self { stop, thread })
    }

    /// Stops the worker after it completed every request in flight; returns the ring state and
    /// the kick eventfd.
    pub fn stop(self) -> Option<(Ring, EventFd)> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

fn add(epoll: &Epoll, fd: RawFd, wake: Wake, events: EventSet) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(events, wake.token()),
    )
}

fn run<H: QueueHandler>(mut spec: WorkerSpec<H>, epoll: Epoll, stop: EventFd) -> (Ring, EventFd) {
    let mut broken = false;
    spec.progress.set_running(true);
    // Chains may already be waiting (a restarted backend): look before the first kick.
    pass(&mut spec, &mut broken);
    let mut events = [EpollEvent::default(); 8];
    'outer: loop {
        if !spec.poll.is_zero() && !broken && poll(&mut spec, &epoll, &mut events, &mut broken) {
            break 'outer;
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                guest_warn!(queue = spec.index, "epoll failed, queue stops: {e}");
                break;
            }
        };
        if events
            .iter()
            .take(n)
            .any(|ev| Wake::from_token(ev.data()) == Wake::Stop)
        {
            break 'outer;
        }
        if !broken {
            pass(&mut spec, &mut broken);
        }
    }
    let _ = stop.read();
    finish(&mut spec);
    spec.progress
        .publish(spec.ring.next_avail(), spec.ring.next_used());
    spec.progress.set_running(false);
    (spec.ring, spec.kick)
}

/// Busy-polls for up to `spec.poll` after the last work, with guest kicks suppressed, so that a
/// guest adding work soon finds the worker awake (no kick, no wake-up). Returns true if a stop
/// was requested meanwhile. Ends with kicks re-enabled and the ring checked once more.
fn poll<H: QueueHandler>(
    spec: &mut WorkerSpec<H>,
    epoll: &Epoll,
    events: &mut [EpollEvent],
    broken: &mut bool,
) -> bool {
    let mut deadline = Instant::now() + spec.poll;
    let mut spins: u32 = 0;
    loop {
        let mem = view(spec);
        let work = spec
            .ring
            .suppress_notifications(&mem)
            .and_then(|()| spec.ring.pending(&mem));
        match work {
            Ok(0) => {}
            Ok(_) => {
                if let Err(e) = process_once(spec, &mem) {
                    guest_warn!(
                        queue = spec.index,
                        "ring unusable until the frontend resets it: {e}"
                    );
                    spec.err.signal();
                    *broken = true;
                    return false;
                }
                deadline = Instant::now() + spec.poll;
            }
            Err(_) => break,
        }
        spins = spins.wrapping_add(1);
        // Now and then, look at the stop eventfd and the handler's own sources.
        if spins.is_multiple_of(64) {
            let n = epoll.wait(0, events).unwrap_or(0);
            for ev in events.iter().take(n) {
                match Wake::from_token(ev.data()) {
                    Wake::Stop => return true,
                    Wake::Kick => {}
                    Wake::Source => deadline = Instant::now() + spec.poll,
                }
            }
            if n > 0 {
                if let Err(e) = process_once(spec, &mem) {
                    guest_warn!(
                        queue = spec.index,
                        "ring unusable until the frontend resets it: {e}"
                    );
                    spec.err.signal();
                    *broken = true;
                    return false;
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        std::hint::spin_loop();
    }
    pass(spec, broken);
    false
}

/// One handler pass without touching the guest's kick suppression.
fn process_once<H: QueueHandler>(
    spec: &mut WorkerSpec<H>,
    mem: &GuestAccess,
) -> Result<(), RingError> {
    let mut ctx = QueueCtx::new(
        mem,
        &mut spec.ring,
        &mut spec.tracking,
        &mut spec.pipeline,
        &spec.call,
        &mut spec.log,
    );
    spec.handler.process(&mut ctx)?;
    ctx.flush()
}

/// Runs the handler until the ring is empty (or the handler saturated), with guest kicks
/// suppressed meanwhile, then re-enables them and checks for a race with a late buffer.
fn pass<H: QueueHandler>(spec: &mut WorkerSpec<H>, broken: &mut bool) {
    let mem = view(spec);
    if let Err(e) = pass_inner(spec, &mem) {
        guest_warn!(
            queue = spec.index,
            "ring unusable until the frontend resets it: {e}"
        );
        spec.err.signal();
        *broken = true;
    }
    spec.progress
        .publish(spec.ring.next_avail(), spec.ring.next_used());
}

fn pass_inner<H: QueueHandler>(
    spec: &mut WorkerSpec<H>,
    mem: &GuestAccess,
) -> Result<(), RingError> {
    loop {
        spec.ring.disable_notifications(mem)?;
        let mut ctx = QueueCtx::new(
            mem,
            &mut spec.ring,
            &mut spec.tracking,
            &mut spec.pipeline,
            &spec.call,
            &mut spec.log,
        );
        let progress = spec.handler.process(&mut ctx)?;
        ctx.flush()?;
        if progress == Progress::Waiting {
            return Ok(());
        }
        if !ctx.ring().enable_notifications(mem)? {
            return Ok(());
        }
    }
}

fn finish<H: QueueHandler>(spec: &mut WorkerSpec<H>) {
    let mem = view(spec);
    let mut ctx = QueueCtx::new(
        &mem,
        &mut spec.ring,
        &mut spec.tracking,
        &mut spec.pipeline,
        &spec.call,
        &mut spec.log,
    );
    let result = spec
        .handler
        .drain(&mut ctx)
        .and_then(|()| ctx.flush())
        .and_then(|()| ctx.release_held())
        .and_then(|()| ctx.flush());
    if let Err(e) = result {
        guest_warn!(
            queue = spec.index,
            "could not complete requests while stopping: {e}"
        );
    }
}
