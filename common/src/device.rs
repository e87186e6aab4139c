//! What a daemon implements: the [`Device`] (features, config space, queue handlers) and a
//! [`QueueHandler`] per queue, which the engine drives on that queue's worker thread.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::inflight::InflightQueue;
use crate::memory::GuestMemory;
use crate::notify::Signal;
use crate::vring::{AvailChain, Desc, RingError, SplitRing};

/// Errors a device reports to the engine.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("config access at offset {offset} of {len} bytes is outside the config space")]
    ConfigRange { offset: u32, len: usize },
    #[error("config field at offset {0} is read-only")]
    ConfigReadOnly(u32),
    #[error("features {0:#x} were not offered")]
    UnofferedFeatures(u64),
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    #[error("cannot set up queue {index}")]
    Queue {
        index: u16,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A virtio device served over vhost-user.
/// `1 << b` for a virtio feature bit number.
pub const fn feature_bit(b: u32) -> u64 {
    1 << b
}

/// The transport features the engine's split ring implements for every device: virtio 1.0,
/// EVENT_IDX and indirect descriptor tables. Devices add their own to these.
pub const RING_FEATURES: u64 = feature_bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | feature_bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    | feature_bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);

pub trait Device: Send + Sync + 'static {
    type Handler: QueueHandler;

    /// Virtio feature bits offered (device bits plus ring bits such as EVENT_IDX); the engine adds
    /// `VHOST_USER_F_PROTOCOL_FEATURES` itself.
    fn features(&self) -> u64;

    /// Protocol features the device needs on top of the engine's own (MQ, REPLY_ACK,
    /// CONFIGURE_MEM_SLOTS), e.g. CONFIG.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    /// Number of queues offered.
    fn num_queues(&self) -> u16;

    /// The answer to GET_QUEUE_NUM: queues for most devices, queue pairs for net (QEMU's
    /// vhost-user-net compares it with its `queues=` setting, which counts pairs).
    fn queue_num(&self) -> u64 {
        u64::from(self.num_queues())
    }

    /// NET_SET_MTU: the MTU the frontend gives the guest (net only).
    fn set_mtu(&self, _mtu: u16) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("NET_SET_MTU"))
    }

    /// Largest queue size accepted.
    fn max_queue_size(&self) -> u16;

    /// Reads `out.len()` bytes of config space at `offset`.
    fn read_config(&self, offset: u32, out: &mut [u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigRange {
            offset,
            len: out.len(),
        })
    }

    /// Writes config space (e.g. the blk writeback flag).
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigRange {
            offset,
            len: data.len(),
        })
    }

    /// The frontend acked `features`; called before any queue starts.
    fn set_features(&self, _features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Creates the handler for queue `index`, started with the acked `features`.
    fn queue_handler(&self, index: u16, features: u64) -> Result<Self::Handler, DeviceError>;

    /// The frontend went away; forget per-connection state.
    fn disconnected(&self) {}

    /// Log counters (SIGUSR1).
    fn report(&self) {}
}

/// How a pass over the queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// No more work right now: the ring is empty or the device waits for its own event source.
    Idle,
    /// The handler stopped for a reason of its own (all I/O slots busy, nothing to receive) and
    /// continues when one of its event sources fires; the engine leaves guest notifications as
    /// they are.
    Waiting,
}

/// The per-queue part of a device, run on the queue's own worker thread.
pub trait QueueHandler: Send + 'static {
    /// Descriptors (besides the kick eventfd) whose readiness should wake the worker, e.g. an
    /// io_uring completion eventfd or a TAP queue. Registered edge-triggered: on each wake-up the
    /// handler must consume what is ready.
    fn event_sources(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Takes and completes as much work as possible.
    fn process(&mut self, queue: &mut QueueCtx<'_>) -> Result<Progress, RingError>;

    /// Completes every request that was taken but not yet completed; called before the ring
    /// stops so that `GET_VRING_BASE` can report a consistent index.
    fn drain(&mut self, queue: &mut QueueCtx<'_>) -> Result<(), RingError>;
}

/// A handler's view of its ring during one pass: take chains, complete them. Completions are
/// published and the guest interrupted (only when it asked) once the pass ends.
#[derive(Debug)]
pub struct QueueCtx<'a> {
    mem: &'a Arc<GuestMemory>,
    ring: &'a mut SplitRing,
    tracking: &'a mut Tracking,
    completed: u32,
}

/// Inflight tracking state of one queue (see [`crate::inflight`]).
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    pub inflight: Option<InflightQueue>,
    /// Chains owed from before a crash, oldest first: handed out before new ones.
    pub resubmit: VecDeque<u16>,
    /// Chains returned since the last publish.
    pub batch: Vec<u16>,
}

fn tracking_error(e: crate::inflight::InflightError) -> RingError {
    RingError::Inflight(e.to_string())
}

impl<'a> QueueCtx<'a> {
    pub(crate) fn new(
        mem: &'a Arc<GuestMemory>,
        ring: &'a mut SplitRing,
        tracking: &'a mut Tracking,
    ) -> Self {
        Self {
            mem,
            ring,
            tracking,
            completed: 0,
        }
    }

    /// Guest memory for this pass.
    pub fn mem(&self) -> &GuestMemory {
        self.mem
    }

    /// A reference to guest memory that keeps the current mappings alive, for requests that
    /// outlive this pass (asynchronous I/O).
    pub fn mem_arc(&self) -> Arc<GuestMemory> {
        Arc::clone(self.mem)
    }

    /// Takes the next chain (first those owed from before a restart, then new available ones);
    /// its descriptors go into `descs`.
    pub fn pop(&mut self, descs: &mut Vec<Desc>) -> Result<Option<AvailChain>, RingError> {
        if let Some(head) = self.tracking.resubmit.pop_front() {
            return Ok(Some(self.ring.chain_at(self.mem, head, descs)));
        }
        let chain = self.ring.pop(self.mem, descs)?;
        if let (Some(c), Some(q)) = (&chain, self.tracking.inflight.as_mut()) {
            if c.head < self.ring.size() {
                q.taken(c.head).map_err(tracking_error)?;
            }
        }
        Ok(chain)
    }

    /// Puts the last `count` taken chains back, to be taken again later (e.g. receive buffers
    /// gathered for a frame that turned out smaller, or that did not arrive). Not for queues
    /// with inflight tracking.
    pub fn unpop(&mut self, count: u16) {
        self.ring.rewind_avail(count);
    }

    /// Asks the guest to kick once it adds buffers beyond those already available (the handler
    /// needs more than there are). Returns true if more arrived meanwhile: look again.
    pub fn kick_on_more_buffers(&mut self) -> Result<bool, RingError> {
        self.ring.enable_notifications_beyond_avail(self.mem)
    }

    /// Chains the guest has made available and we have not taken yet.
    pub fn pending(&mut self) -> Result<u16, RingError> {
        self.ring.pending(self.mem)
    }

    /// Returns a chain to the guest with `len` bytes written into it.
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        if self.ring.push_used(self.mem, head, len)? {
            self.completed = self.completed.saturating_add(1);
            if self.tracking.inflight.is_some() {
                self.tracking.batch.push(head);
            }
        }
        Ok(())
    }

    /// Completions since the last flush.
    pub fn completed(&self) -> u32 {
        self.completed
    }

    /// Publishes completions (keeping the inflight record consistent at every step) and
    /// interrupts the guest if it wants to be.
    pub fn flush(&mut self, call: &Signal) -> Result<(), RingError> {
        if self.completed == 0 {
            return Ok(());
        }
        self.completed = 0;
        if let Some(q) = self.tracking.inflight.as_mut() {
            q.batch_ready(&self.tracking.batch)
                .map_err(tracking_error)?;
        }
        self.ring.publish_used(self.mem)?;
        if let Some(q) = self.tracking.inflight.as_mut() {
            q.batch_published(&self.tracking.batch, self.ring.next_used())
                .map_err(tracking_error)?;
        }
        self.tracking.batch.clear();
        if self.ring.needs_signal(self.mem)? {
            call.signal();
        }
        Ok(())
    }

    pub(crate) fn ring(&mut self) -> &mut SplitRing {
        self.ring
    }
}
