//! Inflight recovery from an arbitrary (corrupt) region, followed by arbitrary tracking steps:
//! never an out-of-bounds access, never a panic.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Arbitrary;
use bulkhead_common::inflight::InflightRegion;
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
}

const QUEUES: u16 = 2;
const SIZE: u16 = 8;

fuzz_target!(|input: Input| {
    let fresh = InflightRegion::create(QUEUES, SIZE).expect("region");
    let fd = fresh.fd().try_clone_to_owned().expect("dup");
    let file = std::fs::File::from(fd.try_clone().expect("dup"));
    let len = fresh.mmap_size() as usize;
    let bytes: Vec<u8> = input.region.iter().copied().chain(std::iter::repeat(0)).take(len).collect();
    file.write_all_at(&bytes, 0).expect("write");
    let Ok(region) = InflightRegion::adopt(fd, fresh.mmap_size(), 0, QUEUES, SIZE) else { return };
    let region = Arc::new(region);
    let Ok(mut q) = region.queue(u16::from(input.queue % 3), SIZE) else { return };
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
