//! A Linux TAP device with virtio-net headers: one file descriptor per queue (IFF_MULTI_QUEUE),
//! the header size the guest negotiated (TUNSETVNETHDRSZ) and the receive offloads it accepts
//! (TUNSETOFFLOAD). A few ioctls over `libc`; the crates.io `tap` crate is not a TUN/TAP library.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to TAP {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("descriptor {fd} is not a TAP queue with virtio-net headers")]
    NotVnetTap {
        fd: RawFd,
        #[source]
        source: Option<io::Error>,
    },
    #[error("cannot configure the TAP")]
    Configure(#[source] io::Error),
    #[error("cannot {} a TAP queue", if *.attach { "attach" } else { "detach" })]
    Steer {
        attach: bool,
        #[source]
        source: io::Error,
    },
    #[error("cannot write a frame to the TAP")]
    Write(#[source] io::Error),
}

/// One queue of a TAP device.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
    /// On a multi-queue TAP: whether the kernel steers frames to this queue (TUNSETQUEUE).
    attached: Option<AtomicBool>,
}

const IFNAMSIZ: usize = 16;

/// The part of `struct ifreq` the TUN ioctls use: a name and a flags word.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_int) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ {
            return Err(TapError::BadName(name.to_owned()));
        }
        let mut n = [0u8; IFNAMSIZ];
        n.get_mut(..bytes.len())
            .ok_or_else(|| TapError::BadName(name.to_owned()))?
            .copy_from_slice(bytes);
        let flags =
            libc::c_short::try_from(flags).map_err(|_| TapError::BadName(name.to_owned()))?;
        Ok(Self {
            name: n,
            flags,
            _pad: [0; 22],
        })
    }

    /// An ifreq with no name (the queue's own TAP) and `flags`.
    fn unnamed(flags: libc::c_int) -> Self {
        Self {
            name: [0; IFNAMSIZ],
            // The IFF_* flags the TUN ioctls take all fit the 16-bit field.
            flags: libc::c_short::try_from(flags).unwrap_or(0),
            _pad: [0; 22],
        }
    }
}

impl TapQueue {
    /// Opens `queues` queues of the TAP `name`, creating it if needed (needs CAP_NET_ADMIN unless
    /// the TAP exists and belongs to our user).
    pub fn open_all(name: &str, queues: u16) -> Result<Vec<TapQueue>, TapError> {
        let base = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        (0..queues)
            .map(|_| match Self::open(name, base | libc::IFF_MULTI_QUEUE) {
                // A pre-created single-queue TAP cannot be attached with IFF_MULTI_QUEUE.
                Err(TapError::Attach { source, .. })
                    if queues == 1 && source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    Self::open(name, base)
                }
                other => other,
            })
            .collect()
    }

    fn open(name: &str, flags: libc::c_int) -> Result<TapQueue, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name, flags)?;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReq has its layout (40 bytes).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(TapQueue {
            file,
            attached: (flags & libc::IFF_MULTI_QUEUE != 0).then(|| AtomicBool::new(true)),
        })
    }

    /// Attaches this queue to its multi-queue TAP or detaches it (TUNSETQUEUE); a no-op on a
    /// single-queue TAP. A queue with no guest behind it is detached, so the kernel steers
    /// frames only to queues that are read: when the TAP is shared (the source and destination
    /// daemons of a migration, a guest using fewer queue pairs than the daemon opened), frames
    /// and replies do not vanish into a queue nobody reads. Attaching needs the rights opening
    /// the TAP needed (its owner, or CAP_NET_ADMIN; a TAP with no owner set: anyone).
    pub fn set_attached(&self, attach: bool) -> Result<(), TapError> {
        let Some(state) = &self.attached else {
            return Ok(());
        };
        if state.load(Ordering::Relaxed) == attach {
            return Ok(());
        }
        let flag = if attach {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = IfReq::unnamed(flag);
        // SAFETY: TUNSETQUEUE reads a struct ifreq (only its flags); IfReq has its layout.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETQUEUE, &raw mut req) } < 0 {
            return Err(TapError::Steer {
                attach,
                source: io::Error::last_os_error(),
            });
        }
        state.store(attach, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the interface outlive this process, so that a restarted daemon finds it again with
    /// its addresses, routes and bridge membership (TUNSETPERSIST).
    pub fn set_persistent(&self) -> Result<(), TapError> {
        // SAFETY: TUNSETPERSIST takes the flag as the argument value.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Adopts a TAP queue descriptor opened by a privileged parent (`--tap-fd`).
    pub fn from_fd(fd: OwnedFd) -> Result<TapQueue, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a struct ifreq into `req`.
        let r = unsafe { libc::ioctl(raw, libc::TUNGETIFF, &raw mut req) };
        if r < 0 {
            return Err(TapError::NotVnetTap {
                fd: raw,
                source: Some(io::Error::last_os_error()),
            });
        }
        let flags = libc::c_int::from(req.flags);
        if flags & libc::IFF_TAP == 0
            || flags & libc::IFF_VNET_HDR == 0
            || flags & libc::IFF_NO_PI == 0
        {
            return Err(TapError::NotVnetTap {
                fd: raw,
                source: None,
            });
        }
        bulkhead_common::fd::set_nonblocking(fd.as_fd()).map_err(TapError::Configure)?;
        Ok(TapQueue {
            file: File::from(fd),
            attached: (flags & libc::IFF_MULTI_QUEUE != 0).then(|| AtomicBool::new(true)),
        })
    }

    /// A stand-in for a TAP queue: any non-blocking descriptor that reads and writes whole frames
    /// (a datagram or seqpacket socket). For the receive path's tests and fuzzing, where a real
    /// TAP needs privileges; nothing is checked or configured.
    #[doc(hidden)]
    pub fn stand_in(fd: OwnedFd) -> TapQueue {
        TapQueue {
            file: File::from(fd),
            attached: None,
        }
    }

    /// Adopts an inherited descriptor number.
    pub fn from_raw(fd: RawFd) -> Result<TapQueue, TapError> {
        // SAFETY: F_GETFD only checks that the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotVnetTap {
                fd,
                source: Some(io::Error::last_os_error()),
            });
        }
        // SAFETY: the user handed us this descriptor (--tap-fd) to own.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The interface name.
    pub fn name(&self) -> Result<String, TapError> {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a struct ifreq into `req`.
        if unsafe { libc::ioctl(self.fd(), libc::TUNGETIFF, &raw mut req) } < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        let len = req.name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
        Ok(String::from_utf8_lossy(req.name.get(..len).unwrap_or_default()).into_owned())
    }

    /// Sets the virtio-net header size the TAP reads and writes (10 or 12 bytes).
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<(), TapError> {
        let size = libc::c_int::try_from(size)
            .map_err(|_| TapError::Configure(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETVNETHDRSZ, &raw const size) } < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Sets which offloaded frames the TAP may hand us (TUN_F_* flags). USO is retried without
    /// when the kernel does not know it.
    pub fn set_offloads(&self, flags: libc::c_uint) -> Result<(), TapError> {
        let set = |f: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes the flags as the argument value.
            if unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(f)) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        match set(flags) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & uso != 0 => {
                set(flags & !uso)
            }
            other => other,
        }
        .map_err(TapError::Configure)
    }

    /// Writes one frame (with its virtio-net header) to the TAP.
    pub fn write_frame(&self, frame: &[u8]) -> Result<(), TapError> {
        let one = [libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        }];
        // SAFETY: the one iovec describes `frame`, valid for reads for its length.
        unsafe { self.send_gathered(&one) }
            .map(|_| ())
            .map_err(TapError::Write)
    }

    /// Writes one frame gathered from `iovs` (header first) to the TAP: bytes written.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads for its length.
    pub unsafe fn send_gathered(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let fd = self.fd();
        // Raw system calls: libc's wrappers are cancellation points that cost a multi-threaded
        // caller two calls around each syscall, about 4 % of a 64-byte frame's transmit. One
        // buffer (Linux sends small frames with header and data together) takes the plain
        // write, which skips the kernel's iovec import.
        let r = match iovs {
            // SAFETY: the caller vouches for the buffer.
            [one] => unsafe { libc::syscall(libc::SYS_write, fd, one.iov_base, one.iov_len) },
            _ => {
                let count = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
                // SAFETY: the caller vouches for every buffer; `iovs` is valid for `count`.
                unsafe { libc::syscall(libc::SYS_writev, fd, iovs.as_ptr(), count) }
            }
        };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    /// Reads one frame (header first) into the buffers `iovs` describe: bytes read.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes for its length.
    pub unsafe fn receive_scattered(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
        // A raw system call for the reason `send_gathered` gives.
        // SAFETY: the caller vouches for every buffer; `iovs` is valid for `count`.
        let r = unsafe { libc::syscall(libc::SYS_readv, self.fd(), iovs.as_ptr(), count) };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Gives up the descriptor (to hand it to another process).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    /// Brings the interface up (best effort; needs CAP_NET_ADMIN).
    pub fn set_up(&self) -> Result<(), TapError> {
        let name = self.name()?;
        // SAFETY: a plain datagram socket for interface ioctls; checked below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        // SAFETY: `sock` is a fresh descriptor we own.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = IfReq::new(&name, 0)?;
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write a struct ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: as above.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut req) } < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        Ok(())
    }
}
