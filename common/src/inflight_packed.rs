//! Inflight I/O tracking for packed rings, in the vhost-user spec's packed layout:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 free_head | u16 old_free_head
//! u16 used_idx | u16 old_used_idx | u8 used_wrap_counter | u8 old_used_wrap_counter | u8 pad[7]
//! (pad to 32) desc_num × { u8 inflight, u8 pad, u16 next, u16 last, u16 num, u64 counter,
//!                          u16 id, u16 flags, u32 len, u64 addr }
//! ```
//!
//! Entries form a free list (`free_head`, `next`). Taking a chain copies its ring descriptors
//! into free entries (a packed ring's slots may be overwritten by used descriptors before the
//! chain completes, so the copy is what a restarted daemon resubmits), sets the head entry's
//! `num`, `last`, `counter` and `inflight`, and commits by setting `old_free_head`. Returning a
//! batch splices its entries back onto the free list and stores the used position it will
//! reach (step 1), publishes the used descriptors with the first one's flags last (step 2),
//! clears the heads' `inflight` (step 3) and commits by copying the three values into their
//! `old_*` fields (step 4). Unlike the spec's description, completed entries go back on the free
//! list only when their batch is published, so chains taken meanwhile never use them and every
//! operation commits on its own.
//!
//! After a crash, [`PackedInflightQueue::recover`] finishes or undoes the step in progress: if
//! the used position moved past its `old_*` copy, the slot at the old position tells whether
//! the batch reached the guest (its flags are used in the old lap: commit) or not (roll back);
//! then entries on the free list are not in flight, and the rest are resubmitted in `counter`
//! order. The ring's positions come from the region, not from `SET_VRING_BASE`: QEMU cannot
//! read a packed ring's positions from guest memory and resends stale ones after a crash.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::inflight::{InflightError, InflightRegion};
use crate::vring::packed_chain::{self, PackedDesc, Pos};
use crate::vring::{Layout, PackedBase};

const HEADER: u64 = 32;
const ENTRY: u64 = 32;
const ALIGN: u64 = 64;
const VERSION: u16 = 1;

const OFF_VERSION: u64 = 8;
const OFF_DESC_NUM: u64 = 10;
const OFF_FREE_HEAD: u64 = 12;
const OFF_OLD_FREE_HEAD: u64 = 14;
const OFF_USED_IDX: u64 = 16;
const OFF_OLD_USED_IDX: u64 = 18;
const OFF_USED_WRAP: u64 = 20;
const OFF_OLD_USED_WRAP: u64 = 21;

const E_INFLIGHT: u64 = 0;
const E_NEXT: u64 = 2;
const E_LAST: u64 = 4;
const E_NUM: u64 = 6;
const E_COUNTER: u64 = 8;
const E_ID: u64 = 16;
const E_FLAGS: u64 = 18;
const E_LEN: u64 = 20;
const E_ADDR: u64 = 24;

/// Bytes of one queue's block.
pub fn queue_stride(queue_size: u16) -> u64 {
    HEADER
        .saturating_add(ENTRY.saturating_mul(u64::from(queue_size)))
        .div_ceil(ALIGN)
        .saturating_mul(ALIGN)
}

/// What a restarted packed queue owes the guest and where its ring stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRecovery {
    pub base: PackedBase,
    /// Chains taken before the crash and never returned, oldest first: buffer id and the ring
    /// descriptors as taken.
    pub owed: Vec<(u16, Vec<PackedDesc>)>,
}

/// One queue's block of the region.
#[derive(Debug)]
pub struct PackedInflightQueue {
    region: Arc<InflightRegion>,
    base: u64,
    size: u16,
    counter: u64,
    /// Buffer id → head entry of its chain (`size`: none).
    head_of: Vec<u16>,
}

impl PackedInflightQueue {
    pub fn new(region: &Arc<InflightRegion>, index: u16, size: u16) -> Result<Self, InflightError> {
        let base = region.block(Layout::Packed, index, size)?;
        Ok(Self {
            region: Arc::clone(region),
            base,
            size,
            counter: 0,
            head_of: vec![size; usize::from(size)],
        })
    }

    fn at(&self, off: u64) -> GuestAddress {
        GuestAddress(self.base.saturating_add(off))
    }

    fn entry(&self, e: u16, field: u64) -> GuestAddress {
        self.at(HEADER
            .saturating_add(ENTRY.saturating_mul(u64::from(e)))
            .saturating_add(field))
    }

    fn read<T: vm_memory::ByteValued>(&self, at: GuestAddress) -> Result<T, InflightError> {
        self.region
            .mem()
            .read_obj(at)
            .map_err(|_| InflightError::Access)
    }

    fn write<T: vm_memory::ByteValued>(&self, v: T, at: GuestAddress) -> Result<(), InflightError> {
        self.region
            .mem()
            .write_obj(v, at)
            .map_err(|_| InflightError::Access)
    }

    /// A store the steps after it depend on (a commit point).
    fn store_u16(&self, v: u16, at: GuestAddress) -> Result<(), InflightError> {
        self.region
            .mem()
            .store(v, at, Ordering::Release)
            .map_err(|_| InflightError::Access)
    }

    fn entry_index(&self, v: u16) -> Result<u16, InflightError> {
        if v < self.size {
            Ok(v)
        } else {
            Err(InflightError::BadIndex(v))
        }
    }

    fn read_pos(&self, idx: u64, wrap: u64) -> Result<Pos, InflightError> {
        let slot: u16 = self.read(self.at(idx))?;
        let w: u8 = self.read(self.at(wrap))?;
        if slot >= self.size || w > 1 {
            return Err(InflightError::BadIndex(slot));
        }
        Ok(Pos { slot, wrap: w == 1 })
    }

    /// Prepares the block when the ring starts and works out what a crash left owed.
    /// `frontend` is `SET_VRING_BASE`'s word (used only for a fresh region); `slot_flags`
    /// reads the flags of a descriptor ring slot from guest memory.
    pub fn recover(
        &mut self,
        frontend: PackedBase,
        slot_flags: impl Fn(u16) -> Option<u16>,
    ) -> Result<PackedRecovery, InflightError> {
        let version: u16 = self.read(self.at(OFF_VERSION))?;
        if version == 0 {
            self.initialise(frontend)?;
            return Ok(PackedRecovery {
                base: frontend,
                owed: Vec::new(),
            });
        }
        if version != VERSION {
            return Err(InflightError::BadVersion(version));
        }
        let desc_num: u16 = self.read(self.at(OFF_DESC_NUM))?;
        if desc_num != self.size {
            return Err(InflightError::DescNum {
                got: desc_num,
                want: self.size,
            });
        }
        let used = self.read_pos(OFF_USED_IDX, OFF_USED_WRAP)?;
        let old_used = self.read_pos(OFF_OLD_USED_IDX, OFF_OLD_USED_WRAP)?;
        if used != old_used {
            // A batch was being returned. Its first used descriptor's flags are stored last:
            // if the slot shows them, the guest has the whole batch.
            let flags = slot_flags(old_used.slot).ok_or(InflightError::Access)?;
            let published = (flags & packed_chain::F_AVAIL != 0) == old_used.wrap
                && (flags & packed_chain::F_USED != 0) == old_used.wrap;
            if published {
                self.commit()?;
            }
        }
        // Roll back whatever did not commit.
        let free: u16 = self.read(self.at(OFF_OLD_FREE_HEAD))?;
        let used = self.read_pos(OFF_OLD_USED_IDX, OFF_OLD_USED_WRAP)?;
        self.write(free, self.at(OFF_FREE_HEAD))?;
        self.write(used.slot, self.at(OFF_USED_IDX))?;
        self.write(u8::from(used.wrap), self.at(OFF_USED_WRAP))?;
        // Entries on the free list are not in flight, whatever their flag says.
        let mut e = free;
        let mut free_count: u32 = 0;
        while e < self.size {
            free_count = free_count.saturating_add(1);
            if free_count > u32::from(self.size) {
                return Err(InflightError::BadChain(e));
            }
            self.write(0u8, self.entry(e, E_INFLIGHT))?;
            e = self.read(self.entry(e, E_NEXT))?;
        }
        let mut owed: Vec<(u64, u16, Vec<PackedDesc>)> = Vec::new();
        let mut slots: u32 = 0;
        for h in 0..self.size {
            match self.read::<u8>(self.entry(h, E_INFLIGHT))? {
                0 => continue,
                1 => {}
                other => return Err(InflightError::BadFlag(other)),
            }
            let raw = self.chain(h)?;
            slots = slots.saturating_add(raw.len() as u32);
            let counter: u64 = self.read(self.entry(h, E_COUNTER))?;
            owed.push((counter, h, raw));
        }
        // Owed chains occupy ring slots between the used and the available position.
        let owed_slots = u16::try_from(slots)
            .ok()
            .filter(|s| *s <= self.size)
            .ok_or(InflightError::BadChain(0))?;
        owed.sort_unstable_by_key(|(c, _, _)| *c);
        self.counter = owed.last().map_or(0, |(c, _, _)| c.saturating_add(1));
        self.head_of.fill(self.size);
        let mut result = Vec::with_capacity(owed.len());
        for (_, h, raw) in owed {
            let id = raw.last().map(|d| d.id).ok_or(InflightError::BadChain(h))?;
            let slot = self
                .head_of
                .get_mut(usize::from(id))
                .ok_or(InflightError::BadIndex(id))?;
            if *slot != self.size {
                return Err(InflightError::BadChain(h));
            }
            *slot = h;
            result.push((id, raw));
        }
        Ok(PackedRecovery {
            base: PackedBase {
                avail: used.advance(owed_slots, self.size),
                used,
            },
            owed: result,
        })
    }

    /// A fresh block: every entry free, the positions the frontend gave.
    fn initialise(&mut self, base: PackedBase) -> Result<(), InflightError> {
        self.write(self.size, self.at(OFF_DESC_NUM))?;
        for e in 0..self.size {
            self.write(0u8, self.entry(e, E_INFLIGHT))?;
            self.write(e.saturating_add(1), self.entry(e, E_NEXT))?;
        }
        self.write(0u16, self.at(OFF_FREE_HEAD))?;
        self.write(0u16, self.at(OFF_OLD_FREE_HEAD))?;
        for (idx, wrap) in [
            (OFF_USED_IDX, OFF_USED_WRAP),
            (OFF_OLD_USED_IDX, OFF_OLD_USED_WRAP),
        ] {
            self.write(base.used.slot, self.at(idx))?;
            self.write(u8::from(base.used.wrap), self.at(wrap))?;
        }
        self.head_of.fill(self.size);
        self.counter = 0;
        self.store_u16(VERSION, self.at(OFF_VERSION))
    }

    /// The ring descriptors recorded for the chain whose head entry is `h`.
    fn chain(&self, h: u16) -> Result<Vec<PackedDesc>, InflightError> {
        let num: u16 = self.read(self.entry(h, E_NUM))?;
        if num == 0 || num > self.size {
            return Err(InflightError::BadChain(h));
        }
        let mut out = Vec::with_capacity(usize::from(num));
        let mut e = h;
        for i in 0..num {
            let e_checked = self.entry_index(e)?;
            out.push(PackedDesc {
                addr: self.read(self.entry(e_checked, E_ADDR))?,
                len: self.read(self.entry(e_checked, E_LEN))?,
                id: self.read(self.entry(e_checked, E_ID))?,
                flags: self.read(self.entry(e_checked, E_FLAGS))?,
            });
            if i.saturating_add(1) < num {
                e = self.read(self.entry(e_checked, E_NEXT))?;
            }
        }
        Ok(out)
    }

    /// Records that the chain `raw` (its ring descriptors) was taken under buffer id `id`.
    pub fn taken(&mut self, id: u16, raw: &[PackedDesc]) -> Result<(), InflightError> {
        let slot = usize::from(id);
        if self.head_of.get(slot).is_none_or(|h| *h != self.size) {
            return Err(InflightError::BadIndex(id));
        }
        let head: u16 = self.read(self.at(OFF_FREE_HEAD))?;
        let mut e = head;
        let mut last = head;
        for d in raw {
            let cur = self.entry_index(e).map_err(|_| InflightError::Exhausted)?;
            self.write(d.addr, self.entry(cur, E_ADDR))?;
            self.write(d.len, self.entry(cur, E_LEN))?;
            self.write(d.id, self.entry(cur, E_ID))?;
            self.write(d.flags, self.entry(cur, E_FLAGS))?;
            last = cur;
            e = self.read(self.entry(cur, E_NEXT))?;
        }
        let num = u16::try_from(raw.len()).map_err(|_| InflightError::BadChain(head))?;
        self.entry_index(head)
            .map_err(|_| InflightError::Exhausted)?;
        self.write(num, self.entry(head, E_NUM))?;
        self.write(last, self.entry(head, E_LAST))?;
        self.counter = self.counter.saturating_add(1);
        self.write(self.counter, self.entry(head, E_COUNTER))?;
        self.region
            .mem()
            .store(1u8, self.entry(head, E_INFLIGHT), Ordering::Release)
            .map_err(|_| InflightError::Access)?;
        self.write(e, self.at(OFF_FREE_HEAD))?;
        self.store_u16(e, self.at(OFF_OLD_FREE_HEAD))?;
        if let Some(h) = self.head_of.get_mut(slot) {
            *h = head;
        }
        Ok(())
    }

    /// Step 1 of returning `batch` (buffer ids): its entries back on the free list, and the
    /// used position the ring reaches once it is published.
    pub fn batch_ready(&mut self, batch: &[u16], used: Pos) -> Result<(), InflightError> {
        let mut free: u16 = self.read(self.at(OFF_FREE_HEAD))?;
        for &id in batch {
            let Some(&h) = self.head_of.get(usize::from(id)) else {
                continue;
            };
            if h >= self.size {
                continue;
            }
            let last: u16 = self.read(self.entry(h, E_LAST))?;
            let last = self.entry_index(last)?;
            self.write(free, self.entry(last, E_NEXT))?;
            free = h;
        }
        self.write(free, self.at(OFF_FREE_HEAD))?;
        self.write(u8::from(used.wrap), self.at(OFF_USED_WRAP))?;
        self.store_u16(used.slot, self.at(OFF_USED_IDX))
    }

    /// Steps 3 and 4, after the batch was published: its chains are no longer in flight.
    pub fn batch_published(&mut self, batch: &[u16]) -> Result<(), InflightError> {
        for &id in batch {
            let Some(h) = self.head_of.get_mut(usize::from(id)) else {
                continue;
            };
            let head = std::mem::replace(h, self.size);
            if head < self.size {
                self.region
                    .mem()
                    .store(0u8, self.entry(head, E_INFLIGHT), Ordering::Release)
                    .map_err(|_| InflightError::Access)?;
            }
        }
        self.commit()
    }

    /// Copies free head and used position into their `old_*` fields; the used index last,
    /// as recovery compares it.
    fn commit(&mut self) -> Result<(), InflightError> {
        let free: u16 = self.read(self.at(OFF_FREE_HEAD))?;
        let used: u16 = self.read(self.at(OFF_USED_IDX))?;
        let wrap: u8 = self.read(self.at(OFF_USED_WRAP))?;
        self.store_u16(free, self.at(OFF_OLD_FREE_HEAD))?;
        self.write(wrap, self.at(OFF_OLD_USED_WRAP))?;
        self.store_u16(used, self.at(OFF_OLD_USED_IDX))
    }
}
