//! Bringing a vhost-user device up the way QEMU 7.2 does (the message order is QEMU's), and
//! stopping rings again. Device-specific drivers (blk, net) build on this.

use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use anyhow::{ensure, Context, Result};
use vhost::vhost_user::message::{FrontendReq, VhostUserInflight, VhostUserProtocolFeatures};
use vm_memory::ByteValued;
use vm_memory::GuestAddress;

use super::connection::Connection;
use super::packed::FRESH_BASE;
use super::queue::{borrow, DriverQueue, RingLayout};
use super::ram::GuestRam;

pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_INDIRECT: u64 = 1 << 28;
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_PACKED.
pub const F_RING_PACKED: u64 = 1 << 34;
/// VHOST_F_LOG_ALL: acked only while migrating.
pub const F_LOG_ALL: u64 = 1 << 26;
/// VHOST_VRING_F_LOG in SET_VRING_ADDR.
const VRING_F_LOG: u32 = 1;

/// How to set the device up.
#[derive(Debug, Clone)]
pub struct Setup {
    pub queues: u16,
    pub queue_size: u16,
    pub event_idx: bool,
    pub indirect: bool,
    /// Packed virtqueues (VIRTIO_F_RING_PACKED, which the backend must offer) instead of split.
    pub packed: bool,
    /// Device feature bits to ack (intersected with what is offered); ring bits are added from
    /// `event_idx`/`indirect`/`packed`.
    pub device_features: u64,
    /// Send memory as ADD_MEM_REG (CONFIGURE_MEM_SLOTS, as QEMU does when offered) or as one
    /// SET_MEM_TABLE.
    pub add_mem_reg: bool,
    /// Guest RAM regions (guest address, size). The rings live in the first region.
    pub ram_layout: Vec<(u64, u64)>,
    /// GET_QUEUE_NUM counts queue pairs (net) rather than queues.
    pub queue_num_is_pairs: bool,
    /// Negotiate inflight I/O tracking when the backend offers it (QEMU's vhost-user-blk does).
    pub inflight: bool,
    /// Negotiate BACKEND_REQ when offered and hand the backend a channel (SET_BACKEND_REQ_FD),
    /// whose other end is [`Frontend::backend`].
    pub backend_channel: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 128,
            event_idx: true,
            indirect: true,
            packed: false,
            device_features: u64::MAX,
            add_mem_reg: true,
            ram_layout: vec![(0, 64 << 20)],
            queue_num_is_pairs: false,
            inflight: true,
            backend_channel: false,
        }
    }
}

impl Setup {
    /// The default set-up with split (`false`) or packed (`true`) rings.
    pub fn with_packed(packed: bool) -> Self {
        Self {
            packed,
            ..Self::default()
        }
    }
}

/// A connected, started device as the VMM sees it.
#[derive(Debug)]
pub struct Frontend {
    pub conn: Connection,
    pub ram: GuestRam,
    pub queues: Vec<DriverQueue>,
    pub offered: u64,
    pub acked: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub setup: Setup,
    /// The inflight region (QEMU keeps it across backend restarts).
    inflight: Option<InflightShm>,
    /// Our end of the backend channel ([`Setup::backend_channel`]).
    pub backend: Option<UnixStream>,
    /// Per queue, the last ring base sent or received (SET/GET_VRING_BASE): what QEMU's
    /// VirtQueue remembers, and all it has for a packed ring after the backend died.
    bases: Vec<u32>,
}

/// The inflight region the backend handed out (GET_INFLIGHT_FD), as QEMU keeps it.
#[derive(Debug)]
pub struct InflightShm {
    pub fd: OwnedFd,
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightShm {
    fn payload(&self) -> VhostUserInflight {
        VhostUserInflight::new(
            self.mmap_size,
            self.mmap_offset,
            self.num_queues,
            self.queue_size,
        )
    }
}

/// The driver queues `setup` asks for, laid out one after another from guest address 0, in
/// `mem` (zeroed).
pub fn driver_queues(
    mem: &vm_memory::GuestMemoryMmap<()>,
    setup: &Setup,
) -> Result<Vec<DriverQueue>> {
    (0..setup.queues)
        .map(|q| {
            let base = GuestAddress(u64::from(q) * RingLayout::bytes(setup.queue_size));
            let size = setup.queue_size;
            if setup.packed {
                DriverQueue::new_packed(
                    mem,
                    size,
                    RingLayout::packed_at(base, size),
                    setup.event_idx,
                )
            } else {
                DriverQueue::new(mem, size, RingLayout::at(base, size), setup.event_idx)
            }
        })
        .collect()
}

/// Where the first data byte may go: after all rings, 1 MiB aligned.
pub fn data_base(setup: &Setup) -> GuestAddress {
    let rings = u64::from(setup.queues) * RingLayout::bytes(setup.queue_size);
    GuestAddress(rings.div_ceil(1 << 20) * (1 << 20))
}

/// What the handshake negotiated.
struct Negotiated {
    backend: Option<UnixStream>,
    offered: u64,
    protocol: VhostUserProtocolFeatures,
    use_slots: bool,
}

/// The part of the handshake QEMU replays on every (re)connection, up to SET_OWNER.
fn negotiate(conn: &mut Connection, setup: &Setup) -> Result<Negotiated> {
    let offered = conn.get_u64(FrontendReq::GET_FEATURES)?;
    ensure!(
        offered & F_PROTOCOL_FEATURES != 0,
        "backend does not offer protocol features"
    );
    let proto_offered = conn.get_u64(FrontendReq::GET_PROTOCOL_FEATURES)?;
    let mut want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD;
    if setup.inflight {
        want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    if setup.backend_channel {
        want |= VhostUserProtocolFeatures::BACKEND_REQ;
    }
    let protocol = VhostUserProtocolFeatures::from_bits_truncate(proto_offered & want.bits());
    conn.set_u64(FrontendReq::SET_PROTOCOL_FEATURES, protocol.bits())?;
    conn.reply_ack = protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
    let max_queues = conn.get_u64(FrontendReq::GET_QUEUE_NUM)?;
    let wanted = if setup.queue_num_is_pairs {
        setup.queues / 2
    } else {
        setup.queues
    };
    ensure!(
        max_queues >= u64::from(wanted),
        "backend offers {max_queues} queues, {wanted} wanted"
    );
    let use_slots =
        setup.add_mem_reg && protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    if use_slots {
        let slots = conn.get_u64(FrontendReq::GET_MAX_MEM_SLOTS)?;
        ensure!(
            slots >= setup.ram_layout.len() as u64,
            "backend offers {slots} memory slots"
        );
    }
    conn.send(FrontendReq::SET_OWNER, &[], &[])?;
    let backend = if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        let (ours, theirs) = UnixStream::pair()?;
        conn.send(FrontendReq::SET_BACKEND_REQ_FD, &[], &[theirs.as_fd()])?;
        Some(ours)
    } else {
        None
    };
    Ok(Negotiated {
        backend,
        offered,
        protocol,
        use_slots,
    })
}

impl Frontend {
    /// Runs the whole start-up handshake and starts every queue.
    pub fn start(mut conn: Connection, setup: Setup) -> Result<Self> {
        let n = negotiate(&mut conn, &setup)?;
        let ram = GuestRam::with_layout(&setup.ram_layout)?;
        let queues = driver_queues(ram.mem(), &setup)?;
        let mut ring_bits = 0;
        if setup.event_idx {
            ring_bits |= F_EVENT_IDX;
        }
        if setup.indirect {
            ring_bits |= F_INDIRECT;
        }
        if setup.packed {
            ensure!(
                n.offered & F_RING_PACKED != 0,
                "backend does not offer VIRTIO_F_RING_PACKED (features {:#x})",
                n.offered
            );
            ring_bits |= F_RING_PACKED;
        }
        // LOG_ALL is a migration's, not a start's; the ring layout is `setup.packed`'s.
        let device_bits =
            setup.device_features & !(F_EVENT_IDX | F_INDIRECT | F_RING_PACKED | F_LOG_ALL);
        let acked = n.offered & (device_bits | ring_bits | F_PROTOCOL_FEATURES | F_VERSION_1);
        let fresh = if setup.packed { FRESH_BASE } else { 0 };
        let bases = vec![fresh; usize::from(setup.queues)];
        let mut fe = Self {
            conn,
            ram,
            queues,
            offered: n.offered,
            acked,
            protocol: n.protocol,
            setup,
            inflight: None,
            backend: n.backend,
            bases,
        };
        fe.bring_up(n.use_slots, |_| fresh)?;
        Ok(fe)
    }

    /// Reconnects after the backend went away, as QEMU does: the whole handshake again, the same
    /// inflight region, the same memory, and each ring restarted where QEMU believes it is. A
    /// split ring at its used index, read from guest memory. A packed ring's positions are not
    /// in memory: QEMU sends the last base it knows with the available position set back to the
    /// used one (`virtio_queue_packed_restore_last_avail_idx`), and the backend finds the true
    /// positions in the inflight region.
    pub fn reconnect(&mut self, conn: Connection) -> Result<()> {
        self.conn = conn;
        let n = negotiate(&mut self.conn, &self.setup)?;
        self.backend = n.backend;
        ensure!(
            n.offered == self.offered,
            "backend offers different features after a restart"
        );
        let mut bases = Vec::with_capacity(self.queues.len());
        for (q, dq) in self.queues.iter().enumerate() {
            bases.push(if dq.is_packed() {
                let used = self.bases[q] >> 16;
                used | used << 16
            } else {
                u32::from(dq.used_idx(self.ram.mem())?)
            });
        }
        self.bring_up(n.use_slots, |q| bases[usize::from(q)])
    }

    fn get_inflight_fd(&mut self) -> Result<()> {
        let q = VhostUserInflight::new(0, 0, self.setup.queues, self.setup.queue_size);
        let reply = self
            .conn
            .request(FrontendReq::GET_INFLIGHT_FD, q.as_slice(), &[], true)?
            .context("no reply")?;
        let info = VhostUserInflight::from_slice(&reply.payload)
            .copied()
            .context("GET_INFLIGHT_FD reply size")?;
        let fd = reply
            .fds
            .into_iter()
            .next()
            .context("GET_INFLIGHT_FD without a descriptor")?;
        self.inflight = Some(InflightShm {
            fd,
            mmap_size: info.mmap_size,
            mmap_offset: info.mmap_offset,
            num_queues: info.num_queues,
            queue_size: info.queue_size,
        });
        Ok(())
    }

    /// Inflight region, features, memory and rings, in QEMU's order. With inflight tracking,
    /// QEMU (`vhost_dev_prepare_inflight`) sends the features first, so that the backend knows
    /// the ring layout, and so the inflight layout, before GET_INFLIGHT_FD (asked once per VM;
    /// the region is handed back on every start); then the features again as every start does.
    fn bring_up(&mut self, use_slots: bool, base: impl Fn(u16) -> u32) -> Result<()> {
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            self.conn.set_u64(FrontendReq::SET_FEATURES, self.acked)?;
            if self.inflight.is_none() {
                self.get_inflight_fd()?;
            }
        }
        if let Some(shm) = &self.inflight {
            let fd = shm.fd.try_clone()?;
            let payload = shm.payload();
            self.conn.send(
                FrontendReq::SET_INFLIGHT_FD,
                payload.as_slice(),
                &[fd.as_fd()],
            )?;
        }
        self.conn.set_u64(FrontendReq::SET_FEATURES, self.acked)?;
        self.send_memory(use_slots)?;
        for q in 0..self.setup.queues {
            self.start_queue(q, base(q))?;
        }
        Ok(())
    }

    /// The inflight region's descriptor and geometry, if negotiated.
    pub fn inflight(&self) -> Option<&InflightShm> {
        self.inflight.as_ref()
    }

    fn send_memory(&mut self, use_slots: bool) -> Result<()> {
        let fd = self.ram.fd();
        if use_slots {
            for r in self.ram.regions().to_vec() {
                self.conn.add_mem_reg(&r, fd)?;
            }
            Ok(())
        } else {
            let regions = self.ram.regions().to_vec();
            self.conn.set_mem_table(&regions, fd)
        }
    }

    /// SET_VRING_NUM/BASE/ADDR/CALL/KICK and ENABLE for queue `q`, starting at `base` (the
    /// vhost-user encoding: split, the next available index; packed, next avail position and
    /// wrap counter in bits 0-15, used position and wrap counter in bits 16-31).
    pub fn start_queue(&mut self, q: u16, base: u32) -> Result<()> {
        let i = u32::from(q);
        let dq = &self.queues[usize::from(q)];
        let layout = dq.layout;
        let (desc, avail, used) = (
            self.ram.user_addr(layout.desc)?,
            self.ram.user_addr(layout.avail)?,
            self.ram.user_addr(layout.used)?,
        );
        let call = dq.call.try_clone()?;
        let kick = dq.kick.try_clone()?;
        self.conn
            .set_vring_fd(FrontendReq::SET_VRING_CALL, q as u8, Some(borrow(&call)))?;
        self.conn.set_vring_state(
            FrontendReq::SET_VRING_NUM,
            i,
            u32::from(self.setup.queue_size),
        )?;
        self.conn
            .set_vring_state(FrontendReq::SET_VRING_BASE, i, base)?;
        self.bases[usize::from(q)] = base;
        self.conn.set_vring_addr(i, desc, used, avail)?;
        self.conn
            .set_vring_fd(FrontendReq::SET_VRING_KICK, q as u8, Some(borrow(&kick)))?;
        self.conn
            .set_vring_state(FrontendReq::SET_VRING_ENABLE, i, 1)?;
        Ok(())
    }

    /// Disables queue `q` and asks for its base, as QEMU does when the guest driver stops.
    pub fn stop_queue(&mut self, q: u16) -> Result<u32> {
        self.conn
            .set_vring_state(FrontendReq::SET_VRING_ENABLE, u32::from(q), 0)?;
        let base = self.conn.get_vring_base(u32::from(q))?;
        self.bases[usize::from(q)] = base;
        Ok(base)
    }

    pub fn queue(&mut self, q: u16) -> &mut DriverQueue {
        &mut self.queues[usize::from(q)]
    }

    /// Splits borrows: the guest memory and one queue.
    pub fn mem_and_queue(&mut self, q: u16) -> (&vm_memory::GuestMemoryMmap<()>, &mut DriverQueue) {
        (self.ram.mem(), &mut self.queues[usize::from(q)])
    }

    pub fn has(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }
}

/// The dirty log a migrating frontend shares with the backend (SET_LOG_BASE): one bit per
/// 4 KiB page of guest memory.
#[derive(Debug)]
pub struct DirtyLogShm {
    pub fd: OwnedFd,
    map: vm_memory::MmapRegion<()>,
}

impl DirtyLogShm {
    /// A log covering `ram_bytes` of guest memory.
    pub fn new(ram_bytes: u64) -> Result<Self> {
        let bytes = ram_bytes.div_ceil(4096).div_ceil(8).max(1);
        let fd = super::ram::memfd("bulkhead-dirty-log")?;
        std::fs::File::from(fd.try_clone()?).set_len(bytes)?;
        let map = vm_memory::MmapRegion::from_file(
            vm_memory::FileOffset::new(std::fs::File::from(fd.try_clone()?), 0),
            usize::try_from(bytes)?,
        )
        .context("mapping the dirty log")?;
        Ok(Self { fd, map })
    }

    pub fn bytes(&self) -> u64 {
        self.map.size() as u64
    }

    /// Whether the page holding guest address `gpa` is marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / 4096;
        let Ok(i) = usize::try_from(page / 8) else {
            return false;
        };
        if i >= self.map.size() {
            return false;
        }
        let p = self.map.as_ptr().wrapping_add(i);
        // SAFETY: `i` is inside the mapping, which `self` keeps; a volatile read of shared memory.
        let b = unsafe { std::ptr::read_volatile(p) };
        b & (1 << (page % 8)) != 0
    }

    /// Every marked page's guest address.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let pages = self.map.size() as u64 * 8;
        (0..pages)
            .filter(|p| self.is_dirty(p * 4096))
            .map(|p| p * 4096)
            .collect()
    }

    /// Clears the log (as a migration's sync does).
    pub fn clear(&self) {
        // SAFETY: writes zeros over the whole mapping, which `self` keeps.
        unsafe { std::ptr::write_bytes(self.map.as_ptr(), 0, self.map.size()) };
    }
}

impl Frontend {
    /// What QEMU does when a migration starts: share a dirty log (SET_LOG_BASE, answered with a
    /// u64), turn on LOG_ALL (SET_FEATURES, queues running) and ask for used-ring logging
    /// (SET_VRING_ADDR with VHOST_VRING_F_LOG at the used ring's guest address).
    pub fn start_dirty_log(&mut self) -> Result<DirtyLogShm> {
        let total: u64 = self
            .ram
            .regions()
            .iter()
            .map(|r| r.guest_addr + r.size)
            .max()
            .unwrap_or(0);
        let log = DirtyLogShm::new(total)?;
        self.set_log_base(&log)?;
        self.conn
            .set_u64(FrontendReq::SET_FEATURES, self.acked | F_LOG_ALL)?;
        for q in 0..self.setup.queues {
            self.set_used_logging(q, true)?;
        }
        Ok(log)
    }

    /// SET_LOG_BASE with `log` (also to replace a log while logging).
    pub fn set_log_base(&mut self, log: &DirtyLogShm) -> Result<()> {
        let payload = vhost::vhost_user::message::VhostUserLog::new(log.bytes(), 0);
        let reply = self
            .conn
            .request(
                FrontendReq::SET_LOG_BASE,
                payload.as_slice(),
                &[log.fd.as_fd()],
                true,
            )?
            .context("no reply to SET_LOG_BASE")?;
        ensure!(
            reply.payload.len() == 8,
            "SET_LOG_BASE refused ({} bytes of reply)",
            reply.payload.len()
        );
        Ok(())
    }

    /// What QEMU does when the migration ends: LOG_ALL off, used-ring logging off.
    pub fn stop_dirty_log(&mut self) -> Result<()> {
        self.conn.set_u64(FrontendReq::SET_FEATURES, self.acked)?;
        for q in 0..self.setup.queues {
            self.set_used_logging(q, false)?;
        }
        Ok(())
    }

    fn set_used_logging(&mut self, q: u16, on: bool) -> Result<()> {
        let layout = self.queues[usize::from(q)].layout;
        let a = vhost::vhost_user::message::VhostUserVringAddr {
            index: u32::from(q),
            flags: if on { VRING_F_LOG } else { 0 },
            descriptor: self.ram.user_addr(layout.desc)?,
            used: self.ram.user_addr(layout.used)?,
            available: self.ram.user_addr(layout.avail)?,
            log: layout.used.0,
        };
        self.conn
            .send(FrontendReq::SET_VRING_ADDR, a.as_slice(), &[])
    }
}

/// Default per-request wait in tests.
pub const WAIT: Duration = Duration::from_secs(10);
