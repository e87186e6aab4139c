//! A virtio-net driver on the synthetic frontend: posts receive buffers, reassembles frames
//! spread over several buffers (MRG_RXBUF), and transmits frames with a virtio-net header.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vm_memory::{Bytes, GuestAddress};

use super::device::{data_base, Frontend};
use super::queue::Buf;
use super::rings::Rings;

pub const F_MRG_RXBUF: u32 = 15;
pub const HDR_LEN: usize = 12;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const F_NEEDS_CSUM: u8 = 1;
/// Largest frame a transmit slot holds (header + 64 KiB GSO frame).
const TX_SLOT: u64 = 72 * 1024;

/// The 12-byte virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }
}

/// A received frame.
#[derive(Debug, Clone)]
pub struct RxFrame {
    pub hdr: VnetHdr,
    pub data: Vec<u8>,
    /// Chains it occupied.
    pub buffers: usize,
}

#[derive(Debug)]
pub struct NetDriver<R = Frontend> {
    pub fe: R,
    pub rx_buf: u32,
    pub mergeable: bool,
    base: GuestAddress,
    rx_depth: u32,
    tx_depth: u32,
    rx_free: Vec<Vec<u32>>,
    rx_heads: Vec<HashMap<u16, u32>>,
    tx_free: Vec<Vec<u32>>,
    tx_heads: Vec<HashMap<u16, u32>>,
}

impl<R: Rings> NetDriver<R> {
    /// Each pair gets `rx_depth` receive buffers of `rx_buf` bytes and `tx_depth` transmit slots.
    pub fn new(fe: R, rx_buf: u32, rx_depth: u32, tx_depth: u32) -> Result<Self> {
        let pairs = usize::from(fe.setup().queues / 2);
        ensure!(
            pairs > 0 && fe.setup().queues.is_multiple_of(2),
            "net needs queue pairs"
        );
        let base = data_base(fe.setup());
        let per_pair = u64::from(rx_buf) * u64::from(rx_depth) + TX_SLOT * u64::from(tx_depth);
        let ram = fe.ram().regions()[0].size;
        ensure!(
            base.0 + per_pair * pairs as u64 <= ram,
            "guest RAM too small for the buffers"
        );
        let mergeable = fe.has(F_MRG_RXBUF);
        Ok(Self {
            fe,
            rx_buf,
            mergeable,
            base,
            rx_depth,
            tx_depth,
            rx_free: (0..pairs).map(|_| (0..rx_depth).rev().collect()).collect(),
            rx_heads: (0..pairs).map(|_| HashMap::new()).collect(),
            tx_free: (0..pairs).map(|_| (0..tx_depth).rev().collect()).collect(),
            tx_heads: (0..pairs).map(|_| HashMap::new()).collect(),
        })
    }

    fn pair_base(&self, pair: u16) -> u64 {
        let per_pair =
            u64::from(self.rx_buf) * u64::from(self.rx_depth) + TX_SLOT * u64::from(self.tx_depth);
        self.base.0 + u64::from(pair) * per_pair
    }

    fn rx_addr(&self, pair: u16, tag: u32) -> GuestAddress {
        GuestAddress(self.pair_base(pair) + u64::from(tag) * u64::from(self.rx_buf))
    }

    fn tx_addr(&self, pair: u16, tag: u32) -> GuestAddress {
        GuestAddress(
            self.pair_base(pair)
                + u64::from(self.rx_buf) * u64::from(self.rx_depth)
                + u64::from(tag) * TX_SLOT,
        )
    }

    /// Posts up to `count` receive buffers on `pair` and kicks. Returns how many were posted.
    pub fn post_rx(&mut self, pair: u16, count: u32) -> Result<u32> {
        let p = usize::from(pair);
        let q = pair * 2;
        let old = self.fe.queue(q).avail_idx();
        let mut posted = 0;
        while posted < count {
            let Some(tag) = self.rx_free[p].pop() else {
                break;
            };
            let addr = self.rx_addr(pair, tag);
            let len = self.rx_buf;
            let (mem, dq) = self.fe.mem_and_queue(q);
            match dq.add(mem, &[Buf::writable(addr, len)])? {
                Some(head) => {
                    self.rx_heads[p].insert(head, tag);
                    posted += 1;
                }
                None => {
                    self.rx_free[p].push(tag);
                    break;
                }
            }
        }
        let (mem, dq) = self.fe.mem_and_queue(q);
        dq.notify(mem, old)?;
        Ok(posted)
    }

    /// Receive buffers currently posted on `pair`.
    pub fn rx_posted(&self, pair: u16) -> usize {
        self.rx_heads[usize::from(pair)].len()
    }

    /// Takes one used receive chain.
    fn take_rx(&mut self, pair: u16, timeout: Duration) -> Result<Option<(Vec<u8>, u32)>> {
        let q = pair * 2;
        let (mem, dq) = self.fe.mem_and_queue(q);
        let used = match dq.wait(mem, timeout) {
            Ok(u) => u,
            Err(_) => return Ok(None),
        };
        let tag = self.rx_heads[usize::from(pair)]
            .remove(&used.head)
            .context("unknown receive head")?;
        let mut data = vec![0u8; used.len as usize];
        self.fe
            .ram()
            .mem()
            .read_slice(&mut data, self.rx_addr(pair, tag))?;
        self.rx_free[usize::from(pair)].push(tag);
        Ok(Some((data, used.len)))
    }

    /// Receives one frame on `pair` (reassembling merged buffers).
    pub fn recv(&mut self, pair: u16, timeout: Duration) -> Result<Option<RxFrame>> {
        let Some((first, _)) = self.take_rx(pair, timeout)? else {
            return Ok(None);
        };
        ensure!(
            first.len() >= HDR_LEN,
            "receive chain of {} bytes has no header",
            first.len()
        );
        let hdr = VnetHdr::from_bytes(&first[..HDR_LEN]);
        let mut data = first[HDR_LEN..].to_vec();
        let buffers = if self.mergeable {
            usize::from(hdr.num_buffers)
        } else {
            1
        };
        ensure!(buffers >= 1, "num_buffers is 0");
        if !self.mergeable {
            ensure!(
                hdr.num_buffers == 1,
                "num_buffers {} without MRG_RXBUF",
                hdr.num_buffers
            );
        }
        for _ in 1..buffers {
            let (more, _) = self
                .take_rx(pair, Duration::from_secs(5))?
                .context("merged buffer missing")?;
            data.extend_from_slice(&more);
        }
        Ok(Some(RxFrame { hdr, data, buffers }))
    }

    /// Queues one frame for transmission, split into `pieces` buffers after a buffer holding
    /// the header alone; `pieces == 0` puts header and frame in one buffer.
    pub fn submit_tx(
        &mut self,
        pair: u16,
        hdr: &VnetHdr,
        frame: &[u8],
        pieces: usize,
    ) -> Result<Option<u16>> {
        let p = usize::from(pair);
        ensure!((HDR_LEN + frame.len()) as u64 <= TX_SLOT, "frame too large");
        let Some(tag) = self.tx_free[p].pop() else {
            return Ok(None);
        };
        let addr = self.tx_addr(pair, tag);
        let mem = self.fe.ram().mem();
        mem.write_slice(&hdr.to_bytes(), addr)?;
        mem.write_slice(frame, GuestAddress(addr.0 + HDR_LEN as u64))?;
        // pieces == 0: header and frame in one buffer, as Linux lays out a transmit skb when the
        // header fits in front of it (any layout).
        let mut bufs = if pieces == 0 {
            vec![Buf::readable(addr, u32::try_from(HDR_LEN + frame.len())?)]
        } else {
            vec![Buf::readable(addr, HDR_LEN as u32)]
        };
        let pieces = if pieces == 0 {
            0
        } else {
            pieces.clamp(1, frame.len().max(1))
        };
        let chunk = frame.len() / pieces.max(1);
        for i in 0..pieces {
            let start = i * chunk;
            let len = if i + 1 == pieces {
                frame.len() - start
            } else {
                chunk
            };
            if len > 0 {
                bufs.push(Buf::readable(
                    GuestAddress(addr.0 + (HDR_LEN + start) as u64),
                    u32::try_from(len)?,
                ));
            }
        }
        let (mem, dq) = self.fe.mem_and_queue(pair * 2 + 1);
        let Some(head) = dq.add(mem, &bufs)? else {
            self.tx_free[p].push(tag);
            return Ok(None);
        };
        self.tx_heads[p].insert(head, tag);
        Ok(Some(head))
    }

    /// Publishes queued transmit chains and kicks if needed.
    pub fn kick_tx(&mut self, pair: u16, old_avail: u16) -> Result<bool> {
        let (mem, dq) = self.fe.mem_and_queue(pair * 2 + 1);
        dq.notify(mem, old_avail)
    }

    /// Collects finished transmit chains without waiting; returns how many.
    pub fn reap_tx(&mut self, pair: u16) -> Result<usize> {
        let p = usize::from(pair);
        let mut n = 0;
        loop {
            let (mem, dq) = self.fe.mem_and_queue(pair * 2 + 1);
            let Some(u) = dq.poll(mem)? else { return Ok(n) };
            let tag = self.tx_heads[p]
                .remove(&u.head)
                .context("unknown transmit head")?;
            self.tx_free[p].push(tag);
            n += 1;
        }
    }

    /// Transmit chains queued and not yet completed on `pair`.
    pub fn tx_in_flight(&self, pair: u16) -> usize {
        self.tx_heads[usize::from(pair)].len()
    }

    /// Waits for one transmit completion on `pair`.
    pub fn wait_tx(&mut self, pair: u16) -> Result<()> {
        // Like Linux's TX path: an interrupt when 3/4 of what is in flight has been sent.
        let later = u16::try_from(self.tx_in_flight(pair) * 3 / 4).unwrap_or(0);
        let (mem, dq) = self.fe.mem_and_queue(pair * 2 + 1);
        let u = dq.wait_after(mem, Duration::from_secs(10), later)?;
        let tag = self.tx_heads[usize::from(pair)]
            .remove(&u.head)
            .context("unknown transmit head")?;
        self.tx_free[usize::from(pair)].push(tag);
        Ok(())
    }

    /// Transmits one frame and waits until the device is done with it.
    pub fn send(&mut self, pair: u16, hdr: &VnetHdr, frame: &[u8], pieces: usize) -> Result<()> {
        let q = pair * 2 + 1;
        let old = self.fe.queue(q).avail_idx();
        self.submit_tx(pair, hdr, frame, pieces)?
            .context("no transmit slot")?;
        self.kick_tx(pair, old)?;
        let (mem, dq) = self.fe.mem_and_queue(q);
        let u = dq.wait(mem, Duration::from_secs(10))?;
        let tag = self.tx_heads[usize::from(pair)]
            .remove(&u.head)
            .context("unknown transmit head")?;
        self.tx_free[usize::from(pair)].push(tag);
        if u.len != 0 {
            bail!("transmit chain completed with length {}", u.len);
        }
        Ok(())
    }
}

/// An Ethernet frame: broadcast destination, `src` MAC, `ethertype`, then `payload`.
pub fn ethernet(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
