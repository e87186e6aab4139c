//! What the device may have written into each chain it holds: the chain's device-writable
//! buffers, recorded when the chain is taken and marked in the dirty log when it is completed.
//!
//! Recording always (a few words per chain) rather than only while migrating: a chain taken just
//! before logging starts and completed after must be logged too. Marking every writable buffer
//! of a completed chain covers whatever the device wrote there, however it wrote it (a `preadv`,
//! io_uring, a TAP `readv`, a status byte), so no device can forget to log.

use vm_memory::GuestAddress;

use super::Desc;
use crate::dirty_log::DirtyLog;

#[derive(Debug, Default)]
pub struct Written {
    /// Per head (buffer id): the writable buffers of the chain taken under it.
    per_head: Vec<Vec<(GuestAddress, u32)>>,
}

impl Written {
    pub fn new(size: u16) -> Self {
        Self {
            per_head: (0..size).map(|_| Vec::new()).collect(),
        }
    }

    /// Remembers the writable buffers of the chain just taken under `head`.
    pub fn record(&mut self, head: u16, descs: &[Desc]) {
        if let Some(v) = self.per_head.get_mut(usize::from(head)) {
            v.clear();
            v.extend(descs.iter().filter(|d| d.writable).map(|d| (d.addr, d.len)));
        }
    }

    /// The chain under `head` is being completed: marks its writable buffers in `log`.
    pub fn complete(&mut self, head: u16, log: Option<&DirtyLog>) {
        if let Some(v) = self.per_head.get_mut(usize::from(head)) {
            if let Some(log) = log {
                for (addr, len) in v.iter() {
                    log.mark(addr.0, u64::from(*len));
                }
            }
            v.clear();
        }
    }
}
