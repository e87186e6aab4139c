//! Receive: frames are read from the TAP straight into guest buffers with one `readv`.
//!
//! The TAP is read only while the guest has posted enough buffers for the largest frame it may
//! deliver; otherwise the frame stays in the kernel's (bounded) TAP queue and reading resumes on
//! the guest's next kick. With MRG_RXBUF a frame spreads over as many chains as it needs and
//! `num_buffers` says how many; chains are completed in order.
//!
//! When the TAP runs dry the buffers gathered for the next frame stay with the queue, ready, for
//! the frame that wakes it: under load the device drains the TAP and sleeps many times a second,
//! and gathering the largest frame's worth of chains again at each wake-up (17 chains of 4 KiB
//! for a 64 KiB frame) cost more than reading the frame. They go back to the engine (to be
//! taken again first) when the guest's memory table changes, when there are too few of them to
//! wait with, and when the queue stops.

use std::collections::VecDeque;
use std::sync::Arc;

use bulkhead_common::vring::{AvailChain, Desc, RingError};
use bulkhead_common::{guest_warn, GuestMemory, Progress, QueueCtx, QueueHandler};
use vm_memory::{Bytes, GuestAddress};

use crate::stats::QueueStats;
use crate::tap::TapQueue;
use crate::vnet::{HDR_LEN, NUM_BUFFERS_OFFSET};
use bulkhead_common::iov;

/// A receive chain taken from the ring, ready to be filled.
#[derive(Debug, Clone, Copy)]
struct Buffer {
    chain: AvailChain,
    capacity: u32,
    /// Where `num_buffers` of a header placed at the start of this chain would go.
    num_buffers_at: Option<GuestAddress>,
    /// This chain's iovecs: `iovs[iov_end - n .. iov_end]`, counted from the queue's front.
    iov_count: usize,
}

#[derive(Debug)]
pub struct RxQueue {
    tap: Arc<TapQueue>,
    stats: Arc<QueueStats>,
    hdr_len: usize,
    mergeable: bool,
    /// Header plus the largest frame the TAP may deliver.
    max_frame: usize,
    descs: Vec<Desc>,
    buffers: VecDeque<Buffer>,
    /// Sum of `buffers`' capacities.
    prefetched: usize,
    iovs: VecDeque<libc::iovec>,
    /// The guest memory snapshot `iovs` point into, kept mapped while they are held.
    iovs_in: Option<Arc<GuestMemory>>,
    scratch: Vec<libc::iovec>,
    /// `spread`'s output, reused.
    used: Vec<u32>,
}

// SAFETY: the iovecs point into the guest memory snapshot `iovs_in` keeps mapped; they are used
// only on the queue's own thread, and rebuilt when a pass sees another snapshot.
unsafe impl Send for RxQueue {}

/// How a frame's bytes spread over buffers of the given capacities: bytes per buffer used, into
/// `out` (cleared first).
pub fn spread(len: usize, capacities: impl IntoIterator<Item = u32>, out: &mut Vec<u32>) {
    out.clear();
    let mut left = len;
    for cap in capacities {
        let take = left.min(cap as usize);
        out.push(u32::try_from(take).unwrap_or(u32::MAX));
        left -= take;
        if left == 0 {
            break;
        }
    }
}

impl RxQueue {
    pub fn new(
        tap: Arc<TapQueue>,
        stats: Arc<QueueStats>,
        hdr_len: usize,
        mergeable: bool,
        max_frame: usize,
    ) -> Self {
        Self {
            tap,
            stats,
            hdr_len,
            mergeable,
            max_frame,
            descs: Vec::new(),
            buffers: VecDeque::new(),
            prefetched: 0,
            iovs: VecDeque::new(),
            iovs_in: None,
            scratch: Vec::new(),
            used: Vec::new(),
        }
    }

    /// The oldest gathered buffer, gone.
    fn pop_buffer(&mut self) -> Option<Buffer> {
        let b = self.buffers.pop_front()?;
        self.iovs.drain(..b.iov_count.min(self.iovs.len()));
        self.prefetched = self.prefetched.saturating_sub(b.capacity as usize);
        Some(b)
    }

    /// Takes chains until they can hold the largest frame (or one chain without MRG_RXBUF).
    /// Returns false if the ring ran out first.
    fn fill(&mut self, ctx: &mut QueueCtx<'_>) -> Result<bool, RingError> {
        loop {
            let enough = if self.mergeable {
                self.prefetched >= self.max_frame
            } else {
                !self.buffers.is_empty()
            };
            if enough {
                return Ok(true);
            }
            let mut descs = std::mem::take(&mut self.descs);
            let popped = ctx.pop(&mut descs);
            self.descs = descs;
            let Some(chain) = popped? else {
                return Ok(false);
            };
            if let Some(e) = chain.error {
                guest_warn!(head = chain.head, "malformed receive chain: {e}");
                self.stats.error();
                ctx.complete(chain.head, 0)?;
                continue;
            }
            if self.descs.iter().any(|d| !d.writable) {
                guest_warn!(
                    head = chain.head,
                    "receive chain with a device-readable buffer"
                );
                self.stats.error();
                ctx.complete(chain.head, 0)?;
                continue;
            }
            let capacity: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
            self.scratch.clear();
            if capacity < self.hdr_len as u64
                || iov::build(
                    ctx.mem(),
                    self.descs.iter().map(|d| (d.addr, d.len)),
                    &mut self.scratch,
                )
                .is_err()
            {
                guest_warn!(
                    head = chain.head,
                    "receive chain too small or outside guest memory"
                );
                self.stats.error();
                ctx.complete(chain.head, 0)?;
                continue;
            }
            let num_buffers_at = byte_address(&self.descs, NUM_BUFFERS_OFFSET);
            if self.buffers.is_empty() {
                self.iovs_in = Some(ctx.mem_arc());
            }
            self.iovs.extend(self.scratch.iter().copied());
            let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
            self.prefetched = self.prefetched.saturating_add(capacity as usize);
            self.buffers.push_back(Buffer {
                chain,
                capacity,
                num_buffers_at,
                iov_count: self.scratch.len(),
            });
        }
    }

    /// Reads one frame into the prefetched buffers. `Ok(false)`: the TAP had nothing.
    fn receive_one(&mut self, ctx: &mut QueueCtx<'_>) -> Result<bool, RingError> {
        let iov_total: usize = if self.mergeable {
            self.iovs.len()
        } else {
            self.buffers.front().map_or(0, |b| b.iov_count)
        };
        self.scratch.clear();
        self.scratch
            .extend(self.iovs.iter().take(iov_total).copied());
        // SAFETY: the iovecs point into guest buffers of chains we hold, mapped for this pass.
        let n = match unsafe { self.tap.receive_scattered(&self.scratch) } {
            Ok(n) => n,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {}
                    // The guest buffers are not there (the frontend revoked its memory): the ring
                    // cannot be served any more; the engine stops it and signals the error.
                    Some(libc::EFAULT) => {
                        self.stats.error();
                        return Err(RingError::Memory);
                    }
                    _ => {
                        guest_warn!("TAP read failed: {e}");
                        self.stats.error();
                    }
                }
                return Ok(false);
            }
        };
        let mut used = std::mem::take(&mut self.used);
        spread(
            n,
            self.buffers
                .iter()
                .map(|b| if self.mergeable { b.capacity } else { u32::MAX }),
            &mut used,
        );
        let result = self.complete_frame(ctx, n, &used);
        self.used = used;
        result.map(|()| true)
    }

    /// Completes the buffers a frame of `n` bytes filled (`used`: bytes per buffer).
    fn complete_frame(
        &mut self,
        ctx: &mut QueueCtx<'_>,
        n: usize,
        used: &[u32],
    ) -> Result<(), RingError> {
        let used_count = used.len().max(1);
        let first = self.buffers.front().copied();
        if self.hdr_len == HDR_LEN {
            if let Some(at) = first.and_then(|b| b.num_buffers_at) {
                let count = u16::try_from(used_count).unwrap_or(u16::MAX);
                // The TAP leaves the header's last two bytes alone; they are ours to fill.
                if ctx.mem().write_obj(count.to_le(), at).is_err() {
                    self.stats.error();
                }
            }
        }
        for len in used {
            let Some(b) = self.pop_buffer() else {
                break;
            };
            ctx.complete(b.chain.head, *len)?;
        }
        if used.is_empty() {
            if let Some(b) = self.pop_buffer() {
                ctx.complete(b.chain.head, 0)?;
            }
        }
        self.stats.packet(n.saturating_sub(self.hdr_len));
        Ok(())
    }

    /// Gives back chains taken but not filled, so they are taken again next time (the engine
    /// keeps them; chains completed meanwhile are not among them).
    fn put_back(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        self.iovs.clear();
        self.iovs_in = None;
        self.prefetched = 0;
        for b in self.buffers.drain(..) {
            ctx.put_back(&b.chain)?;
        }
        Ok(())
    }
}

/// Guest address of byte `offset` of a chain, if the chain is that long.
fn byte_address(descs: &[Desc], mut offset: usize) -> Option<GuestAddress> {
    for d in descs {
        let len = d.len as usize;
        if offset < len {
            return d.addr.0.checked_add(offset as u64).map(GuestAddress);
        }
        offset -= len;
    }
    None
}

impl QueueHandler for RxQueue {
    fn event_sources(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.tap.fd()]
    }

    fn process(&mut self, ctx: &mut QueueCtx<'_>) -> Result<Progress, RingError> {
        // Buffers kept from an earlier pass point into the snapshot they were gathered on.
        let stale = self
            .iovs_in
            .as_ref()
            .is_some_and(|m| !Arc::ptr_eq(m, ctx.mem().snapshot()));
        if stale {
            self.put_back(ctx)?;
        }
        let result = (|| loop {
            if !self.fill(ctx)? {
                if self.buffers.is_empty() {
                    // Ring empty: the engine asks the guest to kick when it posts buffers.
                    return Ok(Progress::Idle);
                }
                // Some buffers, but not enough for the largest frame: wait for more.
                self.put_back(ctx)?;
                if ctx.kick_on_more_buffers()? {
                    continue;
                }
                return Ok(Progress::Waiting);
            }
            if !self.receive_one(ctx)? {
                // Nothing to receive: sleep until the TAP has a frame, the buffers for it
                // in hand.
                return Ok(Progress::Waiting);
            }
        })();
        if result.is_err() {
            self.put_back(ctx)?;
        }
        result
    }

    fn drain(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        self.put_back(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_spreads_over_as_few_buffers_as_it_needs() {
        let spread = |len, caps: &[u32]| {
            let mut out = vec![7; 3];
            super::spread(len, caps.iter().copied(), &mut out);
            out
        };
        assert_eq!(spread(3000, &[1500, 1500, 1500]), vec![1500, 1500]);
        assert_eq!(spread(3001, &[1500, 1500, 1500]), vec![1500, 1500, 1]);
        assert_eq!(spread(100, &[4096, 4096]), vec![100]);
        assert_eq!(spread(65536 + 12, &[4096; 20]).len(), 17);
    }

    #[test]
    fn num_buffers_address_follows_the_chain_layout() {
        let d = |a, l| Desc {
            addr: GuestAddress(a),
            len: l,
            writable: true,
        };
        assert_eq!(
            byte_address(&[d(0x1000, 4096)], 10),
            Some(GuestAddress(0x100a))
        );
        assert_eq!(
            byte_address(&[d(0x1000, 8), d(0x2000, 4096)], 10),
            Some(GuestAddress(0x2002))
        );
        assert_eq!(byte_address(&[d(0x1000, 8)], 10), None);
    }
}
