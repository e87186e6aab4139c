//! The device side of a packed virtqueue (VIRTIO 1.1 §2.8): one descriptor ring written by both
//! sides, wrap counters instead of indexes, and event suppression structures instead of flags
//! and event indexes in the rings. It offers the same operations as [`SplitRing`], so devices
//! see no difference (through [`Ring`]).
//!
//! What differs underneath, and why it is handled here:
//! - Used descriptors are written in completion order over slots the driver filled, so a slot
//!   of a chain still in progress may be overwritten: every chain's ring descriptors are copied
//!   when it is taken, and re-reading a chain (resubmission, a held receive buffer) uses the copy.
//! - The device skips as many slots as the completed chain occupied; that count is kept per
//!   buffer id, and an id already in the device's hands is refused (a hostile driver could
//!   otherwise make two chains share one record).
//! - A batch of used descriptors becomes visible when its first descriptor's flags are stored:
//!   they are stored last, so the driver (and inflight recovery) sees all of a batch or none.
//!
//! [`SplitRing`]: super::SplitRing
//! [`Ring`]: super::Ring

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vm_memory::GuestAddress;

use super::chain::{ChainError, Desc, DESC_SIZE};
use super::packed_chain::{self, Limits, PackedDesc, Pos};
use super::split::{check_part, AvailChain, RingAddrs, RingError, MAX_QUEUE_SIZE};
use super::written::Written;
use crate::dirty_log::DirtyLog;
use crate::guest_access::GuestAccess;
use crate::memory::GuestMemory;

/// `VIRTIO_F_RING_PACKED`: the guest drives packed rings.
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

/// Event suppression flags (the `flags` half of a suppression structure).
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;

/// The head of a chain that names no record (a duplicate buffer id): completing it does nothing.
const NO_HEAD: u16 = u16::MAX;

/// Where a packed ring stands: the vhost-user ring base of a packed queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedBase {
    pub avail: Pos,
    pub used: Pos,
}

impl PackedBase {
    /// A fresh ring: both wrap counters start at 1.
    pub const FRESH: PackedBase = PackedBase {
        avail: Pos {
            slot: 0,
            wrap: true,
        },
        used: Pos {
            slot: 0,
            wrap: true,
        },
    };

    /// `SET_VRING_BASE`'s packed payload: avail index and wrap in bits 0-15, used in 16-31.
    pub fn decode(num: u32, size: u16) -> Option<Self> {
        let avail = Pos::decode((num & 0xffff) as u16);
        let used = Pos::decode((num >> 16) as u16);
        (avail.slot < size && used.slot < size).then_some(Self { avail, used })
    }

    pub fn encode(self) -> u32 {
        u32::from(self.avail.encode()) | (u32::from(self.used.encode()) << 16)
    }
}

/// Per buffer id: the chain in the device's hands under it.
#[derive(Debug, Default)]
struct Record {
    busy: bool,
    slots: u16,
    /// The chain's ring descriptors as taken.
    raw: Vec<PackedDesc>,
}

/// State of one packed ring.
#[derive(Debug)]
pub struct PackedRing {
    size: u16,
    /// `avail` is the driver event suppression area, `used` the device's.
    addrs: RingAddrs,
    event_idx: bool,
    indirect: bool,
    next_avail: Pos,
    /// Where the next used descriptor goes (written, maybe not yet published).
    next_used: Pos,
    /// Slots from `next_avail` on seen available (saves re-reading flags).
    horizon: u16,
    records: Vec<Record>,
    /// Chains taken and not completed.
    in_hands: u16,
    /// Used descriptors written whose flags are not stored yet: `(slot, flags)`, ring order.
    unpublished: Vec<(u16, u16)>,
    unpublished_slots: u32,
    /// Used position the guest can see.
    published_used: Pos,
    /// Slots published since the last interrupt decision.
    slots_since_decision: u32,
    /// Completions published since the guest was last interrupted.
    unseen: u16,
    owed: bool,
    /// Chains put back (receive buffers not filled): `(buffer id, first slot)`.
    held: VecDeque<(u16, Pos)>,
    written: Written,
    log: Option<Arc<DirtyLog>>,
    used_log: Option<u64>,
    log_buffers: bool,
    /// Free-running counts of chains taken and completed (what `next_avail`/`next_used`
    /// report for the control socket: packed rings have no such indexes).
    taken_count: u16,
    used_count: u16,
    scratch: Vec<PackedDesc>,
}

impl PackedRing {
    /// Validates the layout against guest memory; `base` is where `SET_VRING_BASE` (or inflight
    /// recovery) says the ring stands.
    pub fn new(
        mem: &GuestMemory,
        size: u16,
        addrs: RingAddrs,
        base: PackedBase,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self, RingError> {
        // Packed rings need not be a power of two.
        if size == 0 || size > MAX_QUEUE_SIZE {
            return Err(RingError::BadSize(size));
        }
        if base.avail.slot >= size || base.used.slot >= size {
            return Err(RingError::BadBase);
        }
        let n = u64::from(size);
        check_part(
            mem,
            addrs.desc,
            DESC_SIZE.saturating_mul(n),
            16,
            "descriptor ring",
        )?;
        check_part(mem, addrs.avail, 4, 4, "driver event suppression")?;
        check_part(mem, addrs.used, 4, 4, "device event suppression")?;
        Ok(Self {
            size,
            addrs,
            event_idx,
            indirect,
            next_avail: base.avail,
            next_used: base.used,
            horizon: 0,
            records: (0..size).map(|_| Record::default()).collect(),
            in_hands: 0,
            unpublished: Vec::new(),
            unpublished_slots: 0,
            published_used: base.used,
            slots_since_decision: 0,
            unseen: 0,
            owed: false,
            held: VecDeque::new(),
            written: Written::new(size),
            log: None,
            used_log: None,
            log_buffers: true,
            taken_count: 0,
            used_count: 0,
            scratch: Vec::new(),
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    pub fn indirect(&self) -> bool {
        self.indirect
    }

    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Guest address of the descriptor ring.
    pub fn desc_table(&self) -> GuestAddress {
        self.addrs.desc
    }

    /// Chains taken so far (free-running).
    pub fn taken_count(&self) -> u16 {
        self.taken_count
    }

    /// Chains completed so far (free-running).
    pub fn used_count(&self) -> u16 {
        self.used_count
    }

    /// Where the ring stands (`GET_VRING_BASE`). Used descriptors written but not published
    /// are counted: the ring is only stopped after a flush.
    pub fn base(&self) -> PackedBase {
        PackedBase {
            avail: self.next_avail,
            used: self.next_used,
        }
    }

    pub fn next_avail_pos(&self) -> Pos {
        self.next_avail
    }

    pub fn next_used_pos(&self) -> Pos {
        self.next_used
    }

    fn limits(&self) -> Limits {
        Limits {
            queue_size: self.size,
            indirect: self.indirect,
        }
    }

    /// After inflight recovery: chains owed from before a crash, by buffer id with their ring
    /// descriptors as the region kept them, are in the device's hands again.
    pub fn restore_in_hands(&mut self, id: u16, raw: &[PackedDesc]) -> Result<(), RingError> {
        let rec = self
            .records
            .get_mut(usize::from(id))
            .ok_or(RingError::Inflight(format!("buffer id {id} out of range")))?;
        if rec.busy {
            return Err(RingError::Inflight(format!("buffer id {id} owed twice")));
        }
        rec.busy = true;
        rec.slots = u16::try_from(raw.len()).unwrap_or(u16::MAX);
        rec.raw.clear();
        rec.raw.extend_from_slice(raw);
        self.in_hands = self.in_hands.saturating_add(1);
        self.taken_count = self.taken_count.wrapping_add(1);
        Ok(())
    }

    /// The ring descriptors of the chain in the device's hands under `id`.
    pub fn record(&self, id: u16) -> Option<&[PackedDesc]> {
        self.records
            .get(usize::from(id))
            .filter(|r| r.busy)
            .map(|r| r.raw.as_slice())
    }

    /// Looks ahead for available slots past `next_avail`; returns how many are known.
    fn scan(&mut self, mem: &GuestAccess) -> Result<u16, RingError> {
        while self.horizon < self.size {
            let pos = self.next_avail.advance(self.horizon, self.size);
            let flags = packed_chain::load_flags(mem, self.addrs.desc, pos.slot)
                .ok_or(RingError::Memory)?;
            if !packed_chain::is_avail(flags, pos.wrap) {
                break;
            }
            self.horizon = self.horizon.saturating_add(1);
        }
        Ok(self.horizon)
    }

    /// Slots the guest made available that we have not taken (each chain counts its slots).
    pub fn pending(&mut self, mem: &GuestAccess) -> Result<u16, RingError> {
        self.scan(mem)
    }

    /// Takes the next available chain, copying its descriptors into `descs`.
    pub fn pop(
        &mut self,
        mem: &GuestAccess,
        descs: &mut Vec<Desc>,
    ) -> Result<Option<AvailChain>, RingError> {
        if self.horizon == 0 && self.scan(mem)? == 0 {
            return Ok(None);
        }
        let start = self.next_avail;
        let limits = self.limits();
        let mut raw = std::mem::take(&mut self.scratch);
        let t = packed_chain::take(mem, self.addrs.desc, start, limits, &mut raw, descs);
        if t.slots == 0 {
            self.scratch = raw;
            return Err(RingError::Memory);
        }
        self.next_avail = start.advance(t.slots, self.size);
        self.horizon = self.horizon.saturating_sub(t.slots);
        self.taken_count = self.taken_count.wrapping_add(1);
        let mut error = t.result.err();
        let head = match self.records.get_mut(usize::from(t.id)) {
            None => {
                error = Some(ChainError::HeadOutOfRange(t.id));
                t.id
            }
            Some(rec) if rec.busy => {
                error = Some(ChainError::IdInUse(t.id));
                NO_HEAD
            }
            Some(rec) => {
                rec.busy = true;
                rec.slots = t.slots;
                std::mem::swap(&mut rec.raw, &mut raw);
                self.in_hands = self.in_hands.saturating_add(1);
                t.id
            }
        };
        self.scratch = raw;
        if head != NO_HEAD {
            self.written.record(head, descs);
        }
        Ok(Some(AvailChain {
            head,
            pos: start.encode(),
            error,
        }))
    }

    /// Reads the chain in the device's hands under `head` again, from the copy taken with it.
    pub fn chain_at(&mut self, mem: &GuestAccess, head: u16, descs: &mut Vec<Desc>) -> AvailChain {
        let limits = self.limits();
        let error = match self.records.get(usize::from(head)) {
            Some(rec) if rec.busy => packed_chain::buffers(mem, &rec.raw, limits, descs).err(),
            _ => {
                descs.clear();
                Some(ChainError::HeadOutOfRange(head))
            }
        };
        self.written.record(head, descs);
        AvailChain {
            head,
            pos: self.next_avail.encode(),
            error,
        }
    }

    pub fn hold(&mut self, chain: &AvailChain) {
        self.held.push_back((chain.head, Pos::decode(chain.pos)));
    }

    pub fn take_held(&mut self, mem: &GuestAccess, descs: &mut Vec<Desc>) -> Option<AvailChain> {
        let (head, start) = self.held.pop_front()?;
        let mut c = self.chain_at(mem, head, descs);
        c.pos = start.encode();
        Some(c)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// As [`SplitRing::release_held`](super::SplitRing::release_held): held chains that are the
    /// last taken, in order, are given back by stepping `next_avail` back over them (their slots
    /// are still marked available); otherwise they are used empty.
    pub fn release_held(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        let mut expect = self.held.front().map(|&(_, p)| p);
        let mut tail = true;
        for &(head, start) in &self.held {
            let slots = self.records.get(usize::from(head)).map_or(0, |r| r.slots);
            if expect != Some(start) || slots == 0 {
                tail = false;
                break;
            }
            expect = Some(start.advance(slots, self.size));
        }
        if tail && expect == Some(self.next_avail) {
            if let Some(&(_, first)) = self.held.front() {
                self.next_avail = first;
                self.horizon = 0;
            }
            while let Some((head, _)) = self.held.pop_front() {
                if let Some(rec) = self.records.get_mut(usize::from(head)) {
                    rec.busy = false;
                    self.in_hands = self.in_hands.saturating_sub(1);
                    self.taken_count = self.taken_count.wrapping_sub(1);
                }
                self.written.complete(head, None);
            }
            return Ok(());
        }
        while let Some((head, _)) = self.held.pop_front() {
            self.push_used(mem, head, 0)?;
        }
        self.publish_used(mem)
    }

    /// Writes a used descriptor (all but its flags); the guest sees it after
    /// [`publish_used`](Self::publish_used). A head naming no chain in our hands is dropped.
    pub fn push_used(&mut self, mem: &GuestAccess, head: u16, len: u32) -> Result<bool, RingError> {
        let Some(rec) = self.records.get_mut(usize::from(head)).filter(|r| r.busy) else {
            return Ok(false);
        };
        rec.busy = false;
        let slots = rec.slots;
        let slot = self.next_used.slot;
        let at = packed_chain::slot_addr(self.addrs.desc, slot);
        mem.write_val(len.to_le(), GuestAddress(at.0.saturating_add(8)))
            .ok_or(RingError::Memory)?;
        mem.write_val(head.to_le(), GuestAddress(at.0.saturating_add(12)))
            .ok_or(RingError::Memory)?;
        self.unpublished
            .push((slot, packed_chain::used_flags(self.next_used.wrap, len > 0)));
        self.unpublished_slots = self.unpublished_slots.saturating_add(u32::from(slots));
        // Migrating: the chain's buffers, and the descriptor (by guest address: the dirty log
        // is indexed by guest-physical address, the ring's included).
        let buffers_log = self.log.as_deref().filter(|_| self.log_buffers);
        self.written.complete(head, buffers_log);
        if let (Some(log), Some(_)) = (self.log.as_deref(), self.used_log) {
            log.mark(at.0, DESC_SIZE);
        }
        self.next_used = self.next_used.advance(slots, self.size);
        self.in_hands = self.in_hands.saturating_sub(1);
        self.used_count = self.used_count.wrapping_add(1);
        Ok(true)
    }

    pub fn set_log(&mut self, log: Option<Arc<DirtyLog>>, used_log: Option<u64>, buffers: bool) {
        self.log = log;
        self.used_log = used_log;
        self.log_buffers = buffers;
    }

    /// Makes every written used descriptor visible: flags stored from the last to the first, so
    /// the driver, which looks at the first, sees the batch whole.
    pub fn publish_used(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        let chains = u16::try_from(self.unpublished.len()).unwrap_or(u16::MAX);
        for &(slot, flags) in self.unpublished.iter().rev() {
            let at = packed_chain::slot_addr(self.addrs.desc, slot);
            mem.store_u16(
                flags.to_le(),
                GuestAddress(at.0.saturating_add(packed_chain::FLAGS_OFFSET)),
                Ordering::Release,
            )
            .map_err(|_| RingError::Memory)?;
        }
        self.unpublished.clear();
        self.published_used = self.next_used;
        self.slots_since_decision = self
            .slots_since_decision
            .saturating_add(self.unpublished_slots);
        self.unpublished_slots = 0;
        self.unseen = self.unseen.saturating_add(chains);
        Ok(())
    }

    /// Whether the driver's suppression structure asks for an interrupt for `slots` slots used
    /// up to `new`.
    fn wants_interrupt(&self, mem: &GuestAccess, new: Pos, slots: u32) -> Result<bool, RingError> {
        let raw: u32 = mem.read_val(self.addrs.avail).ok_or(RingError::Memory)?;
        let raw = u32::from_le(raw);
        let off_wrap = (raw & 0xffff) as u16;
        let flags = (raw >> 16) as u16 & 3;
        Ok(match flags {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx => {
                if slots >= u32::from(self.size) {
                    return Ok(true);
                }
                let event = Pos::decode(off_wrap);
                let mut event_idx = event.slot;
                if event.wrap != new.wrap {
                    event_idx = event_idx.wrapping_sub(self.size);
                }
                let slots = slots as u16;
                let old = new.slot.wrapping_sub(slots);
                // vring_need_event, in ring slots.
                new.slot.wrapping_sub(event_idx).wrapping_sub(1) < new.slot.wrapping_sub(old)
            }
            // ENABLE, DESC without EVENT_IDX (invalid: err towards interrupting), reserved.
            _ => true,
        })
    }

    pub fn needs_signal(&mut self, mem: &GuestAccess) -> Result<bool, RingError> {
        Ok(self.interrupt_owed(mem)?.is_some())
    }

    /// A look ahead, changing nothing: would the guest want an interrupt if everything written
    /// were published, and how many completions would it find?
    pub fn interrupt_due(&self, mem: &GuestAccess) -> Result<Option<u16>, RingError> {
        let unpublished = u16::try_from(self.unpublished.len()).unwrap_or(u16::MAX);
        let unseen = self.unseen.saturating_add(unpublished);
        if self.owed {
            return Ok(Some(unseen));
        }
        let slots = self
            .slots_since_decision
            .saturating_add(self.unpublished_slots);
        if slots == 0 {
            return Ok(None);
        }
        Ok(self
            .wants_interrupt(mem, self.next_used, slots)?
            .then_some(unseen))
    }

    /// If the guest is owed an interrupt for what was published: how many completions it has
    /// not seen.
    pub fn interrupt_owed(&mut self, mem: &GuestAccess) -> Result<Option<u16>, RingError> {
        if self.slots_since_decision > 0 && !self.owed {
            // Order the flag stores before reading the guest's suppression state.
            fence(Ordering::SeqCst);
            let slots = self.slots_since_decision;
            self.slots_since_decision = 0;
            self.owed = self.wants_interrupt(mem, self.published_used, slots)?;
        }
        Ok(self.owed.then_some(self.unseen))
    }

    pub fn signalled(&mut self) {
        self.owed = false;
        self.unseen = 0;
        self.slots_since_decision = 0;
    }

    /// Chains in our hands plus slots seen waiting (the split ring's count of chains made
    /// available and not completed, as near as a packed ring knows it without a full scan).
    pub fn outstanding(&self) -> u16 {
        self.in_hands.saturating_add(self.horizon)
    }

    /// Writes the device event suppression structure (one 32-bit store: the driver reads both
    /// halves at once).
    fn set_device_event(
        &self,
        mem: &GuestAccess,
        off_wrap: u16,
        flags: u16,
    ) -> Result<(), RingError> {
        let v = u32::from(off_wrap) | (u32::from(flags) << 16);
        mem.write_val(v.to_le(), self.addrs.used)
            .ok_or(RingError::Memory)?;
        if let (Some(log), Some(base)) = (self.log.as_deref(), self.used_log) {
            log.mark(base, 4);
        }
        Ok(())
    }

    /// Asks the guest to kick for new buffers. Returns true if buffers arrived meanwhile.
    pub fn enable_notifications(&mut self, mem: &GuestAccess) -> Result<bool, RingError> {
        if self.event_idx {
            self.set_device_event(mem, self.next_avail.encode(), EVENT_DESC)?;
        } else {
            self.set_device_event(mem, 0, EVENT_ENABLE)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.scan(mem)? != 0)
    }

    /// Asks for a kick when the guest makes a slot available beyond those available now.
    pub fn enable_notifications_beyond_avail(
        &mut self,
        mem: &GuestAccess,
    ) -> Result<bool, RingError> {
        let seen = self.scan(mem)?;
        if self.event_idx {
            let at = self.next_avail.advance(seen.min(self.size), self.size);
            self.set_device_event(mem, at.encode(), EVENT_DESC)?;
        } else {
            self.set_device_event(mem, 0, EVENT_ENABLE)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.scan(mem)? != seen)
    }

    /// Tells the guest not to kick at all (busy-polling).
    pub fn suppress_notifications(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        self.set_device_event(mem, 0, EVENT_DISABLE)
    }

    /// Tells the guest kicks are not needed while we are processing anyway. With EVENT_IDX the
    /// event offset is left behind as we advance, which suppresses kicks (as for split rings).
    pub fn disable_notifications(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        if !self.event_idx {
            self.set_device_event(mem, 0, EVENT_DISABLE)?;
        }
        Ok(())
    }
}
