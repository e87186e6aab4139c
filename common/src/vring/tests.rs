//! Split ring behaviour on mock guest memory laid out by `virtio_queue::mock`.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::atomic::Ordering;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::guest_access::GuestAccess;
use crate::memory::GuestMemory;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const SIZE: u16 = 16;

fn memory() -> GuestAccess {
    GuestAccess::new(std::sync::Arc::new(
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    ))
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// The mock lays its used ring over the tail of the available ring (its `end()` counts elements,
/// not bytes), so the used ring goes here instead.
const USED: GuestAddress = GuestAddress(0x8000);

fn addrs(q: &MockSplitQueue<'_, GuestMemory>) -> RingAddrs {
    RingAddrs {
        desc: q.desc_table_addr(),
        avail: q.avail_addr(),
        used: USED,
    }
}

fn ring(mem: &GuestMemory, q: &MockSplitQueue<'_, GuestMemory>, event_idx: bool) -> SplitRing {
    let addrs = addrs(q);
    SplitRing::new(mem, SIZE, addrs, 0, event_idx, true).unwrap()
}

#[test]
fn chains_pop_in_order_with_their_descriptors() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(
        &[
            desc(0x10000, 16, F_NEXT, 1),
            desc(0x20000, 512, F_WRITE, 0),
            desc(0x30000, 8, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut r = ring(&mem, &q, false);
    let mut d = Vec::new();
    let c = r.pop(&mem, &mut d).unwrap().unwrap();
    assert_eq!((c.head, c.error), (0, None));
    assert_eq!(
        d,
        vec![
            Desc {
                addr: GuestAddress(0x10000),
                len: 16,
                writable: false
            },
            Desc {
                addr: GuestAddress(0x20000),
                len: 512,
                writable: true
            }
        ]
    );
    let c = r.pop(&mem, &mut d).unwrap().unwrap();
    assert_eq!((c.head, d.len()), (2, 1));
    assert!(r.pop(&mem, &mut d).unwrap().is_none());
}

#[test]
fn descriptor_loop_is_reported_not_followed() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(
        &[desc(0x10000, 16, F_NEXT, 1), desc(0x10000, 16, F_NEXT, 0)],
        0,
    )
    .unwrap();
    let mut r = ring(&mem, &q, false);
    let mut d = Vec::new();
    let c = r.pop(&mem, &mut d).unwrap().unwrap();
    assert_eq!(c.error, Some(ChainError::TooLong));
    assert!(d.len() <= usize::from(SIZE));
}

#[test]
fn indirect_table_is_expanded_and_nesting_is_refused() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    let table = GuestAddress(0x40000);
    mem.write_obj(desc(0x10000, 16, F_NEXT, 1), table).unwrap();
    mem.write_obj(desc(0x20000, 1, F_WRITE, 0), table.unchecked_add(16))
        .unwrap();
    let nested = GuestAddress(0x50000);
    mem.write_obj(desc(0x40000, 32, F_INDIRECT, 0), nested)
        .unwrap();
    q.add_desc_chains(
        &[
            desc(table.0, 32, F_INDIRECT, 0),
            desc(nested.0, 16, F_INDIRECT, 0),
        ],
        0,
    )
    .unwrap();
    let mut r = ring(&mem, &q, false);
    let mut d = Vec::new();
    let c = r.pop(&mem, &mut d).unwrap().unwrap();
    assert_eq!(c.error, None);
    assert_eq!(d.len(), 2);
    assert!(d[1].writable);
    let c = r.pop(&mem, &mut d).unwrap().unwrap();
    assert_eq!(c.error, Some(ChainError::NestedIndirect));
}

#[test]
fn indirect_descriptor_without_the_feature_is_refused() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(&[desc(0x40000, 32, F_INDIRECT, 0)], 0)
        .unwrap();
    let mut r = SplitRing::new(&mem, SIZE, addrs(&q), 0, false, false).unwrap();
    let c = r.pop(&mem, &mut Vec::new()).unwrap().unwrap();
    assert_eq!(c.error, Some(ChainError::IndirectNotNegotiated));
}

#[test]
fn oversized_or_misaligned_indirect_tables_are_refused() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(
        &[
            desc(0x40000, 17, F_INDIRECT, 0),
            desc(0x40000, 16 * 1024, F_INDIRECT, 0),
        ],
        0,
    )
    .unwrap();
    let mut r = ring(&mem, &q, false);
    let mut d = Vec::new();
    assert_eq!(
        r.pop(&mem, &mut d).unwrap().unwrap().error,
        Some(ChainError::BadIndirectLength(17))
    );
    assert_eq!(
        r.pop(&mem, &mut d).unwrap().unwrap().error,
        Some(ChainError::TooLong)
    );
}

#[test]
fn head_beyond_queue_size_is_reported_and_cannot_be_completed() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    mem.write_obj(200u16, q.avail_addr().unchecked_add(4))
        .unwrap();
    mem.write_obj(1u16, q.avail_addr().unchecked_add(2))
        .unwrap();
    let mut r = ring(&mem, &q, false);
    let c = r.pop(&mem, &mut Vec::new()).unwrap().unwrap();
    assert_eq!(c.error, Some(ChainError::HeadOutOfRange(200)));
    assert!(!r.push_used(&mem, 200, 0).unwrap());
}

#[test]
fn avail_index_jumping_past_the_queue_size_is_a_ring_error() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    mem.write_obj(SIZE + 1, q.avail_addr().unchecked_add(2))
        .unwrap();
    let mut r = ring(&mem, &q, false);
    assert_eq!(
        r.pop(&mem, &mut Vec::new()),
        Err(RingError::AvailIndexJump(SIZE + 1))
    );
}

#[test]
fn readable_after_writable_and_unmapped_buffers_are_refused() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(
        &[
            desc(0x10000, 16, F_WRITE | F_NEXT, 1),
            desc(0x20000, 16, 0, 0),
        ],
        0,
    )
    .unwrap();
    q.add_desc_chains(&[desc(0x2000_0000, 16, 0, 0)], 2)
        .unwrap();
    q.add_desc_chains(&[desc(0xff_fff0, 32, 0, 0)], 3).unwrap();
    let mut r = ring(&mem, &q, false);
    let mut d = Vec::new();
    assert_eq!(
        r.pop(&mem, &mut d).unwrap().unwrap().error,
        Some(ChainError::ReadableAfterWritable)
    );
    assert_eq!(
        r.pop(&mem, &mut d).unwrap().unwrap().error,
        Some(ChainError::Unmapped(0x2000_0000, 16))
    );
    assert_eq!(
        r.pop(&mem, &mut d).unwrap().unwrap().error,
        Some(ChainError::Unmapped(0xff_fff0, 32))
    );
}

#[test]
fn used_elements_become_visible_only_when_published() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(&[desc(0x10000, 16, 0, 0), desc(0x10000, 16, 0, 0)], 0)
        .unwrap();
    let mut r = ring(&mem, &q, false);
    let mut d = Vec::new();
    let a = r.pop(&mem, &mut d).unwrap().unwrap();
    let b = r.pop(&mem, &mut d).unwrap().unwrap();
    r.push_used(&mem, b.head, 7).unwrap();
    r.push_used(&mem, a.head, 9).unwrap();
    let used_idx = |m: &GuestMemory| {
        m.load::<u16>(USED.unchecked_add(2), Ordering::Acquire)
            .unwrap()
    };
    assert_eq!(used_idx(&mem), 0);
    r.publish_used(&mem).unwrap();
    assert_eq!(used_idx(&mem), 2);
    let elem: u64 = mem.read_obj(USED.unchecked_add(4)).unwrap();
    assert_eq!((elem as u32, (elem >> 32) as u32), (u32::from(b.head), 7));
}

#[test]
fn signal_follows_used_event_with_event_idx() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(
        &(0..4).map(|_| desc(0x10000, 16, 0, 0)).collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let used_event = q.avail_addr().unchecked_add(4 + 2 * u64::from(SIZE));
    mem.write_obj(2u16, used_event).unwrap();
    let mut r = ring(&mem, &q, true);
    let mut d = Vec::new();
    let mut signals = Vec::new();
    for _ in 0..4 {
        let c = r.pop(&mem, &mut d).unwrap().unwrap();
        r.push_used(&mem, c.head, 0).unwrap();
        r.publish_used(&mem).unwrap();
        let s = r.needs_signal(&mem).unwrap();
        if s {
            r.signalled();
        }
        signals.push(s);
    }
    // used_event = 2: interrupt when the used index moves past 2, i.e. reaches 3.
    assert_eq!(signals, vec![false, false, true, false]);
    // Nothing new: no signal.
    assert!(!r.needs_signal(&mem).unwrap());
}

#[test]
fn an_owed_interrupt_counts_the_completions_the_guest_has_not_seen() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(
        &(0..6).map(|_| desc(0x10000, 16, 0, 0)).collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let used_event = q.avail_addr().unchecked_add(4 + 2 * u64::from(SIZE));
    mem.write_obj(1u16, used_event).unwrap();
    let mut r = ring(&mem, &q, true);
    let mut d = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let c = r.pop(&mem, &mut d).unwrap().unwrap();
        r.push_used(&mem, c.head, 0).unwrap();
        r.publish_used(&mem).unwrap();
        seen.push((r.interrupt_owed(&mem).unwrap(), r.outstanding()));
    }
    // The guest waits from completion 1 on: owed once the second completion is published,
    // with every later one counted until it is signalled; two chains are still to do.
    assert_eq!(
        seen,
        vec![(None, 5), (Some(1), 4), (Some(2), 3), (Some(3), 2)]
    );
    r.signalled();
    assert_eq!(r.interrupt_owed(&mem).unwrap(), None);
}

#[test]
fn no_interrupt_flag_silences_signals_without_event_idx() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(&[desc(0x10000, 16, 0, 0), desc(0x10000, 16, 0, 0)], 0)
        .unwrap();
    let mut r = ring(&mem, &q, false);
    let mut d = Vec::new();
    mem.write_obj(1u16, q.avail_addr()).unwrap();
    let c = r.pop(&mem, &mut d).unwrap().unwrap();
    r.push_used(&mem, c.head, 0).unwrap();
    r.publish_used(&mem).unwrap();
    assert!(!r.needs_signal(&mem).unwrap());
    mem.write_obj(0u16, q.avail_addr()).unwrap();
    let c = r.pop(&mem, &mut d).unwrap().unwrap();
    r.push_used(&mem, c.head, 0).unwrap();
    r.publish_used(&mem).unwrap();
    assert!(r.needs_signal(&mem).unwrap());
}

#[test]
fn enabling_notifications_reports_buffers_that_raced_in() {
    let mem = memory();
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    let mut r = ring(&mem, &q, true);
    assert!(!r.enable_notifications(&mem).unwrap());
    let avail_event: u16 = mem
        .read_obj(USED.unchecked_add(4 + 8 * u64::from(SIZE)))
        .unwrap();
    assert_eq!(avail_event, 0);
    q.add_desc_chains(&[desc(0x10000, 16, 0, 0)], 0).unwrap();
    assert!(r.enable_notifications(&mem).unwrap());
}

#[test]
fn ring_outside_memory_or_misaligned_is_refused() {
    let mem = memory();
    let ok = GuestAddress(0x1000);
    let bad = |desc, avail, used| {
        SplitRing::new(&mem, SIZE, RingAddrs { desc, avail, used }, 0, false, false)
    };
    assert_eq!(
        bad(GuestAddress(0x1008), ok, ok).unwrap_err(),
        RingError::BadAddress("descriptor table")
    );
    assert_eq!(
        bad(ok, GuestAddress(0x2000_0000), ok).unwrap_err(),
        RingError::BadAddress("available ring")
    );
    assert_eq!(
        bad(ok, ok, GuestAddress(0xff_fffc)).unwrap_err(),
        RingError::BadAddress("used ring")
    );
    let size = |n| {
        SplitRing::new(
            &mem,
            n,
            RingAddrs {
                desc: ok,
                avail: ok,
                used: ok,
            },
            0,
            false,
            false,
        )
    };
    assert_eq!(size(12).unwrap_err(), RingError::BadSize(12));
    assert_eq!(size(0).unwrap_err(), RingError::BadSize(0));
}

#[test]
fn chain_carrying_more_than_4_gib_is_refused() {
    // Two mapped 2 GiB buffers (the same bytes twice) add up to 4 GiB, one byte too many for
    // the 32-bit length a used element can report. The region is virtual: nothing is touched.
    let mem = GuestAccess::new(std::sync::Arc::new(
        GuestMemory::from_ranges(&[(GuestAddress(0), 0xa000_0000)]).unwrap(),
    ));
    let q = MockSplitQueue::create(&*mem, GuestAddress(0), SIZE);
    q.add_desc_chains(
        &[
            desc(0x10_0000, 0x8000_0000, F_NEXT, 1),
            desc(0x10_0000, 0x8000_0000, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut r = ring(&mem, &q, false);
    let c = r.pop(&mem, &mut Vec::new()).unwrap().unwrap();
    assert_eq!(c.error, Some(ChainError::TooManyBytes));
}
