//! Which dirty log a queue's completions are marked in, kept current at every completion.
//!
//! A worker sets its ring up with the session's log at the start of each pass, and a pass can
//! be long: under steady load a device keeps finding work and the pass goes on for as long as
//! the load does. A migration that starts meanwhile (`SET_FEATURES` with `LOG_ALL`), or a log
//! replaced meanwhile (QEMU syncs the old one and stops reading it), must be taken up by the
//! next completion, not the next pass, or the writes completed in between are never copied
//! again. So each completion compares the session's log generation with the one the ring was
//! set up with: one load of a counter that changes only at those events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::dirty_log::LogState;
use crate::vring::Ring;

/// No used-ring logging address.
pub(crate) const NO_USED_LOG: u64 = u64::MAX;

#[derive(Debug)]
pub(crate) struct LogCursor {
    state: Arc<LogState>,
    /// Guest physical address the used ring is logged at (`NO_USED_LOG`: not logged); the
    /// frontend may set it while the ring runs.
    used_log: Arc<AtomicU64>,
    /// The state's generation the ring was last set up with.
    seen: u64,
}

impl LogCursor {
    pub fn new(state: Arc<LogState>, used_log: Arc<AtomicU64>) -> Self {
        Self {
            state,
            used_log,
            // Never a real generation (they start at 0 and count up): the first `apply` is due.
            seen: u64::MAX,
        }
    }

    /// A cursor for a queue no frontend migrates (in-process placements).
    pub fn unlogged() -> Self {
        Self::new(
            Arc::new(LogState::new()),
            Arc::new(AtomicU64::new(NO_USED_LOG)),
        )
    }

    /// Sets `ring` up with the session's current log.
    pub fn apply(&mut self, ring: &mut Ring) {
        // The generation is read first: a change that lands after it is seen again next time.
        self.seen = self.state.generation();
        let used_log = match self.used_log.load(Ordering::Acquire) {
            NO_USED_LOG => None,
            at => Some(at),
        };
        ring.set_log(self.state.current(), used_log, self.state.buffers_logged());
    }

    /// Takes up a change made since the last `apply` (before a completion is marked).
    #[inline]
    pub fn refresh(&mut self, ring: &mut Ring) {
        if self.state.generation() != self.seen {
            self.apply(ring);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]

    use std::fs::File;

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::dirty_log::{DirtyLog, LOG_PAGE};
    use crate::guest_access::GuestAccess;
    use crate::memory::GuestMemory;
    use crate::notify::Signal;
    use crate::pipeline::Pipeline;
    use crate::queue_ctx::Tracking;
    use crate::vring::{RingAddrs, SplitRing};
    use crate::QueueCtx;

    const F_WRITE: u16 = 2;
    const SIZE: u16 = 16;

    fn log(state: &LogState) -> File {
        let fd = crate::memfd::create("log-cursor-test").unwrap();
        let file = File::from(fd.try_clone().unwrap());
        file.set_len(4096).unwrap();
        state.replace(Some(DirtyLog::map(fd, 4096, 0).unwrap()));
        file
    }

    /// A pass under steady load never ends on its own: a migration starting in the middle of it
    /// must be logged from the next completion on, as must a log replaced in the middle of it.
    #[test]
    fn a_pass_under_way_takes_up_a_migration_and_a_new_log_at_its_next_completion() {
        let mem = GuestAccess::new(Arc::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        ));
        let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
        let buffers = [0x20000u64, 0x30000, 0x40000];
        let chains: Vec<RawDescriptor> = buffers
            .iter()
            .map(|&a| RawDescriptor::from(SplitDescriptor::new(a, 4096, F_WRITE, 0)))
            .collect();
        q.add_desc_chains(&chains, 0).unwrap();
        let addrs = RingAddrs {
            desc: q.desc_table_addr(),
            avail: q.avail_addr(),
            used: GuestAddress(0x8000),
        };
        let mut ring = Ring::Split(SplitRing::new(&mem, SIZE, addrs, 0, false, true).unwrap());
        let state = Arc::new(LogState::new());
        let mut cursor = LogCursor::new(Arc::clone(&state), Arc::new(AtomicU64::new(NO_USED_LOG)));
        // The pass starts with logging off.
        cursor.apply(&mut ring);
        let (mut tracking, mut pipeline, call) =
            (Tracking::default(), Pipeline::adaptive(), Signal::new());
        let mut ctx = QueueCtx::new(
            &mem,
            &mut ring,
            &mut tracking,
            &mut pipeline,
            &call,
            &mut cursor,
        );
        let mut d = Vec::new();
        let heads: Vec<u16> = (0..3)
            .map(|_| ctx.pop(&mut d).unwrap().unwrap().head)
            .collect();
        ctx.complete(heads[0], 4096).unwrap();
        // The migration starts: a log, then LOG_ALL (QEMU's order).
        let _first_file = log(&state);
        state.set_enabled(true);
        let first = state.current().unwrap();
        ctx.complete(heads[1], 4096).unwrap();
        // Memory hot-plug: QEMU hands over a bigger log and stops reading the first one.
        let _second_file = log(&state);
        let second = state.current().unwrap();
        ctx.complete(heads[2], 4096).unwrap();
        ctx.flush().unwrap();
        let page = |a: u64| a / LOG_PAGE;
        assert!(
            !first.is_marked(page(buffers[0])),
            "completed before logging"
        );
        assert!(
            first.is_marked(page(buffers[1])),
            "completed once logging was on"
        );
        assert!(
            !first.is_marked(page(buffers[2])),
            "completed after the log was replaced"
        );
        assert!(second.is_marked(page(buffers[2])));
    }
}
