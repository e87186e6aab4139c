//! A descriptor table, available ring and request bytes all chosen by the fuzzer: the split ring
//! takes chains from it and vhost-user-blk parses and executes them (on a null disk).
#![no_main]

use arbitrary::Arbitrary;
use bulkhead_common::vring::{RingAddrs, SplitRing};
use bulkhead_common::guest_access::GuestAccess;
use bulkhead_common::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vhost_user_blk::disk::Disk;
use vhost_user_blk::io::sync::SyncIo;
use vhost_user_blk::request::{parse, Limits};
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Guest memory contents (the first 64 KiB).
    memory: Vec<u8>,
    avail_idx: u16,
    event_idx: bool,
    read_only: bool,
}

const MEM: u64 = 64 * 1024;
const SIZE: u16 = 16;

fuzz_target!(|input: Input| {
    let mem = GuestAccess::new(std::sync::Arc::new(
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory"),
    ));
    let bytes: Vec<u8> = input.memory.iter().copied().take(MEM as usize).collect();
    let _ = mem.write_slice(&bytes, GuestAddress(0));
    // Descriptor table at 0 (16 × 16 bytes), available ring at 0x100, used ring at 0x200, and
    // request buffers anywhere: all within the first kilobyte the fuzzer writes.
    let _ = mem.write_obj(input.avail_idx, GuestAddress(0x102));
    let addrs = RingAddrs { desc: GuestAddress(0), avail: GuestAddress(0x100), used: GuestAddress(0x200) };
    let Ok(mut ring) = SplitRing::new(&mem, SIZE, addrs, 0, input.event_idx, true) else { return };
    let disk = Disk::null(1 << 20, input.read_only).expect("null disk");
    let limits = Limits { capacity: disk.capacity(), read_only: input.read_only, max_segments: 126 };
    let serial = [b'x'; 20];
    let io = SyncIo { disk: &disk, serial: &serial, writethrough: false };
    let mut descs = Vec::new();
    let mut segs = Vec::new();
    let mut iovs = Vec::new();
    for _ in 0..32 {
        let Ok(Some(chain)) = ring.pop(&mem, &mut descs) else { break };
        if chain.error.is_none() {
            if let Ok(req) = parse(&mem, &descs, &limits, &mut segs) {
                let _ = io.execute(&mem, &req, &segs, &mut iovs);
            }
        }
        let _ = ring.push_used(&mem, chain.head, 1);
    }
    let _ = ring.publish_used(&mem);
    let _ = ring.needs_signal(&mem);
    let _ = ring.enable_notifications(&mem);
});
