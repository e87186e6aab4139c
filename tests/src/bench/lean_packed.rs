//! The lean drivers' side of a packed ring, written as Linux's virtio_ring packed driver runs it
//! (`virtqueue_add_packed`, `virtqueue_kick_prepare_packed`, `virtqueue_get_buf_ctx_packed`,
//! `virtqueue_enable_cb_prepare_packed` / `_delayed_packed`, `virtqueue_disable_cb_packed`):
//!
//! - a chain is written into the ring at the driver's next position, every descriptor with the
//!   buffer id, AVAIL/USED from the driver's wrap counter; the first descriptor's flags are
//!   stored last, with release ordering, so the device sees the whole chain or none of it;
//! - completions are read at the driver's used position while its flags say "used in this lap",
//!   and the position moves on by the slots the buffer's chain took;
//! - the driver event suppression area asks for interrupts (an offset with EVENT_IDX, ENABLE
//!   without) only before the driver sleeps and says DISABLE once it is awake; the device's
//!   area decides kicks.

use std::sync::atomic::Ordering;

use anyhow::{bail, Result};

use super::lean_ring::{RingPtrs, Seg};
use super::raw_packed::{event, raw_packed, split_event, wants_event, Pos, RawPacked};
use crate::frontend::packed::{EVENT_F_DESC, EVENT_F_DISABLE, EVENT_F_ENABLE};
use crate::frontend::queue::{DESC_F_NEXT, DESC_F_WRITE};
use crate::frontend::Rings;

#[derive(Debug)]
pub(super) struct PackedSide {
    ring: RawPacked,
    /// Every buffer's chain, `n` descriptors each, buffer by buffer.
    segs: Vec<Seg>,
    n: u16,
    chains: u16,
    next_avail: Pos,
    /// Slots made available, free-running (what `mark` hands out).
    avail_count: u16,
    last_used: Pos,
    /// The driver event suppression word as last stored (Linux's `event_flags_shadow`, with
    /// the offset): stores that would change nothing are skipped.
    shadow: u32,
}

impl PackedSide {
    pub(super) fn new<R: Rings>(rings: &mut R, q: u16, chains: &[Vec<Seg>]) -> Result<Self> {
        let (ring, at) = raw_packed(rings, q)?;
        // No interrupts until the driver first arms before sleeping, as on the split ring, whose
        // zeroed used_event asks for one interrupt at most. (A zeroed area reads ENABLE: an
        // interrupt for every completion, one eventfd write per pass where the driver never
        // sleeps, such as the inline placements.)
        let shadow = event(at.encode(), EVENT_F_DISABLE);
        ring.driver_event().store(shadow, Ordering::Release);
        Ok(Self {
            ring,
            segs: chains.iter().flatten().copied().collect(),
            n: chains[0].len() as u16,
            chains: chains.len() as u16,
            next_avail: at,
            avail_count: 0,
            last_used: at,
            shadow,
        })
    }

    pub(super) fn ptrs(&self) -> RingPtrs {
        RingPtrs::Packed(self.ring, self.next_avail)
    }

    pub(super) fn mark(&self) -> u16 {
        self.avail_count
    }

    #[inline(always)]
    pub(super) fn push(&mut self, id: u16) {
        let size = self.ring.size;
        let first = usize::from(id) * usize::from(self.n);
        let chain = &self.segs[first..first + usize::from(self.n)];
        let head = self.next_avail;
        let mut head_flags = 0;
        let mut pos = head;
        for (i, seg) in chain.iter().enumerate() {
            let mut flags = pos.avail_flags() | if seg.write { DESC_F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= DESC_F_NEXT;
            }
            self.ring.write_desc(pos.slot, seg.addr, seg.len, id);
            if i == 0 {
                head_flags = flags;
            } else {
                self.ring
                    .flags(pos.slot)
                    .store(flags.to_le(), Ordering::Relaxed);
            }
            pos = pos.advance(1, size);
        }
        // virtio_wmb, then the head's flags: the chain becomes available whole.
        self.ring
            .flags(head.slot)
            .store(head_flags.to_le(), Ordering::Release);
        self.next_avail = pos;
        self.avail_count = self.avail_count.wrapping_add(self.n);
    }

    /// Whether the device wants a kick for the slots pushed since `mark` (after a full fence).
    pub(super) fn kick_needed(&self, event_idx: bool, mark: u16) -> bool {
        let word = self.ring.device_event().load(Ordering::Relaxed);
        let added = self.avail_count.wrapping_sub(mark);
        wants_event(word, event_idx, self.ring.size, self.next_avail, added)
    }

    #[inline(always)]
    pub(super) fn has_used(&self) -> bool {
        let flags = u16::from_le(self.ring.flags(self.last_used.slot).load(Ordering::Acquire));
        self.last_used.is_used(flags)
    }

    #[inline(always)]
    pub(super) fn reap(&mut self, done: &mut Vec<(u16, u32)>) -> Result<()> {
        while self.has_used() {
            // The acquire load of the flags made the rest of the used descriptor visible.
            let (_, len, id) = self.ring.desc(self.last_used.slot);
            if id >= self.chains {
                bail!(
                    "device completed buffer id {id} at slot {}, which it was never given",
                    self.last_used.slot
                );
            }
            self.last_used = self.last_used.advance(self.n, self.ring.size);
            done.push((id, len));
        }
        Ok(())
    }

    fn store_event(&mut self, word: u32, order: Ordering) {
        if word != self.shadow {
            self.ring.driver_event().store(word, order);
            self.shadow = word;
        }
    }

    /// Interrupt once the device has used `later + 1` more buffers (with EVENT_IDX), or at the
    /// next one (without); then looks once more. True if something was used meanwhile.
    pub(super) fn arm(&mut self, event_idx: bool, later: u16) -> bool {
        let word = if event_idx {
            // The slot after the `later` buffers to come: the used descriptor after them, which
            // is where their slots end (every chain takes `n`).
            let slots = u32::from(later) * u32::from(self.n);
            let slots = slots.min(u32::from(self.ring.size)) as u16;
            let at = self.last_used.advance(slots, self.ring.size);
            event(at.encode(), EVENT_F_DESC)
        } else {
            event(0, EVENT_F_ENABLE)
        };
        // Offset and flags in one store: the device reads them in one load.
        self.store_event(word, Ordering::Release);
        // virtio_mb before looking at the ring again (virtqueue_poll_packed).
        std::sync::atomic::fence(Ordering::SeqCst);
        self.has_used()
    }

    pub(super) fn disable(&mut self) {
        let (off_wrap, _) = split_event(self.shadow);
        self.store_event(event(off_wrap, EVENT_F_DISABLE), Ordering::Relaxed);
    }

    pub(super) fn state(&self) -> String {
        let (drv_off, drv_flags) = split_event(self.ring.driver_event().load(Ordering::Relaxed));
        let (dev_off, dev_flags) = split_event(self.ring.device_event().load(Ordering::Relaxed));
        format!(
            "packed: driver next avail {:?} last used {:?}; flags at last used {:#x}; driver area off_wrap {drv_off:#x} flags {drv_flags}; device area off_wrap {dev_off:#x} flags {dev_flags}",
            self.next_avail,
            self.last_used,
            u16::from_le(self.ring.flags(self.last_used.slot).load(Ordering::Relaxed)),
        )
    }
}
