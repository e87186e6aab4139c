//! Small operations on descriptors the engine and the devices share.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets O_NONBLOCK with fcntl. std's `set_nonblocking` uses an ioctl (FIONBIO) that the seccomp
/// filter does not allow, so everything that runs after the filter is on comes here.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller holds open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
