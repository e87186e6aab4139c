//! Network namespaces the tests create (and delete), so that test traffic never leaves them, plus
//! raw packet sockets on interfaces inside them.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A network namespace created with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create(tag: &str) -> Result<Self> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bh-{tag}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No IPv6 autoconfiguration chatter on test interfaces: every frame is the test's own.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        Ok(ns)
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// Path of the namespace handle.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening {}", self.path()))
    }

    /// Runs `f` on a thread that entered the namespace; sockets it creates belong there.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ns = self.open()?;
        std::thread::spawn(move || {
            enter(&ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }

    /// Interface index of `ifname` in the namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<i32> {
        let out = self.ip(&["-o", "link", "show", ifname])?;
        let idx = out
            .split(':')
            .next()
            .context("no ifindex")?
            .trim()
            .parse()?;
        Ok(idx)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Moves the calling thread into the namespace behind `ns`.
pub fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns on a namespace descriptor affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A raw AF_PACKET socket bound to one interface (all protocols), optionally carrying
/// virtio-net headers (PACKET_VNET_HDR) so that GSO frames pass whole.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    pub vnet_hdr: bool,
}

const ETH_P_ALL: u16 = 0x0003;

impl PacketSocket {
    /// Must run inside the interface's namespace (see [`NetNs::run_in`]).
    pub fn bind(ifindex: i32, vnet_hdr: bool) -> Result<Self> {
        // SAFETY: creating a socket; checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if vnet_hdr {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int option.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&raw const one).cast(),
                    4,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error()).context("PACKET_VNET_HDR");
            }
        }
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: binds to a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("bind AF_PACKET");
        }
        Ok(Self {
            fd,
            ifindex,
            vnet_hdr,
        })
    }

    /// Sends one frame out of the interface (with a leading virtio-net header if enabled).
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        // SAFETY: sends `frame` to a valid link-layer address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("sendto");
        }
        Ok(())
    }

    /// Sends `frame` `copies` times with one `sendmmsg`; returns how many the kernel took.
    pub fn send_many(&self, frame: &[u8], copies: usize) -> Result<usize> {
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        };
        // SAFETY: msghdr is plain data; the fields set below make it valid.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = (&raw mut sll).cast();
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        hdr.msg_iov = &raw mut iov;
        hdr.msg_iovlen = 1;
        let mut msgs: Vec<libc::mmsghdr> = (0..copies)
            .map(|_| libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            })
            .collect();
        let count = u32::try_from(copies).unwrap_or(u32::MAX);
        // SAFETY: every message points at `sll` and `iov`, which point at `frame`; all outlive
        // the call, and the kernel only reads them.
        let n = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), count, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("sendmmsg");
        }
        Ok(n.unsigned_abs() as usize)
    }

    /// Receives one frame, waiting at most `timeout`. Only frames that arrived from the wire
    /// (PACKET_HOST/BROADCAST/OTHERHOST…), not our own outgoing ones.
    pub fn recv(&self, timeout: std::time::Duration) -> Result<Option<Vec<u8>>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if !crate::frontend::queue::wait_readable(self.fd.as_raw_fd(), left)? {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receives into `buf` and `sll`, both valid for their lengths.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut sll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return Err(e).context("recvfrom");
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(buf[..n as usize].to_vec()));
        }
    }
}
