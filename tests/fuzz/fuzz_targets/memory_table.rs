//! The memory table under arbitrary add / remove / replace sequences with arbitrary region
//! descriptions and backing files of arbitrary sizes, then reads through every snapshot.
#![no_main]

use std::os::fd::OwnedFd;

use arbitrary::Arbitrary;
use bulkhead_common::memory::MemoryTable;
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, Arbitrary)]
struct Region {
    gpa: u64,
    size: u32,
    uva: u64,
    offset: u32,
    file_pages: u8,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Add(Region),
    Remove(Region),
    Replace(Vec<Region>),
    Read { addr: u64, vmm: u64 },
}

fn file(pages: u8) -> OwnedFd {
    let fd = bulkhead_common::memfd::create("fuzz").expect("memfd");
    std::fs::File::from(fd.try_clone().expect("dup")).set_len(u64::from(pages) * 4096).expect("set_len");
    fd
}

fn desc(r: &Region) -> VhostUserMemoryRegion {
    // Keep mappings small: the size is at most 4 GiB, files at most 1 MiB.
    VhostUserMemoryRegion::new(r.gpa, u64::from(r.size), r.uva, u64::from(r.offset))
}

fuzz_target!(|ops: Vec<Op>| {
    let mut t = MemoryTable::new();
    for op in ops.iter().take(64) {
        match op {
            Op::Add(r) => {
                let _ = t.add(&desc(r), file(r.file_pages));
            }
            Op::Remove(r) => {
                let _ = t.remove(&desc(r));
            }
            Op::Replace(rs) => {
                let rs: Vec<&Region> = rs.iter().take(10).collect();
                let descs: Vec<VhostUserMemoryRegion> = rs.iter().map(|r| desc(r)).collect();
                let fds = rs.iter().map(|r| file(r.file_pages)).collect();
                let _ = t.replace_all(&descs, fds);
            }
            Op::Read { addr, vmm } => {
                if let Ok(mem) = t.snapshot() {
                    let _ = mem.read_obj::<u64>(GuestAddress(*addr));
                    let _ = mem.write_obj(0u8, GuestAddress(*addr));
                    if let Some(gpa) = t.vmm_to_guest(*vmm) {
                        let _ = mem.read_obj::<u8>(gpa);
                    }
                }
            }
        }
    }
});
