//! The io_uring engine: reads, writes and flushes of one queue are submitted together and complete
//! out of order, so a queue keeps many requests in flight with one syscall per batch. Completions
//! are announced on an eventfd the queue's worker waits on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use bulkhead_common::guest_access::GuestAccess;
use bulkhead_common::GuestMemory;
use io_uring::{opcode, types, IoUring};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::sync::{transfer_all, Dir, Outcome, SyncIo};
use crate::request::{Op, Request, Segment};
use crate::stats::Tally;
use bulkhead_common::iov;

/// What a request in flight needs at completion.
#[derive(Debug)]
struct Slot {
    head: u16,
    status: GuestAddress,
    kind: SlotKind,
    iovs: Vec<libc::iovec>,
    /// Keeps the guest memory mappings the iovecs point into alive until the kernel is done.
    mem: Option<Arc<GuestMemory>>,
    /// What the request counts as once it completes.
    tally: Option<Tally>,
}

#[derive(Debug, Clone, Copy)]
enum SlotKind {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        flags: libc::c_int,
    },
    Flush,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQueued {
    /// Run it synchronously instead (discard, get-id, misaligned O_DIRECT buffers).
    RunSync,
    /// Its buffers are not in guest memory: fail it.
    BadBuffers,
}

/// A finished request.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    pub head: u16,
    pub status: GuestAddress,
    pub outcome: Outcome,
    pub tally: Option<Tally>,
}

/// `user_data` of the cancel request (never a slot index, which fits 16 bits).
const CANCEL_TAG: u64 = u64::MAX;

/// The engine of one queue.
pub struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Slot>,
    free: Vec<u16>,
}

impl Drop for Uring {
    /// Whatever ends the queue (a failed drain, a panicking worker), the kernel is done with
    /// every request before the slots' iovecs and mappings go.
    fn drop(&mut self) {
        self.cancel_and_wait();
    }
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Uring {
    pub fn new(depth: u16) -> io::Result<Self> {
        let depth = depth.max(1);
        let ring = IoUring::new(u32::from(depth))?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let slots = (0..depth)
            .map(|_| Slot {
                head: 0,
                status: GuestAddress(0),
                kind: SlotKind::Flush,
                iovs: Vec::new(),
                mem: None,
                tally: None,
            })
            .collect();
        let free = (0..depth).rev().collect();
        Ok(Self {
            ring,
            eventfd,
            slots,
            free,
        })
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `req` (submitted at the next [`submit`](Self::submit)).
    pub fn queue(
        &mut self,
        sync: &SyncIo<'_>,
        view: &GuestAccess,
        head: u16,
        req: &Request,
        data: &[Segment],
        tally: Tally,
    ) -> Result<(), NotQueued> {
        let kind = match &req.op {
            Op::Read { offset, len } => SlotKind::Read {
                offset: *offset,
                len: *len,
            },
            Op::Write { offset, len } => SlotKind::Write {
                offset: *offset,
                len: *len,
                flags: sync.write_flags(),
            },
            Op::Flush => SlotKind::Flush,
            Op::GetId { .. } | Op::Discard(_) | Op::WriteZeroes(_) => {
                return Err(NotQueued::RunSync)
            }
        };
        if sync.disk.kind() == crate::disk::DiskKind::Null {
            return Err(NotQueued::RunSync);
        }
        let Some(&index) = self.free.last() else {
            return Err(NotQueued::RunSync);
        };
        let slot = self
            .slots
            .get_mut(usize::from(index))
            .ok_or(NotQueued::RunSync)?;
        if !matches!(kind, SlotKind::Flush) {
            iov::build(view, super::sync::segs(data), &mut slot.iovs)
                .map_err(|_| NotQueued::BadBuffers)?;
            if sync.needs_bounce(&slot.iovs) {
                return Err(NotQueued::RunSync);
            }
        }
        let fd = types::Fd(sync.disk.file().as_raw_fd());
        let iov_ptr = slot.iovs.as_ptr();
        let iov_len = u32::try_from(slot.iovs.len()).map_err(|_| NotQueued::BadBuffers)?;
        let entry = match kind {
            SlotKind::Read { offset, .. } => opcode::Readv::new(fd, iov_ptr, iov_len)
                .offset(offset)
                .build(),
            SlotKind::Write { offset, flags, .. } => opcode::Writev::new(fd, iov_ptr, iov_len)
                .offset(offset)
                .rw_flags(flags)
                .build(),
            SlotKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(u64::from(index));
        // SAFETY: the iovecs and the guest memory they point into live in `slot` (with `mem`)
        // until the completion for `index` is reaped; the slot is not reused before that.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(NotQueued::RunSync);
        }
        slot.head = head;
        slot.status = req.status;
        slot.kind = kind;
        slot.mem = Some(Arc::clone(view.snapshot()));
        slot.tally = Some(tally);
        self.free.pop();
        Ok(())
    }

    /// Hands queued requests to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until at least one request completes.
    pub fn wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Cancels every request in flight and waits until the kernel reported each one, so that no
    /// iovec the kernel may still write through outlives its guest memory mapping. Returns how
    /// many requests it waited for. If waiting fails, the mappings of the requests still in
    /// flight are leaked on purpose: memory that is never unmapped cannot be written after free.
    pub fn cancel_and_wait(&mut self) -> usize {
        let owed = self.in_flight();
        if owed == 0 {
            return 0;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request carries no buffers.
        let pushed = unsafe { self.ring.submission().push(&cancel) };
        if pushed.is_err() {
            // A full submission queue: submit what is queued first, then try once more.
            let _ = self.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&cancel) };
        }
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    bulkhead_common::guest_warn!(
                        "io_uring wait failed with {} requests in flight; keeping their memory mapped: {e}",
                        self.in_flight()
                    );
                    for slot in &mut self.slots {
                        if let Some(mem) = slot.mem.take() {
                            std::mem::forget(mem);
                        }
                    }
                    return owed;
                }
            }
            let Self {
                ring, slots, free, ..
            } = self;
            for c in ring.completion() {
                let Ok(index) = u16::try_from(c.user_data()) else {
                    continue; // the cancel request's own completion
                };
                if let Some(slot) = slots.get_mut(usize::from(index)) {
                    slot.mem = None;
                    free.push(index);
                }
            }
        }
        owed
    }

    /// Collects finished requests into `done` without blocking. Cheap when nothing finished (two
    /// loads of the completion ring), so the queue can look after every request it queues. The
    /// eventfd is not read: the worker waits on it edge-triggered, and every completion the
    /// kernel signals is an edge, whatever the counter holds.
    pub fn reap(&mut self, sync: &SyncIo<'_>, done: &mut Vec<Done>) {
        let Self {
            ring, slots, free, ..
        } = self;
        for c in ring.completion() {
            let Ok(index) = u16::try_from(c.user_data()) else {
                continue;
            };
            let Some(slot) = slots.get_mut(usize::from(index)) else {
                continue;
            };
            let outcome = finish(sync, slot, c.result());
            done.push(Done {
                head: slot.head,
                status: slot.status,
                outcome,
                tally: slot.tally.take(),
            });
            slot.mem = None;
            free.push(index);
        }
    }
}

/// Turns a completion result into an outcome, finishing a short transfer synchronously.
fn finish(sync: &SyncIo<'_>, slot: &mut Slot, result: i32) -> Outcome {
    if result < 0 {
        let e = io::Error::from_raw_os_error(-result);
        bulkhead_common::guest_warn!("I/O error on {}: {e}", sync.disk.path().display());
        return Outcome::FAILED;
    }
    let moved = u64::from(result.unsigned_abs());
    let (expected, offset, dir, flags) = match slot.kind {
        SlotKind::Flush => return Outcome::ok(0),
        SlotKind::Read { offset, len } => (len, offset, Dir::Read, 0),
        SlotKind::Write { offset, len, flags } => (len, offset, Dir::Write, flags),
    };
    if moved < expected {
        iov::advance(&mut slot.iovs, moved as usize);
        if let Err(e) = transfer_all(sync.disk, &mut slot.iovs, offset + moved, dir, flags) {
            bulkhead_common::guest_warn!("I/O error on {}: {e}", sync.disk.path().display());
            return Outcome::FAILED;
        }
    }
    let written = if dir == Dir::Read {
        u32::try_from(expected).unwrap_or(u32::MAX)
    } else {
        0
    };
    Outcome::ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    /// A read that never completes on its own: from an empty pipe.
    /// Returns both ends of the pipe: the read stays pending while they are open.
    fn pending_read(u: &mut Uring, mem: &GuestAccess) -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the descriptor is fresh and ours.
        let r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        let slot = u.slots.get_mut(0).unwrap();
        iov::build(mem, [(GuestAddress(0x1000), 4096)], &mut slot.iovs).unwrap();
        let entry = opcode::Readv::new(types::Fd(r.as_raw_fd()), slot.iovs.as_ptr(), 1)
            .build()
            .user_data(0);
        // SAFETY: the slot's iovecs and mapping stay alive until the completion is reaped.
        unsafe { u.ring.submission().push(&entry).unwrap() };
        slot.mem = Some(Arc::clone(mem.snapshot()));
        u.free.retain(|&i| i != 0);
        u.submit().unwrap();
        (r, w)
    }

    #[test]
    fn cancelling_waits_for_every_request_and_only_then_lets_the_memory_go() {
        let mem = GuestAccess::new(Arc::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        ));
        let mut u = Uring::new(4).unwrap();
        let _w = pending_read(&mut u, &mem);
        assert_eq!(u.in_flight(), 1);
        assert_eq!(
            Arc::strong_count(mem.snapshot()),
            2,
            "the request holds the mapping"
        );
        assert_eq!(u.cancel_and_wait(), 1);
        assert_eq!(u.in_flight(), 0);
        assert_eq!(Arc::strong_count(mem.snapshot()), 1);
    }

    #[test]
    fn dropping_the_engine_with_a_request_in_flight_returns_once_it_is_cancelled() {
        let mem = GuestAccess::new(Arc::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        ));
        let mut u = Uring::new(4).unwrap();
        let _w = pending_read(&mut u, &mem);
        drop(u);
        // The drop waited for the kernel: nothing refers to the mapping any more.
        assert_eq!(Arc::strong_count(mem.snapshot()), 1);
    }
}
