//! Guest memory a frontend can take away.
//!
//! A frontend keeps the file descriptors of the memory it shares with us and can shrink the
//! files at any time (`ftruncate` of its memfd); the next access through our mapping of a page
//! that is gone raises SIGBUS, which would kill the daemon. Checking sizes when a region arrives
//! cannot prevent it, and a `memory-backend-file` cannot be sealed. So every mapping of frontend
//! memory (guest RAM regions, an inflight region handed back) is registered here, and a SIGBUS
//! handler that finds the faulting address in a registered mapping puts an anonymous page over
//! it, marks the frontend's memory as revoked and returns: the access is retried and reads zeros,
//! the worker goes on, and the session, woken through [`revoked_fd`], drops that frontend and
//! serves the next. A SIGBUS anywhere else is a genuine fault: the default action is restored
//! and the process dies of it, as before.
//!
//! The registry is a fixed table of atomics (the handler may not allocate or lock). Kernel-side
//! copies into revoked memory (preadv, io_uring, TAP reads) do not raise SIGBUS but fail with
//! EFAULT, which the devices turn into an error status or a stopped ring.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings that can be guarded at once (guest regions are at most 32 per table; old tables'
/// mappings linger until no worker holds them).
const SLOTS: usize = 512;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
};
static GUARDED: [Slot; SLOTS] = [EMPTY; SLOTS];
/// The eventfd the handler signals (-1 until [`install`]).
static NOTIFY: AtomicI32 = AtomicI32::new(-1);
static REVOKED: AtomicBool = AtomicBool::new(false);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static EVENTFD: OnceLock<OwnedFd> = OnceLock::new();

/// Installs the SIGBUS handler (once per process; later calls do nothing).
pub fn install() -> io::Result<()> {
    if EVENTFD.get().is_some() {
        return Ok(());
    }
    // SAFETY: creates an eventfd; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is fresh and ours.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if EVENTFD.set(owned).is_err() {
        return Ok(()); // another thread won the race; its descriptor is the one in use
    }
    NOTIFY.store(fd, Ordering::Release);
    // SAFETY: sysconf has no side effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    PAGE.store(usize::try_from(page).unwrap_or(4096), Ordering::Relaxed);
    // SAFETY: sigaction is plain data; all-zero is a valid empty action before we fill it in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigbus as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler for SIGBUS with a valid action; the old one is not wanted.
    if unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Readable once a registered mapping was revoked (see [`take_revoked`]).
pub fn revoked_fd() -> Option<BorrowedFd<'static>> {
    use std::os::fd::AsFd;
    EVENTFD.get().map(|f| f.as_fd())
}

/// Whether memory was revoked since the last call; clears the mark and the eventfd.
pub fn take_revoked() -> bool {
    if let Some(fd) = EVENTFD.get() {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from a non-blocking eventfd we own.
        unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(fd), (&raw mut v).cast(), 8) };
    }
    REVOKED.swap(false, Ordering::AcqRel)
}

/// A registered mapping; unregistered on drop. Drop it only once nothing can touch the
/// mapping any more (it is unmapped, or about to be).
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = GUARDED.get(self.slot) {
            s.end.store(0, Ordering::Release);
            s.start.store(0, Ordering::Release);
        }
    }
}

/// Registers `[start, start + len)`; `None` if the table is full (the mapping then goes
/// unguarded, which is logged once by the caller).
pub fn guard(start: *const u8, len: usize) -> Option<Guard> {
    let start = start as usize;
    let end = start.checked_add(len)?;
    for (i, s) in GUARDED.iter().enumerate() {
        if s.start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.end.store(end, Ordering::Release);
            return Some(Guard { slot: i });
        }
    }
    None
}

fn guarded(addr: usize) -> bool {
    GUARDED.iter().any(|s| {
        let start = s.start.load(Ordering::Acquire);
        start != 0 && addr >= start && addr < s.end.load(Ordering::Acquire)
    })
}

/// Async-signal-safe only: atomics, mmap, write, sigaction.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let addr = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passed a valid siginfo_t for SIGBUS.
        let info = unsafe { &*info };
        // SAFETY: for SIGBUS, si_addr is the fault address.
        unsafe { info.si_addr() as usize }
    };
    if addr != 0 && guarded(addr) {
        let page = PAGE.load(Ordering::Relaxed).max(1);
        let at = addr - addr % page;
        // SAFETY: replaces one page of a mapping we own (registered) with anonymous memory;
        // MAP_FIXED over our own mapping is exactly the intent.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            REVOKED.store(true, Ordering::Release);
            let fd = NOTIFY.load(Ordering::Acquire);
            if fd >= 0 {
                let one = 1u64;
                // SAFETY: write is async-signal-safe; 8 bytes from a valid u64.
                unsafe { libc::write(fd, (&raw const one).cast(), 8) };
            }
            return;
        }
    }
    // Not ours: let the fault kill the process as it would have.
    // SAFETY: restoring the default action is async-signal-safe; returning re-raises the fault.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_truncated_guarded_mapping_reads_zeros_and_reports_the_revocation() {
        install().unwrap();
        let fd = crate::memfd::create("revoke-test").unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(2 * 4096).unwrap();
        // SAFETY: maps two pages of our memfd shared; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        let g = guard(p, 2 * 4096).unwrap();
        // SAFETY: the first page is mapped and backed.
        unsafe { p.write_volatile(7) };
        let _ = take_revoked();
        file.set_len(0).unwrap(); // the "frontend" takes its memory away
        let second = p.wrapping_add(4096);
        // SAFETY: the page is still mapped; the fault is turned into a fresh zero page.
        let v = unsafe { second.read_volatile() };
        assert_eq!(v, 0);
        assert!(take_revoked(), "the revocation was reported");
        assert!(!take_revoked(), "and only once");
        drop(g);
        // SAFETY: unmaps what we mapped above.
        unsafe { libc::munmap(p.cast(), 2 * 4096) };
    }
}
