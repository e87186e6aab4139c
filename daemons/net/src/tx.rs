//! Transmit: each chain the guest makes available is one frame (virtio-net header + data),
//! written to the TAP with one `write`/`writev` straight from guest memory. A malformed chain is
//! dropped, counted and completed; the queue goes on. Chains complete in order.
//!
//! Chains are handled in batches: up to [`BATCH`] are taken from the ring, then their frames are
//! written, then they are completed. Taking, writing and completing one chain at a time runs the
//! ring code between two kernel TAP writes that evict it from the caches; batched, each of the
//! three loops stays warm. A/B with the harness, the daemons alternated seven times, 64 B frames,
//! medians (tests/results/2026-12-04c/before-after-net-tx.txt): 1.05M -> 1.14M frames/s across
//! two pinned CPUs (device CPU 0.95 -> 0.87 µs a frame), 1.06M -> 1.12M unpinned, 1.12M -> 1.18M
//! on one CPU.
//!
//! A crash between a batch's writes and its completions leaves those chains uncompleted: the
//! frontend resumes the restarted daemon from the used index, so their frames go out again.
//! Up to a batch of duplicate frames is what a network tolerates from a NIC that retransmits.

use std::sync::Arc;

use bulkhead_common::vring::{Desc, RingError};
use bulkhead_common::{guest_warn, Progress, QueueCtx, QueueHandler};

use crate::stats::QueueStats;
use crate::tap::TapQueue;
use crate::vnet::MAX_GSO_FRAME;
use bulkhead_common::iov;

#[derive(Debug)]
pub struct TxQueue {
    tap: Arc<TapQueue>,
    stats: Arc<QueueStats>,
    hdr_len: usize,
    descs: Vec<Desc>,
    /// One frame's iovecs, built apart from the batch's so that the iovec limit `iov::build`
    /// enforces stays the frame's own, wherever in the batch it lands.
    frame_iovs: Vec<libc::iovec>,
    /// The batch's iovecs, frame after frame.
    iovs: Vec<libc::iovec>,
    batch: Vec<Taken>,
}

/// A chain taken for the current batch, and the frame to write for it (none when the chain
/// was refused).
#[derive(Debug)]
struct Taken {
    head: u16,
    frame: Option<Frame>,
}

/// A frame to write: its iovecs in the batch's, and its length without the virtio-net header.
#[derive(Debug)]
struct Frame {
    iovs: std::ops::Range<usize>,
    len: usize,
}

/// Chains taken before any is written (see the module's comment).
const BATCH: usize = 32;
/// A batch also ends once it holds this many iovecs (a guest's long chains keep it small).
const BATCH_IOVECS: usize = 64;

// SAFETY: `frame_iovs` and `iovs` hold scratch pointers into guest memory, rebuilt for every
// batch and used only on the queue's own thread, within the pass that built them.
unsafe impl Send for TxQueue {}

/// Why a transmit chain is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("chain has a device-writable buffer")]
    Writable,
    #[error("chain of {0} bytes is shorter than the virtio-net header")]
    TooShort(u64),
    #[error("chain of {0} bytes is longer than the largest frame")]
    TooLong(u64),
    #[error("buffer outside guest memory")]
    Unmapped,
}

/// Checks a transmit chain's shape: readable only, header present, frame not oversized.
pub fn check_tx_chain(descs: &[Desc], hdr_len: usize) -> Result<u64, TxError> {
    if descs.iter().any(|d| d.writable) {
        return Err(TxError::Writable);
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    if total < hdr_len as u64 {
        return Err(TxError::TooShort(total));
    }
    if total > (hdr_len + MAX_GSO_FRAME) as u64 {
        return Err(TxError::TooLong(total));
    }
    Ok(total)
}

impl TxQueue {
    pub fn new(tap: Arc<TapQueue>, stats: Arc<QueueStats>, hdr_len: usize) -> Self {
        Self {
            tap,
            stats,
            hdr_len,
            descs: Vec::new(),
            frame_iovs: Vec::new(),
            iovs: Vec::new(),
            batch: Vec::with_capacity(BATCH),
        }
    }

    /// Checks the chain in `descs` and appends its iovecs to the batch's.
    fn gather(&mut self, ctx: &QueueCtx<'_>) -> Result<Frame, TxError> {
        let total = check_tx_chain(&self.descs, self.hdr_len)?;
        if iov::build(
            ctx.mem(),
            self.descs.iter().map(|d| (d.addr, d.len)),
            &mut self.frame_iovs,
        )
        .is_err()
        {
            return Err(TxError::Unmapped);
        }
        let start = self.iovs.len();
        self.iovs.extend_from_slice(&self.frame_iovs);
        Ok(Frame {
            iovs: start..self.iovs.len(),
            len: usize::try_from(total)
                .unwrap_or(0)
                .saturating_sub(self.hdr_len),
        })
    }

    /// Takes up to a batch of chains into `batch`. On a ring error the chains taken before it
    /// stay in `batch`, to be written and completed all the same.
    fn take_batch(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        self.batch.clear();
        self.iovs.clear();
        while self.batch.len() < BATCH && self.iovs.len() < BATCH_IOVECS {
            let mut descs = std::mem::take(&mut self.descs);
            let popped = ctx.pop(&mut descs);
            self.descs = descs;
            let Some(chain) = popped? else {
                return Ok(());
            };
            let frame = match chain.error {
                Some(e) => {
                    guest_warn!(head = chain.head, "malformed transmit chain: {e}");
                    self.stats.error();
                    None
                }
                None => match self.gather(ctx) {
                    Ok(frame) => Some(frame),
                    Err(e) => {
                        guest_warn!(head = chain.head, "transmit chain dropped: {e}");
                        self.stats.error();
                        None
                    }
                },
            };
            self.batch.push(Taken {
                head: chain.head,
                frame,
            });
        }
        Ok(())
    }

    /// Writes the batch's frames to the TAP.
    fn send_batch(&self) {
        for frame in self.batch.iter().filter_map(|t| t.frame.as_ref()) {
            let Some(iovs) = self.iovs.get(frame.iovs.clone()) else {
                continue;
            };
            // SAFETY: the iovecs point into guest memory kept mapped by the pass's context,
            // which outlives the batch.
            if let Err(e) = unsafe { self.tap.send_gathered(iovs) } {
                // A full TAP queue drops like a full NIC ring would; the guest's TCP recovers.
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS)) {
                    self.stats.drop_one();
                } else {
                    guest_warn!("TAP write failed: {e}");
                    self.stats.error();
                }
                continue;
            }
            self.stats.packet(frame.len);
        }
    }
}

impl QueueHandler for TxQueue {
    fn process(&mut self, ctx: &mut QueueCtx<'_>) -> Result<Progress, RingError> {
        loop {
            let taken = self.take_batch(ctx);
            if self.batch.is_empty() {
                taken?;
                return Ok(Progress::Idle);
            }
            self.send_batch();
            for t in &self.batch {
                ctx.complete(t.head, 0)?;
            }
            taken?;
        }
    }

    fn drain(&mut self, _ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        // Frames are written synchronously: nothing is ever left in flight.
        Ok(())
    }
}
