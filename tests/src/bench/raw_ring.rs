//! Host-pointer access to a split ring laid out in the harness's own guest RAM, for the lean
//! drivers and the instant device: plain loads and stores, no per-access bounds walk, so the
//! driver costs what a guest's driver costs.

use std::sync::atomic::AtomicU16;
use std::time::Duration;

use anyhow::{Context, Result};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};

use crate::frontend::{RingLayout, Rings};

/// Host pointers to one split ring's parts.
#[derive(Debug, Clone, Copy)]
pub struct RawRing {
    pub size: u16,
    pub desc: *mut u8,
    pub avail: *mut u8,
    pub used: *mut u8,
}

// SAFETY: the pointers point into guest RAM that outlives every user (the driver owns the
// mapping; the instant backend's thread is joined before the driver is dropped).
unsafe impl Send for RawRing {}

/// Reads a `T` at byte `off` of guest RAM mapped at `base`.
pub fn read_at<T: Copy>(base: *mut u8, off: usize) -> T {
    let p = base.wrapping_add(off).cast::<T>();
    // SAFETY: callers pass offsets of naturally aligned ring fields inside guest RAM, which
    // outlives the driver (see `RawRing`).
    unsafe { std::ptr::read_volatile(p) }
}

/// Writes a `T` at byte `off` of guest RAM mapped at `base`.
pub fn write_at<T: Copy>(base: *mut u8, off: usize, v: T) {
    let p = base.wrapping_add(off).cast::<T>();
    // SAFETY: as in `read_at`.
    unsafe { std::ptr::write_volatile(p, v) }
}

/// A shared 16-bit ring field at byte `off` of `base`.
fn u16_at(base: *mut u8, off: usize) -> &'static AtomicU16 {
    let p = base.wrapping_add(off).cast::<AtomicU16>();
    // SAFETY: ring fields are 2-byte aligned (the layout aligns every part to 4 KiB and fields
    // to their size) and lie inside guest RAM, which outlives the driver.
    unsafe { &*p }
}

/// `VRING_USED_F_NO_NOTIFY`: the device asks not to be kicked (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

impl RawRing {
    /// `avail->flags`
    pub fn avail_flags(&self) -> &AtomicU16 {
        u16_at(self.avail, 0)
    }
    /// `used->flags`
    pub fn used_flags(&self) -> &AtomicU16 {
        u16_at(self.used, 0)
    }
    /// `avail->idx`
    pub fn avail_idx(&self) -> &AtomicU16 {
        u16_at(self.avail, 2)
    }
    /// `avail->ring[i]`
    pub fn avail_slot(&self, i: u16) -> &AtomicU16 {
        u16_at(self.avail, 4 + 2 * usize::from(i % self.size))
    }
    /// `used_event` (after the available ring's entries).
    pub fn used_event(&self) -> &AtomicU16 {
        u16_at(self.avail, 4 + 2 * usize::from(self.size))
    }
    /// `used->idx`
    pub fn used_idx(&self) -> &AtomicU16 {
        u16_at(self.used, 2)
    }
    /// `avail_event` (after the used ring's entries).
    pub fn avail_event(&self) -> &AtomicU16 {
        u16_at(self.used, 4 + 8 * usize::from(self.size))
    }
    /// Reads used element `i`: (id, len). The device wrote it before the release store of
    /// used->idx that the caller acquired.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        // Two 32-bit reads: used elements are only 4-byte aligned.
        let at = 4 + 8 * usize::from(i % self.size);
        (
            u32::from_le(read_at(self.used, at)),
            u32::from_le(read_at(self.used, at + 4)),
        )
    }
    /// Writes used element `i`.
    pub fn set_used_elem(&self, i: u16, id: u32, len: u32) {
        let at = 4 + 8 * usize::from(i % self.size);
        write_at(self.used, at, id.to_le());
        write_at(self.used, at + 4, len.to_le());
    }
    /// Reads descriptor `i`: (addr, len, flags, next).
    pub fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
        let at = 16 * usize::from(i % self.size);
        (
            u64::from_le(read_at(self.desc, at)),
            u32::from_le(read_at(self.desc, at + 8)),
            u16::from_le(read_at(self.desc, at + 12)),
            u16::from_le(read_at(self.desc, at + 14)),
        )
    }
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = 16 * usize::from(i % self.size);
        write_at(self.desc, at, addr.to_le());
        write_at(self.desc, at + 8, len.to_le());
        write_at(self.desc, at + 12, flags.to_le());
        write_at(self.desc, at + 14, next.to_le());
    }
}

/// `vring_need_event`: whether moving an index from `old` to `new` passes `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

pub fn host(mem: &GuestMemoryMmap<()>, addr: GuestAddress, len: usize) -> Result<*mut u8> {
    let slice = mem
        .get_slice(addr, len)
        .with_context(|| format!("guest address {:#x} (+{len}) is not in RAM", addr.0))?;
    Ok(slice.ptr_guard_mut().as_ptr())
}

/// Host pointers to queue `q` of `rings`.
pub fn raw_ring<R: Rings>(rings: &mut R, q: u16) -> Result<RawRing> {
    let size = rings.setup().queue_size;
    let (mem, dq) = rings.mem_and_queue(q);
    let layout = dq.layout;
    Ok(RawRing {
        size,
        desc: host(mem, layout.desc, RingLayout::bytes(size) as usize)?,
        avail: host(mem, layout.avail, 6 + 2 * usize::from(size))?,
        used: host(mem, layout.used, 6 + 8 * usize::from(size))?,
    })
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the calling thread's CPU clock.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether the driver must kick after moving the available index from `old` to `new`: the
/// device's `avail_event` with EVENT_IDX, its NO_NOTIFY flag without. Call after a full fence
/// that orders the index store before this read (virtio_mb in `virtqueue_kick_prepare`).
pub fn kick_needed(ring: &RawRing, event_idx: bool, new: u16, old: u16) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    if event_idx {
        need_event(u16::from_le(ring.avail_event().load(Relaxed)), new, old)
    } else {
        u16::from_le(ring.used_flags().load(Relaxed)) & USED_F_NO_NOTIFY == 0
    }
}

/// Asks for an interrupt once the used index passes `used_event` (EVENT_IDX), or at every
/// completion (clears VRING_AVAIL_F_NO_INTERRUPT). The caller fences and re-checks the ring.
pub fn arm_interrupt(ring: &RawRing, event_idx: bool, used_event: u16) {
    use std::sync::atomic::Ordering::Relaxed;
    if event_idx {
        ring.used_event().store(used_event.to_le(), Relaxed);
    } else {
        ring.avail_flags().store(0, Relaxed);
    }
}

/// Sleeps until the device interrupts (signals the call eventfd): one `epoll_wait` per
/// interrupt. Edge-triggered, so the counter need not be read: every signal is an edge.
#[derive(Debug)]
pub struct Interrupts {
    epoll: vmm_sys_util::epoll::Epoll,
}

impl Interrupts {
    pub fn new(call: std::os::fd::RawFd) -> Result<Self> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            call,
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
        )?;
        Ok(Self { epoll })
    }

    /// Waits up to `timeout_ms`; false if no interrupt came.
    pub fn wait(&self, timeout_ms: i32) -> Result<bool> {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 1];
        match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => Ok(n > 0),
            // A signal woke us: look at the ring again, as after a spurious interrupt.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
}

/// Kicks the device (writes the kick eventfd).
pub fn kick(fd: std::os::fd::RawFd) -> Result<()> {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd.
    let n = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    anyhow::ensure!(n == 8, "kick: {}", std::io::Error::last_os_error());
    Ok(())
}
