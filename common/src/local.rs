//! The same queue processing, run inside the caller's process instead of behind vhost-user: the
//! isolation harness compares these placements with the daemon on identical device code.
//!
//! - [`DirectQueue`]: the caller runs the handler itself, no notifications at all (the floor).
//! - [`ThreadedQueue`]: the handler runs on a worker thread of the caller's process, kicked and
//!   answered through eventfds, as a monolithic VMM with an I/O thread runs a device.

use std::sync::Arc;

use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Progress, QueueCtx, QueueHandler};
use crate::guest_access::GuestAccess;
use crate::log_cursor::LogCursor;
use crate::memory::GuestMemory;
use crate::notify::Signal;
use crate::pipeline::Pipeline;
use crate::queue_ctx::Tracking;
use crate::vring::{Layout, Ring, RingAddrs, RingError};
use crate::worker::{Worker, WorkerSpec};

/// Ring parameters of an in-process queue.
#[derive(Debug, Clone, Copy)]
pub struct LocalRing {
    pub size: u16,
    pub addrs: RingAddrs,
    pub event_idx: bool,
    pub indirect: bool,
    /// Split or packed (a fresh ring either way).
    pub layout: Layout,
}

impl LocalRing {
    fn open(&self, mem: &GuestMemory) -> Result<Ring, RingError> {
        Ring::new(
            self.layout,
            mem,
            self.size,
            self.addrs,
            self.layout.fresh_base(),
            self.event_idx,
            self.indirect,
        )
    }
}

/// A queue whose handler the caller drives directly.
#[derive(Debug)]
pub struct DirectQueue<H: QueueHandler> {
    handler: H,
    ring: Ring,
    tracking: Tracking,
    pipeline: Pipeline,
    mem: GuestAccess,
    call: Signal,
    log: LogCursor,
}

impl<H: QueueHandler> DirectQueue<H> {
    pub fn new(handler: H, mem: GuestMemory, ring: LocalRing) -> Result<Self, RingError> {
        let ring = ring.open(&mem)?;
        Ok(Self {
            handler,
            ring,
            tracking: Tracking::default(),
            pipeline: Pipeline::adaptive(),
            mem: GuestAccess::new(Arc::new(mem)),
            call: Signal::new(),
            log: LogCursor::unlogged(),
        })
    }

    /// One pass: take and complete what is available, publish the completions.
    pub fn run(&mut self) -> Result<Progress, RingError> {
        let mut ctx = QueueCtx::new(
            &self.mem,
            &mut self.ring,
            &mut self.tracking,
            &mut self.pipeline,
            &self.call,
            &mut self.log,
        );
        let progress = self.handler.process(&mut ctx)?;
        ctx.flush()?;
        Ok(progress)
    }

    /// Completes everything still in flight (asynchronous engines).
    pub fn drain(&mut self) -> Result<(), RingError> {
        let mut ctx = QueueCtx::new(
            &self.mem,
            &mut self.ring,
            &mut self.tracking,
            &mut self.pipeline,
            &self.call,
            &mut self.log,
        );
        self.handler.drain(&mut ctx)?;
        ctx.flush()?;
        ctx.release_held()?;
        ctx.flush()
    }
}

/// A queue served by a worker thread in the caller's process.
#[derive(Debug)]
pub struct ThreadedQueue {
    worker: Option<Worker>,
}

impl ThreadedQueue {
    /// Starts a worker for `handler`; `kick` wakes it, `call` is signalled on completions.
    pub fn spawn<H: QueueHandler>(
        handler: H,
        mem: GuestMemory,
        ring: LocalRing,
        kick: EventFd,
        call: EventFd,
        poll: crate::idle_poll::PollPolicy,
    ) -> Result<Self, LocalError> {
        let ring = ring.open(&mem)?;
        let signal = Arc::new(Signal::new());
        signal.set(Some(call));
        let spec = WorkerSpec {
            index: 0,
            handler,
            ring,
            kick,
            call: signal,
            err: Arc::new(Signal::new()),
            mem: GuestMemoryAtomic::new(mem),
            tracking: Tracking::default(),
            idle: crate::idle_poll::IdlePoll::new(poll),
            pipeline: Pipeline::adaptive(),
            view: None,
            log: LogCursor::unlogged(),
            progress: Arc::default(),
        };
        Ok(Self {
            worker: Some(Worker::spawn(spec).map_err(LocalError::Spawn)?),
        })
    }

    /// Stops the worker after it completed what it took.
    pub fn stop(mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for ThreadedQueue {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("ring")]
    Ring(#[from] RingError),
    #[error("cannot start the worker")]
    Spawn(#[source] std::io::Error),
}
