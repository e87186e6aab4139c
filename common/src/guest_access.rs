//! Guest memory as the queue workers touch it: one snapshot of the memory table with its regions'
//! host addresses laid out flat, so that translating a guest address is a compare or two instead
//! of vm-memory's general lookup (which was ~45 % of the block device's time per request at
//! millions of requests per second: ring entries, descriptors, headers and status bytes are
//! all a few bytes each, and every one was looked up).
//!
//! A `GuestAccess` holds the snapshot (`Arc`), so every mapping its pointers point into stays
//! mapped for as long as it lives, even if the frontend removes the region meanwhile. It derefs
//! to the snapshot for everything else (iovecs, slices).

use std::ops::Deref;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// An access outside guest memory (or misaligned where alignment is required).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest memory access at {0:#x} is outside guest memory or misaligned")]
pub struct OutOfRange(pub u64);

/// One region: guest addresses `[start, end)` mapped at `host`.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    host: *mut u8,
}

#[derive(Debug)]
pub struct GuestAccess {
    mem: Arc<GuestMemory>,
    spans: Vec<Span>,
}

// SAFETY: the raw pointers point into mappings owned by `mem` (shared, immutable regions list);
// they are only dereferenced through the checked accessors below, from any thread, exactly as
// vm-memory's own `Send + Sync` regions are.
unsafe impl Send for GuestAccess {}
// SAFETY: as above; no interior mutability beyond guest memory itself, which is shared by design.
unsafe impl Sync for GuestAccess {}

impl Deref for GuestAccess {
    type Target = GuestMemory;
    fn deref(&self) -> &GuestMemory {
        &self.mem
    }
}

impl GuestAccess {
    pub fn new(mem: Arc<GuestMemory>) -> Self {
        let spans = mem
            .iter()
            .filter_map(|r| {
                let start = r.start_addr().0;
                let end = start.checked_add(r.len())?;
                Some(Span {
                    start,
                    end,
                    host: r.as_ptr(),
                })
            })
            .collect();
        Self { mem, spans }
    }

    /// The snapshot this view was made from.
    pub fn snapshot(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Whether this view was made from `mem` (the same snapshot, not merely equal contents).
    pub fn is_of(&self, mem: &Arc<GuestMemory>) -> bool {
        Arc::ptr_eq(&self.mem, mem)
    }

    /// Host address of `[addr, addr + len)` if it lies within one region.
    #[inline]
    fn host(&self, addr: u64, len: u64) -> Option<*mut u8> {
        for s in &self.spans {
            if addr >= s.start && addr < s.end {
                let off = addr.wrapping_sub(s.start);
                if len > s.end.wrapping_sub(addr) {
                    return None;
                }
                let off = usize::try_from(off).ok()?;
                return Some(s.host.wrapping_add(off));
            }
        }
        None
    }

    /// Host address of the guest range `[addr, addr + len)` if it lies within one region (the
    /// caller may touch `len` bytes there while this view lives).
    pub fn host_range(&self, addr: GuestAddress, len: usize) -> Option<*mut u8> {
        self.host(addr.0, len as u64)
    }

    /// Whether `[addr, addr + len)` is guest memory (possibly across adjacent regions).
    pub fn contains(&self, addr: GuestAddress, len: usize) -> bool {
        self.host(addr.0, len as u64).is_some() || self.mem.check_range(addr, len)
    }

    /// Reads a `T`; `None` if any byte of it is outside guest memory.
    #[inline]
    pub fn read_val<T: ByteValued>(&self, addr: GuestAddress) -> Option<T> {
        let size = std::mem::size_of::<T>() as u64;
        match self.host(addr.0, size) {
            Some(p) if (p as usize).is_multiple_of(std::mem::align_of::<T>()) => {
                // SAFETY: `p` points at `size_of::<T>()` mapped, aligned bytes (checked above)
                // that `self.mem` keeps mapped; `T: ByteValued` accepts any bit pattern. Volatile:
                // the guest may write them concurrently.
                Some(unsafe { std::ptr::read_volatile(p.cast::<T>()) })
            }
            // Misaligned or straddling two regions: vm-memory's general path.
            _ => vm_memory::Bytes::read_obj(&*self.mem, addr).ok(),
        }
    }

    /// Writes a `T`; `None` if any byte of it is outside guest memory.
    #[inline]
    pub fn write_val<T: ByteValued>(&self, val: T, addr: GuestAddress) -> Option<()> {
        let size = std::mem::size_of::<T>() as u64;
        match self.host(addr.0, size) {
            Some(p) if (p as usize).is_multiple_of(std::mem::align_of::<T>()) => {
                // SAFETY: as in `read`; guest memory is writable shared memory.
                unsafe { std::ptr::write_volatile(p.cast::<T>(), val) };
                Some(())
            }
            _ => vm_memory::Bytes::write_obj(&*self.mem, val, addr).ok(),
        }
    }

    /// The 16-bit ring field at `addr` (2-byte aligned, as ring fields are).
    #[inline]
    fn atomic_u16(&self, addr: GuestAddress) -> Result<&AtomicU16, OutOfRange> {
        match self.host(addr.0, 2) {
            Some(p) if (p as usize).is_multiple_of(2) => {
                // SAFETY: 2 mapped, aligned bytes that live as long as `self` (which holds the
                // mapping); AtomicU16 has the size and alignment of u16.
                Ok(unsafe { &*p.cast::<AtomicU16>() })
            }
            _ => Err(OutOfRange(addr.0)),
        }
    }

    /// Atomically loads a 16-bit ring field.
    #[inline]
    pub fn load_u16(&self, addr: GuestAddress, order: Ordering) -> Result<u16, OutOfRange> {
        Ok(self.atomic_u16(addr)?.load(order))
    }

    /// Atomically stores a 16-bit ring field.
    #[inline]
    pub fn store_u16(
        &self,
        val: u16,
        addr: GuestAddress,
        order: Ordering,
    ) -> Result<(), OutOfRange> {
        self.atomic_u16(addr)?.store(val, order);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestAccess {
        GuestAccess::new(Arc::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap(),
        ))
    }

    #[test]
    fn objects_within_a_region_and_straddling_two_read_back() {
        let mem = two_regions();
        for at in [0x10, 0xffc, 0x1ff8] {
            mem.write_val(0x1122_3344_5566_7788u64, GuestAddress(at))
                .unwrap();
            assert_eq!(
                mem.read_val::<u64>(GuestAddress(at)),
                Some(0x1122_3344_5566_7788)
            );
        }
    }

    #[test]
    fn objects_reaching_outside_memory_are_refused() {
        let mem = two_regions();
        assert_eq!(mem.read_val::<u64>(GuestAddress(0x1ffc)), None);
        assert_eq!(mem.write_val(1u64, GuestAddress(0x1ffc)), None);
        assert_eq!(mem.read_val::<u8>(GuestAddress(0x2000)), None);
        assert_eq!(mem.read_val::<u8>(GuestAddress(u64::MAX)), None);
        assert!(mem
            .load_u16(GuestAddress(0x2000), Ordering::Relaxed)
            .is_err());
        assert!(mem.load_u16(GuestAddress(0x11), Ordering::Relaxed).is_err());
        assert!(!mem.contains(GuestAddress(0x1800), 0x900));
        assert!(mem.contains(GuestAddress(0x800), 0x1000));
    }

    #[test]
    fn ring_fields_are_shared_with_the_snapshot() {
        let mem = two_regions();
        mem.store_u16(0xbeef, GuestAddress(0x1002), Ordering::Release)
            .unwrap();
        let v: u16 = vm_memory::Bytes::read_obj(&**mem.snapshot(), GuestAddress(0x1002)).unwrap();
        assert_eq!(v, 0xbeef);
        assert_eq!(
            mem.load_u16(GuestAddress(0x1002), Ordering::Acquire),
            Ok(0xbeef)
        );
    }
}
