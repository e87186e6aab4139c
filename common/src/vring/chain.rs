//! Walking a descriptor chain out of guest memory, validating as we go.
//!
//! Written here rather than using `virtio_queue::DescriptorChain` because that iterator ends
//! silently on an error, so a truncated chain looks like a short valid one; a device must tell the
//! two apart to answer with an error status instead of acting on half a request. Each descriptor is
//! read from guest memory exactly once and copied; the guest rewriting it later changes nothing.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use vm_memory::{Address, ByteValued, GuestAddress};

use crate::guest_access::GuestAccess;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// Size of one split-ring descriptor in guest memory.
pub const DESC_SIZE: u64 = 16;

/// One guest buffer of a chain, as read (once) from guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub writable: bool,
}

/// The raw in-memory descriptor layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

// SAFETY: repr(C) struct of integers with no padding (8 + 4 + 2 + 2 bytes); any bit pattern is valid.
unsafe impl ByteValued for RawDesc {}

/// Why a chain is unusable. The chain is still completed (with zero length) so the guest gets its
/// buffers back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head index {0} is beyond the queue size")]
    HeadOutOfRange(u16),
    #[error("next index {0} is beyond the table size")]
    NextOutOfRange(u16),
    #[error("chain is longer than the queue size (a loop?)")]
    TooLong,
    #[error("chain carries more than 4 GiB")]
    TooManyBytes,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with the NEXT flag or after other descriptors")]
    IndirectNotAlone,
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    BadIndirectLength(u32),
    #[error("indirect table not feature-negotiated")]
    IndirectNotNegotiated,
    #[error("descriptor at {0:#x} (length {1}) is outside guest memory")]
    Unmapped(u64, u32),
    #[error("descriptor table entry is outside guest memory")]
    UnreadableDescriptor,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("packed chain continues into a slot the driver did not make available")]
    NotAvailable,
    #[error("buffer id {0} is already in the device's hands")]
    IdInUse(u16),
}

/// Limits for walking a chain.
#[derive(Clone, Copy, Debug)]
pub struct WalkLimits {
    pub queue_size: u16,
    pub indirect: bool,
}

/// Reads the chain starting at `head` from the descriptor table at `table` into `out`.
/// `out` is cleared first; it never grows beyond `queue_size` entries.
pub fn walk(
    mem: &GuestAccess,
    table: GuestAddress,
    head: u16,
    limits: WalkLimits,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    if head >= limits.queue_size {
        return Err(ChainError::HeadOutOfRange(head));
    }
    let max_descs = usize::from(limits.queue_size);
    let mut table = table;
    let mut table_len = limits.queue_size;
    let mut index = head;
    let mut in_indirect = false;
    let mut total: u32 = 0;
    let mut seen_writable = false;
    loop {
        let offset = u64::from(index)
            .checked_mul(DESC_SIZE)
            .ok_or(ChainError::UnreadableDescriptor)?;
        let at = table
            .checked_add(offset)
            .ok_or(ChainError::UnreadableDescriptor)?;
        let raw: RawDesc = mem.read_val(at).ok_or(ChainError::UnreadableDescriptor)?;
        if raw.flags & DESC_F_INDIRECT != 0 {
            if !limits.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if raw.flags & DESC_F_NEXT != 0 || !out.is_empty() {
                return Err(ChainError::IndirectNotAlone);
            }
            let entries = indirect_entries(raw.len, limits.queue_size)?;
            let addr = GuestAddress(raw.addr);
            if !mem.contains(addr, raw.len as usize) {
                return Err(ChainError::Unmapped(raw.addr, raw.len));
            }
            table = addr;
            table_len = entries;
            index = 0;
            in_indirect = true;
            continue;
        }
        if out.len() >= max_descs {
            return Err(ChainError::TooLong);
        }
        total = total.checked_add(raw.len).ok_or(ChainError::TooManyBytes)?;
        let writable = raw.flags & DESC_F_WRITE != 0;
        if seen_writable && !writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        seen_writable |= writable;
        if !mem.contains(GuestAddress(raw.addr), raw.len as usize) {
            return Err(ChainError::Unmapped(raw.addr, raw.len));
        }
        out.push(Desc {
            addr: GuestAddress(raw.addr),
            len: raw.len,
            writable,
        });
        if raw.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        if raw.next >= table_len {
            return Err(ChainError::NextOutOfRange(raw.next));
        }
        index = raw.next;
    }
}

/// Entries of an indirect table of `len` bytes (both layouts' descriptors are 16 bytes).
pub(super) fn indirect_entries(len: u32, queue_size: u16) -> Result<u16, ChainError> {
    if len == 0 || u64::from(len) % DESC_SIZE != 0 {
        return Err(ChainError::BadIndirectLength(len));
    }
    let entries = u64::from(len) / DESC_SIZE;
    // A chain may not be longer than the queue, so neither may an indirect table.
    if entries > u64::from(queue_size) {
        return Err(ChainError::TooLong);
    }
    u16::try_from(entries).map_err(|_| ChainError::TooLong)
}

/// Total bytes of the chain's descriptors (the walk bounds this below 4 GiB).
pub fn total_len(descs: &[Desc]) -> u64 {
    descs.iter().map(|d| u64::from(d.len)).sum()
}
