//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the region, and the split
//! rings' tracker (packed rings' is in `inflight_packed.rs`).
//!
//! A shared-memory region, which the frontend keeps while we crash and restart, records which
//! chains we took and have not yet returned. The layout is the vhost-user spec's, one block per
//! queue, each rounded up to 64 bytes:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc_num × { u8 inflight, u8 pad[5], u16 next, u64 counter }
//! ```
//!
//! Taking a chain: counter, then inflight = 1. Returning a batch: link the batch through `next`
//! and record its head in `last_batch_head`, publish the used index, clear the batch's inflight
//! flags, store `used_idx`. After a crash at any point of that sequence, [`InflightQueue::recover`]
//! tells exactly which chains are still owed to the guest, oldest first.
//!
//! The region comes from the frontend (`SET_INFLIGHT_FD`) and may be corrupt: every size,
//! version and index is checked, and all access is bounds-checked volatile access.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::fs::File;
use std::num::Wrapping;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::vring::{Layout, MAX_QUEUE_SIZE};

const HEADER: u64 = 16;
const DESC: u64 = 16;
const ALIGN: u64 = 64;
const VERSION: u16 = 1;
/// Upper bound on a region's size: 1024 queues of 32768 descriptors.
const MAX_QUEUES: u16 = 1024;

/// Bytes after the queue blocks of the regions we create, where the device keeps the state that
/// must outlive a backend restart but not the VM (the guest's write-cache choice, which QEMU
/// does not send again after a reconnect). The frontend keeps the whole region and hands it
/// back with `SET_INFLIGHT_FD`, never looking inside; a new VM gets a fresh region.
///
/// ```text
/// u32 magic "BHST" | u16 version | u16 length | length bytes of device state
/// ```
pub const DEVICE_STATE_BYTES: u64 = 64;
/// Device state bytes the trailer holds.
pub const DEVICE_STATE_MAX: usize = 56;
const STATE_MAGIC: u32 = 0x5453_4842; // "BHST" little-endian
const STATE_VERSION: u16 = 1;
const STATE_HEADER: u64 = 8;

// Field offsets within a queue block and within a descriptor entry.
const OFF_VERSION: u64 = 8;
const OFF_DESC_NUM: u64 = 10;
const OFF_LAST_BATCH_HEAD: u64 = 12;
const OFF_USED_IDX: u64 = 14;
const D_INFLIGHT: u64 = 0;
const D_NEXT: u64 = 6;
const D_COUNTER: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("{0} queues of size {1} is not a valid inflight layout")]
    BadGeometry(u16, u16),
    #[error("region of {got} bytes, {want} needed")]
    BadSize { got: u64, want: u64 },
    #[error("mmap offset {0:#x} is not page aligned or overflows")]
    BadOffset(u64),
    #[error("cannot create or map the region")]
    Io(#[source] std::io::Error),
    #[error("cannot map the region")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error("region access out of bounds")]
    Access,
    #[error("queue block has version {0}")]
    BadVersion(u16),
    #[error("queue block is for {got} descriptors, the queue has {want}")]
    DescNum { got: u16, want: u16 },
    #[error("descriptor index {0} out of range")]
    BadIndex(u16),
    #[error("inflight flag {0} is neither 0 nor 1")]
    BadFlag(u8),
    #[error("stored used index {stored} is {distance} behind the ring's, more than a queue")]
    UsedIdxJump { stored: u16, distance: u16 },
    #[error("the region was made for the other ring layout (split or packed)")]
    WrongLayout,
    #[error("no free entry left to record a chain (the region is inconsistent)")]
    Exhausted,
    #[error("chain record at entry {0} is malformed")]
    BadChain(u16),
    #[error("recovered ring state unusable: {0}")]
    Ring(String),
}

/// Bytes of one queue's block of the split layout.
pub fn queue_stride(queue_size: u16) -> u64 {
    HEADER
        .saturating_add(DESC.saturating_mul(u64::from(queue_size)))
        .div_ceil(ALIGN)
        .saturating_mul(ALIGN)
}

/// Bytes of one queue's block in `layout`.
pub fn stride_of(layout: Layout, queue_size: u16) -> u64 {
    match layout {
        Layout::Split => queue_stride(queue_size),
        Layout::Packed => crate::inflight_packed::queue_stride(queue_size),
    }
}

/// The whole region, shared by the queues' trackers.
#[derive(Debug)]
pub struct InflightRegion {
    /// The rings' layout the region was made for (negotiated before `GET_INFLIGHT_FD`).
    layout: Layout,
    mem: GuestMemoryMmap<()>,
    /// A region handed back may be shrunk by the frontend: guarded like guest memory.
    /// Declared after `mem`, so the mapping goes before it is unregistered.
    _guard: Option<crate::revoke::Guard>,
    fd: OwnedFd,
    mmap_size: u64,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
}

fn check_geometry(layout: Layout, num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if num_queues == 0 || num_queues > MAX_QUEUES || queue_size == 0 || queue_size > MAX_QUEUE_SIZE
    {
        return Err(InflightError::BadGeometry(num_queues, queue_size));
    }
    Ok(stride_of(layout, queue_size).saturating_mul(u64::from(num_queues)))
}

/// Registers the region's single mapping with the SIGBUS guard.
fn guard(mem: &GuestMemoryMmap<()>) -> Option<crate::revoke::Guard> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let r = mem.iter().next()?;
    crate::revoke::guard(r.as_ptr(), usize::try_from(r.len()).ok()?)
}

fn map(file: File, offset: u64, size: u64) -> Result<GuestMemoryMmap<()>, InflightError> {
    let len = usize::try_from(size).map_err(|_| InflightError::BadSize {
        got: size,
        want: size,
    })?;
    let region = MmapRegion::<()>::build(
        Some(FileOffset::new(file, offset)),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(InflightError::Mmap)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(InflightError::Access)?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|_| InflightError::Access)
}

impl InflightRegion {
    /// `GET_INFLIGHT_FD` for split rings.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        Self::create_in(Layout::Split, num_queues, queue_size)
    }

    /// `GET_INFLIGHT_FD`: a fresh, zeroed region for `num_queues` queues of `queue_size` in
    /// `layout`.
    pub fn create_in(
        layout: Layout,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let size =
            check_geometry(layout, num_queues, queue_size)?.saturating_add(DEVICE_STATE_BYTES);
        let fd = crate::memfd::create_sealable("bulkhead-inflight").map_err(InflightError::Io)?;
        let file = File::from(fd.try_clone().map_err(InflightError::Io)?);
        file.set_len(size).map_err(InflightError::Io)?;
        // The frontend keeps this descriptor: it may not resize what we map.
        crate::memfd::seal_size(&fd).map_err(InflightError::Io)?;
        let mem = map(file, 0, size)?;
        let _guard = guard(&mem);
        Ok(Self {
            layout,
            mem,
            _guard,
            fd,
            mmap_size: size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        })
    }

    /// `SET_INFLIGHT_FD` for split rings.
    pub fn adopt(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        Self::adopt_in(
            Layout::Split,
            fd,
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        )
    }

    /// `SET_INFLIGHT_FD`: adopts a region the frontend kept, after checking that it has the
    /// size of `layout` and that the file really holds it (no SIGBUS on access).
    pub fn adopt_in(
        layout: Layout,
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let want = check_geometry(layout, num_queues, queue_size)?;
        // Ours carry the device-state trailer; a region another backend made (or an older
        // Bulkhead) does not, and is used without it.
        if mmap_size != want && mmap_size != want.saturating_add(DEVICE_STATE_BYTES) {
            return Err(InflightError::BadSize {
                got: mmap_size,
                want,
            });
        }
        let end = mmap_offset
            .checked_add(mmap_size)
            .ok_or(InflightError::BadOffset(mmap_offset))?;
        if !mmap_offset.is_multiple_of(4096) {
            return Err(InflightError::BadOffset(mmap_offset));
        }
        let file = File::from(fd.try_clone().map_err(InflightError::Io)?);
        let meta = file.metadata().map_err(InflightError::Io)?;
        if !meta.file_type().is_file() || meta.len() < end {
            return Err(InflightError::BadSize {
                got: meta.len(),
                want: end,
            });
        }
        let mem = map(file, mmap_offset, mmap_size)?;
        let _guard = guard(&mem);
        Ok(Self {
            layout,
            mem,
            _guard,
            fd,
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    pub fn mmap_size(&self) -> u64 {
        self.mmap_size
    }
    pub fn mmap_offset(&self) -> u64 {
        self.mmap_offset
    }
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub(crate) fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Offset of queue `index`'s block, for a ring of `size` in `layout`.
    pub(crate) fn block(
        &self,
        layout: Layout,
        index: u16,
        size: u16,
    ) -> Result<u64, InflightError> {
        if layout != self.layout {
            return Err(InflightError::WrongLayout);
        }
        if index >= self.num_queues || size > self.queue_size || size == 0 {
            return Err(InflightError::BadGeometry(index, size));
        }
        Ok(stride_of(layout, self.queue_size).saturating_mul(u64::from(index)))
    }

    /// Where the device-state trailer starts, if the region has one.
    fn state_base(&self) -> Option<u64> {
        let queues =
            stride_of(self.layout, self.queue_size).saturating_mul(u64::from(self.num_queues));
        (self.mmap_size >= queues.saturating_add(DEVICE_STATE_BYTES)).then_some(queues)
    }

    /// The device state stored in the trailer, if there is a valid one (the region comes from
    /// the frontend: anything malformed reads as none).
    pub fn device_state(&self) -> Option<Vec<u8>> {
        let base = self.state_base()?;
        let magic: u32 = self.mem.read_obj(GuestAddress(base)).ok()?;
        let version: u16 = self
            .mem
            .read_obj(GuestAddress(base.saturating_add(4)))
            .ok()?;
        let len: u16 = self
            .mem
            .read_obj(GuestAddress(base.saturating_add(6)))
            .ok()?;
        if magic != STATE_MAGIC || version != STATE_VERSION || usize::from(len) > DEVICE_STATE_MAX {
            return None;
        }
        let mut out = vec![0u8; usize::from(len)];
        self.mem
            .read_slice(&mut out, GuestAddress(base.saturating_add(STATE_HEADER)))
            .ok()?;
        Some(out)
    }

    /// Stores `state` in the trailer (at most [`DEVICE_STATE_MAX`] bytes). Regions without a
    /// trailer keep nothing: `Ok(false)`.
    pub fn set_device_state(&self, state: &[u8]) -> Result<bool, InflightError> {
        let Some(base) = self.state_base() else {
            return Ok(false);
        };
        let len = u16::try_from(state.len())
            .ok()
            .filter(|l| usize::from(*l) <= DEVICE_STATE_MAX)
            .ok_or(InflightError::Access)?;
        let put = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(|_| InflightError::Access);
        // Length and bytes first, the magic last: a crash halfway leaves no valid-looking state.
        put(self.mem.write_obj(0u32, GuestAddress(base)))?;
        put(self
            .mem
            .write_obj(STATE_VERSION, GuestAddress(base.saturating_add(4))))?;
        put(self
            .mem
            .write_obj(len, GuestAddress(base.saturating_add(6))))?;
        put(self
            .mem
            .write_slice(state, GuestAddress(base.saturating_add(STATE_HEADER))))?;
        std::sync::atomic::fence(Ordering::Release);
        put(self.mem.write_obj(STATE_MAGIC, GuestAddress(base)))?;
        Ok(true)
    }

    /// The tracker for queue `index`, whose ring has `size` entries.
    pub fn queue(self: &Arc<Self>, index: u16, size: u16) -> Result<InflightQueue, InflightError> {
        let base = self.block(Layout::Split, index, size)?;
        Ok(InflightQueue {
            region: Arc::clone(self),
            base,
            size,
            counter: 0,
        })
    }
}

/// What a restarted queue owes the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads taken before the crash and never returned, oldest first: resubmit these before
    /// taking new chains.
    pub resubmit: Vec<u16>,
    /// Where taking new chains continues: the used index plus the chains still owed.
    pub next_avail: u16,
}

/// One queue's block of the region.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: u64,
    size: u16,
    counter: u64,
}

impl InflightQueue {
    fn at(&self, off: u64) -> GuestAddress {
        GuestAddress(self.base.saturating_add(off))
    }

    fn desc(&self, head: u16, field: u64) -> GuestAddress {
        self.at(HEADER
            .saturating_add(DESC.saturating_mul(u64::from(head)))
            .saturating_add(field))
    }

    fn read<T: vm_memory::ByteValued>(&self, at: GuestAddress) -> Result<T, InflightError> {
        self.region
            .mem
            .read_obj(at)
            .map_err(|_| InflightError::Access)
    }

    fn write<T: vm_memory::ByteValued>(&self, v: T, at: GuestAddress) -> Result<(), InflightError> {
        self.region
            .mem
            .write_obj(v, at)
            .map_err(|_| InflightError::Access)
    }

    /// Prepares the block when the ring starts and works out what is still owed after a crash.
    /// `used_idx` is the ring's used index as the guest sees it.
    pub fn recover(&mut self, used_idx: u16) -> Result<Recovery, InflightError> {
        let version: u16 = self.read(self.at(OFF_VERSION))?;
        if version == 0 {
            // Fresh region: nothing was ever taken.
            self.write(self.size, self.at(OFF_DESC_NUM))?;
            self.write(used_idx, self.at(OFF_USED_IDX))?;
            self.write(0u16, self.at(OFF_LAST_BATCH_HEAD))?;
            for head in 0..self.size {
                self.write(0u8, self.desc(head, D_INFLIGHT))?;
            }
            self.region
                .mem
                .store(VERSION, self.at(OFF_VERSION), Ordering::Release)
                .map_err(|_| InflightError::Access)?;
            self.counter = 0;
            return Ok(Recovery {
                resubmit: Vec::new(),
                next_avail: used_idx,
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
        // A batch was published but its flags not all cleared: clear them now.
        let stored: u16 = self.read(self.at(OFF_USED_IDX))?;
        let distance = (Wrapping(used_idx) - Wrapping(stored)).0;
        if distance > self.size {
            return Err(InflightError::UsedIdxJump { stored, distance });
        }
        let mut head: u16 = self.read(self.at(OFF_LAST_BATCH_HEAD))?;
        for _ in 0..distance {
            if head >= self.size {
                return Err(InflightError::BadIndex(head));
            }
            self.write(0u8, self.desc(head, D_INFLIGHT))?;
            head = self.read(self.desc(head, D_NEXT))?;
        }
        self.write(used_idx, self.at(OFF_USED_IDX))?;
        let mut owed: Vec<(u64, u16)> = Vec::new();
        for h in 0..self.size {
            match self.read::<u8>(self.desc(h, D_INFLIGHT))? {
                0 => {}
                1 => owed.push((self.read(self.desc(h, D_COUNTER))?, h)),
                other => return Err(InflightError::BadFlag(other)),
            }
        }
        owed.sort_unstable();
        self.counter = owed.last().map_or(0, |(c, _)| c.saturating_add(1));
        let count =
            u16::try_from(owed.len()).map_err(|_| InflightError::BadGeometry(0, self.size))?;
        Ok(Recovery {
            resubmit: owed.into_iter().map(|(_, h)| h).collect(),
            next_avail: (Wrapping(used_idx) + Wrapping(count)).0,
        })
    }

    /// Records that chain `head` was taken.
    pub fn taken(&mut self, head: u16) -> Result<(), InflightError> {
        if head >= self.size {
            return Err(InflightError::BadIndex(head));
        }
        self.counter = self.counter.saturating_add(1);
        self.write(self.counter, self.desc(head, D_COUNTER))?;
        self.region
            .mem
            .store(1u8, self.desc(head, D_INFLIGHT), Ordering::Release)
            .map_err(|_| InflightError::Access)
    }

    /// Before publishing a batch of returned chains: link them and remember the first.
    pub fn batch_ready(&mut self, batch: &[u16]) -> Result<(), InflightError> {
        let Some(&first) = batch.first() else {
            return Ok(());
        };
        for pair in batch.windows(2) {
            if let [a, b] = *pair {
                if a < self.size {
                    self.write(b, self.desc(a, D_NEXT))?;
                }
            }
        }
        self.region
            .mem
            .store(first, self.at(OFF_LAST_BATCH_HEAD), Ordering::Release)
            .map_err(|_| InflightError::Access)
    }

    /// After publishing the batch (the used index is now `used_idx`): the chains are returned.
    pub fn batch_published(&mut self, batch: &[u16], used_idx: u16) -> Result<(), InflightError> {
        for &h in batch {
            if h < self.size {
                self.region
                    .mem
                    .store(0u8, self.desc(h, D_INFLIGHT), Ordering::Release)
                    .map_err(|_| InflightError::Access)?;
            }
        }
        self.region
            .mem
            .store(used_idx, self.at(OFF_USED_IDX), Ordering::Release)
            .map_err(|_| InflightError::Access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 8;

    fn queue() -> (Arc<InflightRegion>, InflightQueue) {
        let r = Arc::new(InflightRegion::create(2, SIZE).unwrap());
        let q = r.queue(1, SIZE).unwrap();
        (r, q)
    }

    /// A restarted daemon's view of the same region.
    fn reopen(r: &Arc<InflightRegion>) -> InflightQueue {
        let fd = r.fd().try_clone_to_owned().unwrap();
        let again = Arc::new(InflightRegion::adopt(fd, r.mmap_size(), 0, 2, SIZE).unwrap());
        again.queue(1, SIZE).unwrap()
    }

    /// Runs the complete return sequence for `batch` (publishing moves the used index).
    fn complete(q: &mut InflightQueue, batch: &[u16], used: &mut u16) {
        q.batch_ready(batch).unwrap();
        *used = used.wrapping_add(batch.len() as u16);
        q.batch_published(batch, *used).unwrap();
    }

    #[test]
    fn fresh_region_owes_nothing_and_starts_at_the_used_index() {
        let (_r, mut q) = queue();
        assert_eq!(
            q.recover(5).unwrap(),
            Recovery {
                resubmit: vec![],
                next_avail: 5
            }
        );
    }

    #[test]
    fn crash_after_taking_resubmits_in_taking_order() {
        let (r, mut q) = queue();
        q.recover(0).unwrap();
        for h in [5, 2, 7] {
            q.taken(h).unwrap();
        }
        assert_eq!(
            reopen(&r).recover(0).unwrap(),
            Recovery {
                resubmit: vec![5, 2, 7],
                next_avail: 3
            }
        );
    }

    #[test]
    fn crash_before_publishing_a_batch_resubmits_the_batch() {
        let (r, mut q) = queue();
        q.recover(0).unwrap();
        for h in [1, 2, 3] {
            q.taken(h).unwrap();
        }
        // Linked, but the used index never moved: the guest saw nothing.
        q.batch_ready(&[3, 1]).unwrap();
        assert_eq!(
            reopen(&r).recover(0).unwrap(),
            Recovery {
                resubmit: vec![1, 2, 3],
                next_avail: 3
            }
        );
    }

    #[test]
    fn crash_after_publishing_an_out_of_order_batch_owes_only_the_rest() {
        let (r, mut q) = queue();
        q.recover(0).unwrap();
        for h in [1, 2, 3] {
            q.taken(h).unwrap();
        }
        // 3 and 1 returned together and published (used index 0 -> 2); crash before the flags
        // were cleared.
        q.batch_ready(&[3, 1]).unwrap();
        let mut q2 = reopen(&r);
        assert_eq!(
            q2.recover(2).unwrap(),
            Recovery {
                resubmit: vec![2],
                next_avail: 3
            }
        );
        // Recovery is idempotent: a second crash right away changes nothing.
        assert_eq!(
            reopen(&r).recover(2).unwrap(),
            Recovery {
                resubmit: vec![2],
                next_avail: 3
            }
        );
    }

    #[test]
    fn crash_while_clearing_flags_finishes_the_batch() {
        let (r, mut q) = queue();
        q.recover(0).unwrap();
        for h in [4, 6] {
            q.taken(h).unwrap();
        }
        q.batch_ready(&[6, 4]).unwrap();
        // Published, one flag cleared, used_idx not yet stored.
        q.region
            .mem
            .store(0u8, q.desc(6, D_INFLIGHT), Ordering::Release)
            .unwrap();
        assert_eq!(
            reopen(&r).recover(2).unwrap(),
            Recovery {
                resubmit: vec![],
                next_avail: 2
            }
        );
    }

    #[test]
    fn complete_sequences_leave_nothing_owed_and_counters_continue() {
        let (r, mut q) = queue();
        let mut used = 0u16;
        q.recover(used).unwrap();
        for round in 0..20u16 {
            let a = round % SIZE;
            let b = (round + 3) % SIZE;
            q.taken(a).unwrap();
            q.taken(b).unwrap();
            complete(&mut q, &[b], &mut used);
            complete(&mut q, &[a], &mut used);
        }
        q.taken(1).unwrap();
        q.taken(0).unwrap();
        let mut again = reopen(&r);
        assert_eq!(
            again.recover(used).unwrap(),
            Recovery {
                resubmit: vec![1, 0],
                next_avail: used.wrapping_add(2)
            }
        );
        // A later take gets a newer counter than the owed ones: it sorts after them.
        again.taken(5).unwrap();
        assert_eq!(reopen(&r).recover(used).unwrap().resubmit, vec![1, 0, 5]);
    }

    #[test]
    fn corrupt_regions_are_errors_not_out_of_bounds_access() {
        let (r, mut q) = queue();
        q.recover(0).unwrap();
        q.taken(1).unwrap();
        q.write(9u16, q.at(OFF_VERSION)).unwrap();
        assert!(matches!(
            reopen(&r).recover(0),
            Err(InflightError::BadVersion(9))
        ));
        q.write(VERSION, q.at(OFF_VERSION)).unwrap();
        q.write(SIZE + 1, q.at(OFF_DESC_NUM)).unwrap();
        assert!(matches!(
            reopen(&r).recover(0),
            Err(InflightError::DescNum { .. })
        ));
        q.write(SIZE, q.at(OFF_DESC_NUM)).unwrap();
        q.write(200u16, q.at(OFF_LAST_BATCH_HEAD)).unwrap();
        assert!(matches!(
            reopen(&r).recover(1),
            Err(InflightError::BadIndex(200))
        ));
        assert!(matches!(
            reopen(&r).recover(SIZE + 3),
            Err(InflightError::UsedIdxJump { .. })
        ));
        q.write(0u16, q.at(OFF_LAST_BATCH_HEAD)).unwrap();
        q.write(7u8, q.desc(3, D_INFLIGHT)).unwrap();
        assert!(matches!(
            reopen(&r).recover(0),
            Err(InflightError::BadFlag(7))
        ));
        assert!(q.taken(SIZE).is_err());
    }

    #[test]
    fn regions_of_the_wrong_size_or_geometry_are_refused() {
        assert!(matches!(
            InflightRegion::create(0, 128),
            Err(InflightError::BadGeometry(..))
        ));
        assert!(matches!(
            InflightRegion::create(1, 40000),
            Err(InflightError::BadGeometry(..))
        ));
        let r = InflightRegion::create(1, 128).unwrap();
        let fd = || r.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            InflightRegion::adopt(fd(), r.mmap_size() + 64, 0, 1, 128),
            Err(InflightError::BadSize { .. })
        ));
        assert!(matches!(
            InflightRegion::adopt(fd(), r.mmap_size(), 4096, 1, 128),
            Err(InflightError::BadSize { .. })
        ));
        assert!(matches!(
            InflightRegion::adopt(fd(), r.mmap_size(), 12, 1, 128),
            Err(InflightError::BadOffset(12))
        ));
        assert!(matches!(
            InflightRegion::adopt(fd(), r.mmap_size(), u64::MAX - 8, 1, 128),
            Err(InflightError::BadOffset(_))
        ));
        assert_eq!(queue_stride(128), 2112);
    }

    #[test]
    fn device_state_survives_handing_the_region_back_and_corrupt_state_reads_as_none() {
        let r = InflightRegion::create(2, 128).unwrap();
        assert_eq!(r.mmap_size(), 2 * 2112 + DEVICE_STATE_BYTES);
        assert_eq!(r.device_state(), None, "a fresh region holds no state");
        assert!(r.set_device_state(&[0]).unwrap());
        let fd = || r.fd().try_clone_to_owned().unwrap();
        let back = InflightRegion::adopt(fd(), r.mmap_size(), 0, 2, 128).unwrap();
        assert_eq!(back.device_state(), Some(vec![0]));
        assert!(back.set_device_state(&[0; DEVICE_STATE_MAX + 1]).is_err());
        // A frontend scribbling over the trailer: the magic no longer matches.
        let base = 2 * 2112;
        back.mem
            .write_obj(0xdead_beefu32, GuestAddress(base))
            .unwrap();
        assert_eq!(back.device_state(), None);
        // A length beyond the trailer.
        back.set_device_state(&[1]).unwrap();
        back.mem.write_obj(1000u16, GuestAddress(base + 6)).unwrap();
        assert_eq!(back.device_state(), None);
        // A region without the trailer (another backend's) is usable, and keeps no state.
        let plain = InflightRegion::adopt(fd(), 2 * 2112, 0, 2, 128).unwrap();
        assert!(!plain.set_device_state(&[0]).unwrap());
        assert_eq!(plain.device_state(), None);
    }
}
