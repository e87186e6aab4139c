//! iovecs straight into guest memory, for the kernel to move data between a file or TAP and the
//! guest's buffers without a copy: built here once for every device (blk reads and writes, net
//! transmit and receive), from a snapshot that keeps the mappings alive.

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::guest_access::GuestAccess;

/// Most iovecs one request or frame may need (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IovError {
    #[error("buffer at {0:#x} is outside guest memory")]
    Unmapped(u64),
    #[error("more than {MAX_IOVECS} buffers")]
    TooMany,
}

/// Appends iovecs for the guest buffer `[addr, addr + len)` to `out`; a buffer spanning two
/// regions becomes two iovecs. The pointers stay valid while `mem` (its snapshot) lives.
pub fn append(
    mem: &GuestAccess,
    addr: GuestAddress,
    len: u32,
    out: &mut Vec<libc::iovec>,
) -> Result<(), IovError> {
    let len = len as usize;
    if let Some(p) = mem.host_range(addr, len) {
        if out.len() >= MAX_IOVECS {
            return Err(IovError::TooMany);
        }
        out.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: len,
        });
        return Ok(());
    }
    for slice in mem.get_slices(addr, len) {
        let slice = slice.map_err(|_| IovError::Unmapped(addr.0))?;
        if out.len() >= MAX_IOVECS {
            return Err(IovError::TooMany);
        }
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}

/// Clears `out` and fills it with iovecs for every `(address, length)` buffer.
pub fn build(
    mem: &GuestAccess,
    bufs: impl IntoIterator<Item = (GuestAddress, u32)>,
    out: &mut Vec<libc::iovec>,
) -> Result<(), IovError> {
    out.clear();
    bufs.into_iter()
        .try_for_each(|(addr, len)| append(mem, addr, len, out))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memory::GuestMemory;

    fn mem(ranges: &[(u64, usize)]) -> GuestAccess {
        let r: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestAccess::new(Arc::new(GuestMemory::from_ranges(&r).unwrap()))
    }

    #[test]
    fn a_buffer_spanning_two_regions_becomes_two_iovecs_over_the_right_bytes() {
        let m = mem(&[(0, 0x1000), (0x1000, 0x1000)]);
        let mut out = Vec::new();
        append(&m, GuestAddress(0x800), 0x1000, &mut out).unwrap();
        let lens: Vec<usize> = out.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, vec![0x800, 0x800]);
        let first = m.get_slice(GuestAddress(0x800), 1).unwrap();
        let second = m.get_slice(GuestAddress(0x1000), 1).unwrap();
        assert_eq!(out[0].iov_base, first.ptr_guard_mut().as_ptr().cast());
        assert_eq!(out[1].iov_base, second.ptr_guard_mut().as_ptr().cast());
    }

    #[test]
    fn a_buffer_reaching_outside_memory_is_refused() {
        let m = mem(&[(0, 0x1000)]);
        let mut out = Vec::new();
        assert_eq!(
            append(&m, GuestAddress(0x800), 0x1000, &mut out),
            Err(IovError::Unmapped(0x800))
        );
    }

    #[test]
    fn too_many_buffers_are_refused() {
        let m = mem(&[(0, 0x10000)]);
        let mut out = Vec::new();
        let bufs = (0..=MAX_IOVECS as u64).map(|i| (GuestAddress(i * 8), 8));
        assert_eq!(build(&m, bufs, &mut out), Err(IovError::TooMany));
    }

    #[test]
    fn advancing_drops_whole_and_partial_buffers() {
        let m = mem(&[(0, 0x1000)]);
        let mut out = Vec::new();
        build(
            &m,
            [(GuestAddress(0), 10), (GuestAddress(100), 20)],
            &mut out,
        )
        .unwrap();
        advance(&mut out, 15);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].iov_len, 15);
        assert_eq!(total(&out), 15);
    }
}
