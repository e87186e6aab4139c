//! Termination and report signals, delivered through a signalfd so the serve loop can wait on
//! them together with its socket.
//!
//! [`Signals::install`] must run before any thread is spawned: it blocks the signals in the
//! calling thread, and threads inherit that mask, so no thread is interrupted by them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The descriptor waited on is readable.
    Readable,
    /// SIGTERM or SIGINT: exit.
    Shutdown,
    /// SIGUSR1: log counters.
    Report,
    /// The second descriptor of [`Signals::wait_readable_or`] is readable.
    Other,
}

#[derive(Debug)]
pub struct Signals {
    fd: OwnedFd,
}

const HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

impl Signals {
    pub fn install() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for s in HANDLED {
            // SAFETY: `set` is initialised and `s` a valid signal number.
            unsafe { libc::sigaddset(&mut set, s) };
        }
        // SAFETY: blocks the signals in this thread; `set` is valid, the old mask is not wanted.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: creates a new signalfd for `set`; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Waits until `fd` is readable or a signal arrives.
    pub fn wait_readable(&self, fd: BorrowedFd<'_>) -> Wait {
        loop {
            if let Some(w) = self.wait(Some(fd), -1) {
                return w;
            }
        }
    }

    /// Waits until `fd` or `other` is readable or a signal arrives.
    pub fn wait_readable_or(&self, fd: BorrowedFd<'_>, other: Option<BorrowedFd<'_>>) -> Wait {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: other.map_or(-1, |f| f.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of three pollfds (a negative fd is ignored).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
            if n <= 0 {
                continue;
            }
            let [sig, main, extra] = fds;
            if sig.revents != 0 {
                if let Some(w) = self.read_signal() {
                    return w;
                }
            }
            if extra.revents != 0 {
                return Wait::Other;
            }
            if main.revents != 0 {
                return Wait::Readable;
            }
        }
    }

    /// Sleeps up to `timeout_ms`; returns early with the signal that arrived.
    pub fn sleep(&self, timeout_ms: i32) -> Option<Wait> {
        self.wait(None, timeout_ms)
    }

    fn wait(&self, fd: Option<BorrowedFd<'_>>, timeout_ms: i32) -> Option<Wait> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fd.map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if n <= 0 {
            return None;
        }
        let [sig, other] = fds;
        if sig.revents != 0 {
            if let Some(w) = self.read_signal() {
                return Some(w);
            }
        }
        // Hang-up and errors count as readable: the following read reports them.
        if other.revents != 0 {
            return Some(Wait::Readable);
        }
        None
    }

    fn read_signal(&self) -> Option<Wait> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut info).cast(), size) };
        if usize::try_from(n).ok() != Some(size) {
            return None;
        }
        match i32::try_from(info.ssi_signo).unwrap_or(0) {
            libc::SIGUSR1 => Some(Wait::Report),
            libc::SIGTERM | libc::SIGINT => Some(Wait::Shutdown),
            _ => None,
        }
    }
}
