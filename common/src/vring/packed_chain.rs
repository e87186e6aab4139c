//! Reading one buffer's descriptors out of a packed descriptor ring (VIRTIO 1.1 §2.8), with the
//! same validation as split chains (`chain.rs`): a chain is consecutive ring slots linked by
//! the NEXT flag, or a single INDIRECT slot naming a table. Each ring descriptor is read once and
//! copied, so the guest rewriting the slot later (or the device overwriting it with a used
//! descriptor, which packed rings do out of order) changes nothing.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::sync::atomic::Ordering;

use vm_memory::{ByteValued, GuestAddress};

use super::chain::{indirect_entries, ChainError, Desc, DESC_SIZE};
use crate::guest_access::GuestAccess;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
pub const F_AVAIL: u16 = 1 << 7;
pub const F_USED: u16 = 1 << 15;

/// A packed descriptor as laid out in guest memory (and in the inflight region's copies).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

// SAFETY: repr(C) struct of integers with no padding (8 + 4 + 2 + 2 bytes); any bit pattern is valid.
unsafe impl ByteValued for PackedDesc {}

/// Offset of `flags` within a descriptor.
pub const FLAGS_OFFSET: u64 = 14;

/// Whether `flags` mark a descriptor the driver made available in the lap of `wrap`.
pub fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) != wrap
}

/// Flags of a used descriptor written in the lap of `wrap`.
pub fn used_flags(wrap: bool, written: bool) -> u16 {
    let lap = if wrap { F_AVAIL | F_USED } else { 0 };
    if written {
        lap | F_WRITE
    } else {
        lap
    }
}

/// A position in the ring: slot and the lap's wrap counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub slot: u16,
    pub wrap: bool,
}

impl Pos {
    /// `n` slots further on in a ring of `size` (`n <= size`).
    pub fn advance(self, n: u16, size: u16) -> Pos {
        let slot = u32::from(self.slot).saturating_add(u32::from(n));
        if slot >= u32::from(size) {
            Pos {
                slot: u16::try_from(slot.saturating_sub(u32::from(size))).unwrap_or(0),
                wrap: !self.wrap,
            }
        } else {
            Pos {
                slot: u16::try_from(slot).unwrap_or(0),
                wrap: self.wrap,
            }
        }
    }

    /// `n` slots back (`n <= size`).
    pub fn retreat(self, n: u16, size: u16) -> Pos {
        if n <= self.slot {
            Pos {
                slot: self.slot.saturating_sub(n),
                wrap: self.wrap,
            }
        } else {
            Pos {
                slot: size.saturating_sub(n.saturating_sub(self.slot)),
                wrap: !self.wrap,
            }
        }
    }

    /// The vhost-user encoding of one index: slot in bits 0-14, wrap counter in bit 15.
    pub fn encode(self) -> u16 {
        (self.slot & 0x7fff) | if self.wrap { 0x8000 } else { 0 }
    }

    pub fn decode(v: u16) -> Pos {
        Pos {
            slot: v & 0x7fff,
            wrap: v & 0x8000 != 0,
        }
    }
}

/// Address of slot `slot` of the ring at `table`.
pub fn slot_addr(table: GuestAddress, slot: u16) -> GuestAddress {
    GuestAddress(
        table
            .0
            .saturating_add(u64::from(slot).saturating_mul(DESC_SIZE)),
    )
}

/// Reads the flags of the descriptor in `slot` (acquire: the rest of the descriptor, written
/// before the flags, is then visible).
pub fn load_flags(mem: &GuestAccess, table: GuestAddress, slot: u16) -> Option<u16> {
    let at = GuestAddress(slot_addr(table, slot).0.saturating_add(FLAGS_OFFSET));
    mem.load_u16(at, Ordering::Acquire).ok().map(u16::from_le)
}

fn read_desc(mem: &GuestAccess, at: GuestAddress) -> Option<PackedDesc> {
    let d: PackedDesc = mem.read_val(at)?;
    Some(PackedDesc {
        addr: u64::from_le(d.addr),
        len: u32::from_le(d.len),
        id: u16::from_le(d.id),
        flags: u16::from_le(d.flags),
    })
}

/// What taking a chain from the ring found.
#[derive(Debug)]
pub struct Taken {
    /// Ring slots the chain occupies (the device skips this many when it uses the buffer).
    pub slots: u16,
    /// Buffer id (of the last descriptor).
    pub id: u16,
    pub result: Result<(), ChainError>,
}

/// Limits for walking a chain.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub queue_size: u16,
    pub indirect: bool,
}

/// Reads the chain starting at `start` (whose flags the caller saw available) from the ring
/// at `table`: its ring descriptors go into `raw` and its buffers into `out` (both cleared
/// first, neither longer than the queue size).
pub fn take(
    mem: &GuestAccess,
    table: GuestAddress,
    start: Pos,
    limits: Limits,
    raw: &mut Vec<PackedDesc>,
    out: &mut Vec<Desc>,
) -> Taken {
    raw.clear();
    out.clear();
    let mut pos = start;
    let mut id = 0;
    loop {
        let Some(d) = read_desc(mem, slot_addr(table, pos.slot)) else {
            return taken(raw, id, Err(ChainError::UnreadableDescriptor));
        };
        if !raw.is_empty() && !is_avail(d.flags, pos.wrap) {
            // The driver makes the first slot available last; a later one that is not is a
            // broken chain. It is not ours: stop before it.
            return taken(raw, id, Err(ChainError::NotAvailable));
        }
        raw.push(d);
        id = d.id;
        if d.flags & F_NEXT == 0 {
            break;
        }
        if raw.len() >= usize::from(limits.queue_size) {
            return taken(raw, id, Err(ChainError::TooLong));
        }
        pos = pos.advance(1, limits.queue_size);
    }
    let result = buffers(mem, raw, limits, out);
    taken(raw, id, result)
}

fn taken(raw: &[PackedDesc], id: u16, result: Result<(), ChainError>) -> Taken {
    Taken {
        slots: u16::try_from(raw.len()).unwrap_or(u16::MAX),
        id,
        result,
    }
}

/// Turns a chain's ring descriptors (as taken, or as kept by the inflight region) into its
/// buffers, following an indirect table; `out` is cleared first.
pub fn buffers(
    mem: &GuestAccess,
    raw: &[PackedDesc],
    limits: Limits,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    let mut total: u32 = 0;
    let mut seen_writable = false;
    let mut push = |addr: u64, len: u32, writable: bool, out: &mut Vec<Desc>| {
        if out.len() >= usize::from(limits.queue_size) {
            return Err(ChainError::TooLong);
        }
        total = total.checked_add(len).ok_or(ChainError::TooManyBytes)?;
        if seen_writable && !writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        seen_writable |= writable;
        if !mem.contains(GuestAddress(addr), len as usize) {
            return Err(ChainError::Unmapped(addr, len));
        }
        out.push(Desc {
            addr: GuestAddress(addr),
            len,
            writable,
        });
        Ok(())
    };
    for (i, d) in raw.iter().enumerate() {
        if d.flags & F_INDIRECT == 0 {
            push(d.addr, d.len, d.flags & F_WRITE != 0, out)?;
            continue;
        }
        if !limits.indirect {
            return Err(ChainError::IndirectNotNegotiated);
        }
        if i != 0 || raw.len() != 1 {
            return Err(ChainError::IndirectNotAlone);
        }
        let entries = indirect_entries(d.len, limits.queue_size)?;
        if !mem.contains(GuestAddress(d.addr), d.len as usize) {
            return Err(ChainError::Unmapped(d.addr, d.len));
        }
        for e in 0..entries {
            let at = slot_addr(GuestAddress(d.addr), e);
            let t = read_desc(mem, at).ok_or(ChainError::UnreadableDescriptor)?;
            // Only WRITE means anything in a table (the rest is reserved); an INDIRECT there
            // is refused as for split rings rather than silently taken as a buffer.
            if t.flags & F_INDIRECT != 0 {
                return Err(ChainError::NestedIndirect);
            }
            push(t.addr, t.len, t.flags & F_WRITE != 0, out)?;
        }
    }
    Ok(())
}
