//! The guest memory table: regions the frontend shares with us, mapped into this process.
//!
//! Every region arrives from an untrusted frontend, so each is validated before it is mapped: no
//! address overflow, no overlap, no more regions than slots, and a backing file at least as large
//! as the mapping. That check holds only at the time: the frontend keeps the descriptor and can
//! shrink the file later, so every mapping is also registered with the SIGBUS guard
//! ([`crate::revoke`]), which turns such a revocation into the end of that frontend's session.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Memory slots offered with `GET_MAX_MEM_SLOTS` (what libvhost-user offers as well).
pub const MAX_MEM_SLOTS: usize = 32;

/// The guest memory type every queue worker reads and writes.
pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("region of size 0")]
    EmptyRegion,
    #[error("region at guest address {0:#x} of size {1:#x} overflows the address space")]
    Overflow(u64, u64),
    #[error("region at guest address {0:#x} overlaps an existing region")]
    Overlap(u64),
    #[error("more than {MAX_MEM_SLOTS} memory regions")]
    TooManyRegions,
    #[error("{regions} regions but {fds} file descriptors")]
    FdCountMismatch { regions: usize, fds: usize },
    #[error("mmap offset {0:#x} is not page aligned")]
    UnalignedOffset(u64),
    #[error("backing file is not a regular file")]
    NotRegularFile,
    #[error("backing file holds {file_size:#x} bytes but the region needs {needed:#x}")]
    FileTooSmall { file_size: u64, needed: u64 },
    #[error("no region at guest address {0:#x} of size {1:#x}")]
    UnknownRegion(u64, u64),
    #[error("cannot inspect the backing file")]
    Stat(#[source] std::io::Error),
    #[error("cannot map the region")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot build the guest memory map")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// One mapped region with the addresses the frontend described it by.
#[derive(Debug)]
struct Region {
    guest_phys_addr: u64,
    size: u64,
    user_addr: u64,
    /// How many times the frontend added this exact region. QEMU's multiqueue net sends the
    /// same ADD_MEM_REG once per queue pair; the region goes when every add was removed.
    refs: u32,
    mapping: Arc<GuestRegionMmap<()>>,
    /// Registers the mapping with the SIGBUS guard (`crate::revoke`).
    guard: Option<crate::revoke::Guard>,
}

/// A region gone from the table whose mapping a worker's snapshot may still use: it stays
/// guarded until only this entry holds it (the mapping is unmapped with the entry).
#[derive(Debug)]
struct Retired {
    mapping: Arc<GuestRegionMmap<()>>,
    _guard: Option<crate::revoke::Guard>,
}

impl Region {
    /// The region the frontend describes by these addresses (its file offset is not part of the
    /// identity: QEMU sends 0 with REM_MEM_REG).
    fn same_as(&self, d: &VhostUserMemoryRegion) -> bool {
        self.guest_phys_addr == d.guest_phys_addr
            && self.size == d.memory_size
            && self.user_addr == d.user_addr
    }

    fn guest_end(&self) -> u64 {
        // Validated at creation: cannot overflow.
        self.guest_phys_addr.saturating_add(self.size)
    }
    fn user_end(&self) -> u64 {
        self.user_addr.saturating_add(self.size)
    }
}

/// The current set of regions. Each change produces a new [`GuestMemory`] snapshot that workers
/// pick up atomically; a mapping stays alive while any snapshot still refers to it.
#[derive(Debug, Default)]
pub struct MemoryTable {
    regions: Vec<Region>,
    retired: Vec<Retired>,
}

impl MemoryTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// `SET_MEM_TABLE`: replace every region. On error the old table stays in place.
    pub fn replace_all(
        &mut self,
        descs: &[VhostUserMemoryRegion],
        fds: Vec<OwnedFd>,
    ) -> Result<GuestMemory, MemoryError> {
        if descs.len() != fds.len() {
            return Err(MemoryError::FdCountMismatch {
                regions: descs.len(),
                fds: fds.len(),
            });
        }
        if descs.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let mut fresh = MemoryTable::new();
        for (desc, fd) in descs.iter().zip(fds) {
            fresh.insert(desc, fd)?;
        }
        let snapshot = fresh.snapshot()?;
        let old = std::mem::replace(&mut self.regions, fresh.regions);
        self.retire(old);
        Ok(snapshot)
    }

    /// `ADD_MEM_REG`: add one region.
    pub fn add(
        &mut self,
        desc: &VhostUserMemoryRegion,
        fd: OwnedFd,
    ) -> Result<GuestMemory, MemoryError> {
        if let Some(r) = self.regions.iter_mut().find(|r| r.same_as(desc)) {
            r.refs = r.refs.saturating_add(1);
            drop(fd);
            return self.snapshot();
        }
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        self.insert(desc, fd)?;
        match self.snapshot() {
            Ok(s) => Ok(s),
            Err(e) => {
                self.regions
                    .retain(|r| r.guest_phys_addr != desc.guest_phys_addr);
                Err(e)
            }
        }
    }

    /// `REM_MEM_REG`: remove the region with exactly this guest address and size.
    pub fn remove(&mut self, desc: &VhostUserMemoryRegion) -> Result<GuestMemory, MemoryError> {
        let pos =
            self.regions
                .iter()
                .position(|r| r.same_as(desc))
                .ok_or(MemoryError::UnknownRegion(
                    desc.guest_phys_addr,
                    desc.memory_size,
                ))?;
        if let Some(r) = self.regions.get_mut(pos).filter(|r| r.refs > 1) {
            r.refs = r.refs.saturating_sub(1);
            return self.snapshot();
        }
        let removed = self.regions.remove(pos);
        match self.snapshot() {
            Ok(s) => {
                self.retire(vec![removed]);
                Ok(s)
            }
            Err(e) => {
                self.regions.insert(pos, removed);
                Err(e)
            }
        }
    }

    /// Moves regions out of the table into the retired list, and forgets retired mappings that
    /// no snapshot holds any more.
    fn retire(&mut self, regions: Vec<Region>) {
        self.retired.extend(regions.into_iter().map(|r| Retired {
            mapping: r.mapping,
            _guard: r.guard,
        }));
        self.retired.retain(|r| Arc::strong_count(&r.mapping) > 1);
    }

    /// Translates an address in the frontend's virtual address space (as used by
    /// `SET_VRING_ADDR`) to a guest physical address.
    pub fn vmm_to_guest(&self, user_addr: u64) -> Option<GuestAddress> {
        self.regions
            .iter()
            .find(|r| user_addr >= r.user_addr && user_addr < r.user_end())
            .map(|r| {
                GuestAddress(
                    r.guest_phys_addr
                        .saturating_add(user_addr.saturating_sub(r.user_addr)),
                )
            })
    }

    /// The memory map workers use.
    pub fn snapshot(&self) -> Result<GuestMemory, MemoryError> {
        if self.regions.is_empty() {
            return Ok(GuestMemory::new());
        }
        let mut sorted: Vec<Arc<GuestRegionMmap<()>>> = self
            .regions
            .iter()
            .map(|r| Arc::clone(&r.mapping))
            .collect();
        sorted.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(r.as_ref()));
        GuestMemory::from_arc_regions(sorted).map_err(MemoryError::Collection)
    }

    fn insert(&mut self, desc: &VhostUserMemoryRegion, fd: OwnedFd) -> Result<(), MemoryError> {
        let (gpa, size, uva, offset) = (
            desc.guest_phys_addr,
            desc.memory_size,
            desc.user_addr,
            desc.mmap_offset,
        );
        if size == 0 {
            return Err(MemoryError::EmptyRegion);
        }
        let needed = offset
            .checked_add(size)
            .ok_or(MemoryError::Overflow(gpa, size))?;
        let guest_end = gpa
            .checked_add(size)
            .ok_or(MemoryError::Overflow(gpa, size))?;
        let user_end = uva
            .checked_add(size)
            .ok_or(MemoryError::Overflow(gpa, size))?;
        let map_len = usize::try_from(size).map_err(|_| MemoryError::Overflow(gpa, size))?;
        if !offset.is_multiple_of(page_size()) {
            return Err(MemoryError::UnalignedOffset(offset));
        }
        for r in &self.regions {
            let guest_overlap = gpa < r.guest_end() && r.guest_phys_addr < guest_end;
            let user_overlap = uva < r.user_end() && r.user_addr < user_end;
            if guest_overlap || user_overlap {
                return Err(MemoryError::Overlap(gpa));
            }
        }
        let file = File::from(fd);
        let meta = file.metadata().map_err(MemoryError::Stat)?;
        if !meta.file_type().is_file() {
            return Err(MemoryError::NotRegularFile);
        }
        if meta.len() < needed {
            return Err(MemoryError::FileTooSmall {
                file_size: meta.len(),
                needed,
            });
        }
        let mmap = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(MemoryError::Mmap)?;
        let mapping = GuestRegionMmap::new(mmap, GuestAddress(gpa))
            .ok_or(MemoryError::Overflow(gpa, size))?;
        // The frontend keeps the descriptor and may shrink the file under us: guard the
        // mapping so that a SIGBUS there ends this frontend's session, not the daemon.
        let guard = crate::revoke::guard(mapping.as_ptr(), map_len);
        if guard.is_none() {
            crate::guest_warn!(gpa, "too many mappings to guard: this region is unguarded");
        }
        self.regions.push(Region {
            guest_phys_addr: gpa,
            size,
            user_addr: uva,
            refs: 1,
            mapping: Arc::new(mapping),
            guard,
        });
        Ok(())
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no side effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )]
    use super::*;
    use std::os::fd::FromRawFd;
    use vm_memory::Bytes;

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: memfd_create with a valid C string; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(owned.try_clone().unwrap())
            .set_len(size)
            .unwrap();
        owned
    }

    fn region(gpa: u64, size: u64, uva: u64, off: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, uva, off)
    }

    #[test]
    fn regions_map_and_translate_vmm_addresses() {
        let mut t = MemoryTable::new();
        let mem = t
            .replace_all(
                &[
                    region(0, 0x10000, 0x7f00_0000_0000, 0),
                    region(0x100000, 0x10000, 0x7f10_0000_0000, 0),
                ],
                vec![memfd(0x10000), memfd(0x10000)],
            )
            .unwrap();
        mem.write_obj(0xabcdu16, GuestAddress(0x100010)).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x100010)).unwrap(), 0xabcd);
        assert_eq!(
            t.vmm_to_guest(0x7f10_0000_0010),
            Some(GuestAddress(0x100010))
        );
        assert_eq!(t.vmm_to_guest(0x7f10_0001_0000), None);
    }

    #[test]
    fn region_larger_than_its_file_is_refused() {
        let mut t = MemoryTable::new();
        let err = t.replace_all(&[region(0, 0x20000, 0x1000_0000, 0)], vec![memfd(0x10000)]);
        assert!(matches!(err, Err(MemoryError::FileTooSmall { .. })));
        assert!(t.is_empty());
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let mut t = MemoryTable::new();
        t.add(&region(0, 0x10000, 0x1000_0000, 0), memfd(0x10000))
            .unwrap();
        let err = t.add(&region(0x8000, 0x10000, 0x2000_0000, 0), memfd(0x10000));
        assert!(matches!(err, Err(MemoryError::Overlap(_))));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn address_overflow_is_refused() {
        let mut t = MemoryTable::new();
        let err = t.add(&region(u64::MAX - 0xfff, 0x10000, 0, 0), memfd(0x10000));
        assert!(matches!(err, Err(MemoryError::Overflow(..))));
        let err = t.add(&region(0, 0x10000, 0, u64::MAX - 0xfff), memfd(0x10000));
        assert!(matches!(err, Err(MemoryError::Overflow(..))));
    }

    #[test]
    fn removing_unknown_region_is_refused_and_known_region_goes() {
        let mut t = MemoryTable::new();
        t.add(&region(0, 0x10000, 0x1000_0000, 0), memfd(0x10000))
            .unwrap();
        assert!(matches!(
            t.remove(&region(0, 0x8000, 0, 0)),
            Err(MemoryError::UnknownRegion(..))
        ));
        let mem = t.remove(&region(0, 0x10000, 0x1000_0000, 0)).unwrap();
        assert!(t.is_empty());
        assert!(mem.read_obj::<u8>(GuestAddress(0)).is_err());
    }

    #[test]
    fn duplicate_add_is_counted_and_needs_as_many_removes() {
        let mut t = MemoryTable::new();
        let r = region(0, 0x10000, 0x1000_0000, 0);
        t.add(&r, memfd(0x10000)).unwrap();
        t.add(&r, memfd(0x10000)).unwrap();
        assert_eq!(t.len(), 1);
        let mem = t.remove(&r).unwrap();
        assert!(mem.read_obj::<u8>(GuestAddress(0)).is_ok());
        let mem = t.remove(&r).unwrap();
        assert!(mem.read_obj::<u8>(GuestAddress(0)).is_err());
    }

    #[test]
    fn more_regions_than_slots_are_refused() {
        let mut t = MemoryTable::new();
        for i in 0..MAX_MEM_SLOTS as u64 {
            t.add(&region(i * 0x10000, 0x1000, i * 0x10000, 0), memfd(0x1000))
                .unwrap();
        }
        let err = t.add(&region(0x1000_0000, 0x1000, 0x1000_0000, 0), memfd(0x1000));
        assert!(matches!(err, Err(MemoryError::TooManyRegions)));
    }
}
