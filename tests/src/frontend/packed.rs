//! The driver side of a packed virtqueue (virtio 1.1, 2.8), as Linux's virtio_ring runs it: one
//! descriptor ring that the driver fills and the device overwrites with used descriptors, a wrap
//! counter on each side, and the two event suppression areas. [`DriverQueue`](super::DriverQueue)
//! dispatches here for packed rings.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::queue::{need_event, Buf, RingLayout, Used, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

pub const DESC_F_AVAIL: u16 = 1 << 7;
pub const DESC_F_USED: u16 = 1 << 15;
/// Event suppression flags (`struct pvirtq_event_suppress`).
pub const EVENT_F_ENABLE: u16 = 0;
pub const EVENT_F_DISABLE: u16 = 1;
pub const EVENT_F_DESC: u16 = 2;
/// Largest packed queue (the spec's 2^15: positions keep bit 15 for the wrap counter).
pub const MAX_SIZE: u16 = 1 << 15;
/// The ring base of a fresh packed ring: both positions 0, both wrap counters 1.
pub const FRESH_BASE: u32 = 0x8000_8000;

/// A ring position and the wrap counter that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    at: u16,
    wrap: bool,
}

impl Pos {
    const START: Self = Self { at: 0, wrap: true };

    /// Moves `n` slots on, flipping the wrap counter on each wrap.
    fn advance(&mut self, n: u16, size: u16) {
        let to = u32::from(self.at) + u32::from(n);
        let laps = to / u32::from(size);
        // Remainder of a division by a u16: fits.
        self.at = (to % u32::from(size)) as u16;
        self.wrap ^= laps % 2 == 1;
    }

    /// The 16-bit encoding of ring bases and event offsets: position | wrap << 15.
    fn encode(self) -> u16 {
        self.at | (u16::from(self.wrap) << 15)
    }

    /// AVAIL and USED as the driver sets them to make a descriptor available at this position.
    fn avail_flags(self) -> u16 {
        if self.wrap {
            DESC_F_AVAIL
        } else {
            DESC_F_USED
        }
    }
}

/// A descriptor written verbatim by [`DriverQueue::add_packed_raw`](super::DriverQueue::add_packed_raw).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    /// NEXT, WRITE, INDIRECT as the test wants them (AVAIL/USED are the driver's).
    pub flags: u16,
}

#[derive(Debug)]
pub(super) struct PackedDriver {
    size: u16,
    layout: RingLayout,
    event_idx: bool,
    free_ids: Vec<u16>,
    /// Ring slots each buffer in flight occupies, by buffer id.
    in_flight: HashMap<u16, u16>,
    free_slots: u16,
    next_avail: Pos,
    last_used: Pos,
    /// Slots made available and slots seen used, free-running (the split ring's avail and used
    /// indices have no packed counterpart in memory; these give callers the same arithmetic).
    avail_count: u16,
    used_count: u16,
    /// First descriptors of chains added but not yet published: (slot, flags). Their flags are
    /// written last, so the device never sees part of a chain.
    pending: Vec<(u16, u16)>,
}

impl PackedDriver {
    pub(super) fn new(size: u16, layout: RingLayout, event_idx: bool) -> Result<Self> {
        if size == 0 || size > MAX_SIZE {
            bail!("packed queue size {size} outside 1..={MAX_SIZE}");
        }
        Ok(Self {
            size,
            layout,
            event_idx,
            free_ids: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            free_slots: size,
            next_avail: Pos::START,
            last_used: Pos::START,
            avail_count: 0,
            used_count: 0,
            pending: Vec::new(),
        })
    }

    pub(super) fn free_descriptors(&self) -> usize {
        usize::from(self.free_slots)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub(super) fn avail_idx(&self) -> u16 {
        self.avail_count
    }

    pub(super) fn last_used(&self) -> u16 {
        self.used_count
    }

    /// The base (GET/SET_VRING_BASE encoding) of a device that took every buffer published and
    /// completed every one the driver has seen.
    pub(super) fn base(&self) -> u32 {
        u32::from(self.next_avail.encode()) | u32::from(self.last_used.encode()) << 16
    }

    fn desc_at(&self, slot: u16) -> GuestAddress {
        GuestAddress(self.layout.desc.0 + 16 * u64::from(slot))
    }

    /// Writes addr, len and id of a descriptor; its flags too unless it heads a chain.
    fn write_desc(
        &self,
        mem: &GuestMemoryMmap<()>,
        at: GuestAddress,
        addr: u64,
        len: u32,
        id: u16,
        flags: Option<u16>,
    ) -> Result<()> {
        mem.write_obj(addr.to_le(), at)?;
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8))?;
        mem.write_obj(id.to_le(), GuestAddress(at.0 + 12))?;
        if let Some(flags) = flags {
            mem.write_obj(flags.to_le(), GuestAddress(at.0 + 14))?;
        }
        Ok(())
    }

    /// Takes an id and `slots` ring slots for a new buffer, or `None` if the ring is full.
    fn take(&mut self, slots: u16) -> Option<(u16, Pos)> {
        if slots == 0 || slots > self.free_slots {
            return None;
        }
        let id = self.free_ids.pop()?;
        self.in_flight.insert(id, slots);
        self.free_slots -= slots;
        self.avail_count = self.avail_count.wrapping_add(slots);
        Some((id, self.next_avail))
    }

    pub(super) fn add(&mut self, mem: &GuestMemoryMmap<()>, bufs: &[Buf]) -> Result<Option<u16>> {
        let descs: Vec<RawDesc> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= DESC_F_NEXT;
                }
                RawDesc {
                    addr: b.addr.0,
                    len: b.len,
                    flags,
                }
            })
            .collect();
        self.add_raw(mem, &descs)
    }

    pub(super) fn add_indirect(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        table: GuestAddress,
        bufs: &[Buf],
    ) -> Result<Option<u16>> {
        let table_len = u32::try_from(bufs.len() * 16)?;
        let Some((id, head)) = self.take(1) else {
            return Ok(None);
        };
        for (i, b) in bufs.iter().enumerate() {
            // In a table only WRITE means something: entries are consecutive, no NEXT, no id.
            let flags = if b.writable { DESC_F_WRITE } else { 0 };
            let at = GuestAddress(table.0 + 16 * i as u64);
            self.write_desc(mem, at, b.addr.0, b.len, 0, Some(flags))?;
        }
        self.write_desc(mem, self.desc_at(head.at), table.0, table_len, id, None)?;
        self.pending
            .push((head.at, head.avail_flags() | DESC_F_INDIRECT));
        self.next_avail.advance(1, self.size);
        Ok(Some(id))
    }

    /// Adds a chain of descriptors whose flags (NEXT, WRITE, INDIRECT) are taken as given,
    /// however wrong (hostile tests); the driver adds only AVAIL/USED and the id, which, as
    /// Linux does, goes in every descriptor, not only the last.
    pub(super) fn add_raw(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        descs: &[RawDesc],
    ) -> Result<Option<u16>> {
        let Ok(slots) = u16::try_from(descs.len()) else {
            return Ok(None);
        };
        let Some((id, head)) = self.take(slots) else {
            return Ok(None);
        };
        let mut pos = head;
        for (i, d) in descs.iter().enumerate() {
            let flags = pos.avail_flags() | (d.flags & !(DESC_F_AVAIL | DESC_F_USED));
            let at = self.desc_at(pos.at);
            if i == 0 {
                self.write_desc(mem, at, d.addr, d.len, id, None)?;
                self.pending.push((pos.at, flags));
            } else {
                self.write_desc(mem, at, d.addr, d.len, id, Some(flags))?;
            }
            pos.advance(1, self.size);
        }
        self.next_avail = pos;
        Ok(Some(id))
    }

    pub(super) fn withhold(&mut self, ids: &[u16]) {
        self.free_ids.retain(|f| !ids.contains(f));
    }

    /// Writes the first descriptor's flags of every chain added since the last publish, in the
    /// order they were added, each after everything else the chain holds.
    pub(super) fn publish(&mut self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        fence(Ordering::SeqCst);
        for (slot, flags) in std::mem::take(&mut self.pending) {
            let at = GuestAddress(self.desc_at(slot).0 + 14);
            mem.store(flags.to_le(), at, Ordering::Release)?;
        }
        Ok(())
    }

    /// Reads an event suppression area as one 32-bit word, so offset and flags are a snapshot.
    fn event_area(mem: &GuestMemoryMmap<()>, at: GuestAddress) -> Result<(u16, u16)> {
        let word = u32::from_le(mem.load(at, Ordering::Acquire)?);
        // Low half off_wrap, high half flags.
        Ok((word as u16, (word >> 16) as u16))
    }

    fn store_event_area(
        mem: &GuestMemoryMmap<()>,
        at: GuestAddress,
        off_wrap: u16,
        flags: u16,
    ) -> Result<()> {
        let word = u32::from(off_wrap) | u32::from(flags) << 16;
        mem.store(word.to_le(), at, Ordering::Release)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Whether the device wants a kick for the slots made available since `old_avail` (read
    /// after they were published).
    pub(super) fn kick_needed(&self, mem: &GuestMemoryMmap<()>, old_avail: u16) -> Result<bool> {
        let added = self.avail_count.wrapping_sub(old_avail);
        self.kick_decision(mem, self.next_avail, added)
    }

    /// Whether the device's event suppression asks for a kick once the driver makes `slots` more
    /// slots available (from where it stands now).
    pub(super) fn would_kick(&self, mem: &GuestMemoryMmap<()>, slots: u16) -> Result<bool> {
        let mut next = self.next_avail;
        next.advance(slots, self.size);
        self.kick_decision(mem, next, slots)
    }

    /// Linux's `virtqueue_kick_prepare_packed`: kick for `added` slots that end before `next`?
    fn kick_decision(&self, mem: &GuestMemoryMmap<()>, next: Pos, added: u16) -> Result<bool> {
        // The device event suppression area.
        let (off_wrap, flags) = Self::event_area(mem, self.layout.used)?;
        Ok(match flags {
            EVENT_F_DISABLE => false,
            EVENT_F_DESC if self.event_idx => {
                let new = next.at;
                let old = new.wrapping_sub(added);
                let mut event = off_wrap & 0x7fff;
                // An offset in the other lap than the driver's: count it from this lap's start.
                if (off_wrap >> 15 != 0) != next.wrap {
                    event = event.wrapping_sub(self.size);
                }
                need_event(event, new, old)
            }
            // ENABLE, or a value the driver does not understand: kicking is always safe.
            _ => true,
        })
    }

    pub(super) fn poll(&mut self, mem: &GuestMemoryMmap<()>) -> Result<Option<Used>> {
        let slot = self.last_used.at;
        let at = self.desc_at(slot);
        let flags = u16::from_le(mem.load(GuestAddress(at.0 + 14), Ordering::Acquire)?);
        let avail = flags & DESC_F_AVAIL != 0;
        let used = flags & DESC_F_USED != 0;
        if avail != used || used != self.last_used.wrap {
            return Ok(None);
        }
        let len = u32::from_le(mem.read_obj(GuestAddress(at.0 + 8))?);
        let id = u16::from_le(mem.read_obj(GuestAddress(at.0 + 12))?);
        let Some(slots) = self.in_flight.remove(&id) else {
            // The id says how many slots to skip; without it, step one slot so that the driver
            // does not read the same descriptor forever (what follows is likely garbage).
            self.last_used.advance(1, self.size);
            self.used_count = self.used_count.wrapping_add(1);
            bail!("device completed buffer id {id} at slot {slot}, which is not in flight");
        };
        self.free_ids.push(id);
        self.free_slots += slots;
        self.last_used.advance(slots, self.size);
        self.used_count = self.used_count.wrapping_add(slots);
        Ok(Some(Used { head: id, len }))
    }

    /// Asks for an interrupt at the next used descriptor, as Linux's
    /// `virtqueue_enable_cb_prepare_packed`: an event offset at the driver's used position with
    /// EVENT_IDX, interrupts enabled without.
    pub(super) fn arm_interrupt(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        let flags = if self.event_idx {
            EVENT_F_DESC
        } else {
            EVENT_F_ENABLE
        };
        Self::store_event_area(mem, self.layout.avail, self.last_used.encode(), flags)
    }

    /// An event offset `used_event - used_idx` slots past the driver's used position, as Linux's
    /// `virtqueue_enable_cb_delayed_packed` (only with EVENT_IDX; without it the offset is
    /// written and the flags left alone, as the split ring's used_event is).
    pub(super) fn set_used_event(&self, mem: &GuestMemoryMmap<()>, used_event: u16) -> Result<()> {
        let later = used_event.wrapping_sub(self.used_count);
        let mut at = self.last_used;
        at.advance(later, self.size);
        if self.event_idx {
            Self::store_event_area(mem, self.layout.avail, at.encode(), EVENT_F_DESC)
        } else {
            mem.store(at.encode().to_le(), self.layout.avail, Ordering::Release)?;
            fence(Ordering::SeqCst);
            Ok(())
        }
    }

    pub(super) fn suppress_interrupts(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        Self::store_event_area(
            mem,
            self.layout.avail,
            self.last_used.encode(),
            EVENT_F_DISABLE,
        )
    }
}
