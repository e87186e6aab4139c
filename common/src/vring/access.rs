//! Ring structures read and written through the region that holds them.
//!
//! vm-memory's `Bytes` impl for a whole memory map walks a slice iterator even for an object
//! that lies in one region, which showed up in profiles of the 64-byte TX path (descriptor reads
//! and used-element writes happen once per chain). Ring objects are small and naturally aligned,
//! so they nearly always lie in one region: go straight to it, and fall back to the general path
//! for the rare object that straddles two.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// Reads a `T` at `addr`; `None` if any byte of it is outside guest memory.
pub fn read<T: ByteValued>(mem: &GuestMemory, addr: GuestAddress) -> Option<T> {
    if let Some((region, offset)) = mem.to_region_addr(addr) {
        if let Ok(v) = region.read_obj(offset) {
            return Some(v);
        }
    }
    mem.read_obj(addr).ok()
}

/// Writes `val` at `addr`; `None` if any byte of it is outside guest memory.
pub fn write<T: ByteValued>(mem: &GuestMemory, val: T, addr: GuestAddress) -> Option<()> {
    if let Some((region, offset)) = mem.to_region_addr(addr) {
        if region.write_obj(val, offset).is_ok() {
            return Some(());
        }
    }
    mem.write_obj(val, addr).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn objects_within_a_region_and_straddling_two_read_back() {
        let mem = two_regions();
        for at in [0x10, 0xffc, 0x1ff8] {
            write(&mem, 0x1122_3344_5566_7788u64, GuestAddress(at)).unwrap();
            assert_eq!(
                read::<u64>(&mem, GuestAddress(at)),
                Some(0x1122_3344_5566_7788)
            );
        }
    }

    #[test]
    fn objects_reaching_outside_memory_are_refused() {
        let mem = two_regions();
        assert_eq!(read::<u64>(&mem, GuestAddress(0x1ffc)), None);
        assert_eq!(write(&mem, 1u64, GuestAddress(0x1ffc)), None);
        assert_eq!(read::<u8>(&mem, GuestAddress(0x2000)), None);
        assert_eq!(read::<u8>(&mem, GuestAddress(u64::MAX)), None);
    }
}
