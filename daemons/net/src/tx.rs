//! Transmit: each chain the guest makes available is one frame (virtio-net header + data),
//! written to the TAP with one `writev` straight from guest memory. A malformed chain is dropped,
//! counted and completed; the queue goes on. Chains complete in order.

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
    iovs: Vec<libc::iovec>,
}

// SAFETY: `iovs` holds scratch pointers rebuilt for every frame and used only on the queue's own
// thread.
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
            iovs: Vec::new(),
        }
    }

    fn send(&mut self, ctx: &QueueCtx<'_>) -> Result<usize, TxError> {
        let total = check_tx_chain(&self.descs, self.hdr_len)?;
        self.iovs.clear();
        if iov::build(
            ctx.mem(),
            self.descs.iter().map(|d| (d.addr, d.len)),
            &mut self.iovs,
        )
        .is_err()
        {
            return Err(TxError::Unmapped);
        }
        // SAFETY: the iovecs point into guest memory kept mapped by `ctx` for this pass.
        if let Err(e) = unsafe { self.tap.send_gathered(&self.iovs) } {
            // A full TAP queue drops like a full NIC ring would; the guest's TCP recovers.
            if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS)) {
                self.stats.drop_one();
            } else {
                guest_warn!("TAP write failed: {e}");
                self.stats.error();
            }
            return Ok(0);
        }
        let frame = usize::try_from(total)
            .unwrap_or(0)
            .saturating_sub(self.hdr_len);
        self.stats.packet(frame);
        Ok(frame)
    }
}

impl QueueHandler for TxQueue {
    fn process(&mut self, ctx: &mut QueueCtx<'_>) -> Result<Progress, RingError> {
        loop {
            let mut descs = std::mem::take(&mut self.descs);
            let popped = ctx.pop(&mut descs);
            self.descs = descs;
            let Some(chain) = popped? else {
                return Ok(Progress::Idle);
            };
            if let Some(e) = chain.error {
                guest_warn!(head = chain.head, "malformed transmit chain: {e}");
                self.stats.error();
            } else if let Err(e) = self.send(ctx) {
                guest_warn!(head = chain.head, "transmit chain dropped: {e}");
                self.stats.error();
            }
            ctx.complete(chain.head, 0)?;
        }
    }

    fn drain(&mut self, _ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        // Frames are written synchronously: nothing is ever left in flight.
        Ok(())
    }
}
