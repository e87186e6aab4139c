//! Host-pointer access to a packed ring (VIRTIO 1.1 §2.8) laid out in the harness's own guest
//! RAM, the packed counterpart of `raw_ring.rs`: plain loads and stores, no per-access bounds
//! walk, so the lean drivers and the instant device cost on packed rings what a guest's driver
//! costs there.
//!
//! The three addresses are what vhost-user's SET_VRING_ADDR carries for a packed queue: the
//! descriptor ring, the driver event suppression area (sent as the available ring's address)
//! and the device event suppression area (sent as the used ring's).

use std::sync::atomic::{AtomicU16, AtomicU32};

use anyhow::{ensure, Result};

use super::raw_ring::{host, need_event, read_at, write_at};
use crate::frontend::packed::{DESC_F_AVAIL, DESC_F_USED, EVENT_F_DESC, EVENT_F_DISABLE};
use crate::frontend::Rings;

/// A ring position and the wrap counter of its lap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub slot: u16,
    pub wrap: bool,
}

impl Pos {
    /// The vhost-user encoding (ring bases, event offsets): slot | wrap << 15.
    pub fn encode(self) -> u16 {
        self.slot | (u16::from(self.wrap) << 15)
    }

    pub fn decode(v: u16) -> Self {
        Self {
            slot: v & 0x7fff,
            wrap: v & 0x8000 != 0,
        }
    }

    /// `n` slots further on in a ring of `size` (`n <= size`), flipping the wrap counter when
    /// it passes the end (Linux's `if (++i >= num) { i = 0; wrap ^= 1; }`).
    pub fn advance(self, n: u16, size: u16) -> Self {
        let to = u32::from(self.slot) + u32::from(n);
        if to >= u32::from(size) {
            Self {
                // Less than `size` (n <= size): fits.
                slot: (to - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Self {
                slot: to as u16,
                wrap: self.wrap,
            }
        }
    }

    /// AVAIL and USED as the driver sets them to make a descriptor available in this lap.
    pub fn avail_flags(self) -> u16 {
        if self.wrap {
            DESC_F_AVAIL
        } else {
            DESC_F_USED
        }
    }

    /// AVAIL and USED as the device sets them to mark a descriptor used in this lap.
    pub fn used_flags(self) -> u16 {
        if self.wrap {
            DESC_F_AVAIL | DESC_F_USED
        } else {
            0
        }
    }

    /// Whether descriptor `flags` say "available" in this lap.
    pub fn is_avail(self, flags: u16) -> bool {
        (flags & DESC_F_AVAIL != 0) == self.wrap && (flags & DESC_F_USED != 0) != self.wrap
    }

    /// Whether descriptor `flags` say "used" in this lap (Linux's `is_used_desc_packed`).
    pub fn is_used(self, flags: u16) -> bool {
        let avail = flags & DESC_F_AVAIL != 0;
        let used = flags & DESC_F_USED != 0;
        avail == used && used == self.wrap
    }
}

/// Host pointers to one packed ring's parts.
#[derive(Debug, Clone, Copy)]
pub struct RawPacked {
    pub size: u16,
    pub desc: *mut u8,
    /// `struct pvirtq_event_suppress` the driver writes (interrupt suppression).
    pub driver_event: *mut u8,
    /// `struct pvirtq_event_suppress` the device writes (kick suppression).
    pub device_event: *mut u8,
}

// SAFETY: as for `RawRing`: the pointers point into guest RAM that outlives every user (the
// driver owns the mapping; the instant backend's thread is joined before the driver is dropped).
unsafe impl Send for RawPacked {}

impl RawPacked {
    /// Byte offset of descriptor `slot`. Positions never leave the ring (`Pos::advance` keeps
    /// them inside), so this is a compare, not the division a modulo would cost on every
    /// access; the check keeps a stray slot from addressing past the ring.
    fn offset(&self, slot: u16) -> usize {
        assert!(
            slot < self.size,
            "slot {slot} outside a ring of {}",
            self.size
        );
        16 * usize::from(slot)
    }

    /// `flags` of descriptor `slot`: the field that hands a descriptor over, either way.
    pub fn flags(&self, slot: u16) -> &AtomicU16 {
        let p = self
            .desc
            .wrapping_add(self.offset(slot) + 14)
            .cast::<AtomicU16>();
        // SAFETY: descriptors are 16-byte aligned inside guest RAM (the layout aligns the ring
        // to 4 KiB), so `flags` at offset 14 is 2-byte aligned; guest RAM outlives the driver.
        unsafe { &*p }
    }

    /// Writes addr, len and id of descriptor `slot`; its flags are the caller's to store.
    pub fn write_desc(&self, slot: u16, addr: u64, len: u32, id: u16) {
        let at = self.offset(slot);
        write_at(self.desc, at, addr.to_le());
        write_at(self.desc, at + 8, len.to_le());
        write_at(self.desc, at + 12, id.to_le());
    }

    /// Reads descriptor `slot`: (addr, len, id). Call after an acquire load of its flags (or of
    /// the chain head's flags) that made it visible.
    pub fn desc(&self, slot: u16) -> (u64, u32, u16) {
        let at = self.offset(slot);
        (
            u64::from_le(read_at(self.desc, at)),
            u32::from_le(read_at(self.desc, at + 8)),
            u16::from_le(read_at(self.desc, at + 12)),
        )
    }

    /// Writes the len and id of a used descriptor at `slot` (the device never writes addr).
    pub fn write_used(&self, slot: u16, id: u16, len: u32) {
        let at = self.offset(slot);
        write_at(self.desc, at + 8, len.to_le());
        write_at(self.desc, at + 12, id.to_le());
    }

    /// Both suppression areas as one 32-bit word (off_wrap low, flags high), so a reader gets
    /// offset and flags from the same moment, as Linux reads the device's with one load.
    pub fn driver_event(&self) -> &AtomicU32 {
        event_word(self.driver_event)
    }

    pub fn device_event(&self) -> &AtomicU32 {
        event_word(self.device_event)
    }
}

fn event_word(p: *mut u8) -> &'static AtomicU32 {
    // SAFETY: the suppression areas are 4-byte aligned (the layout puts each at a 4 KiB
    // boundary) and lie inside guest RAM, which outlives the driver.
    unsafe { &*p.cast::<AtomicU32>() }
}

/// An event suppression word as (off_wrap, flags).
pub fn split_event(word: u32) -> (u16, u16) {
    let word = u32::from_le(word);
    (word as u16, (word >> 16) as u16)
}

/// An event suppression word from (off_wrap, flags).
pub fn event(off_wrap: u16, flags: u16) -> u32 {
    (u32::from(off_wrap) | u32::from(flags) << 16).to_le()
}

/// Whether the other side's suppression word asks to be notified for `added` slots ending
/// just before `next` (Linux's `virtqueue_kick_prepare_packed`; the device's interrupt
/// decision is the same test on the driver's area). Call after a full fence that orders the
/// descriptor stores before this read.
pub fn wants_event(word: u32, event_idx: bool, size: u16, next: Pos, added: u16) -> bool {
    let (off_wrap, flags) = split_event(word);
    if flags != EVENT_F_DESC || !event_idx {
        // ENABLE, or DESC without EVENT_IDX (not valid: notifying is always safe).
        return flags != EVENT_F_DISABLE;
    }
    if u32::from(added) >= u32::from(size) {
        return true;
    }
    let at = Pos::decode(off_wrap);
    let mut event = at.slot;
    // An offset in the other lap: count it from the start of this one.
    if at.wrap != next.wrap {
        event = event.wrapping_sub(size);
    }
    need_event(event, next.slot, next.slot.wrapping_sub(added))
}

/// Host pointers to packed queue `q` of `rings`, and the position the driver stands at (the
/// queue must have nothing in flight).
pub fn raw_packed<R: Rings>(rings: &mut R, q: u16) -> Result<(RawPacked, Pos)> {
    let size = rings.setup().queue_size;
    let (mem, dq) = rings.mem_and_queue(q);
    ensure!(dq.is_packed(), "queue {q} is a split ring");
    ensure!(dq.in_flight() == 0, "queue {q} has buffers in flight");
    // The driver queue's base: next available and used positions with their wrap counters
    // (0x8000_8000 on a fresh ring); with nothing in flight they are the same.
    let base = dq.base();
    let (avail, used) = (Pos::decode(base as u16), Pos::decode((base >> 16) as u16));
    ensure!(avail == used, "queue {q} has buffers in flight");
    let layout = dq.layout;
    let ring = RawPacked {
        size,
        desc: host(mem, layout.desc, 16 * usize::from(size))?,
        driver_event: host(mem, layout.avail, 4)?,
        device_event: host(mem, layout.used, 4)?,
    };
    Ok((ring, used))
}
