//! One virtio-blk queue: take chains, parse them, execute them (synchronously or through
//! io_uring), write the status and complete. A bad chain gets an error status; the queue goes on.

use std::io;
use std::sync::Arc;

use bulkhead_common::vring::{Desc, RingError};
use bulkhead_common::{guest_warn, Progress, QueueCtx, QueueHandler};
use vm_memory::GuestAddress;

use crate::disk::DiskKind;
use crate::io::sync::{Outcome, SyncIo};
use crate::io::uring::{Done, NotQueued, Uring};
use crate::io::IoEngine;
use crate::request::{self, Limits, Segment};
use crate::shared::{Shared, SEG_MAX};
use crate::stats::{BlkQueueStats, Clock, OpKind, Tally};

/// Requests queued on io_uring before they are submitted mid-pass: one system call per few
/// requests, and the first ones already running while later ones are parsed.
const SUBMIT_EVERY: u32 = 8;

#[derive(Debug)]
pub struct BlkQueue {
    shared: Arc<Shared>,
    /// This queue's counters (none with `--no-stats`).
    stats: Option<Arc<BlkQueueStats>>,
    /// The clock as last read (see `crate::stats` for when).
    clock: Clock,
    uring: Option<Uring>,
    descs: Vec<Desc>,
    data: Vec<Segment>,
    iovs: Vec<libc::iovec>,
    done: Vec<Done>,
}

// SAFETY: the raw pointers in `iovs` are scratch values rebuilt for every request and only used
// on the thread that owns the queue; nothing aliases them across threads.
unsafe impl Send for BlkQueue {}

impl BlkQueue {
    pub fn new(
        shared: Arc<Shared>,
        stats: Option<Arc<BlkQueueStats>>,
        engine: IoEngine,
        queue_size: u16,
    ) -> io::Result<Self> {
        let uring = match engine.resolve(&shared.disk) {
            IoEngine::Sync | IoEngine::Auto => None,
            IoEngine::IoUring => Some(Uring::new(queue_size)?),
        };
        Ok(Self {
            shared,
            stats,
            clock: Clock::new(),
            uring,
            descs: Vec::new(),
            data: Vec::new(),
            iovs: Vec::new(),
            done: Vec::new(),
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity: self.shared.disk.capacity(),
            read_only: self.shared.disk.read_only(),
            max_segments: SEG_MAX as usize,
        }
    }

    /// Handles the chain just popped into `self.descs`.
    fn handle(&mut self, ctx: &mut QueueCtx<'_>, head: u16) -> Result<(), RingError> {
        let limits = self.limits();
        let req = match request::parse(ctx.mem(), &self.descs, &limits, &mut self.data) {
            Ok(r) => r,
            Err((e, status)) => {
                guest_warn!(head, "bad request: {e}");
                let kind = match e {
                    request::ParseError::Unsupported(_) => OpKind::Unsupported,
                    _ => OpKind::Invalid,
                };
                self.count(&Tally::refused(kind, self.clock.now), e.status());
                return finish(ctx, head, status, e.status(), 0);
            }
        };
        let tally = Tally::of(&req.op, self.clock.now);
        let sync = sync_io(&self.shared);
        if let Some(uring) = self.uring.as_mut() {
            match uring.queue(&sync, ctx.mem(), head, &req, &self.data, tally) {
                Ok(()) => return Ok(()),
                Err(NotQueued::BadBuffers) => {
                    self.count(&tally, Some(status_of(Outcome::FAILED)));
                    return finish_outcome(ctx, head, req.status, Outcome::FAILED);
                }
                Err(NotQueued::RunSync) => {}
            }
        }
        let outcome = sync.execute(ctx.mem(), &req, &self.data, &mut self.iovs);
        if self.stats.is_some() && sync.disk.kind() != DiskKind::Null {
            // A file request took a system call: one more clock read is noise beside it.
            self.clock.read();
        }
        self.count(&tally, Some(status_of(outcome)));
        finish_outcome(ctx, head, req.status, outcome)
    }

    #[inline]
    fn count(&self, tally: &Tally, status: Option<u8>) {
        if let Some(s) = &self.stats {
            s.completed(tally, status, self.clock.now);
        }
    }

    fn reap(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        let Some(uring) = self.uring.as_mut() else {
            return Ok(());
        };
        let sync = sync_io(&self.shared);
        uring.reap(&sync, &mut self.done);
        if self.done.is_empty() {
            return Ok(());
        }
        if self.stats.is_some() {
            self.clock.read();
        }
        let mut done = std::mem::take(&mut self.done);
        for d in done.drain(..) {
            if let Some(t) = &d.tally {
                self.count(t, Some(status_of(d.outcome)));
            }
            finish_outcome(ctx, d.head, d.status, d.outcome)?;
        }
        self.done = done;
        Ok(())
    }

    fn submit(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            if let Err(e) = uring.submit() {
                guest_warn!("io_uring submit failed (will retry): {e}");
            }
        }
    }
}

fn sync_io(shared: &Shared) -> SyncIo<'_> {
    SyncIo {
        disk: &shared.disk,
        serial: &shared.serial,
        writethrough: shared.writethrough(),
    }
}

/// Writes the status byte (if there is one) and completes the chain.
fn finish(
    ctx: &mut QueueCtx<'_>,
    head: u16,
    status_at: Option<GuestAddress>,
    status: Option<u8>,
    written: u32,
) -> Result<(), RingError> {
    let used = match (status_at, status) {
        (Some(at), Some(s)) if ctx.mem().write_val(s, at).is_some() => written.saturating_add(1),
        _ => 0,
    };
    ctx.complete(head, used)
}

/// The status byte an outcome is reported with.
fn status_of(outcome: Outcome) -> u8 {
    let status = if outcome.ok {
        virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK
    } else {
        virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR
    };
    // Both constants are single bytes.
    u8::try_from(status).unwrap_or(u8::MAX)
}

fn finish_outcome(
    ctx: &mut QueueCtx<'_>,
    head: u16,
    status_at: GuestAddress,
    outcome: Outcome,
) -> Result<(), RingError> {
    let written = if outcome.ok { outcome.written } else { 0 };
    finish(
        ctx,
        head,
        Some(status_at),
        Some(status_of(outcome)),
        written,
    )
}

impl QueueHandler for BlkQueue {
    fn event_sources(&self) -> Vec<std::os::fd::RawFd> {
        self.uring
            .as_ref()
            .map(|u| vec![u.eventfd()])
            .unwrap_or_default()
    }

    fn process(&mut self, ctx: &mut QueueCtx<'_>) -> Result<Progress, RingError> {
        if self.stats.is_some() {
            // Requests taken in this pass count their latency from here.
            self.clock.read();
        }
        self.reap(ctx)?;
        let mut progress = Progress::Idle;
        let mut unsubmitted = 0;
        loop {
            if self.uring.as_ref().is_some_and(Uring::is_full) {
                progress = Progress::Waiting;
                break;
            }
            let mut descs = std::mem::take(&mut self.descs);
            let popped = ctx.pop(&mut descs);
            self.descs = descs;
            let Some(chain) = popped? else { break };
            if let Some(e) = chain.error {
                guest_warn!(head = chain.head, "malformed chain: {e}");
                self.count(&Tally::refused(OpKind::Invalid, self.clock.now), None);
                ctx.complete(chain.head, 0)?;
                continue;
            }
            self.handle(ctx, chain.head)?;
            if self.uring.is_some() {
                // Hand the kernel work early and complete what finished meanwhile, so the
                // guest sees completions while the rest of the ring is still being taken.
                unsubmitted += 1;
                if unsubmitted >= SUBMIT_EVERY {
                    self.submit();
                    unsubmitted = 0;
                }
                self.reap(ctx)?;
            }
        }
        self.submit();
        self.reap(ctx)?;
        Ok(progress)
    }

    fn drain(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        self.submit();
        while self.uring.as_ref().is_some_and(|u| u.in_flight() > 0) {
            if let Some(u) = self.uring.as_mut() {
                if let Err(e) = u.wait() {
                    guest_warn!("io_uring wait failed while draining: {e}");
                    break;
                }
            }
            self.reap(ctx)?;
        }
        Ok(())
    }
}
