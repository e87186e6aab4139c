//! Framing of vhost-user messages, with their file descriptors, over a unix stream socket.
//!
//! Both ends use this: the daemons to receive requests and the test frontend to send them. `vhost`
//! keeps its endpoint type private, hence this module.

use std::io::{self, IoSlice, Read, Write};
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::ByteValued;

use super::wire::{Header, HeaderError, HEADER_SIZE, MAX_FDS};

/// Room for this many descriptors in the control buffer: more than `MAX_FDS`, so that a sender
/// exceeding the limit is detected instead of silently truncated.
const CMSG_FDS: usize = MAX_FDS * 2;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("socket I/O failed")]
    Io(#[from] io::Error),
    #[error("peer closed the connection in the middle of a message")]
    Truncated,
    #[error("invalid message header")]
    Header(#[from] HeaderError),
    #[error("too many file descriptors to send ({0})")]
    TooManyFdsToSend(usize),
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The sender attached more descriptors than fit; the extras were closed by the kernel.
    pub fds_truncated: bool,
}

/// A vhost-user connection.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
}

impl Channel {
    pub fn new(sock: UnixStream) -> Self {
        Self { sock }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.sock
    }

    /// Receives one message. `Ok(None)` means the peer closed the connection between messages.
    pub fn recv(&mut self) -> Result<Option<Message>, ChannelError> {
        let mut header_bytes = [0u8; HEADER_SIZE];
        let (got, fds, fds_truncated) = recv_with_fds(&self.sock, &mut header_bytes)?;
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_SIZE {
            let rest = header_bytes.get_mut(got..).ok_or(ChannelError::Truncated)?;
            read_exact_or_truncated(&self.sock, rest)?;
        }
        let header = Header::from_slice(&header_bytes)
            .copied()
            .ok_or(ChannelError::Truncated)?;
        header.validate()?;
        // `validate` bounded the size, so this allocation is at most MAX_PAYLOAD_SIZE.
        let mut payload = vec![0u8; header.size as usize];
        read_exact_or_truncated(&self.sock, &mut payload)?;
        Ok(Some(Message {
            header,
            payload,
            fds,
            fds_truncated,
        }))
    }

    /// Sends one message with optional descriptors.
    pub fn send(
        &mut self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFdsToSend(fds.len()));
        }
        let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
        bytes.extend_from_slice(header.as_slice());
        bytes.extend_from_slice(payload);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = send_with_fds(&self.sock, &bytes, &raw)?;
        if let Some(rest) = bytes.get(sent..) {
            if !rest.is_empty() {
                (&self.sock).write_all(rest)?;
            }
        }
        Ok(())
    }

    /// Sends raw bytes, for tests that need to produce malformed messages.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = send_with_fds(&self.sock, bytes, &raw)?;
        if let Some(rest) = bytes.get(sent..) {
            (&self.sock).write_all(rest)?;
        }
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn read_exact_or_truncated(mut sock: &UnixStream, buf: &mut [u8]) -> Result<(), ChannelError> {
    sock.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ChannelError::Truncated,
        _ => ChannelError::Io(e),
    })
}

/// Control buffer with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
struct CmsgBuffer([u8; cmsg_space(CMSG_FDS)]);

const fn cmsg_space(fds: usize) -> usize {
    // CMSG_SPACE is not const in libc; this mirrors it for 64-bit Linux (16-byte header, data
    // rounded up to 8 bytes).
    size_of::<libc::cmsghdr>() + (fds * size_of::<RawFd>()).div_ceil(8) * 8
}

fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>, bool), ChannelError> {
    let mut cmsg = MaybeUninit::<CmsgBuffer>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<CmsgBuffer>();
    let got = loop {
        // SAFETY: msg points at a live iovec over `buf` and a control buffer of the advertised
        // length; both outlive the call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r.unsigned_abs();
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err.into());
        }
    };
    let mut fds = Vec::new();
    // SAFETY: msg was filled in by recvmsg; CMSG_FIRSTHDR/NXTHDR only walk within msg_control.
    let mut hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !hdr.is_null() {
        // SAFETY: hdr is non-null and points inside the control buffer, per CMSG_FIRSTHDR/NXTHDR.
        let c = unsafe { &*hdr };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure computation.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = c.cmsg_len.saturating_sub(header_len) / size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at the payload of this control message.
            let data = unsafe { libc::CMSG_DATA(hdr) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count` keeps the pointer within cmsg_len.
                let slot = unsafe { data.add(i) };
                // SAFETY: `slot` points at an initialised descriptor number, possibly unaligned.
                let fd = unsafe { slot.read_unaligned() };
                // SAFETY: SCM_RIGHTS gave this process a new descriptor that nothing else owns.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: msg and hdr are valid as above.
        hdr = unsafe { libc::CMSG_NXTHDR(&msg, hdr) };
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS;
    Ok((got, fds, truncated))
}

fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<usize, ChannelError> {
    let iov = [IoSlice::new(bytes)];
    let mut cmsg = MaybeUninit::<CmsgBuffer>::zeroed();
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut().cast();
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        if fds.len() > CMSG_FDS {
            return Err(ChannelError::TooManyFdsToSend(fds.len()));
        }
        let data_len = std::mem::size_of_val(fds);
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation on a small length.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
        // SAFETY: msg_control points at a zeroed buffer at least msg_controllen long.
        let hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: hdr points at the start of our control buffer, which has room for a header.
        let c = unsafe { &mut *hdr };
        c.cmsg_level = libc::SOL_SOCKET;
        c.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: CMSG_LEN is a pure computation.
        c.cmsg_len = unsafe { libc::CMSG_LEN(data_len as u32) } as usize;
        // SAFETY: hdr is the control message header filled in above.
        let dst = unsafe { libc::CMSG_DATA(hdr) };
        // SAFETY: `dst` has room for `fds.len()` descriptors (CMSG_SPACE above); a byte copy has
        // no alignment requirement.
        unsafe { std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), dst, data_len) };
    }
    loop {
        // SAFETY: msg references the iovec and control buffer above, both alive for the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(r.unsigned_abs());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::{MAX_PAYLOAD_SIZE, VERSION};
    use std::fs::File;

    #[test]
    fn message_with_fds_round_trips() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        let file = File::open("/dev/null").unwrap();
        let h = Header::request(12, 8, false);
        a.send(&h, &7u64.to_ne_bytes(), &[file.as_fd()]).unwrap();
        let m = b.recv().unwrap().unwrap();
        assert_eq!(m.header, h);
        assert_eq!(m.payload, 7u64.to_ne_bytes());
        assert_eq!(m.fds.len(), 1);
        assert!(!m.fds_truncated);
    }

    #[test]
    fn eof_between_messages_is_none_and_mid_message_is_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        drop(a);
        assert!(b.recv().unwrap().is_none());

        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        let h = Header {
            request: 1,
            flags: VERSION,
            size: 8,
        };
        (&a).write_all(h.as_slice()).unwrap();
        (&a).write_all(&[1, 2, 3]).unwrap();
        drop(a);
        assert!(matches!(b.recv(), Err(ChannelError::Truncated)));
    }

    #[test]
    fn oversized_header_is_refused_without_allocating_its_size() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b);
        let h = Header {
            request: 1,
            flags: VERSION,
            size: u32::MAX,
        };
        (&a).write_all(h.as_slice()).unwrap();
        assert!(matches!(
            b.recv(),
            Err(ChannelError::Header(HeaderError::Oversized(_)))
        ));
        assert!(MAX_PAYLOAD_SIZE < u32::MAX as usize);
    }

    /// Descriptors past the limit are flagged; those received are owned (closed on drop) and
    /// the kernel closes any that did not fit the control buffer. Leak counting across a real
    /// daemon process lives in the integration tests (a test binary's own fd table is shared
    /// with concurrently running tests).
    #[test]
    fn too_many_fds_are_flagged() {
        for count in [MAX_FDS + 1, CMSG_FDS + 4] {
            let (a, b) = UnixStream::pair().unwrap();
            let mut b = Channel::new(b);
            let files: Vec<File> = (0..count)
                .map(|_| File::open("/dev/null").unwrap())
                .collect();
            let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
            let h = Header::request(5, 0, false);
            send_with_fds(&a, h.as_slice(), &raw[..count.min(CMSG_FDS)]).unwrap();
            if count > CMSG_FDS {
                // The sender side refuses more than the control buffer holds.
                assert!(send_with_fds(&a, h.as_slice(), &raw).is_err());
            }
            let m = b.recv().unwrap().unwrap();
            assert!(m.fds_truncated, "{count} descriptors");
            assert!(m.fds.len() <= CMSG_FDS);
        }
    }
}
