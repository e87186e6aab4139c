//! vhost-user-net's receive path as a hostile guest drives it: arbitrary descriptor tables and
//! available rings (readable, tiny, unmapped, looping buffers among good ones), frames of any
//! size arriving between passes, buffers taken and put back across passes. Besides ASan's
//! checks: the device never returns more chains than the guest made available (a chain put back
//! and completed again would), and every used entry names a descriptor of the table.
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use arbitrary::Arbitrary;
use bulkhead_common::local::{DirectQueue, LocalRing};
use bulkhead_common::vring::RingAddrs;
use bulkhead_common::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vhost_user_net::rx::RxQueue;
use vhost_user_net::stats::QueueStats;
use vhost_user_net::tap::TapQueue;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 64 * 1024;
const SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const BUFFERS: u64 = 0x1000;

#[derive(Debug, Arbitrary)]
struct Step {
    /// Descriptors to (re)write: (index, addr, len, flags, next).
    descs: Vec<(u8, u16, u16, u8, u8)>,
    /// Heads to make available.
    heads: Vec<u8>,
    /// Frames to queue on the "TAP" before the pass.
    frames: Vec<u16>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    mergeable: bool,
    max_frame: u16,
    steps: Vec<Step>,
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|input: Input| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory");
    let (tap_end, wire) = socketpair();
    let tap = Arc::new(TapQueue::stand_in(tap_end));
    let hdr = if input.mergeable { 12 } else { 10 };
    let max_frame = usize::from(input.max_frame).max(hdr + 14);
    let rx = RxQueue::new(tap, Arc::new(QueueStats::default()), hdr, input.mergeable, max_frame);
    let ring = LocalRing {
        size: SIZE,
        addrs: RingAddrs {
            desc: GuestAddress(DESC),
            avail: GuestAddress(AVAIL),
            used: GuestAddress(USED),
        },
        event_idx: false,
        indirect: true,
        layout: bulkhead_common::vring::Layout::Split,
    };
    let Ok(mut q) = DirectQueue::new(rx, mem.clone(), ring) else { return };
    let mut avail: u16 = 0;
    for step in input.steps.iter().take(32) {
        for &(i, addr, len, flags, next) in step.descs.iter().take(32) {
            let at = GuestAddress(DESC + 16 * u64::from(i % SIZE as u8));
            // Buffers anywhere above the rings (or beyond memory): a guest pointing its buffers
            // at its own used ring corrupts only itself, and would defeat the checks below.
            let _ = mem.write_obj(BUFFERS + u64::from(addr) * 4, at);
            let _ = mem.write_obj(u32::from(len), GuestAddress(at.0 + 8));
            let _ = mem.write_obj(u16::from(flags & 7), GuestAddress(at.0 + 12));
            let _ = mem.write_obj(u16::from(next % SIZE as u8), GuestAddress(at.0 + 14));
        }
        for &h in step.heads.iter().take(usize::from(SIZE)) {
            // Never more outstanding than the ring holds: a guest that does more is refused
            // by the ring check, which is not what this target explores.
            let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
            if avail.wrapping_sub(used) >= SIZE {
                break;
            }
            let slot = u64::from(avail % SIZE);
            let _ = mem.write_obj(u16::from(h) % SIZE, GuestAddress(AVAIL + 4 + 2 * slot));
            avail = avail.wrapping_add(1);
        }
        let _ = mem.write_obj(avail, GuestAddress(AVAIL + 2));
        for &len in step.frames.iter().take(8) {
            let frame = vec![0x5au8; usize::from(len).clamp(hdr + 14, 9000)];
            // SAFETY: sends `frame` on a socket we own; a full socket just drops it.
            unsafe {
                libc::send(
                    std::os::fd::AsRawFd::as_raw_fd(&wire),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                )
            };
        }
        if q.run().is_err() {
            return; // ring declared broken: the engine stops it
        }
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
        assert!(
            used <= avail,
            "the device returned {used} chains of {avail} made available"
        );
        for k in 0..used.min(SIZE) {
            let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(k))).unwrap_or(0);
            assert!(id < u32::from(SIZE), "used id {id} is no descriptor");
        }
    }
    let _ = q.drain();
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
    assert!(used <= avail, "after the stop: {used} returned of {avail}");
});
