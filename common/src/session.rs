//! One frontend connection: the vhost-user request state machine.
//!
//! Everything here is per connection and dropped when the frontend goes away; the device itself
//! (its open file or TAP) outlives sessions. Each request is validated before it changes state;
//! a bad request gets an error reply (or a REPLY_ACK failure) and the session continues.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserVirtioFeatures, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::control::state::{EngineState, QueueConfig};
use crate::device::{Device, DeviceError};
use crate::dirty_log::{DirtyLog, LogState};
use crate::guest_warn;
use crate::inflight::{InflightError, InflightRegion};
use crate::memory::{GuestMemory, MemoryError, MemoryTable, MAX_MEM_SLOTS};
use crate::notify::Signal;
use crate::protocol::backend::BackendChannel;
use crate::protocol::channel::{Channel, ChannelError, Message};
use crate::protocol::wire::{decode_exact, decode_prefix, Header, MAX_FDS};
use crate::queue_ctx::Tracking;
use crate::vring::{RingAddrs, SplitRing, MAX_QUEUE_SIZE};
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

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    #[error("request {0:?} is not supported")]
    Unsupported(FrontendReq),
    #[error("payload of {got} bytes for {req:?} is malformed")]
    BadPayload { req: FrontendReq, got: usize },
    #[error("{req:?} needs {want} file descriptors, got {got}")]
    BadFds {
        req: FrontendReq,
        want: usize,
        got: usize,
    },
    #[error("more file descriptors than a message may carry")]
    TooManyFds,
    #[error("queue index {0} out of range")]
    BadQueue(u64),
    #[error("queue size {0} is not a power of two up to the maximum")]
    BadQueueSize(u32),
    #[error("queue {0} is running; stop it first")]
    QueueRunning(u16),
    #[error("features {0:#x} were not offered")]
    UnofferedFeatures(u64),
    #[error("protocol features {0:#x} were not offered")]
    UnofferedProtocolFeatures(u64),
    #[error("{0:?} belongs to a protocol feature that was not negotiated")]
    ProtocolFeatureNotNegotiated(FrontendReq),
    #[error("SET_VRING_ENABLE before protocol features were negotiated")]
    ProtocolFeaturesNotNegotiated,
    #[error("invalid config access")]
    Config(#[source] DeviceError),
    #[error("memory table update refused")]
    Memory(#[from] MemoryError),
    #[error("device refused")]
    Device(#[from] DeviceError),
    #[error("ring address {0:#x} is outside guest memory")]
    RingOutsideMemory(u64),
    #[error("inflight region refused")]
    Inflight(#[from] InflightError),
    #[error("dirty log refused")]
    Log(#[from] crate::dirty_log::LogError),
    #[error("cannot set up the eventfd")]
    EventFd(#[source] std::io::Error),
}

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

/// Ring addresses in the frontend's address space, translated when the ring starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VmmRingAddrs {
    desc: u64,
    avail: u64,
    used: u64,
}

/// Per-queue state kept by the session.
#[derive(Debug)]
struct QueueSlot {
    size: u16,
    vmm_addrs: Option<VmmRingAddrs>,
    base: u16,
    kick: Option<EventFd>,
    call: Arc<Signal>,
    err: Arc<Signal>,
    enabled: bool,
    worker: Option<Worker>,
    /// Where writes to the used ring are logged while migrating (shared with the worker).
    used_log: Arc<std::sync::atomic::AtomicU64>,
}

impl QueueSlot {
    fn new(size: u16) -> Self {
        Self {
            size,
            vmm_addrs: None,
            base: 0,
            kick: None,
            call: Arc::new(Signal::new()),
            err: Arc::new(Signal::new()),
            enabled: false,
            worker: None,
            used_log: Arc::new(std::sync::atomic::AtomicU64::new(
                crate::worker::NO_USED_LOG,
            )),
        }
    }
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
    opts: crate::serve::EngineOptions,
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
        opts: crate::serve::EngineOptions,
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
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | VHOST_F_LOG_ALL
    }

    fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        engine_protocol_features() | self.device.protocol_features()
    }

    fn handle(
        &mut self,
        req: FrontendReq,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, RequestError> {
        use FrontendReq as R;
        let expect_fds = |want: usize, fds: &Vec<OwnedFd>| {
            if fds.len() == want {
                Ok(())
            } else {
                Err(RequestError::BadFds {
                    req,
                    want,
                    got: fds.len(),
                })
            }
        };
        let bad = || RequestError::BadPayload {
            req,
            got: payload.len(),
        };
        match req {
            R::GET_FEATURES => Ok(u64_reply(self.offered_features())),
            R::SET_FEATURES => {
                expect_fds(0, &fds)?;
                let f: u64 = decode_exact(payload).ok_or_else(bad)?;
                let extra = f & !self.offered_features();
                if extra != 0 {
                    return Err(RequestError::UnofferedFeatures(extra));
                }
                self.device.set_features(f)?;
                // Migration starts and ends with this bit, while the queues run.
                let logging = f & VHOST_F_LOG_ALL != 0;
                if logging != (self.acked_features & VHOST_F_LOG_ALL != 0) {
                    tracing::info!(on = logging, "dirty logging (migration)");
                }
                self.log.set_enabled(logging);
                self.acked_features = f;
                self.features_set = true;
                self.update_all_queues();
                Ok(Reply::Ack)
            }
            R::GET_PROTOCOL_FEATURES => Ok(u64_reply(self.offered_protocol().bits())),
            R::SET_PROTOCOL_FEATURES => {
                expect_fds(0, &fds)?;
                let f: u64 = decode_exact(payload).ok_or_else(bad)?;
                let extra = f & !self.offered_protocol().bits();
                if extra != 0 {
                    return Err(RequestError::UnofferedProtocolFeatures(extra));
                }
                self.acked_protocol = Some(VhostUserProtocolFeatures::from_bits_truncate(f));
                Ok(Reply::Ack)
            }
            R::SET_OWNER => {
                expect_fds(0, &fds)?;
                Ok(Reply::Ack)
            }
            R::RESET_OWNER | R::RESET_DEVICE => {
                expect_fds(0, &fds)?;
                self.reset_queues();
                Ok(Reply::Ack)
            }
            R::GET_QUEUE_NUM => Ok(u64_reply(self.device.queue_num())),
            R::GET_MAX_MEM_SLOTS => Ok(u64_reply(MAX_MEM_SLOTS as u64)),
            R::SET_MEM_TABLE => {
                let (head, rest): (VhostUserMemory, _) = decode_prefix(payload).ok_or_else(bad)?;
                let n = head.num_regions as usize;
                let region_size = std::mem::size_of::<VhostUserMemoryRegion>();
                if n > MAX_FDS || rest.len() != n.saturating_mul(region_size) {
                    return Err(bad());
                }
                expect_fds(n, &fds)?;
                let regions: Vec<VhostUserMemoryRegion> = rest
                    .chunks_exact(region_size)
                    .filter_map(|c| VhostUserMemoryRegion::from_slice(c).copied())
                    .collect();
                let snapshot = self.memory.replace_all(&regions, fds)?;
                self.install_memory(snapshot);
                Ok(Reply::Ack)
            }
            R::ADD_MEM_REG => {
                let r: VhostUserSingleMemoryRegion = decode_exact(payload).ok_or_else(bad)?;
                expect_fds(1, &fds)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let snapshot = self.memory.add(&r, fd)?;
                self.install_memory(snapshot);
                Ok(Reply::Ack)
            }
            R::REM_MEM_REG => {
                // QEMU attaches the region's fd here too; it is simply closed.
                let r: VhostUserSingleMemoryRegion = decode_exact(payload).ok_or_else(bad)?;
                let snapshot = self.memory.remove(&r)?;
                self.install_memory(snapshot);
                Ok(Reply::Ack)
            }
            R::SET_VRING_NUM => {
                expect_fds(0, &fds)?;
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let max = self.device.max_queue_size().min(MAX_QUEUE_SIZE);
                let i = self.stopped_queue(u64::from(s.index))?;
                let size = u16::try_from(s.num)
                    .ok()
                    .filter(|n| *n > 0 && n.is_power_of_two() && *n <= max)
                    .ok_or(RequestError::BadQueueSize(s.num))?;
                self.slot(i)?.size = size;
                Ok(Reply::Ack)
            }
            R::SET_VRING_ADDR => {
                expect_fds(0, &fds)?;
                let a: VhostUserVringAddr = decode_exact(payload).ok_or_else(bad)?;
                let i = self.queue_index(u64::from(a.index))?;
                let addrs = VmmRingAddrs {
                    desc: a.descriptor,
                    avail: a.available,
                    used: a.used,
                };
                let used_log = if a.flags & VRING_F_LOG != 0 {
                    a.log
                } else {
                    crate::worker::NO_USED_LOG
                };
                let slot = self.slot(i)?;
                if slot.worker.is_some() {
                    // A running ring may only change whether its used ring is logged (QEMU
                    // turns that on and off around a migration without stopping the ring).
                    if slot.vmm_addrs != Some(addrs) {
                        return Err(RequestError::QueueRunning(i));
                    }
                    slot.used_log
                        .store(used_log, std::sync::atomic::Ordering::Relaxed);
                    return Ok(Reply::Ack);
                }
                // Memory comes first (QEMU's order): rings outside it are refused outright.
                let outside = [a.descriptor, a.available, a.used]
                    .into_iter()
                    .find(|va| self.memory.vmm_to_guest(*va).is_none());
                if let (false, Some(va)) = (self.memory.is_empty(), outside) {
                    return Err(RequestError::RingOutsideMemory(va));
                }
                let slot = self.slot(i)?;
                slot.vmm_addrs = Some(addrs);
                slot.used_log
                    .store(used_log, std::sync::atomic::Ordering::Relaxed);
                self.update_queue(i);
                Ok(Reply::Ack)
            }
            R::SET_VRING_BASE => {
                expect_fds(0, &fds)?;
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let i = self.stopped_queue(u64::from(s.index))?;
                // Split rings: the base is the next available index (16 bits).
                self.slot(i)?.base = u16::try_from(s.num).map_err(|_| bad())?;
                Ok(Reply::Ack)
            }
            R::GET_VRING_BASE => {
                expect_fds(0, &fds)?;
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let i = self.queue_index(u64::from(s.index))?;
                self.stop_queue(i);
                let slot = self.slot(i)?;
                // The ring is now stopped: a new SET_VRING_KICK starts it again.
                slot.kick = None;
                let state = VhostUserVringState::new(s.index, u32::from(slot.base));
                Ok(Reply::Payload(state.as_slice().to_vec()))
            }
            R::SET_VRING_KICK => {
                let (i, fd) = self.vring_fd(req, payload, fds)?;
                self.stop_queue(i);
                let kick = match fd {
                    Some(fd) => Some(eventfd_from(fd)?),
                    None => None,
                };
                self.slot(i)?.kick = kick;
                self.update_queue(i);
                Ok(Reply::Ack)
            }
            R::SET_VRING_CALL => {
                let (i, fd) = self.vring_fd(req, payload, fds)?;
                let call = fd.map(eventfd_from).transpose()?;
                let slot = self.slot(i)?;
                slot.call.set(call);
                // A frontend that reconnects may have missed our last interrupt: one spurious
                // interrupt is harmless, a lost one hangs the guest driver.
                if slot.worker.is_some() {
                    slot.call.signal();
                }
                Ok(Reply::Ack)
            }
            R::SET_VRING_ERR => {
                let (i, fd) = self.vring_fd(req, payload, fds)?;
                let err = fd.map(eventfd_from).transpose()?;
                self.slot(i)?.err.set(err);
                Ok(Reply::Ack)
            }
            R::SET_VRING_ENABLE => {
                expect_fds(0, &fds)?;
                // QEMU's net frontend sends this before SET_FEATURES: protocol features having
                // been set is what counts.
                if self.acked_protocol.is_none() {
                    return Err(RequestError::ProtocolFeaturesNotNegotiated);
                }
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let i = self.queue_index(u64::from(s.index))?;
                let enable = match s.num {
                    0 => false,
                    1 => true,
                    _ => return Err(bad()),
                };
                self.slot(i)?.enabled = enable;
                self.update_queue(i);
                Ok(Reply::Ack)
            }
            R::GET_CONFIG => {
                let (cfg, data): (VhostUserConfig, _) = decode_prefix(payload).ok_or_else(bad)?;
                let (offset, size) = (cfg.offset, cfg.size);
                if size == 0 || size > MAX_CONFIG_SIZE || data.len() != size as usize {
                    return Err(bad());
                }
                let mut out = vec![0u8; size as usize];
                self.device
                    .read_config(offset, &mut out)
                    .map_err(RequestError::Config)?;
                let mut reply = cfg.as_slice().to_vec();
                reply.extend_from_slice(&out);
                Ok(Reply::Payload(reply))
            }
            R::SET_CONFIG => {
                let (cfg, data): (VhostUserConfig, _) = decode_prefix(payload).ok_or_else(bad)?;
                let (offset, size) = (cfg.offset, cfg.size);
                if size == 0 || size > MAX_CONFIG_SIZE || data.len() != size as usize {
                    return Err(bad());
                }
                self.device
                    .write_config(offset, data)
                    .map_err(RequestError::Config)?;
                self.save_device_state()?;
                Ok(Reply::Ack)
            }
            R::NET_SET_MTU => {
                expect_fds(0, &fds)?;
                let mtu: u64 = decode_exact(payload).ok_or_else(bad)?;
                self.device
                    .set_mtu(u16::try_from(mtu).map_err(|_| bad())?)?;
                Ok(Reply::Ack)
            }
            R::GET_INFLIGHT_FD => {
                expect_fds(0, &fds)?;
                let q: VhostUserInflight = decode_exact(payload).ok_or_else(bad)?;
                let region = InflightRegion::create(q.num_queues, q.queue_size)?;
                let reply = VhostUserInflight::new(
                    region.mmap_size(),
                    region.mmap_offset(),
                    region.num_queues(),
                    region.queue_size(),
                );
                let fd = region
                    .fd()
                    .try_clone_to_owned()
                    .map_err(RequestError::EventFd)?;
                self.inflight = Some(Arc::new(region));
                self.save_device_state()?;
                Ok(Reply::PayloadWithFd(reply.as_slice().to_vec(), fd))
            }
            R::SET_INFLIGHT_FD => {
                expect_fds(1, &fds)?;
                let q: VhostUserInflight = decode_exact(payload).ok_or_else(bad)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let region = InflightRegion::adopt(
                    fd,
                    q.mmap_size,
                    q.mmap_offset,
                    q.num_queues,
                    q.queue_size,
                )?;
                match region.device_state() {
                    // A restart: the guest's earlier choices (QEMU does not send them again).
                    Some(state) => {
                        self.device.restore_state(&state);
                        self.state.resumed();
                        tracing::info!("device state restored from the inflight region");
                    }
                    None => {
                        region.set_device_state(&self.device.persistent_state())?;
                    }
                }
                self.inflight = Some(Arc::new(region));
                Ok(Reply::Ack)
            }
            R::SET_LOG_BASE => {
                expect_fds(1, &fds)?;
                let l: VhostUserLog = decode_exact(payload).ok_or_else(bad)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let log = DirtyLog::map(fd, l.mmap_size, l.mmap_offset)?;
                tracing::info!(bytes = log.len(), "dirty log installed");
                // The old log (if any) goes once no worker's pass holds it.
                self.log.replace(Some(log));
                // The spec's answer to SET_LOG_BASE with LOG_SHMFD: a u64 payload, 0.
                Ok(u64_reply(0))
            }
            R::SEND_RARP => {
                expect_fds(0, &fds)?;
                let mac: u64 = decode_exact(payload).ok_or_else(bad)?;
                let b = mac.to_le_bytes();
                self.device
                    .send_rarp([b[0], b[1], b[2], b[3], b[4], b[5]])?;
                Ok(Reply::Ack)
            }
            R::SET_BACKEND_REQ_FD => {
                expect_fds(1, &fds)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let reply_ack = self.negotiated(Some(VhostUserProtocolFeatures::REPLY_ACK));
                self.state
                    .set_backend(Some(BackendChannel::new(UnixStream::from(fd), reply_ack)));
                Ok(Reply::Ack)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Writes the device's persistent state into the inflight region, if there is one.
    fn save_device_state(&self) -> Result<(), RequestError> {
        if let Some(region) = &self.inflight {
            region.set_device_state(&self.device.persistent_state())?;
        }
        Ok(())
    }

    fn slot(&mut self, i: u16) -> Result<&mut QueueSlot, RequestError> {
        self.queues
            .get_mut(usize::from(i))
            .ok_or(RequestError::BadQueue(u64::from(i)))
    }

    fn queue_index(&self, raw: u64) -> Result<u16, RequestError> {
        u16::try_from(raw)
            .ok()
            .filter(|i| usize::from(*i) < self.queues.len())
            .ok_or(RequestError::BadQueue(raw))
    }

    /// A queue index whose ring is not running (its layout may change).
    fn stopped_queue(&self, raw: u64) -> Result<u16, RequestError> {
        let i = self.queue_index(raw)?;
        if self
            .queues
            .get(usize::from(i))
            .is_some_and(|q| q.worker.is_some())
        {
            return Err(RequestError::QueueRunning(i));
        }
        Ok(i)
    }

    /// Decodes the u64 payload of SET_VRING_KICK/CALL/ERR and checks the descriptor count.
    fn vring_fd(
        &self,
        req: FrontendReq,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(u16, Option<OwnedFd>), RequestError> {
        let v: u64 = decode_exact(payload).ok_or(RequestError::BadPayload {
            req,
            got: payload.len(),
        })?;
        if v & !(VRING_INDEX_MASK | VRING_FD_INVALID) != 0 {
            return Err(RequestError::BadPayload {
                req,
                got: payload.len(),
            });
        }
        let i = self.queue_index(v & VRING_INDEX_MASK)?;
        let want = if v & VRING_FD_INVALID != 0 { 0 } else { 1 };
        if fds.len() != want {
            return Err(RequestError::BadFds {
                req,
                want,
                got: fds.len(),
            });
        }
        Ok((i, fds.into_iter().next()))
    }

    fn install_memory(&mut self, snapshot: GuestMemory) {
        if let Ok(guard) = self.mem.lock() {
            guard.replace(snapshot);
        }
        // Queues waiting for their rings to become addressable may start now.
        self.update_all_queues();
    }

    fn update_all_queues(&mut self) {
        for i in 0..self.queues.len() {
            if let Ok(i) = u16::try_from(i) {
                self.update_queue(i);
            }
        }
    }

    /// Starts or stops queue `i` to match its configuration.
    fn update_queue(&mut self, i: u16) {
        let protocol_acked =
            self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let Some(slot) = self.queues.get(usize::from(i)) else {
            return;
        };
        // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts.
        // A running worker holds the kick eventfd.
        let has_kick = slot.kick.is_some() || slot.worker.is_some();
        let want = self.features_set
            && has_kick
            && slot.vmm_addrs.is_some()
            && (slot.enabled || !protocol_acked);
        match (want, slot.worker.is_some()) {
            (true, false) => self.start_queue(i),
            (false, true) => self.stop_queue(i),
            _ => {}
        }
    }

    fn start_queue(&mut self, i: u16) {
        let features = self.acked_features;
        let mem = self.mem.memory();
        let Some(slot) = self.queues.get_mut(usize::from(i)) else {
            return;
        };
        let Some(addrs) = slot.vmm_addrs else { return };
        let translate = |a: u64| self.memory.vmm_to_guest(a);
        let (Some(desc), Some(avail), Some(used)) = (
            translate(addrs.desc),
            translate(addrs.avail),
            translate(addrs.used),
        ) else {
            // Not an error yet: memory may arrive later (ADD_MEM_REG), which retries.
            return;
        };
        let ring = SplitRing::new(
            &mem,
            slot.size,
            RingAddrs { desc, avail, used },
            slot.base,
            features & VIRTIO_F_RING_EVENT_IDX != 0,
            features & VIRTIO_F_RING_INDIRECT_DESC != 0,
        );
        let mut ring = match ring {
            Ok(r) => r,
            Err(e) => {
                guest_warn!(queue = i, "cannot start ring: {e}");
                slot.err.signal();
                return;
            }
        };
        let tracking = match self
            .inflight
            .as_ref()
            .map(|r| recover(r, i, &mut ring, &self.state))
            .transpose()
        {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => {
                guest_warn!(queue = i, "cannot start ring: inflight region: {e}");
                slot.err.signal();
                return;
            }
        };
        let handler = match self.device.queue_handler(i, features) {
            Ok(h) => h,
            Err(e) => {
                guest_warn!(
                    queue = i,
                    "cannot start queue: {}",
                    crate::logging::chain(&e)
                );
                slot.err.signal();
                return;
            }
        };
        let Some(kick) = slot.kick.take() else { return };
        let (next_avail, used_idx) = (ring.next_avail(), ring.next_used());
        let spec = WorkerSpec {
            index: i,
            handler,
            ring,
            kick,
            call: Arc::clone(&slot.call),
            err: Arc::clone(&slot.err),
            mem: self.mem.clone(),
            tracking,
            poll: self.opts.poll,
            pipeline: crate::pipeline::Pipeline::new(self.opts.completions),
            view: None,
            log: Arc::clone(&self.log),
            used_log: Arc::clone(&slot.used_log),
            progress: self.state.queue(i),
        };
        match Worker::spawn(spec) {
            Ok(w) => {
                tracing::debug!(
                    queue = i,
                    size = slot.size,
                    base = slot.base,
                    next_avail,
                    used_idx,
                    "queue started"
                );
                slot.worker = Some(w);
            }
            Err(e) => guest_warn!(queue = i, "cannot spawn worker: {e}"),
        }
    }

    /// Stops queue `i` (if running) once its in-flight requests completed; keeps its kick fd so
    /// re-enabling restarts it, and records where it stopped.
    fn stop_queue(&mut self, i: u16) {
        let Some(slot) = self.queues.get_mut(usize::from(i)) else {
            return;
        };
        let Some(worker) = slot.worker.take() else {
            return;
        };
        match worker.stop() {
            Some((ring, kick)) => {
                slot.base = ring.next_avail();
                slot.kick = Some(kick);
                tracing::debug!(queue = i, base = slot.base, "queue stopped");
            }
            None => guest_warn!(queue = i, "queue worker panicked"),
        }
        self.device.queue_stopped(i);
    }

    fn reset_queues(&mut self) {
        let max = self.device.max_queue_size();
        for i in 0..self.queues.len() {
            if let Ok(i) = u16::try_from(i) {
                self.stop_queue(i);
            }
        }
        for q in &mut self.queues {
            *q = QueueSlot::new(max);
        }
        self.acked_features = 0;
        self.features_set = false;
    }

    fn teardown(&mut self) {
        self.reset_queues();
        self.device.disconnected();
    }
}

/// Sets up inflight tracking for queue `index` and works out what a crash left owed: those
/// chains are resubmitted first, and new ones are taken after them.
fn recover(
    region: &Arc<InflightRegion>,
    index: u16,
    ring: &mut SplitRing,
    state: &EngineState,
) -> Result<Tracking, InflightError> {
    let mut q = region.queue(index, ring.size())?;
    let r = q.recover(ring.next_used())?;
    if !r.resubmit.is_empty() {
        state.add_resubmitted(r.resubmit.len() as u64);
        tracing::info!(
            queue = index,
            owed = r.resubmit.len(),
            "resubmitting requests in flight before the restart"
        );
    }
    ring.set_next_avail(r.next_avail);
    Ok(Tracking {
        inflight: Some(q),
        resubmit: r.resubmit.into(),
        batch: Vec::new(),
    })
}

/// How many descriptors a request may carry; any others are refused (and closed).
fn allowed_fds(req: FrontendReq) -> std::ops::RangeInclusive<usize> {
    use FrontendReq as R;
    match req {
        R::SET_MEM_TABLE => 0..=MAX_FDS,
        R::ADD_MEM_REG | R::SET_BACKEND_REQ_FD | R::SET_INFLIGHT_FD | R::SET_LOG_BASE => 1..=1,
        // QEMU 7.2 sends none with REM_MEM_REG, later versions may send the region's.
        R::REM_MEM_REG | R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => 0..=1,
        _ => 0..=0,
    }
}

/// The protocol feature a request belongs to (vhost-user.rst, "Front-end message types"): it
/// is refused unless that feature was negotiated, so a frontend cannot reach code paths (and
/// resources: inflight regions, a backend channel) the device never offered.
///
/// | request | needs |
/// | --- | --- |
/// | GET_QUEUE_NUM | MQ |
/// | GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG | CONFIGURE_MEM_SLOTS |
/// | GET_CONFIG, SET_CONFIG | CONFIG |
/// | GET_INFLIGHT_FD, SET_INFLIGHT_FD | INFLIGHT_SHMFD |
/// | SET_BACKEND_REQ_FD | BACKEND_REQ |
/// | NET_SET_MTU | MTU |
/// | SET_LOG_BASE | LOG_SHMFD |
/// | SEND_RARP | RARP |
/// | GET_STATUS, SET_STATUS | STATUS |
fn needed_protocol_feature(req: FrontendReq) -> Option<VhostUserProtocolFeatures> {
    use FrontendReq as R;
    use VhostUserProtocolFeatures as P;
    match req {
        R::GET_QUEUE_NUM => Some(P::MQ),
        R::GET_MAX_MEM_SLOTS | R::ADD_MEM_REG | R::REM_MEM_REG => Some(P::CONFIGURE_MEM_SLOTS),
        R::GET_CONFIG | R::SET_CONFIG => Some(P::CONFIG),
        R::GET_INFLIGHT_FD | R::SET_INFLIGHT_FD => Some(P::INFLIGHT_SHMFD),
        R::SET_BACKEND_REQ_FD => Some(P::BACKEND_REQ),
        R::NET_SET_MTU => Some(P::MTU),
        R::SET_LOG_BASE => Some(P::LOG_SHMFD),
        R::SEND_RARP => Some(P::RARP),
        R::GET_STATUS | R::SET_STATUS => Some(P::STATUS),
        _ => None,
    }
}

fn has_reply(req: FrontendReq) -> bool {
    use FrontendReq as R;
    matches!(
        req,
        R::GET_FEATURES
            | R::GET_PROTOCOL_FEATURES
            | R::GET_QUEUE_NUM
            | R::GET_VRING_BASE
            | R::GET_CONFIG
            | R::GET_INFLIGHT_FD
            | R::GET_MAX_MEM_SLOTS
            | R::GET_STATUS
            | R::GET_SHARED_OBJECT
            | R::GET_SHMEM_CONFIG
            | R::SET_LOG_BASE
            | R::POSTCOPY_ADVISE
            | R::SET_DEVICE_STATE_FD
            | R::CHECK_DEVICE_STATE
    )
}

fn u64_reply(v: u64) -> Reply {
    Reply::Payload(v.to_ne_bytes().to_vec())
}

fn len32(p: &[u8]) -> u32 {
    // Replies are built here and are a few hundred bytes at most.
    u32::try_from(p.len()).unwrap_or(u32::MAX)
}

fn eventfd_from(fd: OwnedFd) -> Result<EventFd, RequestError> {
    set_nonblocking(&fd).map_err(RequestError::EventFd)?;
    // SAFETY: we own `fd`; EventFd takes over ownership and closes it on drop.
    Ok(unsafe {
        <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
    })
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
