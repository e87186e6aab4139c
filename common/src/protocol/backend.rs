//! The backend channel (SET_BACKEND_REQ_FD): requests from us to the frontend. Bulkhead sends
//! one, `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, after a resize; QEMU then reads the config space
//! again (GET_CONFIG, answered by the session thread meanwhile) and interrupts the guest.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::ByteValued;

use super::wire::{Header, HEADER_SIZE};

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (vhost-user.rst, "Back-end message types").
const CONFIG_CHANGE_MSG: u32 = 2;
/// How long the frontend may take to acknowledge (it reads the config space first).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot send on the backend channel")]
    Send(#[source] io::Error),
    #[error("no acknowledgement from the frontend")]
    Ack(#[source] io::Error),
    #[error(
        "the frontend's reply is malformed (request {request}, flags {flags:#x}, {size} bytes)"
    )]
    BadReply { request: u32, flags: u32, size: u32 },
    #[error("the frontend failed the request (status {0})")]
    Refused(u64),
}

/// The frontend's end of the channel, as handed over by SET_BACKEND_REQ_FD.
#[derive(Debug)]
pub struct BackendChannel {
    stream: UnixStream,
    /// REPLY_ACK was negotiated: ask for, and wait for, an acknowledgement.
    reply_ack: bool,
}

impl BackendChannel {
    pub fn new(stream: UnixStream, reply_ack: bool) -> Self {
        Self { stream, reply_ack }
    }

    /// Tells the frontend that the config space changed. Returns once the frontend acknowledged
    /// (with REPLY_ACK) or once the message is sent (without).
    pub fn config_changed(&mut self) -> Result<(), BackendError> {
        let header = Header::request(CONFIG_CHANGE_MSG, 0, self.reply_ack);
        self.stream
            .set_write_timeout(Some(ACK_TIMEOUT))
            .map_err(BackendError::Send)?;
        self.stream
            .write_all(header.as_slice())
            .map_err(BackendError::Send)?;
        if !self.reply_ack {
            return Ok(());
        }
        self.stream
            .set_read_timeout(Some(ACK_TIMEOUT))
            .map_err(BackendError::Ack)?;
        let mut raw = [0u8; HEADER_SIZE];
        self.stream
            .read_exact(&mut raw)
            .map_err(BackendError::Ack)?;
        let reply = Header::from_slice(&raw).copied().unwrap_or_default();
        let bad = BackendError::BadReply {
            request: reply.request,
            flags: reply.flags,
            size: reply.size,
        };
        if !reply.is_reply() || reply.request != CONFIG_CHANGE_MSG || reply.size != 8 {
            return Err(bad);
        }
        let mut status = [0u8; 8];
        self.stream
            .read_exact(&mut status)
            .map_err(BackendError::Ack)?;
        match u64::from_ne_bytes(status) {
            0 => Ok(()),
            s => Err(BackendError::Refused(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_change_waits_for_the_acknowledgement() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let frontend = std::thread::spawn(move || {
            let mut raw = [0u8; HEADER_SIZE];
            theirs.read_exact(&mut raw).unwrap();
            let h = *Header::from_slice(&raw).unwrap();
            assert_eq!(h.request, CONFIG_CHANGE_MSG);
            assert!(h.need_reply());
            assert_eq!(h.size, 0);
            theirs.write_all(h.reply(8).as_slice()).unwrap();
            theirs.write_all(&0u64.to_ne_bytes()).unwrap();
        });
        BackendChannel::new(ours, true).config_changed().unwrap();
        frontend.join().unwrap();
    }

    #[test]
    fn a_failed_acknowledgement_is_reported() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let frontend = std::thread::spawn(move || {
            let mut raw = [0u8; HEADER_SIZE];
            theirs.read_exact(&mut raw).unwrap();
            let h = *Header::from_slice(&raw).unwrap();
            theirs.write_all(h.reply(8).as_slice()).unwrap();
            theirs.write_all(&1u64.to_ne_bytes()).unwrap();
        });
        let r = BackendChannel::new(ours, true).config_changed();
        assert!(matches!(r, Err(BackendError::Refused(1))));
        frontend.join().unwrap();
    }
}
