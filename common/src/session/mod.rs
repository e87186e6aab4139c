//! One frontend connection: the vhost-user request state machine.
//!
//! Everything here is per connection and dropped when the frontend goes away; the device itself
//! (its open file or TAP) outlives sessions. Each request is validated before it changes state;
//! a bad request gets an error reply (or a REPLY_ACK failure) and the session continues.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserVirtioFeatures, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::{ByteValued, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::control::state::{EngineState, QueueConfig};
use crate::device::{Device, DeviceError};
use crate::dirty_log::{DirtyLog, LogState};
use crate::guest_access::GuestAccess;
use crate::guest_warn;
use crate::inflight::{InflightError, InflightRegion};
use crate::inflight_packed::PackedInflightQueue;
use crate::memory::{GuestMemory, MemoryError, MemoryTable, MAX_MEM_SLOTS};
use crate::notify::Signal;
use crate::protocol::backend::BackendChannel;
use crate::protocol::channel::{Channel, ChannelError, Message};
use crate::protocol::wire::{decode_exact, decode_prefix, Header, MAX_FDS};
use crate::queue_ctx::{Inflight, Tracking};
use crate::vring::packed::VIRTIO_F_RING_PACKED;
use crate::vring::{Layout, PackedBase, PackedRing, Ring, RingAddrs, MAX_QUEUE_SIZE};
use crate::worker::{Worker, WorkerSpec};

const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// Bit 8 of the vring fd payloads: no descriptor attached (polling mode).
const VRING_FD_INVALID: u64 = 0x100;
const VRING_INDEX_MASK: u64 = 0xff;
/// Largest config space access we serve (the virtio config space of blk and net is far smaller).
const MAX_CONFIG_SIZE: u32 = 256;

/// Protocol features the engine always implements.
fn engine_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// `VHOST_F_LOG_ALL`: log every write to guest memory (the frontend is migrating).
const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// `VHOST_VRING_F_LOG` in SET_VRING_ADDR: log writes to the used ring at `log_guest_addr`.
const VRING_F_LOG: u32 = 1;

mod error;
mod queues;
mod requests;
mod tables;

pub use error::RequestError;
use queues::{QueueSlot, VmmRingAddrs};
use tables::{allowed_fds, has_reply, needed_protocol_feature};

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The frontend closed the connection (or broke the framing).
    Disconnected,
    /// A termination signal arrived.
    Shutdown,
}

/// A reply to send.
enum Reply {
    /// No reply unless the frontend asked for an ack.
    Ack,
    Payload(Vec<u8>),
    /// A payload with one descriptor (GET_INFLIGHT_FD).
    PayloadWithFd(Vec<u8>, OwnedFd),
}

/// The state of one frontend connection.
pub struct Session<D: Device> {
    device: Arc<D>,
    channel: Channel,
    acked_features: u64,
    features_set: bool,
    acked_protocol: Option<VhostUserProtocolFeatures>,
    memory: MemoryTable,
    mem: GuestMemoryAtomic<GuestMemory>,
    queues: Vec<QueueSlot>,
    inflight: Option<Arc<InflightRegion>>,
    /// The dirty log of a migration, shared with the queue workers.
    log: Arc<LogState>,
    opts: crate::engine_options::EngineOptions,
    /// What the control socket reports (and the backend channel it may use).
    state: Arc<EngineState>,
}

impl<D: Device> std::fmt::Debug for Session<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("acked_features", &self.acked_features)
            .field("acked_protocol", &self.acked_protocol)
            .field("regions", &self.memory.len())
            .field("queues", &self.queues)
            .finish()
    }
}

impl<D: Device> Session<D> {
    pub fn new(
        device: Arc<D>,
        stream: UnixStream,
        opts: crate::engine_options::EngineOptions,
        state: Arc<EngineState>,
    ) -> Self {
        let max = device.max_queue_size();
        let queues = (0..device.num_queues())
            .map(|_| QueueSlot::new(max))
            .collect();
        Self {
            device,
            channel: Channel::new(stream),
            acked_features: 0,
            features_set: false,
            acked_protocol: None,
            memory: MemoryTable::new(),
            mem: GuestMemoryAtomic::new(GuestMemory::new()),
            queues,
            inflight: None,
            log: {
                let log = LogState::new();
                log.set_broken_for_tests(opts.break_dirty_log);
                Arc::new(log)
            },
            opts,
            state,
        }
    }

    /// Serves requests until the frontend disconnects or `shutdown` becomes readable.
    pub fn run(mut self, shutdown: &crate::signals::Signals) -> SessionEnd {
        self.state.session_started();
        let end = self.serve(shutdown);
        self.teardown();
        self.state.session_ended();
        end
    }

    fn serve(&mut self, shutdown: &crate::signals::Signals) -> SessionEnd {
        // A frontend that stops halfway through a message must not hold the daemon forever.
        let _ = self
            .channel
            .stream()
            .set_read_timeout(Some(std::time::Duration::from_secs(5)));
        // A revocation reported for an earlier frontend is not this one's.
        crate::revoke::take_revoked();
        loop {
            match shutdown.wait_readable_or(self.channel.as_fd(), crate::revoke::revoked_fd()) {
                crate::signals::Wait::Shutdown => return SessionEnd::Shutdown,
                crate::signals::Wait::Report => {
                    self.device.report();
                    continue;
                }
                crate::signals::Wait::Other => {
                    if crate::revoke::take_revoked() {
                        // Once per frontend: it shrank memory it had shared with us.
                        tracing::event!(
                            tracing::Level::WARN,
                            "the frontend revoked guest memory (a shared mapping shrank under a queue): closing its connection"
                        );
                        return SessionEnd::Disconnected;
                    }
                    continue;
                }
                crate::signals::Wait::Readable => {}
            }
            let msg = match self.channel.recv() {
                Ok(Some(m)) => m,
                Ok(None) => return SessionEnd::Disconnected,
                Err(e) => {
                    guest_warn!("closing the connection: {}", crate::logging::chain(&e));
                    return SessionEnd::Disconnected;
                }
            };
            if let Err(e) = self.dispatch(msg) {
                guest_warn!("closing the connection: {}", crate::logging::chain(&e));
                return SessionEnd::Disconnected;
            }
        }
    }

    /// Handles one message and sends its reply.
    fn dispatch(&mut self, msg: Message) -> Result<(), ChannelError> {
        let header = msg.header;
        let req = FrontendReq::try_from(header.request).ok();
        tracing::trace!(request = ?req, code = header.request, size = header.size, fds = msg.fds.len(), "request");
        let result = match req {
            None => Err(RequestError::UnknownRequest(header.request)),
            Some(_) if msg.fds_truncated => Err(RequestError::TooManyFds),
            Some(r) if !allowed_fds(r).contains(&msg.fds.len()) => Err(RequestError::BadFds {
                req: r,
                want: *allowed_fds(r).end(),
                got: msg.fds.len(),
            }),
            Some(r) if !self.negotiated(needed_protocol_feature(r)) => {
                Err(RequestError::ProtocolFeatureNotNegotiated(r))
            }
            Some(r) => self.handle(r, &msg.payload, msg.fds),
        };
        let has_own_reply = req.is_some_and(has_reply);
        self.describe();
        match result {
            Ok(Reply::Payload(p)) => self.channel.send(&header.reply(len32(&p)), &p, &[]),
            Ok(Reply::PayloadWithFd(p, fd)) => {
                self.channel
                    .send(&header.reply(len32(&p)), &p, &[fd.as_fd()])
            }
            Ok(Reply::Ack) => self.ack(&header, 0),
            Err(e) => {
                guest_warn!(request = ?req, "request refused: {}", crate::logging::chain(&e));
                if has_own_reply {
                    // An empty reply is how a failed GET_* is reported.
                    self.channel.send(&header.reply(0), &[], &[])
                } else {
                    self.ack(&header, 1)
                }
            }
        }
    }

    /// Tells the control socket what the frontend has set up so far.
    fn describe(&self) {
        let queues = self
            .queues
            .iter()
            .zip(0u16..)
            .filter(|(q, _)| q.vmm_addrs.is_some() || q.enabled || q.worker.is_some())
            .map(|(q, index)| QueueConfig {
                index,
                size: q.size,
                enabled: q.enabled,
                configured: q.vmm_addrs.is_some() && (q.kick.is_some() || q.worker.is_some()),
            })
            .collect();
        self.state.describe_session(|s| {
            s.features = self.acked_features;
            s.protocol_features = self.acked_protocol.map(|p| p.bits());
            s.inflight_tracking = self.inflight.is_some();
            s.dirty_logging = self.acked_features & VHOST_F_LOG_ALL != 0;
            s.queues = queues;
        });
    }

    /// Whether `feature` (if a request needs one) was offered by us and acked by the frontend.
    fn negotiated(&self, feature: Option<VhostUserProtocolFeatures>) -> bool {
        match feature {
            None => true,
            Some(f) => self.acked_protocol.is_some_and(|p| p.contains(f)),
        }
    }

    fn ack(&mut self, header: &Header, status: u64) -> Result<(), ChannelError> {
        let reply_ack = self
            .acked_protocol
            .is_some_and(|p| p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        if header.need_reply() && reply_ack {
            let p = status.to_ne_bytes();
            self.channel.send(&header.reply(len32(&p)), &p, &[])
        } else {
            Ok(())
        }
    }

    fn offered_features(&self) -> u64 {
        // Packed rings are the engine's, so every device has them (unless switched off).
        let packed = if self.opts.no_packed {
            0
        } else {
            VIRTIO_F_RING_PACKED
        };
        self.device.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VHOST_F_LOG_ALL
            | packed
    }

    fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        engine_protocol_features() | self.device.protocol_features()
    }

    fn teardown(&mut self) {
        self.reset_queues();
        self.device.disconnected();
    }
}

fn u64_reply(v: u64) -> Reply {
    Reply::Payload(v.to_ne_bytes().to_vec())
}

fn len32(p: &[u8]) -> u32 {
    // Replies are built here and are a few hundred bytes at most.
    u32::try_from(p.len()).unwrap_or(u32::MAX)
}
