//! Executing parsed requests against the disk: synchronously (vectored pread/pwrite) or through
//! io_uring with many requests in flight per queue.

pub mod sync;
pub mod uring;

/// Which engine a queue uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// `io-uring` for disks opened with O_DIRECT (the kernel then does the I/O asynchronously),
    /// `sync` otherwise: buffered I/O on the page cache or tmpfs completes in the calling thread
    /// faster than io_uring, which punts it to its worker threads (measured by the harness).
    Auto,
    /// Vectored preadv2/pwritev2 on the queue's worker thread, one request at a time.
    Sync,
    /// io_uring: requests of a queue submitted in batches and completed out of order.
    IoUring,
}

impl IoEngine {
    /// The engine `Auto` stands for on `disk`; other choices stay as they are.
    pub fn resolve(self, disk: &crate::disk::Disk) -> IoEngine {
        match self {
            IoEngine::Auto if disk.direct() => IoEngine::IoUring,
            IoEngine::Auto => IoEngine::Sync,
            chosen => chosen,
        }
    }
}
