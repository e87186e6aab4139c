//! Inflight recovery from an arbitrary (corrupt) region, followed by arbitrary tracking steps,
//! in the split and the packed layout: never an out-of-bounds access, never a panic.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Arbitrary;
use bulkhead_common::inflight::InflightRegion;
use bulkhead_common::inflight_packed::PackedInflightQueue;
use bulkhead_common::vring::packed_chain::{PackedDesc, Pos};
use bulkhead_common::vring::{Layout, PackedBase};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Step {
    Take(u16),
    Batch(Vec<u16>),
    Recover(u16),
}

#[derive(Debug, Arbitrary)]
struct Input {
    region: Vec<u8>,
    queue: u8,
    used_idx: u16,
    steps: Vec<Step>,
    packed: bool,
    /// Flags recovery finds in the descriptor ring's slots (packed).
    slot_flags: Vec<u16>,
}

const QUEUES: u16 = 2;
const SIZE: u16 = 8;

fuzz_target!(|input: Input| {
    if input.packed {
        packed(&input);
        return;
    }
    let Some(region) = handed_back(Layout::Split, &input.region) else {
        return;
    };
    let Ok(mut q) = region.queue(u16::from(input.queue % 3), SIZE) else {
        return;
    };
    let mut used = input.used_idx;
    if q.recover(used).is_err() {
        return;
    }
    for s in input.steps.iter().take(64) {
        match s {
            Step::Take(h) => {
                let _ = q.taken(*h);
            }
            Step::Batch(b) => {
                let b: Vec<u16> = b.iter().take(16).copied().collect();
                if q.batch_ready(&b).is_ok() {
                    used = used.wrapping_add(b.len() as u16);
                    let _ = q.batch_published(&b, used);
                }
            }
            Step::Recover(u) => {
                let _ = q.recover(*u);
            }
        }
    }
});

/// A region of `layout` as a frontend might hand it back: our size, arbitrary bytes.
fn handed_back(layout: Layout, content: &[u8]) -> Option<Arc<InflightRegion>> {
    let fresh = InflightRegion::create_in(layout, QUEUES, SIZE).expect("region");
    let fd = fresh.fd().try_clone_to_owned().expect("dup");
    let file = std::fs::File::from(fd.try_clone().expect("dup"));
    let size = fresh.mmap_size();
    let bytes: Vec<u8> = content
        .iter()
        .copied()
        .chain(std::iter::repeat(0))
        .take(size as usize)
        .collect();
    file.write_all_at(&bytes, 0).expect("write");
    InflightRegion::adopt_in(layout, fd, size, 0, QUEUES, SIZE)
        .ok()
        .map(Arc::new)
}

/// A region handed back with arbitrary bytes, recovered and tracked in the packed layout.
fn packed(input: &Input) {
    let Some(region) = handed_back(Layout::Packed, &input.region) else {
        return;
    };
    let Ok(mut q) = PackedInflightQueue::new(&region, u16::from(input.queue % 3), SIZE) else {
        return;
    };
    let flags = |slot: u16| input.slot_flags.get(usize::from(slot)).copied();
    let base =
        PackedBase::decode(u32::from(input.used_idx) * 0x1_0001, SIZE).unwrap_or(PackedBase::FRESH);
    let Ok(rec) = q.recover(base, flags) else {
        return;
    };
    assert!(rec.base.used.slot < SIZE && rec.base.avail.slot < SIZE);
    assert!(rec
        .owed
        .iter()
        .all(|(_, raw)| !raw.is_empty() && raw.len() <= usize::from(SIZE)));
    let mut used = rec.base.used;
    for s in input.steps.iter().take(64) {
        match s {
            Step::Take(h) => {
                let raw = vec![PackedDesc::default(); usize::from(*h % 4) + 1];
                let _ = q.taken(*h % (SIZE + 2), &raw);
            }
            Step::Batch(b) => {
                let b: Vec<u16> = b.iter().take(16).copied().collect();
                used = used.advance(b.len() as u16 % SIZE, SIZE);
                if q.batch_ready(&b, used).is_ok() {
                    let _ = q.batch_published(&b);
                }
            }
            Step::Recover(u) => {
                let at = Pos::decode(*u);
                let base = PackedBase {
                    avail: at,
                    used: at,
                };
                let _ = q.recover(base, flags);
            }
        }
    }
}
