//! One queue as the lean drivers (`lean_blk.rs`, `lean_net.rs`) run it, on a split or a packed
//! ring, so that the same driver measures both layouts.
//!
//! Every buffer id owns a fixed chain (its descriptors' addresses, lengths and directions are
//! given once). On a split ring the chains are written into the descriptor table once and making
//! one available is one available-ring entry; on a packed ring the chain is written into the
//! descriptor ring each time, as a packed ring requires (`lean_packed.rs`). Either way each chain
//! is published as it is added, the device is kicked only when it asks, and interrupts are asked
//! for only before the driver sleeps, as Linux's virtio_ring does.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, ensure, Result};

use super::lean_packed::PackedSide;
use super::raw_packed::{Pos, RawPacked};
use super::raw_ring::{arm_interrupt, kick, kick_needed, raw_ring, Interrupts, RawRing};
use crate::frontend::queue::{DESC_F_NEXT, DESC_F_WRITE};
use crate::frontend::Rings;

/// One descriptor of a buffer's chain.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// The device writes it (DESC_F_WRITE).
    pub write: bool,
}

/// Host pointers to a ring, for a device in this process (the instant device).
#[derive(Debug, Clone, Copy)]
pub enum RingPtrs {
    Split(RawRing),
    /// The ring, and where the device starts (nothing is in flight when this is taken).
    Packed(RawPacked, Pos),
}

#[derive(Debug)]
enum Side {
    Split(SplitSide),
    Packed(PackedSide),
}

/// One queue's driver side. The per-request methods are `#[inline(always)]`: left to LLVM, the
/// two-layout bodies were called out of line and the split driver lost a fifth of its one-CPU
/// ceiling against the split-only driver it replaced.
#[derive(Debug)]
pub struct LeanRing {
    side: Side,
    event_idx: bool,
    kick: RawFd,
    interrupts: Interrupts,
    /// What the last `reap` took.
    done: Vec<(u16, u32)>,
}

impl LeanRing {
    /// Queue `q` of `rings` (fresh or quiet: nothing in flight), whichever layout it has, with
    /// `chains[id]` the descriptors of buffer `id`. Every chain has the same number of
    /// descriptors (so a packed ring's slots in flight follow from the buffers in flight).
    pub fn new<R: Rings>(rings: &mut R, q: u16, chains: &[Vec<Seg>]) -> Result<Self> {
        let n = chains.first().map_or(0, Vec::len);
        ensure!(
            n > 0 && chains.iter().all(|c| c.len() == n),
            "chains must all have the same, non-zero number of descriptors"
        );
        let size = usize::from(rings.setup().queue_size);
        ensure!(
            chains.len() * n <= size,
            "{} chains of {n} descriptors on a queue of {size}",
            chains.len()
        );
        let event_idx = rings.has(29);
        let side = if rings.queue(q).is_packed() {
            Side::Packed(PackedSide::new(rings, q, chains)?)
        } else {
            Side::Split(SplitSide::new(rings, q, chains)?)
        };
        let dq = rings.queue(q);
        Ok(Self {
            side,
            event_idx,
            kick: dq.kick.as_raw_fd(),
            interrupts: Interrupts::new(dq.call.as_raw_fd())?,
            done: Vec::with_capacity(chains.len()),
        })
    }

    pub fn ptrs(&self) -> RingPtrs {
        match &self.side {
            Side::Split(s) => RingPtrs::Split(s.ring),
            Side::Packed(p) => p.ptrs(),
        }
    }

    /// Where the next `push` counts from: capture before a batch, hand to `publish` after it.
    #[inline(always)]
    pub fn mark(&self) -> u16 {
        match &self.side {
            Side::Split(s) => s.avail_idx,
            Side::Packed(p) => p.mark(),
        }
    }

    /// Makes buffer `id`'s chain available and visible at once (Linux's virtqueue_add).
    #[inline(always)]
    pub fn push(&mut self, id: u16) {
        match &mut self.side {
            Side::Split(s) => s.push(id),
            Side::Packed(p) => p.push(id),
        }
    }

    /// Ends a batch pushed since `mark`: kicks if the device asks (virtqueue_kick_prepare).
    #[inline(always)]
    pub fn publish(&mut self, mark: u16, kicks: &mut u64) -> Result<()> {
        if mark == self.mark() {
            return Ok(());
        }
        // Order the publishing stores before reading the device's suppression state (virtio_mb).
        fence(Ordering::SeqCst);
        let wanted = match &self.side {
            Side::Split(s) => kick_needed(&s.ring, self.event_idx, s.avail_idx, mark),
            Side::Packed(p) => p.kick_needed(self.event_idx, mark),
        };
        if wanted {
            kick(self.kick)?;
            *kicks += 1;
        }
        Ok(())
    }

    /// Takes the completions the device has published: (buffer id, bytes written) each, in
    /// the order the device used them. Split: up to the used index as read once (reading it
    /// again at the end of the batch would fetch a line the device is busy writing); packed:
    /// while the next descriptor's flags say used.
    ///
    /// A batch into a buffer, because of what was measured against the split-only driver this
    /// replaced (its ceiling, runs alternated): one completion per call (a `next()` returning
    /// `Option`s) ran at about half its rate across CPUs, a closure per completion (which LLVM
    /// would not inline) at 0.7-0.9; the loops wait on lines the device just wrote, and the
    /// less each step does, the more of those misses the CPU overlaps.
    #[inline(always)]
    pub fn reap(&mut self) -> Result<&[(u16, u32)]> {
        self.done.clear();
        match &mut self.side {
            Side::Split(s) => s.reap(&mut self.done)?,
            Side::Packed(p) => p.reap(&mut self.done)?,
        }
        Ok(&self.done)
    }

    /// Makes every buffer of the last `reap` available again (a receive queue's refill, once
    /// the driver has read what it needs from them).
    #[inline(always)]
    pub fn repost_reaped(&mut self) {
        for i in 0..self.done.len() {
            let id = self.done[i].0;
            self.push(id);
        }
    }

    /// Asks for an interrupt once `later + 1` more buffers are used, then looks once more
    /// (virtqueue_enable_cb_prepare / _delayed, then virtqueue_poll). True if something was
    /// used meanwhile: then do not sleep.
    #[inline(always)]
    pub fn arm(&mut self, later: u16) -> bool {
        match &mut self.side {
            Side::Split(s) => {
                arm_interrupt(&s.ring, self.event_idx, s.last_used.wrapping_add(later));
                fence(Ordering::SeqCst);
                s.has_used()
            }
            Side::Packed(p) => p.arm(self.event_idx, later),
        }
    }

    /// No interrupts until the next `arm` (virtqueue_disable_cb, as an interrupt handler starts).
    /// A split ring with EVENT_IDX needs no store for it (the event index it left behind does
    /// the suppressing) and, as before packed rings existed here, the split driver stores
    /// nothing without EVENT_IDX either; a packed ring's event offset would come round again a
    /// lap later, so it is told DISABLE, as Linux tells it.
    #[inline(always)]
    pub fn disable(&mut self) {
        if let Side::Packed(p) = &mut self.side {
            p.disable();
        }
    }

    /// Sleeps until the device interrupts, up to `timeout_ms`; false if it did not.
    pub fn wait(&self, timeout_ms: i32) -> Result<bool> {
        self.interrupts.wait(timeout_ms)
    }

    /// Both sides' positions, for a failure message.
    pub fn state(&self) -> String {
        match &self.side {
            Side::Split(s) => s.state(),
            Side::Packed(p) => p.state(),
        }
    }
}

/// In `SplitSide::ids`: no chain starts at this descriptor.
const NOT_A_HEAD: u16 = u16::MAX;

/// The split ring's driver state.
#[derive(Debug)]
struct SplitSide {
    ring: RawRing,
    /// Descriptor at which each buffer's chain starts, by buffer id.
    heads: Vec<u16>,
    /// Buffer id by descriptor (`NOT_A_HEAD` if no chain starts there): a table rather than a
    /// division per completion.
    ids: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
}

impl SplitSide {
    fn new<R: Rings>(rings: &mut R, q: u16, chains: &[Vec<Seg>]) -> Result<Self> {
        let ring = raw_ring(rings, q)?;
        let n = chains[0].len() as u16;
        let heads: Vec<u16> = (0..chains.len() as u16).map(|id| id * n).collect();
        let mut ids = vec![NOT_A_HEAD; usize::from(ring.size)];
        for (id, chain) in chains.iter().enumerate() {
            let head = heads[id];
            ids[usize::from(head)] = id as u16;
            for (i, seg) in chain.iter().enumerate() {
                let d = head + i as u16;
                let last = i + 1 == chain.len();
                let flags =
                    if seg.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                ring.write_desc(d, seg.addr, seg.len, flags, if last { 0 } else { d + 1 });
            }
        }
        let avail_idx = u16::from_le(ring.avail_idx().load(Ordering::Acquire));
        let last_used = u16::from_le(ring.used_idx().load(Ordering::Acquire));
        ensure!(avail_idx == last_used, "queue {q} has buffers in flight");
        Ok(Self {
            ring,
            heads,
            ids,
            avail_idx,
            last_used,
        })
    }

    #[inline(always)]
    fn push(&mut self, id: u16) {
        self.ring
            .avail_slot(self.avail_idx)
            .store(self.heads[usize::from(id)].to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ring
            .avail_idx()
            .store(self.avail_idx.to_le(), Ordering::Release);
    }

    #[inline(always)]
    fn used_idx(&self) -> u16 {
        u16::from_le(self.ring.used_idx().load(Ordering::Acquire))
    }

    #[inline(always)]
    fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    #[inline(always)]
    fn reap(&mut self, done: &mut Vec<(u16, u32)>) -> Result<()> {
        let used = self.used_idx();
        while self.last_used != used {
            let (head, len) = self.ring.used_elem(self.last_used);
            self.last_used = self.last_used.wrapping_add(1);
            match self.ids.get(head as usize) {
                Some(&id) if id != NOT_A_HEAD => done.push((id, len)),
                _ => bail!("device completed descriptor {head}, which heads no chain"),
            }
        }
        Ok(())
    }

    fn state(&self) -> String {
        let r = &self.ring;
        format!(
            "split: driver avail {} last used {}; ring avail {} used {} used_event {} avail_event {} used flags {}",
            self.avail_idx,
            self.last_used,
            u16::from_le(r.avail_idx().load(Ordering::Relaxed)),
            u16::from_le(r.used_idx().load(Ordering::Relaxed)),
            u16::from_le(r.used_event().load(Ordering::Relaxed)),
            u16::from_le(r.avail_event().load(Ordering::Relaxed)),
            u16::from_le(r.used_flags().load(Ordering::Relaxed)),
        )
    }
}
