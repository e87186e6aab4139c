//! Turning guest data segments into `iovec`s that point straight into guest memory, so reads and
//! writes move data between the disk and the guest without a copy.

use bulkhead_common::GuestMemory;
use vm_memory::GuestMemoryBackend;

use crate::request::Segment;

/// Most iovecs one request may need (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IovError {
    #[error("data buffer at {0:#x} is outside guest memory")]
    Unmapped(u64),
    #[error("request needs more than {MAX_IOVECS} buffers")]
    TooMany,
}

/// Fills `out` with iovecs for `segments`; a segment spanning two memory regions becomes two.
///
/// The pointers stay valid while `mem` (a snapshot that owns its mappings) is alive.
pub fn build(
    mem: &GuestMemory,
    segments: &[Segment],
    out: &mut Vec<libc::iovec>,
) -> Result<(), IovError> {
    out.clear();
    for s in segments {
        // Fast path: the buffer lies in one region (nearly always).
        if let Ok(slice) = mem.get_slice(s.addr, s.len as usize) {
            if out.len() >= MAX_IOVECS {
                return Err(IovError::TooMany);
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            continue;
        }
        let slices = mem.get_slices(s.addr, s.len as usize);
        for slice in slices {
            let slice = slice.map_err(|_| IovError::Unmapped(s.addr.0))?;
            if out.len() >= MAX_IOVECS {
                return Err(IovError::TooMany);
            }
            let len = slice.len();
            let ptr = slice.ptr_guard_mut().as_ptr();
            out.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            });
        }
    }
    Ok(())
}

/// Total bytes described by `iov`.
pub fn total(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

/// Drops the first `n` bytes from `iov` (after a partial transfer).
pub fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut skip = 0;
    for v in iov.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= v.iov_len {
            n -= v.iov_len;
            skip += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iov.drain(..skip);
}

/// Whether every buffer and length is aligned as O_DIRECT requires.
pub fn aligned(iov: &[libc::iovec], align: usize) -> bool {
    iov.iter()
        .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
}
