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
