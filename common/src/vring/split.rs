//! The device side of a split virtqueue: taking chains from the available ring, returning them
//! on the used ring, and deciding when the guest needs an interrupt (EVENT_IDX or the NO_INTERRUPT
//! flag). Every device uses this one implementation.
//!
//! Not `virtio_queue::Queue`: it publishes the used index after every element (we batch, which
//! inflight tracking's `last_batch_head` relies on), ignores `VRING_AVAIL_F_NO_INTERRUPT`, and
//! its chain iterator hides errors (see `chain.rs`).

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::chain::{self, ChainError, Desc, WalkLimits, DESC_SIZE};
use std::sync::Arc;

use crate::dirty_log::DirtyLog;
use crate::guest_access::GuestAccess;
use crate::memory::GuestMemory;

const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// Largest queue a split ring may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Guest-physical addresses of a ring's three parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

/// Errors that make the whole ring unusable until the frontend sets it up again.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    #[error("ring part {0} is misaligned or outside guest memory")]
    BadAddress(&'static str),
    #[error("guest memory access to the ring failed")]
    Memory,
    #[error("available index moved by {0}, more than the queue size")]
    AvailIndexJump(u16),
    #[error("inflight region unusable: {0}")]
    Inflight(String),
    #[error("a chain cannot be put back on a queue with inflight tracking")]
    PutBackWithInflight,
    #[error("ring base names a slot beyond the queue size")]
    BadBase,
}

/// A chain taken from the available ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvailChain {
    pub head: u16,
    /// Position in the available ring it was taken from (for putting it back).
    pub pos: u16,
    /// Set when the chain is malformed; the descriptors read so far are unusable.
    pub error: Option<ChainError>,
}

/// State of one split ring.
#[derive(Debug)]
pub struct SplitRing {
    size: u16,
    addrs: RingAddrs,
    event_idx: bool,
    indirect: bool,
    next_avail: Wrapping<u16>,
    /// Last available index read from the guest; saves a guest read per chain.
    shadow_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// Used index at the last notification decision.
    signalled_used: Wrapping<u16>,
    /// The guest asked to be interrupted for a completion published since the last signal;
    /// `armed_at` is the first completion it has not seen.
    owed: bool,
    armed_at: Wrapping<u16>,
    /// Chains taken and put back, to be handed out again first: `(head, available position)`.
    held: std::collections::VecDeque<(u16, u16)>,
    /// Writable buffers of each chain in the device's hands, for the dirty log.
    written: super::written::Written,
    /// The dirty log of this pass (`None` unless migrating).
    log: Option<Arc<DirtyLog>>,
    /// Guest physical address at which the used ring is logged (`VHOST_VRING_F_LOG`).
    used_log: Option<u64>,
    log_buffers: bool,
}

impl SplitRing {
    /// Validates the layout against guest memory. `next_avail` comes from `SET_VRING_BASE`;
    /// the used index is read back from the guest (it survives a backend restart there).
    pub fn new(
        mem: &GuestMemory,
        size: u16,
        addrs: RingAddrs,
        next_avail: u16,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self, RingError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        let n = u64::from(size);
        check_part(
            mem,
            addrs.desc,
            DESC_SIZE.saturating_mul(n),
            16,
            "descriptor table",
        )?;
        check_part(
            mem,
            addrs.avail,
            ring_bytes(AVAIL_ELEM, n),
            2,
            "available ring",
        )?;
        check_part(mem, addrs.used, ring_bytes(USED_ELEM, n), 4, "used ring")?;
        let used_idx: u16 = mem
            .load(addrs.used.unchecked_add(2), Ordering::Acquire)
            .map_err(|_| RingError::Memory)?;
        Ok(Self {
            size,
            addrs,
            event_idx,
            indirect,
            next_avail: Wrapping(next_avail),
            shadow_avail: Wrapping(next_avail),
            next_used: Wrapping(used_idx),
            signalled_used: Wrapping(used_idx),
            owed: false,
            armed_at: Wrapping(used_idx),
            held: std::collections::VecDeque::new(),
            written: super::written::Written::new(size),
            log: None,
            used_log: None,
            log_buffers: true,
        })
    }

    /// Ring slot of a free-running index (the size is a power of two).
    fn slot(&self, index: Wrapping<u16>) -> u64 {
        u64::from(index.0 & self.size.wrapping_sub(1))
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Continues taking chains at `next_avail` (after inflight recovery).
    pub fn set_next_avail(&mut self, next_avail: u16) {
        self.next_avail = Wrapping(next_avail);
        self.shadow_avail = Wrapping(next_avail);
    }

    /// Reads the chain at `head` again without touching the available ring (resubmission of a
    /// chain taken before a crash).
    pub fn chain_at(&mut self, mem: &GuestAccess, head: u16, descs: &mut Vec<Desc>) -> AvailChain {
        let limits = WalkLimits {
            queue_size: self.size,
            indirect: self.indirect,
        };
        let error = chain::walk(mem, self.addrs.desc, head, limits, descs).err();
        self.written.record(head, descs);
        AvailChain {
            head,
            pos: self.next_avail.0,
            error,
        }
    }

    /// Keeps a taken chain to hand out again before any other (a receive buffer gathered for a
    /// frame that did not come). Chains come back in the order they were put back.
    pub fn hold(&mut self, chain: &AvailChain) {
        self.held.push_back((chain.head, chain.pos));
    }

    /// The oldest held chain, its descriptors read again into `descs`.
    pub fn take_held(&mut self, mem: &GuestAccess, descs: &mut Vec<Desc>) -> Option<AvailChain> {
        let (head, pos) = self.held.pop_front()?;
        let mut c = self.chain_at(mem, head, descs);
        c.pos = pos;
        Some(c)
    }

    /// Chains held when the ring stops: if they are the last ones taken, in order, `next_avail`
    /// steps back over them, so the next start takes them again; otherwise (another chain was
    /// completed between them) they are returned to the guest empty, which a driver recycles.
    /// Either way each chain goes back exactly once.
    pub fn release_held(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        let n = u16::try_from(self.held.len()).unwrap_or(u16::MAX);
        let first = self.next_avail - Wrapping(n);
        let tail = self
            .held
            .iter()
            .zip(0..)
            .all(|(&(_, pos), i)| Wrapping(pos) == first + Wrapping(i));
        if tail {
            self.next_avail = first;
            self.shadow_avail = first;
            self.held.clear();
            return Ok(());
        }
        while let Some((head, _)) = self.held.pop_front() {
            self.push_used(mem, head, 0)?;
        }
        self.publish_used(mem)
    }

    /// Chains held to be handed out again.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn avail_idx(&self, mem: &GuestAccess) -> Result<Wrapping<u16>, RingError> {
        let idx: u16 = mem
            .load_u16(self.addrs.avail.unchecked_add(2), Ordering::Acquire)
            .map_err(|_| RingError::Memory)?;
        Ok(Wrapping(u16::from_le(idx)))
    }

    /// Number of chains the guest made available that we have not taken.
    pub fn pending(&mut self, mem: &GuestAccess) -> Result<u16, RingError> {
        let idx = self.avail_idx(mem)?;
        let pending = (idx - self.next_avail).0;
        if pending > self.size {
            return Err(RingError::AvailIndexJump(pending));
        }
        self.shadow_avail = idx;
        Ok(pending)
    }

    /// Takes the next available chain, copying its descriptors into `descs`.
    pub fn pop(
        &mut self,
        mem: &GuestAccess,
        descs: &mut Vec<Desc>,
    ) -> Result<Option<AvailChain>, RingError> {
        if self.shadow_avail == self.next_avail && self.pending(mem)? == 0 {
            return Ok(None);
        }
        let slot = self.slot(self.next_avail);
        let head: u16 = mem
            .load_u16(elem(self.addrs.avail, AVAIL_ELEM, slot), Ordering::Relaxed)
            .map_err(|_| RingError::Memory)?;
        let head = u16::from_le(head);
        let pos = self.next_avail.0;
        self.next_avail += Wrapping(1);
        let limits = WalkLimits {
            queue_size: self.size,
            indirect: self.indirect,
        };
        let error = chain::walk(mem, self.addrs.desc, head, limits, descs).err();
        self.written.record(head, descs);
        Ok(Some(AvailChain { head, pos, error }))
    }

    /// Writes a used element; the guest sees it after [`publish_used`](Self::publish_used).
    /// A head beyond the queue size (from a malformed chain) is dropped: it names no buffer.
    pub fn push_used(&mut self, mem: &GuestAccess, head: u16, len: u32) -> Result<bool, RingError> {
        if head >= self.size {
            return Ok(false);
        }
        let at = elem(self.addrs.used, USED_ELEM, self.slot(self.next_used));
        // Two 32-bit stores: used elements are only 4-byte aligned (the ring starts 4-aligned,
        // elements follow a 4-byte header), and the guest reads them only after the release
        // store of the index in `publish_used`.
        mem.write_val(u32::from(head).to_le(), at)
            .ok_or(RingError::Memory)?;
        mem.write_val(len.to_le(), at.unchecked_add(4))
            .ok_or(RingError::Memory)?;
        // Migrating: what the device wrote into the chain, then the element, both before the
        // index that makes them visible is published.
        let buffers_log = self.log.as_deref().filter(|_| self.log_buffers);
        self.written.complete(head, buffers_log);
        self.log_used(at, USED_ELEM);
        self.next_used += Wrapping(1);
        Ok(true)
    }

    /// Logging for this pass: the session's current dirty log (`None` when not migrating),
    /// where the used ring is logged, and whether completed buffers are (see
    /// `LogState::buffers_logged`).
    pub fn set_log(&mut self, log: Option<Arc<DirtyLog>>, used_log: Option<u64>, buffers: bool) {
        self.log = log;
        self.used_log = used_log;
        self.log_buffers = buffers;
    }

    /// Stores a 16-bit field of the used ring (index, flags, avail_event) and logs it.
    fn store_used(
        &self,
        mem: &GuestAccess,
        val: u16,
        at: GuestAddress,
        order: Ordering,
    ) -> Result<(), RingError> {
        mem.store_u16(val, at, order)
            .map_err(|_| RingError::Memory)?;
        self.log_used(at, 2);
        Ok(())
    }

    /// Marks a write of `len` bytes at `at` (inside the used ring) in the dirty log.
    fn log_used(&self, at: GuestAddress, len: u64) {
        if let (Some(log), Some(base)) = (self.log.as_deref(), self.used_log) {
            let offset = at.0.wrapping_sub(self.addrs.used.0);
            log.mark(base.wrapping_add(offset), len);
        }
    }

    /// Makes every pushed element visible to the guest.
    pub fn publish_used(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        self.store_used(
            mem,
            self.next_used.0.to_le(),
            self.addrs.used.unchecked_add(2),
            Ordering::Release,
        )
    }

    /// Whether the guest wants an interrupt for the elements published since the last call.
    /// The answer stays yes until [`signalled`](Self::signalled) is called.
    pub fn needs_signal(&mut self, mem: &GuestAccess) -> Result<bool, RingError> {
        Ok(self.interrupt_owed(mem)?.is_some())
    }

    /// A look ahead, changing nothing: would the guest want an interrupt if everything written
    /// so far were published, and how many completions would it find? The decision itself is
    /// [`interrupt_owed`](Self::interrupt_owed), over what was published.
    pub fn interrupt_due(&self, mem: &GuestAccess) -> Result<Option<u16>, RingError> {
        if self.owed {
            return Ok(Some((self.next_used - self.armed_at).0));
        }
        let (old, new) = (self.signalled_used, self.next_used);
        if old == new {
            return Ok(None);
        }
        if self.event_idx {
            let at = elem(self.addrs.avail, AVAIL_ELEM, u64::from(self.size));
            let used_event = Wrapping(u16::from_le(
                mem.load_u16(at, Ordering::Relaxed)
                    .map_err(|_| RingError::Memory)?,
            ));
            Ok((new - used_event - Wrapping(1) < new - old).then_some((new - used_event).0))
        } else {
            let flags = u16::from_le(
                mem.load_u16(self.addrs.avail, Ordering::Relaxed)
                    .map_err(|_| RingError::Memory)?,
            );
            Ok((flags & AVAIL_F_NO_INTERRUPT == 0).then_some((new - old).0))
        }
    }

    /// If the guest is owed an interrupt: how many published completions it has not seen (it
    /// will find that many when it looks). `None` if it did not ask for one.
    pub fn interrupt_owed(&mut self, mem: &GuestAccess) -> Result<Option<u16>, RingError> {
        let old = self.signalled_used;
        let new = self.next_used;
        if old != new && !self.owed {
            // Order the used index store before reading the guest's suppression state.
            fence(Ordering::SeqCst);
            self.signalled_used = new;
            if self.event_idx {
                let at = elem(self.addrs.avail, AVAIL_ELEM, u64::from(self.size));
                let used_event: u16 = mem
                    .load_u16(at, Ordering::Relaxed)
                    .map_err(|_| RingError::Memory)?;
                let used_event = Wrapping(u16::from_le(used_event));
                // vring_need_event: signal if used_event lies in [old, new).
                if new - used_event - Wrapping(1) < new - old {
                    self.owed = true;
                    self.armed_at = used_event;
                }
            } else {
                let flags: u16 = mem
                    .load_u16(self.addrs.avail, Ordering::Relaxed)
                    .map_err(|_| RingError::Memory)?;
                if u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0 {
                    self.owed = true;
                    self.armed_at = old;
                }
            }
        }
        Ok(self.owed.then_some((self.next_used - self.armed_at).0))
    }

    /// The guest was interrupted for everything published so far.
    pub fn signalled(&mut self) {
        self.owed = false;
        self.signalled_used = self.next_used;
    }

    /// Chains the guest made available (as last seen) that are not completed yet: taken and
    /// in progress, or still waiting on the ring.
    pub fn outstanding(&self) -> u16 {
        (self.shadow_avail - self.next_used).0
    }

    /// Asks the guest to kick for new buffers. Returns true if buffers arrived meanwhile, in which
    /// case the caller must keep processing (a kick for them may never come).
    pub fn enable_notifications(&mut self, mem: &GuestAccess) -> Result<bool, RingError> {
        if self.event_idx {
            let at = elem(self.addrs.used, USED_ELEM, u64::from(self.size));
            self.store_used(mem, self.next_avail.0.to_le(), at, Ordering::Relaxed)?;
        } else {
            self.store_used(mem, 0u16, self.addrs.used, Ordering::Relaxed)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? != 0)
    }

    /// Asks for a kick when the guest adds a buffer beyond the ones available now (not merely
    /// beyond the ones we took). Returns true if that already happened.
    pub fn enable_notifications_beyond_avail(
        &mut self,
        mem: &GuestAccess,
    ) -> Result<bool, RingError> {
        let seen = self.avail_idx(mem)?;
        if self.event_idx {
            let at = elem(self.addrs.used, USED_ELEM, u64::from(self.size));
            self.store_used(mem, seen.0.to_le(), at, Ordering::Relaxed)?;
        } else {
            self.store_used(mem, 0u16, self.addrs.used, Ordering::Relaxed)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(mem)? != seen)
    }

    /// Tells the guest not to kick at all, even with EVENT_IDX (while busy-polling): the kick
    /// index is set just behind what we took, which the guest's index has already passed.
    pub fn suppress_notifications(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        if self.event_idx {
            let at = elem(self.addrs.used, USED_ELEM, u64::from(self.size));
            let behind = self.next_avail - Wrapping(1);
            self.store_used(mem, behind.0.to_le(), at, Ordering::Relaxed)
        } else {
            self.disable_notifications(mem)
        }
    }

    /// Tells the guest kicks are not needed while we are processing anyway.
    pub fn disable_notifications(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        if !self.event_idx {
            self.store_used(
                mem,
                USED_F_NO_NOTIFY.to_le(),
                self.addrs.used,
                Ordering::Relaxed,
            )?;
        }
        // With EVENT_IDX, avail_event is left behind as we advance, which suppresses kicks.
        Ok(())
    }
}

/// Bytes of the ring header (flags and index) before the elements.
const RING_HEADER: u64 = 4;
const AVAIL_ELEM: u64 = 2;
const USED_ELEM: u64 = 8;

/// Address of element `index` of a ring at `base` (index `size` is the trailing event field).
/// Indexes are at most the queue size, so nothing here can overflow; saturation only keeps the
/// arithmetic total.
fn elem(base: GuestAddress, elem_size: u64, index: u64) -> GuestAddress {
    GuestAddress(
        base.0
            .saturating_add(RING_HEADER.saturating_add(elem_size.saturating_mul(index))),
    )
}

/// Bytes of a ring with `n` elements, including header and event field.
fn ring_bytes(elem_size: u64, n: u64) -> u64 {
    RING_HEADER
        .saturating_add(elem_size.saturating_mul(n))
        .saturating_add(2)
}

/// Checks that a ring part of `len` bytes at `addr` is `align`-aligned guest memory.
pub(super) fn check_part(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: u64,
    align: u64,
    what: &'static str,
) -> Result<(), RingError> {
    let len = usize::try_from(len).map_err(|_| RingError::BadAddress(what))?;
    if !addr.0.is_multiple_of(align) || !mem.check_range(addr, len) {
        return Err(RingError::BadAddress(what));
    }
    Ok(())
}
