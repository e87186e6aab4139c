//! Packed ring behaviour against a small in-test driver that lays descriptors out as Linux's
//! virtio_ring does (chain written first, first descriptor's flags last).
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::packed_chain::{self, PackedDesc, Pos, F_AVAIL, F_INDIRECT, F_NEXT, F_USED, F_WRITE};
use super::*;
use crate::guest_access::GuestAccess;
use crate::inflight::InflightRegion;
use crate::inflight_packed::PackedInflightQueue;
use crate::memory::GuestMemory;

const DESC: GuestAddress = GuestAddress(0x10_0000);
const DRIVER: GuestAddress = GuestAddress(0x20_0000);
const DEVICE: GuestAddress = GuestAddress(0x20_0100);
const TABLES: u64 = 0x30_0000;
const DATA: u64 = 0x40_0000;

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn addrs() -> RingAddrs {
    RingAddrs {
        desc: DESC,
        avail: DRIVER,
        used: DEVICE,
    }
}

/// The driver's side of a packed ring.
struct Driver {
    size: u16,
    avail: Pos,
    used: Pos,
    slots_of: HashMap<u16, u16>,
}

#[derive(Clone, Copy)]
struct B(u64, u32, bool);

impl Driver {
    fn new(size: u16) -> Self {
        Self {
            size,
            avail: PackedBase::FRESH.avail,
            used: PackedBase::FRESH.used,
            slots_of: HashMap::new(),
        }
    }

    fn avail_flags(&self, wrap: bool) -> u16 {
        if wrap {
            F_AVAIL
        } else {
            F_USED
        }
    }

    /// Writes raw descriptors as one chain (flags as given plus the lap bits), first flags last.
    fn add_raw(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)], id: u16) {
        let start = self.avail;
        let mut pos = start;
        let mut first_flags = 0;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let flags = flags | self.avail_flags(pos.wrap);
            let at = packed_chain::slot_addr(DESC, pos.slot);
            mem.write_obj(
                PackedDesc {
                    addr,
                    len,
                    id,
                    flags: if i == 0 { 0 } else { flags },
                },
                at,
            )
            .unwrap();
            if i == 0 {
                first_flags = flags;
                // The first slot stays unavailable until the rest is written.
                let stale = if start.wrap { F_USED | F_AVAIL } else { 0 };
                mem.write_obj(stale, GuestAddress(at.0 + 14)).unwrap();
            }
            pos = pos.advance(1, self.size);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(
            first_flags,
            GuestAddress(packed_chain::slot_addr(DESC, start.slot).0 + 14),
        )
        .unwrap();
        self.slots_of.insert(id, descs.len() as u16);
        self.avail = pos;
    }

    fn add(&mut self, mem: &GuestMemory, bufs: &[B], id: u16) {
        let n = bufs.len();
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut f = if b.2 { F_WRITE } else { 0 };
                if i + 1 < n {
                    f |= F_NEXT;
                }
                (b.0, b.1, f)
            })
            .collect();
        self.add_raw(mem, &descs, id);
    }

    fn add_indirect(&mut self, mem: &GuestMemory, bufs: &[B], id: u16) {
        let table = TABLES + u64::from(id) * 0x1000;
        for (i, b) in bufs.iter().enumerate() {
            let d = PackedDesc {
                addr: b.0,
                len: b.1,
                id: 0,
                flags: if b.2 { F_WRITE } else { 0 },
            };
            mem.write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        self.add_raw(mem, &[(table, 16 * bufs.len() as u32, F_INDIRECT)], id);
    }

    /// The next used descriptor, if the device published one.
    fn poll(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let d: PackedDesc = mem
            .read_obj(packed_chain::slot_addr(DESC, self.used.slot))
            .unwrap();
        let w = self.used.wrap;
        if (d.flags & F_AVAIL != 0) != w || (d.flags & F_USED != 0) != w {
            return None;
        }
        let slots = self.slots_of.remove(&d.id).expect("id not in flight");
        self.used = self.used.advance(slots, self.size);
        Some((d.id, d.len))
    }

    /// Asks for an interrupt at the next used slot (EVENT_IDX) or sets plain flags.
    fn driver_event(&self, mem: &GuestMemory, off_wrap: u16, flags: u16) {
        mem.write_obj(off_wrap, DRIVER).unwrap();
        mem.write_obj(flags, GuestAddress(DRIVER.0 + 2)).unwrap();
    }
}

fn access(mem: &GuestMemory) -> GuestAccess {
    GuestAccess::new(Arc::new(mem.clone()))
}

fn ring(mem: &GuestMemory, size: u16, event_idx: bool) -> PackedRing {
    PackedRing::new(mem, size, addrs(), PackedBase::FRESH, event_idx, true).unwrap()
}

fn complete(r: &mut PackedRing, g: &GuestAccess, id: u16, len: u32) {
    assert!(r.push_used(g, id, len).unwrap());
}

#[test]
fn chains_are_taken_in_ring_order_and_used_out_of_order_skipping_their_slots() {
    let mem = memory();
    let g = access(&mem);
    let mut d = Driver::new(8);
    d.add(&mem, &[B(DATA, 16, false), B(DATA + 0x1000, 512, true)], 5);
    d.add(&mem, &[B(DATA + 0x2000, 64, false)], 3);
    d.add_indirect(
        &mem,
        &[B(DATA + 0x3000, 8, false), B(DATA + 0x4000, 1, true)],
        6,
    );
    let mut r = ring(&mem, 8, false);
    let mut out = Vec::new();
    let a = r.pop(&g, &mut out).unwrap().unwrap();
    assert_eq!((a.head, a.error, out.len()), (5, None, 2));
    assert!(out[1].writable && !out[0].writable);
    let b = r.pop(&g, &mut out).unwrap().unwrap();
    assert_eq!((b.head, out.len()), (3, 1));
    let c = r.pop(&g, &mut out).unwrap().unwrap();
    assert_eq!((c.head, c.error, out.len()), (6, None, 2));
    assert_eq!(out[0].addr, GuestAddress(DATA + 0x3000));
    assert!(r.pop(&g, &mut out).unwrap().is_none());

    complete(&mut r, &g, 3, 0);
    complete(&mut r, &g, 6, 1);
    // Written, not yet visible.
    assert_eq!(d.poll(&mem), None);
    r.publish_used(&g).unwrap();
    assert_eq!(d.poll(&mem), Some((3, 0)));
    assert_eq!(d.poll(&mem), Some((6, 1)));
    assert_eq!(d.poll(&mem), None);
    complete(&mut r, &g, 5, 512);
    r.publish_used(&g).unwrap();
    assert_eq!(d.poll(&mem), Some((5, 512)));
    // Four slots were used: 1 + 1 + 2.
    assert_eq!(
        r.base().used,
        Pos {
            slot: 4,
            wrap: true
        }
    );
    assert_eq!(
        r.base().avail,
        Pos {
            slot: 4,
            wrap: true
        }
    );
}

#[test]
fn rings_of_every_size_wrap_around_many_times() {
    let mut sizes: Vec<u16> = (1..=17).collect();
    sizes.extend([31, 64, 100, 256]);
    for size in sizes {
        let mem = memory();
        let g = access(&mem);
        let mut d = Driver::new(size);
        let mut r = ring(&mem, size, true);
        let mut out = Vec::new();
        let mut free = size;
        let mut next_id = 0u16;
        let mut in_hands = Vec::new();
        for round in 0..(4 * u32::from(size) + 7) {
            // Chains of one to three slots, as many as fit.
            let want = (round % 3) as u16 + 1;
            if want <= free {
                let bufs: Vec<B> = (0..want)
                    .map(|i| B(DATA + u64::from(i) * 64, 64, i + 1 == want))
                    .collect();
                let id = next_id % size;
                if !d.slots_of.contains_key(&id) {
                    d.add(&mem, &bufs, id);
                    free -= want;
                    next_id = next_id.wrapping_add(1);
                }
            }
            while let Some(c) = r.pop(&g, &mut out).unwrap() {
                assert_eq!(c.error, None, "size {size} round {round}");
                in_hands.push(c.head);
            }
            // Complete newest first when several are in hand (out of order).
            if let Some(id) = in_hands.pop() {
                let slots = d.slots_of[&id];
                complete(&mut r, &g, id, 7);
                r.publish_used(&g).unwrap();
                let (got, len) = d.poll(&mem).unwrap();
                assert_eq!((got, len), (id, 7), "size {size} round {round}");
                free += slots;
            }
        }
        // Whatever is left completes too, and the two sides agree where they stand.
        while let Some(id) = in_hands.pop() {
            complete(&mut r, &g, id, 0);
        }
        r.publish_used(&g).unwrap();
        while d.poll(&mem).is_some() {}
        assert_eq!(r.base().used, d.used, "size {size}");
        assert_eq!(r.base().avail, d.avail, "size {size}");
    }
}

#[test]
fn base_round_trips_through_the_vhost_user_encoding() {
    let b = PackedBase {
        avail: Pos {
            slot: 0x1234,
            wrap: false,
        },
        used: Pos {
            slot: 0x7fff,
            wrap: true,
        },
    };
    assert_eq!(PackedBase::decode(b.encode(), 0x8000), Some(b));
    assert_eq!(PackedBase::FRESH.encode(), 0x8000_8000);
    // A slot beyond the queue is refused.
    assert_eq!(PackedBase::decode(0x8000_8010, 16), None);
    let mem = memory();
    assert_eq!(
        Ring::new(Layout::Packed, &mem, 16, addrs(), 0x8000_8010, false, true).err(),
        Some(RingError::BadBase)
    );
}

#[test]
fn non_power_of_two_sizes_are_accepted_and_zero_or_oversized_refused() {
    let mem = memory();
    for size in [1, 3, 100, 32768] {
        assert!(PackedRing::new(&mem, size, addrs(), PackedBase::FRESH, false, true).is_ok());
    }
    for size in [0, 32769] {
        assert_eq!(
            PackedRing::new(&mem, size, addrs(), PackedBase::FRESH, false, true).err(),
            Some(RingError::BadSize(size))
        );
    }
    let mut bad = addrs();
    bad.used = GuestAddress(0x20_0102);
    assert!(matches!(
        PackedRing::new(&mem, 8, bad, PackedBase::FRESH, false, true),
        Err(RingError::BadAddress(_))
    ));
    bad = addrs();
    bad.desc = GuestAddress(0xff_fff0);
    assert!(matches!(
        PackedRing::new(&mem, 8, bad, PackedBase::FRESH, false, true),
        Err(RingError::BadAddress(_))
    ));
}

fn pop_error(mem: &GuestMemory, r: &mut PackedRing) -> (u16, Option<ChainError>) {
    let g = access(mem);
    let mut out = Vec::new();
    let c = r.pop(&g, &mut out).unwrap().unwrap();
    (c.head, c.error)
}

#[test]
fn a_chain_running_into_a_slot_not_made_available_is_refused() {
    let mem = memory();
    let mut d = Driver::new(8);
    d.add_raw(&mem, &[(DATA, 16, F_NEXT)], 1);
    let mut r = ring(&mem, 8, false);
    assert_eq!(pop_error(&mem, &mut r), (1, Some(ChainError::NotAvailable)));
}

#[test]
fn a_chain_as_long_as_the_ring_with_next_everywhere_is_refused() {
    let mem = memory();
    let mut d = Driver::new(4);
    d.add_raw(
        &mem,
        &[
            (DATA, 1, F_NEXT),
            (DATA, 1, F_NEXT),
            (DATA, 1, F_NEXT),
            (DATA, 1, F_NEXT),
        ],
        2,
    );
    let mut r = ring(&mem, 4, false);
    assert_eq!(pop_error(&mem, &mut r), (2, Some(ChainError::TooLong)));
}

#[test]
fn hostile_descriptors_are_refused_like_split_ones() {
    type RawChain = Vec<(u64, u32, u16)>;
    let cases: Vec<(RawChain, ChainError)> = vec![
        (
            vec![(0xff_fff0, 0x100, 0)],
            ChainError::Unmapped(0xff_fff0, 0x100),
        ),
        (
            vec![(DATA, 1, F_WRITE | F_NEXT), (DATA, 1, 0)],
            ChainError::ReadableAfterWritable,
        ),
        (
            vec![(TABLES, 16, F_INDIRECT | F_NEXT), (DATA, 1, 0)],
            ChainError::IndirectNotAlone,
        ),
        (
            vec![(TABLES, 17, F_INDIRECT)],
            ChainError::BadIndirectLength(17),
        ),
        (
            vec![(TABLES, 0, F_INDIRECT)],
            ChainError::BadIndirectLength(0),
        ),
        (vec![(TABLES, 16 * 9, F_INDIRECT)], ChainError::TooLong),
    ];
    for (descs, want) in cases {
        let mem = memory();
        let mut d = Driver::new(8);
        d.add_raw(&mem, &descs, 4);
        let mut r = ring(&mem, 8, false);
        assert_eq!(pop_error(&mem, &mut r), (4, Some(want)));
        // The guest still gets the chain back, once.
        let g = access(&mem);
        complete(&mut r, &g, 4, 0);
        r.publish_used(&g).unwrap();
        assert_eq!(d.poll(&mem), Some((4, 0)));
    }
    // Nested indirect, and indirect without the feature.
    let mem = memory();
    mem.write_obj(
        PackedDesc {
            addr: TABLES,
            len: 16,
            id: 0,
            flags: F_INDIRECT,
        },
        GuestAddress(TABLES + 0x800),
    )
    .unwrap();
    let mut d = Driver::new(8);
    d.add_raw(&mem, &[(TABLES + 0x800, 16, F_INDIRECT)], 0);
    d.add_raw(&mem, &[(TABLES + 0x800, 16, F_INDIRECT)], 1);
    let mut r = ring(&mem, 8, false);
    assert_eq!(
        pop_error(&mem, &mut r),
        (0, Some(ChainError::NestedIndirect))
    );
    let mut r = PackedRing::new(&mem, 8, addrs(), PackedBase::FRESH, false, false).unwrap();
    assert_eq!(
        pop_error(&mem, &mut r),
        (0, Some(ChainError::IndirectNotNegotiated))
    );
}

#[test]
fn a_buffer_id_already_in_hand_is_refused_and_completing_it_changes_nothing() {
    let mem = memory();
    let g = access(&mem);
    let mut d = Driver::new(8);
    d.add(&mem, &[B(DATA, 8, true)], 2);
    d.slots_of.remove(&2);
    d.add(&mem, &[B(DATA, 8, true), B(DATA + 8, 8, true)], 2);
    let mut r = ring(&mem, 8, false);
    assert_eq!(pop_error(&mem, &mut r), (2, None));
    let (head, err) = pop_error(&mem, &mut r);
    assert_eq!(err, Some(ChainError::IdInUse(2)));
    assert!(!r.push_used(&g, head, 0).unwrap());
    // The first chain completes normally, skipping its one slot.
    complete(&mut r, &g, 2, 8);
    assert!(!r.push_used(&g, 2, 8).unwrap(), "completed twice");
    r.publish_used(&g).unwrap();
    assert_eq!(r.base().used.slot, 1);
}

#[test]
fn a_buffer_id_beyond_the_queue_size_is_refused() {
    let mem = memory();
    let g = access(&mem);
    let mut d = Driver::new(8);
    d.add(&mem, &[B(DATA, 8, true)], 9);
    let mut r = ring(&mem, 8, false);
    let (head, err) = pop_error(&mem, &mut r);
    assert_eq!(err, Some(ChainError::HeadOutOfRange(9)));
    assert!(!r.push_used(&g, head, 0).unwrap());
}

#[test]
fn interrupts_follow_the_driver_event_suppression_structure() {
    let mem = memory();
    let g = access(&mem);
    let mut d = Driver::new(8);
    for id in 0..4 {
        d.add(&mem, &[B(DATA, 8, true)], id);
    }
    // No EVENT_IDX: ENABLE interrupts, DISABLE does not.
    let mut r = ring(&mem, 8, false);
    let mut out = Vec::new();
    for _ in 0..4 {
        r.pop(&g, &mut out).unwrap().unwrap();
    }
    d.driver_event(&mem, 0, 1);
    complete(&mut r, &g, 0, 1);
    r.publish_used(&g).unwrap();
    assert!(!r.needs_signal(&g).unwrap());
    d.driver_event(&mem, 0, 0);
    complete(&mut r, &g, 1, 1);
    r.publish_used(&g).unwrap();
    assert!(r.needs_signal(&g).unwrap());
    r.signalled();
    assert!(!r.needs_signal(&g).unwrap(), "nothing new since");

    // EVENT_IDX: interrupt only once the used position passes the event offset.
    let mem = memory();
    let g = access(&mem);
    let mut d = Driver::new(8);
    for id in 0..4 {
        d.add(&mem, &[B(DATA, 8, true)], id);
    }
    let mut r = ring(&mem, 8, true);
    for _ in 0..4 {
        r.pop(&g, &mut out).unwrap().unwrap();
    }
    // Wake me when slot 2 is used (the third completion), in the first lap.
    d.driver_event(&mem, 2 | 0x8000, 2);
    for id in 0..2 {
        complete(&mut r, &g, id, 1);
        r.publish_used(&g).unwrap();
        assert!(!r.needs_signal(&g).unwrap(), "completion {id}");
    }
    assert!(r.interrupt_due(&g).unwrap().is_none());
    complete(&mut r, &g, 2, 1);
    // The guest has three completions it was not interrupted for.
    assert_eq!(r.interrupt_due(&g).unwrap(), Some(3));
    r.publish_used(&g).unwrap();
    assert!(r.needs_signal(&g).unwrap());
    r.signalled();
    // An event in the other lap is far away.
    d.driver_event(&mem, 2, 2);
    complete(&mut r, &g, 3, 1);
    r.publish_used(&g).unwrap();
    assert!(!r.needs_signal(&g).unwrap());
}

#[test]
fn kicks_are_asked_for_at_the_next_available_slot() {
    let mem = memory();
    let g = access(&mem);
    let mut d = Driver::new(4);
    let mut r = ring(&mem, 4, true);
    let mut out = Vec::new();
    for id in 0..3 {
        d.add(&mem, &[B(DATA, 8, false)], id);
        r.pop(&g, &mut out).unwrap().unwrap();
    }
    assert!(!r.enable_notifications(&g).unwrap());
    let event: u32 = mem.read_obj(DEVICE).unwrap();
    assert_eq!(event, 3 | 0x8000 | (2 << 16));
    // A buffer arriving after that is reported, so it is not missed.
    d.add(&mem, &[B(DATA, 8, false)], 3);
    assert!(r.enable_notifications(&g).unwrap());
    r.pop(&g, &mut out).unwrap().unwrap();
    // Now past the end of the ring: the event is in the next lap.
    assert!(!r.enable_notifications(&g).unwrap());
    let event: u32 = mem.read_obj(DEVICE).unwrap();
    assert_eq!(event, 2 << 16);
    r.suppress_notifications(&g).unwrap();
    let event: u32 = mem.read_obj(DEVICE).unwrap();
    assert_eq!(event >> 16, 1);
}

#[test]
fn held_chains_at_the_tail_go_back_to_the_ring_and_others_are_used_empty() {
    let mem = memory();
    let g = access(&mem);
    let mut d = Driver::new(8);
    d.add(&mem, &[B(DATA, 8, true), B(DATA + 8, 8, true)], 0);
    d.add(&mem, &[B(DATA + 16, 8, true)], 1);
    let mut r = ring(&mem, 8, false);
    let mut out = Vec::new();
    let a = r.pop(&g, &mut out).unwrap().unwrap();
    let b = r.pop(&g, &mut out).unwrap().unwrap();
    r.hold(&a);
    r.hold(&b);
    // Taken again from the copy, with the same buffers.
    let again = r.take_held(&g, &mut out).unwrap();
    assert_eq!((again.head, out.len()), (0, 2));
    let again_b = r.take_held(&g, &mut out).unwrap();
    assert_eq!((again_b.head, out.len()), (1, 1));
    r.hold(&again);
    r.hold(&again_b);
    r.release_held(&g).unwrap();
    assert_eq!(r.base().avail, PackedBase::FRESH.avail);
    // The next start takes them again from the ring.
    let mut r2 = PackedRing::new(&mem, 8, addrs(), r.base(), false, true).unwrap();
    // A held chain that is not at the tail (another was taken after it) is used empty.
    let a = r2.pop(&g, &mut out).unwrap().unwrap();
    let b = r2.pop(&g, &mut out).unwrap().unwrap();
    r2.hold(&a);
    complete(&mut r2, &g, b.head, 3);
    r2.release_held(&g).unwrap();
    assert_eq!(d.poll(&mem), Some((1, 3)));
    assert_eq!(d.poll(&mem), Some((0, 0)));
}

/// Reads slot flags for inflight recovery.
fn flags_of(mem: &GuestMemory) -> impl Fn(u16) -> Option<u16> + '_ {
    move |slot| {
        mem.read_obj(GuestAddress(packed_chain::slot_addr(DESC, slot).0 + 14))
            .ok()
    }
}

fn region() -> Arc<InflightRegion> {
    Arc::new(InflightRegion::create_in(Layout::Packed, 1, 8).unwrap())
}

fn reopen(r: &Arc<InflightRegion>) -> PackedInflightQueue {
    let fd = r.fd().try_clone_to_owned().unwrap();
    let again = InflightRegion::adopt_in(Layout::Packed, fd, r.mmap_size(), 0, 1, 8).unwrap();
    PackedInflightQueue::new(&Arc::new(again), 0, 8).unwrap()
}

/// Takes a chain from `r` and records it in `q`.
fn take(r: &mut PackedRing, q: &mut PackedInflightQueue, g: &GuestAccess) -> u16 {
    let mut out = Vec::new();
    let c = r.pop(g, &mut out).unwrap().unwrap();
    q.taken(c.head, r.record(c.head).unwrap()).unwrap();
    c.head
}

/// Returns `batch` through all four steps, or stops after step `stop` (a crash).
fn give_back(
    r: &mut PackedRing,
    q: &mut PackedInflightQueue,
    g: &GuestAccess,
    batch: &[u16],
    stop: u8,
) {
    for &id in batch {
        complete(r, g, id, 1);
    }
    q.batch_ready(batch, r.next_used_pos()).unwrap();
    if stop == 1 {
        return;
    }
    r.publish_used(g).unwrap();
    if stop == 2 {
        return;
    }
    q.batch_published(batch).unwrap();
}

#[test]
fn a_fresh_region_starts_where_the_frontend_says() {
    let mem = memory();
    let r = region();
    let mut q = PackedInflightQueue::new(&r, 0, 8).unwrap();
    let base = PackedBase {
        avail: Pos {
            slot: 3,
            wrap: false,
        },
        used: Pos {
            slot: 3,
            wrap: false,
        },
    };
    let rec = q.recover(base, flags_of(&mem)).unwrap();
    assert_eq!(rec.base, base);
    assert!(rec.owed.is_empty());
    assert!(q.recover(base, flags_of(&mem)).unwrap().owed.is_empty());
}

#[test]
fn a_crash_with_chains_in_hand_resubmits_their_copies_in_taking_order() {
    let mem = memory();
    let g = access(&mem);
    let region = region();
    let mut q = PackedInflightQueue::new(&region, 0, 8).unwrap();
    q.recover(PackedBase::FRESH, flags_of(&mem)).unwrap();
    let mut d = Driver::new(8);
    d.add(&mem, &[B(DATA, 8, false), B(DATA + 0x100, 512, true)], 6);
    d.add(&mem, &[B(DATA + 0x200, 8, false)], 1);
    d.add_indirect(
        &mem,
        &[B(DATA + 0x300, 8, false), B(DATA + 0x400, 4, true)],
        4,
    );
    let mut r = ring(&mem, 8, false);
    for _ in 0..3 {
        take(&mut r, &mut q, &g);
    }
    give_back(&mut r, &mut q, &g, &[1], 3);
    // The used descriptor overwrote chain 6's first slot: only the copy knows it.
    let rec = reopen(&region)
        .recover(PackedBase::FRESH, flags_of(&mem))
        .unwrap();
    assert_eq!(rec.owed.len(), 2);
    assert_eq!(rec.owed[0].0, 6);
    assert_eq!(rec.owed[0].1.len(), 2);
    assert_eq!(rec.owed[0].1[1].addr, DATA + 0x100);
    assert_eq!(rec.owed[1].0, 4);
    assert_eq!(rec.owed[1].1[0].flags & F_INDIRECT, F_INDIRECT);
    // Used one slot; four slots (2 + 1 + 1) were taken.
    assert_eq!(
        rec.base.used,
        Pos {
            slot: 1,
            wrap: true
        }
    );
    assert_eq!(
        rec.base.avail,
        Pos {
            slot: 4,
            wrap: true
        }
    );
    // Resubmitted chains read back the same buffers and complete where the guest expects.
    let mut r2 = PackedRing::new(&mem, 8, addrs(), rec.base, false, true).unwrap();
    for (id, raw) in &rec.owed {
        r2.restore_in_hands(*id, raw).unwrap();
    }
    let mut out = Vec::new();
    let c = r2.chain_at(&g, 4, &mut out);
    assert_eq!((c.error, out.len()), (None, 2));
    assert!(d.poll(&mem).is_some());
    for id in [4, 6] {
        complete(&mut r2, &g, id, 1);
    }
    r2.publish_used(&g).unwrap();
    assert_eq!(d.poll(&mem), Some((4, 1)));
    assert_eq!(d.poll(&mem), Some((6, 1)));
}

#[test]
fn a_crash_before_a_batch_was_published_owes_the_batch_again() {
    for stop in [1u8, 2] {
        let mem = memory();
        let g = access(&mem);
        let region = region();
        let mut q = PackedInflightQueue::new(&region, 0, 8).unwrap();
        q.recover(PackedBase::FRESH, flags_of(&mem)).unwrap();
        let mut d = Driver::new(8);
        for id in 0..3 {
            d.add(&mem, &[B(DATA, 8, true)], id);
        }
        let mut r = ring(&mem, 8, false);
        for _ in 0..3 {
            take(&mut r, &mut q, &g);
        }
        give_back(&mut r, &mut q, &g, &[2, 0], stop);
        let rec = reopen(&region)
            .recover(PackedBase::FRESH, flags_of(&mem))
            .unwrap();
        if stop == 1 {
            // Flags never stored: the guest saw nothing, all three are owed.
            let ids: Vec<u16> = rec.owed.iter().map(|(id, _)| *id).collect();
            assert_eq!(ids, vec![0, 1, 2]);
            assert_eq!(rec.base.used, PackedBase::FRESH.used);
        } else {
            // Published, crash before the flags were cleared: only chain 1 is owed.
            let ids: Vec<u16> = rec.owed.iter().map(|(id, _)| *id).collect();
            assert_eq!(ids, vec![1]);
            assert_eq!(
                rec.base.used,
                Pos {
                    slot: 2,
                    wrap: true
                }
            );
        }
        assert_eq!(
            rec.base.avail,
            Pos {
                slot: 3,
                wrap: true
            }
        );
    }
}

#[test]
fn a_corrupt_region_is_refused_without_panicking() {
    let mem = memory();
    let region = region();
    let mut q = PackedInflightQueue::new(&region, 0, 8).unwrap();
    q.recover(PackedBase::FRESH, flags_of(&mem)).unwrap();
    let g = access(&mem);
    let mut d = Driver::new(8);
    d.add(&mem, &[B(DATA, 8, true)], 0);
    let mut r = ring(&mem, 8, false);
    take(&mut r, &mut q, &g);
    // Scribble over the header and entries as a hostile frontend might.
    let fd = region.fd().try_clone_to_owned().unwrap();
    let file = std::fs::File::from(fd);
    use std::os::unix::fs::FileExt;
    for (off, bytes) in [
        (16u64, vec![0xffu8, 0x7f]),
        (20, vec![7]),
        (32 + 6, vec![0xff, 0xff]),
        (32, vec![9]),
        (12, vec![3, 0]),
        (32 + 2, vec![0, 0]),
    ] {
        file.write_all_at(&bytes, off).unwrap();
        let _ = reopen(&region).recover(PackedBase::FRESH, flags_of(&mem));
    }
    // A split region is not a packed one.
    let split = Arc::new(InflightRegion::create(1, 8).unwrap());
    assert!(PackedInflightQueue::new(&split, 0, 8).is_err());
}
