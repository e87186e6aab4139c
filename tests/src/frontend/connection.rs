//! The VMM side of a vhost-user connection: sends requests and reads replies, with no opinion on
//! what is valid, so that tests can also send what QEMU never would.

use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bulkhead_common::protocol::channel::{Channel, Message};
use bulkhead_common::protocol::wire::Header;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserConfigFlags, VhostUserMemory,
    VhostUserSingleMemoryRegion, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::ByteValued;

use super::ram::RamRegion;

/// Bit 8 of SET_VRING_KICK/CALL/ERR: no descriptor attached.
pub const VRING_NOFD: u64 = 0x100;

#[derive(Debug)]
pub struct Connection {
    channel: Channel,
    /// REPLY_ACK negotiated: requests without their own reply get NEED_REPLY and are acked.
    pub reply_ack: bool,
}

impl Connection {
    pub fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        Ok(Self::from_stream(s))
    }

    pub fn from_stream(s: UnixStream) -> Self {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        Self {
            channel: Channel::new(s),
            reply_ack: false,
        }
    }

    pub fn channel(&mut self) -> &mut Channel {
        &mut self.channel
    }

    /// Sends a request and returns its reply, if the request has one (or an ack was requested).
    pub fn request(
        &mut self,
        req: FrontendReq,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        expect_reply: bool,
    ) -> Result<Option<Message>> {
        let need_ack = !expect_reply && self.reply_ack;
        let h = Header::request(req.into(), u32::try_from(payload.len())?, need_ack);
        self.channel
            .send(&h, payload, fds)
            .with_context(|| format!("sending {req:?}"))?;
        if !(expect_reply || need_ack) {
            return Ok(None);
        }
        let reply = self
            .channel
            .recv()
            .with_context(|| format!("reply to {req:?}"))?;
        let reply =
            reply.with_context(|| format!("connection closed awaiting the reply to {req:?}"))?;
        ensure!(
            reply.header.request == u32::from(req),
            "reply to {req:?} has request {}",
            reply.header.request
        );
        ensure!(
            reply.header.flags == 0x5,
            "reply flags {:#x}",
            reply.header.flags
        );
        if need_ack {
            let status = u64_of(&reply.payload)?;
            ensure!(status == 0, "{req:?} refused (ack {status})");
        }
        Ok(Some(reply))
    }

    /// A request with a u64 reply.
    pub fn get_u64(&mut self, req: FrontendReq) -> Result<u64> {
        let reply = self.request(req, &[], &[], true)?.context("no reply")?;
        u64_of(&reply.payload)
    }

    /// A request without its own reply.
    pub fn send(&mut self, req: FrontendReq, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.request(req, payload, fds, false).map(|_| ())
    }

    pub fn set_u64(&mut self, req: FrontendReq, v: u64) -> Result<()> {
        self.send(req, &v.to_ne_bytes(), &[])
    }

    pub fn set_vring_state(&mut self, req: FrontendReq, index: u32, num: u32) -> Result<()> {
        self.send(req, VhostUserVringState::new(index, num).as_slice(), &[])
    }

    pub fn set_vring_fd(
        &mut self,
        req: FrontendReq,
        index: u8,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        match fd {
            Some(fd) => self.send(req, &u64::from(index).to_ne_bytes(), &[fd]),
            None => self.send(req, &(u64::from(index) | VRING_NOFD).to_ne_bytes(), &[]),
        }
    }

    pub fn set_vring_addr(&mut self, index: u32, desc: u64, used: u64, avail: u64) -> Result<()> {
        let a = VhostUserVringAddr {
            index,
            flags: 0,
            descriptor: desc,
            used,
            available: avail,
            log: 0,
        };
        self.send(FrontendReq::SET_VRING_ADDR, a.as_slice(), &[])
    }

    pub fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        let p = VhostUserVringState::new(index, 0);
        let reply = self
            .request(FrontendReq::GET_VRING_BASE, p.as_slice(), &[], true)?
            .context("no reply")?;
        let s =
            VhostUserVringState::from_slice(&reply.payload).context("GET_VRING_BASE reply size")?;
        ensure!(
            { s.index } == index,
            "GET_VRING_BASE answered for queue {}",
            { s.index }
        );
        Ok(s.num)
    }

    pub fn set_mem_table(&mut self, regions: &[RamRegion], fd: BorrowedFd<'_>) -> Result<()> {
        let mut p = VhostUserMemory::new(u32::try_from(regions.len())?)
            .as_slice()
            .to_vec();
        for r in regions {
            p.extend_from_slice(r.to_vhost().as_slice());
        }
        let fds: Vec<BorrowedFd<'_>> = regions.iter().map(|_| fd).collect();
        self.send(FrontendReq::SET_MEM_TABLE, &p, &fds)
    }

    pub fn add_mem_reg(&mut self, r: &RamRegion, fd: BorrowedFd<'_>) -> Result<()> {
        let p = VhostUserSingleMemoryRegion::new(r.guest_addr, r.size, r.user_addr, r.file_offset);
        self.send(FrontendReq::ADD_MEM_REG, p.as_slice(), &[fd])
    }

    pub fn rem_mem_reg(&mut self, r: &RamRegion) -> Result<()> {
        let p = VhostUserSingleMemoryRegion::new(r.guest_addr, r.size, r.user_addr, 0);
        self.send(FrontendReq::REM_MEM_REG, p.as_slice(), &[])
    }

    /// GET_CONFIG; `None` if the backend answered with an error (empty) reply.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Option<Vec<u8>>> {
        let mut p = VhostUserConfig::new(offset, size, VhostUserConfigFlags::empty())
            .as_slice()
            .to_vec();
        p.resize(p.len() + size as usize, 0);
        let reply = self
            .request(FrontendReq::GET_CONFIG, &p, &[], true)?
            .context("no reply")?;
        if reply.payload.is_empty() {
            return Ok(None);
        }
        ensure!(
            reply.payload.len() == p.len(),
            "GET_CONFIG reply of {} bytes",
            reply.payload.len()
        );
        Ok(Some(reply.payload[12..].to_vec()))
    }

    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let mut p = VhostUserConfig::new(
            offset,
            u32::try_from(data.len())?,
            VhostUserConfigFlags::WRITABLE,
        )
        .as_slice()
        .to_vec();
        p.extend_from_slice(data);
        self.send(FrontendReq::SET_CONFIG, &p, &[])
    }
}

pub fn u64_of(payload: &[u8]) -> Result<u64> {
    match <[u8; 8]>::try_from(payload) {
        Ok(b) => Ok(u64::from_ne_bytes(b)),
        Err(_) => bail!("expected a u64 payload, got {} bytes", payload.len()),
    }
}
