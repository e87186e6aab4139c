//! iovecs straight into guest memory for descriptor chains.

use bulkhead_common::vring::Desc;
use bulkhead_common::GuestMemory;
use vm_memory::GuestMemoryBackend;

/// Most iovecs for one frame (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

/// Appends iovecs covering `descs` to `out`; false if a buffer is outside guest memory or the
/// frame would need too many iovecs.
pub fn append(mem: &GuestMemory, descs: &[Desc], out: &mut Vec<libc::iovec>) -> bool {
    for d in descs {
        // Fast path: the buffer lies in one region (nearly always).
        if let Ok(slice) = mem.get_slice(d.addr, d.len as usize) {
            if out.len() >= MAX_IOVECS {
                return false;
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            continue;
        }
        for slice in mem.get_slices(d.addr, d.len as usize) {
            let Ok(slice) = slice else { return false };
            if out.len() >= MAX_IOVECS {
                return false;
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn desc(addr: u64, len: u32) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }

    #[test]
    fn a_buffer_spanning_two_regions_becomes_two_iovecs_over_the_right_bytes() {
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        let mut out = Vec::new();
        assert!(append(&mem, &[desc(0x800, 0x1000)], &mut out));
        let lens: Vec<usize> = out.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, vec![0x800, 0x800]);
        let first = mem.get_slice(GuestAddress(0x800), 1).unwrap();
        let second = mem.get_slice(GuestAddress(0x1000), 1).unwrap();
        assert_eq!(out[0].iov_base, first.ptr_guard_mut().as_ptr().cast());
        assert_eq!(out[1].iov_base, second.ptr_guard_mut().as_ptr().cast());
    }

    #[test]
    fn a_buffer_reaching_outside_memory_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut out = Vec::new();
        assert!(!append(&mem, &[desc(0x800, 0x1000)], &mut out));
    }
}
