//! A virtio-blk driver on the synthetic frontend: lays requests out in guest RAM (header, data,
//! status), queues them, and reads back status and data, like a guest's virtio_blk driver.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress};

use super::device::{data_base, Frontend, WAIT};
use super::queue::Buf;
use super::rings::Rings;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Status value written before submission, so an untouched status is visible.
pub const S_UNTOUCHED: u8 = 0xff;

/// What to ask the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkOp {
    Read {
        sector: u64,
        len: u32,
    },
    Write {
        sector: u64,
        data: Vec<u8>,
    },
    Flush,
    GetId,
    /// (sector, sectors, flags) per segment.
    Discard(Vec<(u64, u32, u32)>),
    WriteZeroes(Vec<(u64, u32, u32)>),
    /// Any request type, with optional read-only and write-only data lengths.
    Raw {
        kind: u32,
        sector: u64,
        out_len: u32,
        in_len: u32,
    },
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub status: u8,
    pub used_len: u32,
    /// Device-written data (reads, GET_ID).
    pub data: Vec<u8>,
}

/// Guest RAM reserved per request tag.
const TAG_HEADER: u64 = 0;
const TAG_STATUS: u64 = 64;
const TAG_DATA: u64 = 4096;

#[derive(Debug)]
struct InFlight {
    tag: u32,
    in_len: u32,
}

#[derive(Debug)]
pub struct BlkDriver<R = Frontend> {
    pub fe: R,
    /// Bytes of data one request may carry.
    pub max_data: u32,
    /// Split data into this many descriptors (exercises segmented chains).
    pub data_segments: u32,
    /// Put each request behind one indirect descriptor.
    pub use_indirect: bool,
    base: GuestAddress,
    tag_bytes: u64,
    depth: u32,
    free_tags: Vec<Vec<u32>>,
    in_flight: Vec<HashMap<u16, InFlight>>,
    /// The buffers of the request submitted last (what the device may read and write).
    pub last_bufs: Vec<Buf>,
}

impl<R: Rings> BlkDriver<R> {
    /// Wraps a started frontend; each queue gets `depth` request slots of `max_data` bytes.
    pub fn new(fe: R, depth: u32, max_data: u32) -> Result<Self> {
        let base = data_base(fe.setup());
        let tag_bytes = (TAG_DATA + u64::from(max_data)).div_ceil(4096) * 4096;
        let ram: u64 = fe.ram().regions()[0].size;
        let need = base.0 + tag_bytes * u64::from(depth) * u64::from(fe.setup().queues);
        if need > ram {
            bail!("guest RAM of {ram} bytes is too small for {depth} requests of {max_data} bytes per queue (needs {need})");
        }
        let queues = usize::from(fe.setup().queues);
        Ok(Self {
            fe,
            max_data,
            data_segments: 1,
            use_indirect: false,
            base,
            tag_bytes,
            depth,
            free_tags: (0..queues).map(|_| (0..depth).rev().collect()).collect(),
            in_flight: (0..queues).map(|_| HashMap::new()).collect(),
            last_bufs: Vec::new(),
        })
    }

    fn tag_addr(&self, q: u16, tag: u32, part: u64) -> GuestAddress {
        let per_queue = self.tag_bytes * u64::from(self.depth);
        GuestAddress(
            self.base.0 + u64::from(q) * per_queue + u64::from(tag) * self.tag_bytes + part,
        )
    }

    pub fn in_flight(&self, q: u16) -> usize {
        self.in_flight[usize::from(q)].len()
    }

    /// Lays out and queues a request on queue `q` without kicking. `None` when the queue is full.
    pub fn submit(&mut self, q: u16, op: &BlkOp) -> Result<Option<u16>> {
        let qi = usize::from(q);
        let Some(tag) = self.free_tags[qi].pop() else {
            return Ok(None);
        };
        let mem = self.fe.ram().mem();
        let (kind, sector, out_data, in_len): (u32, u64, Vec<u8>, u32) = match op {
            BlkOp::Read { sector, len } => (T_IN, *sector, Vec::new(), *len),
            BlkOp::Write { sector, data } => (T_OUT, *sector, data.clone(), 0),
            BlkOp::Flush => (T_FLUSH, 0, Vec::new(), 0),
            BlkOp::GetId => (T_GET_ID, 0, Vec::new(), 20),
            BlkOp::Discard(segs) => (T_DISCARD, 0, encode_segments(segs), 0),
            BlkOp::WriteZeroes(segs) => (T_WRITE_ZEROES, 0, encode_segments(segs), 0),
            BlkOp::Raw {
                kind,
                sector,
                out_len,
                in_len,
            } => (*kind, *sector, vec![0xa5; *out_len as usize], *in_len),
        };
        if out_data.len() as u64 > u64::from(self.max_data) || in_len > self.max_data {
            bail!(
                "request larger than the {} bytes a slot holds",
                self.max_data
            );
        }
        let header = self.tag_addr(q, tag, TAG_HEADER);
        let status = self.tag_addr(q, tag, TAG_STATUS);
        let data = self.tag_addr(q, tag, TAG_DATA);
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, header)?;
        mem.write_obj(S_UNTOUCHED, status)?;
        let mut bufs = vec![Buf::readable(header, 16)];
        if !out_data.is_empty() {
            mem.write_slice(&out_data, data)?;
            bufs.extend(split(
                data,
                u32::try_from(out_data.len())?,
                self.data_segments,
                false,
            ));
        }
        if in_len > 0 {
            mem.write_slice(&vec![0x5a; in_len as usize], data)?;
            bufs.extend(split(data, in_len, self.data_segments, true));
        }
        bufs.push(Buf::writable(status, 1));
        self.last_bufs.clone_from(&bufs);
        let table = self.tag_addr(q, tag, TAG_STATUS + 64);
        let (mem, dq) = self.fe.mem_and_queue(q);
        let head = if self.use_indirect {
            dq.add_indirect(mem, table, &bufs)?
        } else {
            dq.add(mem, &bufs)?
        };
        let Some(head) = head else {
            self.free_tags[qi].push(tag);
            return Ok(None);
        };
        self.in_flight[qi].insert(head, InFlight { tag, in_len });
        Ok(Some(head))
    }

    /// Publishes queued requests and kicks if the device wants a kick.
    pub fn kick(&mut self, q: u16, old_avail: u16) -> Result<bool> {
        let (mem, dq) = self.fe.mem_and_queue(q);
        dq.notify(mem, old_avail)
    }

    /// Waits for the next completion on queue `q`.
    pub fn wait(&mut self, q: u16) -> Result<Completion> {
        let (mem, dq) = self.fe.mem_and_queue(q);
        let used = dq.wait(mem, WAIT)?;
        self.finish(q, used.head, used.len)
    }

    /// Takes a completion if one is ready.
    pub fn poll(&mut self, q: u16) -> Result<Option<Completion>> {
        let (mem, dq) = self.fe.mem_and_queue(q);
        match dq.poll(mem)? {
            Some(u) => self.finish(q, u.head, u.len).map(Some),
            None => Ok(None),
        }
    }

    fn finish(&mut self, q: u16, head: u16, used_len: u32) -> Result<Completion> {
        let qi = usize::from(q);
        let f = self.in_flight[qi]
            .remove(&head)
            .with_context(|| format!("completion for unknown head {head}"))?;
        let mem = self.fe.ram().mem();
        let status: u8 = mem.read_obj(self.tag_addr(q, f.tag, TAG_STATUS))?;
        let mut data = vec![0u8; f.in_len as usize];
        mem.read_slice(&mut data, self.tag_addr(q, f.tag, TAG_DATA))?;
        self.free_tags[qi].push(f.tag);
        Ok(Completion {
            head,
            status,
            used_len,
            data,
        })
    }

    /// Submits one request, kicks, and waits for it.
    pub fn run(&mut self, q: u16, op: &BlkOp) -> Result<Completion> {
        let old = self.fe.queue(q).avail_idx();
        self.submit(q, op)?.context("queue full")?;
        self.kick(q, old)?;
        self.wait(q)
    }

    pub fn read(&mut self, q: u16, sector: u64, len: u32) -> Result<Vec<u8>> {
        let c = self.run(q, &BlkOp::Read { sector, len })?;
        if c.status != S_OK {
            bail!(
                "read of {len} bytes at sector {sector} failed with status {}",
                c.status
            );
        }
        Ok(c.data)
    }

    pub fn write(&mut self, q: u16, sector: u64, data: &[u8]) -> Result<()> {
        let c = self.run(
            q,
            &BlkOp::Write {
                sector,
                data: data.to_vec(),
            },
        )?;
        if c.status != S_OK {
            bail!("write at sector {sector} failed with status {}", c.status);
        }
        Ok(())
    }
}

fn encode_segments(segs: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (sector, n, flags) in segs {
        v.extend_from_slice(&sector.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
    }
    v
}

/// Splits `len` bytes at `addr` into `parts` buffers (the last takes the remainder).
fn split(addr: GuestAddress, len: u32, parts: u32, writable: bool) -> Vec<Buf> {
    let parts = parts.clamp(1, len.max(1));
    let chunk = len / parts;
    (0..parts)
        .map(|i| {
            let start = i * chunk;
            let l = if i + 1 == parts { len - start } else { chunk };
            Buf {
                addr: GuestAddress(addr.0 + u64::from(start)),
                len: l,
                writable,
            }
        })
        .collect()
}
