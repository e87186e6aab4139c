//! Guest RAM for the synthetic VMM: a memfd shared with the daemon, mapped here too, exactly as
//! QEMU's `memory-backend-memfd,share=on` does.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// One region of guest RAM: its guest address, size, offset in the memfd and where this process
/// mapped it (what QEMU calls the userspace address).
#[derive(Debug, Clone, Copy)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
    pub user_addr: u64,
}

impl RamRegion {
    pub fn to_vhost(&self) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(self.guest_addr, self.size, self.user_addr, self.file_offset)
    }
}

/// Guest RAM backed by one memfd, possibly split into several regions with gaps between their
/// guest addresses (like RAM below and above a PCI hole).
#[derive(Debug)]
pub struct GuestRam {
    fd: OwnedFd,
    mem: GuestMemoryMmap<()>,
    regions: Vec<RamRegion>,
}

impl GuestRam {
    /// One region of `size` bytes at guest address 0.
    pub fn new(size: u64) -> Result<Self> {
        Self::with_layout(&[(0, size)])
    }

    /// Regions at the given (guest address, size) pairs, consecutive in one memfd.
    pub fn with_layout(layout: &[(u64, u64)]) -> Result<Self> {
        let total: u64 = layout.iter().map(|(_, s)| s).sum();
        let fd = memfd("bulkhead-guest-ram")?;
        File::from(fd.try_clone()?)
            .set_len(total)
            .context("sizing guest RAM")?;
        let mut regions = Vec::new();
        let mut mapped = Vec::new();
        let mut offset = 0;
        for &(guest_addr, size) in layout {
            let file = File::from(fd.try_clone()?);
            let mmap =
                MmapRegion::<()>::from_file(FileOffset::new(file, offset), usize::try_from(size)?)
                    .context("mapping guest RAM")?;
            let user_addr = mmap.as_ptr() as u64;
            let region =
                GuestRegionMmap::new(mmap, GuestAddress(guest_addr)).context("guest region")?;
            mapped.push(region);
            regions.push(RamRegion {
                guest_addr,
                size,
                file_offset: offset,
                user_addr,
            });
            offset += size;
        }
        let mem = GuestMemoryMmap::from_regions(mapped).context("guest memory map")?;
        Ok(Self { fd, mem, regions })
    }

    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Translates a guest address to this process's address of it (for SET_VRING_ADDR).
    pub fn user_addr(&self, guest: GuestAddress) -> Result<u64> {
        for r in &self.regions {
            if guest.0 >= r.guest_addr && guest.0 < r.guest_addr + r.size {
                return Ok(r.user_addr + (guest.0 - r.guest_addr));
            }
        }
        bail!("guest address {:#x} is not in RAM", guest.0)
    }
}

pub fn memfd(name: &str) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Raw fd number, for messages.
pub fn raw(fd: BorrowedFd<'_>) -> i32 {
    fd.as_raw_fd()
}
