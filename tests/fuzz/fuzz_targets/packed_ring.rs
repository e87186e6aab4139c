//! The packed ring and its inflight tracker under an arbitrary descriptor ring (any flags, ids,
//! lengths, chains, indirect tables) and arbitrary sequences of take / complete / put back /
//! publish, with a crash (the tracker's region reopened and recovered) at any point between
//! operations. Held to: no panic; a buffer id is never in hand twice; a completion is accepted
//! once; positions stay inside the ring; and recovery after a crash owes exactly the chains in
//! hand, resumes at the published used position and, when every chain taken was recorded, at
//! the available position the ring had reached.
#![no_main]

use std::collections::BTreeSet;
use std::sync::Arc;

use arbitrary::Arbitrary;
use bulkhead_common::guest_access::GuestAccess;
use bulkhead_common::inflight::InflightRegion;
use bulkhead_common::inflight_packed::PackedInflightQueue;
use bulkhead_common::vring::packed_chain;
use bulkhead_common::vring::{AvailChain, Layout, PackedBase, PackedRing, RingAddrs};
use bulkhead_common::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 64 * 1024;
const SIZE: u16 = 16;
const DESC: u64 = 0;
const DRIVER: u64 = 0x100;
const DEVICE: u64 = 0x104;

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Op {
    Take,
    /// Complete the i-th chain in hand with this length.
    Complete(u8, u16),
    /// Put the i-th chain in hand back (rings without inflight tracking, as net's receive
    /// queue does); `Take` hands held chains out first.
    PutBack(u8),
    Publish,
    Crash,
    EnableKicks,
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// The descriptor ring, driver area and the first tables.
    memory: Vec<u8>,
    /// Where the ring starts (both positions: a ring stopped with nothing in flight).
    start: u16,
    /// With an inflight tracker (crashes possible) or without (chains may be put back).
    tracked: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let bytes: Vec<u8> = input.memory.iter().copied().take(0x800).collect();
    let _ = mem.write_slice(&bytes, GuestAddress(DESC));
    let g = GuestAccess::new(Arc::new(mem.clone()));
    let addrs = RingAddrs {
        desc: GuestAddress(DESC),
        avail: GuestAddress(DRIVER),
        used: GuestAddress(DEVICE),
    };
    let at = u32::from(input.start & 0x800f);
    let base = PackedBase::decode(at | at << 16, SIZE).unwrap_or(PackedBase::FRESH);
    let Ok(mut ring) = PackedRing::new(&mem, SIZE, addrs, base, true, true) else {
        return;
    };
    let region = Arc::new(InflightRegion::create_in(Layout::Packed, 1, SIZE).expect("region"));
    let mut q = PackedInflightQueue::new(&region, 0, SIZE).expect("tracker");
    let flags = |slot| packed_chain::load_flags(&g, addrs.desc, slot);
    let rec = q.recover(base, flags).expect("fresh region");
    assert_eq!(rec.base, base);

    let mut descs = Vec::new();
    let mut in_hand: Vec<AvailChain> = Vec::new();
    let mut held: Vec<u16> = Vec::new();
    let mut batch: Vec<u16> = Vec::new();
    let tracked = input.tracked;
    // Chains taken that the ring keeps no record of (ids refused): their slots are lost.
    let mut unrecorded = false;
    for op in input.ops.iter().copied().take(512) {
        match op {
            Op::Take if !held.is_empty() => {
                let c = ring.take_held(&g, &mut descs).expect("a held chain");
                assert_eq!(c.head, held.remove(0), "held chains come back in order");
                in_hand.push(c);
            }
            Op::Take => match ring.pop(&g, &mut descs) {
                Ok(Some(c)) => {
                    if c.head >= SIZE {
                        unrecorded = true;
                        assert!(!ring.push_used(&g, c.head, 0).expect("push"));
                        continue;
                    }
                    assert!(
                        in_hand.iter().all(|h| h.head != c.head),
                        "id {} handed out twice",
                        c.head
                    );
                    if tracked {
                        let raw = ring.record(c.head).expect("record of a chain in hand");
                        q.taken(c.head, &raw.to_vec()).expect("tracker has room");
                    }
                    in_hand.push(c);
                }
                Ok(None) => {}
                Err(_) => return,
            },
            Op::Complete(i, len) => {
                if in_hand.is_empty() {
                    continue;
                }
                let c = in_hand.remove(usize::from(i) % in_hand.len());
                assert!(ring.push_used(&g, c.head, u32::from(len)).expect("push"));
                assert!(
                    !ring.push_used(&g, c.head, 0).expect("push"),
                    "completed twice"
                );
                if tracked {
                    batch.push(c.head);
                }
            }
            Op::PutBack(i) => {
                if tracked || in_hand.is_empty() {
                    continue;
                }
                let c = in_hand.remove(usize::from(i) % in_hand.len());
                ring.hold(&c);
                held.push(c.head);
            }
            Op::Publish => {
                if tracked {
                    q.batch_ready(&batch, ring.next_used_pos()).expect("ready");
                }
                ring.publish_used(&g).expect("publish");
                if tracked {
                    q.batch_published(&batch).expect("published");
                }
                batch.clear();
                let _ = ring.needs_signal(&g);
            }
            Op::EnableKicks => {
                let _ = ring.enable_notifications(&g);
            }
            Op::Crash => {
                if !tracked || !batch.is_empty() {
                    continue;
                }
                let fd = region.fd().try_clone_to_owned().expect("fd");
                let again = Arc::new(
                    InflightRegion::adopt_in(Layout::Packed, fd, region.mmap_size(), 0, 1, SIZE)
                        .expect("adopt"),
                );
                let mut q2 = PackedInflightQueue::new(&again, 0, SIZE).expect("tracker");
                let rec = q2.recover(PackedBase::FRESH, flags).expect("recover");
                let owed: BTreeSet<u16> = rec.owed.iter().map(|(id, _)| *id).collect();
                let want: BTreeSet<u16> = in_hand.iter().map(|c| c.head).collect();
                assert_eq!(owed, want, "owed after a crash");
                assert_eq!(
                    rec.base.used,
                    ring.base().used,
                    "used position after a crash"
                );
                if !unrecorded {
                    assert_eq!(rec.base.avail, ring.base().avail, "avail position");
                }
                for (id, raw) in &rec.owed {
                    assert_eq!(ring.record(*id), Some(raw.as_slice()), "copy of chain {id}");
                }
            }
        }
        let b = ring.base();
        assert!(b.used.slot < SIZE && b.avail.slot < SIZE);
    }
    // Stop: held chains are put back or used empty, the rest completed; then, unless a chain
    // went unrecorded, the two positions meet.
    for c in in_hand.drain(..) {
        let _ = ring.push_used(&g, c.head, 0);
    }
    let _ = ring.release_held(&g);
    if ring.publish_used(&g).is_ok() && !unrecorded {
        let b = ring.base();
        assert_eq!(b.used, b.avail, "every chain taken was returned");
    }
});
