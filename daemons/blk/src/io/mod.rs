//! Executing parsed requests against the disk: synchronously (vectored pread/pwrite) or through
//! io_uring with many requests in flight per queue.

pub mod iov;
pub mod sync;
pub mod uring;

/// Which engine a queue uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// Vectored preadv2/pwritev2 on the queue's worker thread, one request at a time.
    Sync,
    /// io_uring: requests of a queue submitted in batches and completed out of order.
    IoUring,
}
