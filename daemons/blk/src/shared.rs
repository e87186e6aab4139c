//! What the queues of one block device share: the disk, the serial, the guest's cache mode.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::disk::Disk;
use crate::io::sync::ID_BYTES;

/// Data segments per request we accept, advertised as `seg_max`. QEMU's default queue size is
/// 128; a guest never builds a chain longer than `seg_max + 2` descriptors, so this keeps every
/// chain within that queue size.
pub const SEG_MAX: u32 = 126;

/// What the queues of one device share.
#[derive(Debug)]
pub struct Shared {
    pub disk: Disk,
    pub serial: [u8; ID_BYTES],
    /// The guest's cache mode (config `wce`): true = write-back, flushes make writes durable.
    pub(crate) writeback: AtomicBool,
    /// The guest negotiated FLUSH; without it the device must be write-through.
    pub(crate) flush_negotiated: AtomicBool,
}

impl Shared {
    /// Whether each write must be durable before it completes.
    pub fn writethrough(&self) -> bool {
        !(self.writeback.load(Ordering::Relaxed) && self.flush_negotiated.load(Ordering::Relaxed))
    }
}
