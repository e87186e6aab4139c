//! What a daemon implements: the [`Device`] (features, config space, queue handlers) and a
//! [`QueueHandler`] per queue, which the engine drives on that queue's worker thread.

use std::os::fd::RawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

pub use crate::control::metrics::Metrics;
pub use crate::control::protocol::{CommandDone, CommandError};
pub use crate::queue_ctx::QueueCtx;
use crate::vring::RingError;

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

    /// SEND_RARP: announce the guest's MAC on the device's network after a migration (net only).
    fn send_rarp(&self, _mac: [u8; 6]) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("SEND_RARP"))
    }

    /// NET_SET_MTU: the MTU the frontend gives the guest (net only).
    fn set_mtu(&self, _mtu: u16) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("NET_SET_MTU"))
    }

    /// Largest queue size accepted.
    fn max_queue_size(&self) -> u16;

    /// Whether every queue completes chains in the order it took them. Then a packed ring
    /// without inflight tracking can be resumed from its contents after a restart (see
    /// `vring::packed_scan`); devices that complete out of order must not claim this.
    fn completes_in_order(&self) -> bool {
        false
    }

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

    /// Queue `index` stopped (its worker ended with nothing in flight): the device may release
    /// what only a running queue needs.
    fn queue_stopped(&self, _index: u16) {}

    /// The frontend went away; forget per-connection state.
    fn disconnected(&self) {}

    /// State the guest set that must survive a restart of this backend (not a new VM), e.g.
    /// the block write-cache mode: the engine keeps it in the inflight region the frontend
    /// hands back, at most [`crate::inflight::DEVICE_STATE_MAX`] bytes. Called after every
    /// config write.
    fn persistent_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores what [`persistent_state`](Self::persistent_state) returned before a restart. The
    /// bytes come from the frontend's memory: validate them.
    fn restore_state(&self, _state: &[u8]) {}

    /// Log counters (SIGUSR1).
    fn report(&self) {}

    /// What the device is, for `status` ("block", "net").
    fn kind(&self) -> &'static str;

    /// Adds the device's statistics (control socket `stats`).
    fn metrics(&self, _out: &mut Metrics) {}

    /// Names of the device's own control commands (beyond the engine's status and stats).
    fn commands(&self) -> &'static [&'static str] {
        &[]
    }

    /// Runs a device control command (on the control thread, never a queue's). A result with
    /// `config_changed` makes the engine tell the frontend (CONFIG_CHANGE_MSG).
    fn command(
        &self,
        _name: &str,
        _args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<CommandDone, CommandError> {
        Err(CommandError::Unknown)
    }
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
