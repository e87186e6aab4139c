//! Request parsing and execution on mock guest memory: chains are laid out with
//! `virtio_queue::mock`, taken off the ring by the engine's split ring, then parsed and executed.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use bulkhead_common::vring::{RingAddrs, SplitRing};
use bulkhead_common::GuestMemory;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::disk::{Disk, DiskOptions};
use crate::io::sync::{Outcome, SyncIo};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const CAPACITY: u64 = 1 << 20;

fn memory() -> GuestAccess {
    GuestAccess::new(std::sync::Arc::new(
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    ))
}

fn limits() -> Limits {
    Limits {
        capacity: CAPACITY,
        read_only: false,
        max_segments: 8,
    }
}

/// Writes a header, lays the chain out in a mock queue and pops it like the engine does.
fn chain(mem: &GuestAccess, kind: u32, sector: u64, descs: &[(u64, u32, u16)]) -> Vec<Desc> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let q = MockSplitQueue::create(&**mem, GuestAddress(0), 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| {
            let last = i + 1 == descs.len();
            let flags = if last { f } else { f | NEXT };
            RawDescriptor::from(SplitDescriptor::new(a, l, flags, (i + 1) as u16))
        })
        .collect();
    q.add_desc_chains(&raw, 0).unwrap();
    let addrs = RingAddrs {
        desc: q.desc_table_addr(),
        avail: q.avail_addr(),
        used: GuestAddress(0x8000),
    };
    let mut ring = SplitRing::new(mem, 16, addrs, 0, false, true).unwrap();
    let mut out = Vec::new();
    let c = ring.pop(mem, &mut out).unwrap().unwrap();
    assert_eq!(c.error, None);
    out
}

fn parse_err(mem: &GuestAccess, descs: &[Desc], limits: &Limits) -> ParseError {
    parse(mem, descs, limits, &mut Vec::new()).unwrap_err().0
}

#[test]
fn read_request_yields_its_range_segments_and_status() {
    let mem = memory();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_IN,
        8,
        &[
            (HDR, 16, 0),
            (DATA, 2048, WRITE),
            (DATA + 4096, 2048, WRITE),
            (STATUS, 1, WRITE),
        ],
    );
    let mut segs = Vec::new();
    let r = parse(&mem, &d, &limits(), &mut segs).unwrap();
    assert_eq!(
        r.op,
        Op::Read {
            offset: 4096,
            len: 4096
        }
    );
    assert_eq!(r.status, GuestAddress(STATUS));
    assert_eq!(
        segs,
        vec![
            Segment {
                addr: GuestAddress(DATA),
                len: 2048
            },
            Segment {
                addr: GuestAddress(DATA + 4096),
                len: 2048
            }
        ]
    );
}

#[test]
fn header_split_over_descriptors_and_status_sharing_the_data_buffer_parse() {
    let mem = memory();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_IN,
        1,
        &[(HDR, 3, 0), (HDR + 3, 13, 0), (DATA, 513, WRITE)],
    );
    let mut segs = Vec::new();
    let r = parse(&mem, &d, &limits(), &mut segs).unwrap();
    assert_eq!(
        r.op,
        Op::Read {
            offset: 512,
            len: 512
        }
    );
    assert_eq!(r.status, GuestAddress(DATA + 512));
}

#[test]
fn chain_without_writable_status_has_nowhere_to_report() {
    let mem = memory();
    let d = chain(&mem, VIRTIO_BLK_T_OUT, 0, &[(HDR, 16, 0), (DATA, 512, 0)]);
    let (e, status) = parse(&mem, &d, &limits(), &mut Vec::new()).unwrap_err();
    assert_eq!((e, status), (ParseError::NoStatus, None));
    assert_eq!(e.status(), None);
    let d = chain(
        &mem,
        VIRTIO_BLK_T_FLUSH,
        0,
        &[(HDR, 16, 0), (STATUS, 0, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::NoStatus);
}

#[test]
fn short_header_returns_ioerr() {
    let mem = memory();
    let d = chain(&mem, VIRTIO_BLK_T_IN, 0, &[(HDR, 8, 0), (STATUS, 1, WRITE)]);
    let e = parse_err(&mem, &d, &limits());
    assert_eq!(e, ParseError::ShortHeader);
    assert_eq!(e.status(), Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn out_of_range_and_overflowing_sectors_return_ioerr() {
    let mem = memory();
    for sector in [
        CAPACITY / 512,
        CAPACITY / 512 - 1,
        u64::MAX,
        u64::MAX / 512 + 1,
    ] {
        let d = chain(
            &mem,
            VIRTIO_BLK_T_IN,
            sector,
            &[(HDR, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)],
        );
        assert_eq!(
            parse_err(&mem, &d, &limits()),
            ParseError::BeyondCapacity,
            "sector {sector}"
        );
    }
}

#[test]
fn data_direction_and_alignment_are_checked() {
    let mem = memory();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_OUT,
        0,
        &[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::WrongDirection);
    let d = chain(
        &mem,
        VIRTIO_BLK_T_IN,
        0,
        &[(HDR, 16, 0), (DATA, 500, WRITE), (STATUS, 1, WRITE)],
    );
    assert_eq!(
        parse_err(&mem, &d, &limits()),
        ParseError::UnalignedLength(500)
    );
    let d = chain(
        &mem,
        VIRTIO_BLK_T_FLUSH,
        0,
        &[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::UnexpectedData);
    let d = chain(
        &mem,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[(HDR, 16, 0), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::UnexpectedData);
}

#[test]
fn writes_to_a_read_only_disk_are_refused() {
    let mem = memory();
    let ro = Limits {
        read_only: true,
        ..limits()
    };
    let d = chain(
        &mem,
        VIRTIO_BLK_T_OUT,
        0,
        &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &ro), ParseError::ReadOnly);
}

#[test]
fn unknown_type_is_unsupported() {
    let mem = memory();
    let d = chain(&mem, 77, 0, &[(HDR, 16, 0), (STATUS, 1, WRITE)]);
    let e = parse_err(&mem, &d, &limits());
    assert_eq!(e, ParseError::Unsupported(77));
    assert_eq!(e.status(), Some(VIRTIO_BLK_S_UNSUPP as u8));
}

#[test]
fn too_many_data_segments_return_ioerr() {
    let mem = memory();
    let mut descs = vec![(HDR, 16, 0)];
    descs.extend((0..9).map(|i| (DATA + i * 512, 512, WRITE)));
    descs.push((STATUS, 1, WRITE));
    let d = chain(&mem, VIRTIO_BLK_T_IN, 0, &descs);
    assert_eq!(
        parse_err(&mem, &d, &limits()),
        ParseError::TooManySegments(9)
    );
}

fn segment(sector: u64, n: u32, flags: u32) -> Vec<u8> {
    let mut v = sector.to_le_bytes().to_vec();
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

#[test]
fn discard_segments_are_read_and_validated() {
    let mem = memory();
    let mut payload = segment(0, 8, 0);
    payload.extend(segment(64, 16, 0));
    mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, WRITE)],
    );
    let r = parse(&mem, &d, &limits(), &mut Vec::new()).unwrap();
    assert_eq!(
        r.op,
        Op::Discard(vec![
            Range {
                offset: 0,
                len: 4096,
                unmap: false
            },
            Range {
                offset: 32768,
                len: 8192,
                unmap: false
            }
        ])
    );
    mem.write_slice(&segment(0, 8, 1), GuestAddress(DATA))
        .unwrap();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::BadRangeFlags(1));
    let d = chain(
        &mem,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)],
    );
    let r = parse(&mem, &d, &limits(), &mut Vec::new()).unwrap();
    assert_eq!(
        r.op,
        Op::WriteZeroes(vec![Range {
            offset: 0,
            len: 4096,
            unmap: true
        }])
    );
    let d = chain(
        &mem,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, 0), (DATA, 20, 0), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::BadRanges);
    let many = (MAX_DISCARD_SEGMENTS + 1) * 16;
    let d = chain(
        &mem,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, 0), (DATA, many, 0), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::BadRanges);
    mem.write_slice(&segment(CAPACITY / 512 - 1, 2, 0), GuestAddress(DATA))
        .unwrap();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)],
    );
    assert_eq!(parse_err(&mem, &d, &limits()), ParseError::BeyondCapacity);
}

/// Parses and executes with the synchronous engine against a real temporary file.
fn execute(mem: &GuestAccess, disk: &Disk, descs: &[Desc]) -> Outcome {
    let mut segs = Vec::new();
    let req = parse(
        mem,
        descs,
        &Limits {
            capacity: disk.capacity(),
            ..limits()
        },
        &mut segs,
    )
    .unwrap();
    let serial = *b"serial-under-test\0\0\0";
    let io = SyncIo {
        disk,
        serial: &serial,
        writethrough: true,
    };
    io.execute(mem, &req, &segs, &mut Vec::new())
}

fn temp_disk() -> (tempfile_path::TempPath, Disk) {
    let path = tempfile_path::TempPath::new();
    std::fs::File::create(&path.0)
        .unwrap()
        .set_len(CAPACITY)
        .unwrap();
    let disk = Disk::open(&DiskOptions {
        path: path.0.clone(),
        read_only: false,
        direct: false,
    })
    .unwrap();
    (path, disk)
}

mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Self(std::env::temp_dir().join(format!("bulkhead-unit-{}-{n}.img", std::process::id())))
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn executed_write_then_read_moves_data_between_guest_memory_and_file() {
    let mem = memory();
    let (path, disk) = temp_disk();
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_OUT,
        3,
        &[
            (HDR, 16, 0),
            (DATA, 1000, 0),
            (DATA + 1000, 24, 0),
            (STATUS, 1, WRITE),
        ],
    );
    assert_eq!(execute(&mem, &disk, &d), Outcome::ok(0));
    let f = std::fs::read(&path.0).unwrap();
    assert_eq!(&f[3 * 512..3 * 512 + 1024], &data[..]);
    let d = chain(
        &mem,
        VIRTIO_BLK_T_IN,
        3,
        &[
            (HDR, 16, 0),
            (DATA + 0x10000, 1024, WRITE),
            (STATUS, 1, WRITE),
        ],
    );
    assert_eq!(execute(&mem, &disk, &d), Outcome::ok(1024));
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn executed_get_id_writes_at_most_the_buffer_length() {
    let mem = memory();
    let (_path, disk) = temp_disk();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[(HDR, 16, 0), (DATA, 6, WRITE), (STATUS, 1, WRITE)],
    );
    mem.write_slice(&[0xee; 8], GuestAddress(DATA)).unwrap();
    assert_eq!(execute(&mem, &disk, &d), Outcome::ok(6));
    let mut got = [0u8; 8];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got, b"serial\xee\xee");
}

#[test]
fn executed_read_of_a_truncated_image_fails_instead_of_returning_zeroes() {
    let mem = memory();
    let (path, disk) = temp_disk();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path.0)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_IN,
        16,
        &[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
    );
    assert_eq!(execute(&mem, &disk, &d), Outcome::FAILED);
}

/// Property: the same request laid out any way the virtio "any layout" rule allows (header
/// split anywhere across descriptors, data split anywhere, status sharing the last data
/// descriptor or alone) parses to the same operation, range and status byte. 2000 layouts from a
/// fixed pseudo-random sequence.
#[test]
fn any_layout_of_a_request_parses_to_the_same_request() {
    let mem = memory();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    for case in 0..2000u64 {
        let write = case % 2 == 0;
        let sectors = 1 + next(16);
        let len = sectors * 512;
        let sector = next(CAPACITY / 512 - sectors);
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        // The readable byte stream (header, then data for a write) and the writable one (data for
        // a read, then status), each cut into 1..=4 pieces at random points.
        let readable = if write { 16 + len } else { 16 };
        let writable = if write { 1 } else { len + 1 };
        let cut = |total: u64, next: &mut dyn FnMut(u64) -> u64| {
            let mut points: Vec<u64> = (0..next(4)).map(|_| 1 + next(total - 1)).collect();
            points.push(0);
            points.push(total);
            points.sort_unstable();
            points.dedup();
            points
                .windows(2)
                .map(|w| (w[0], w[1] - w[0]))
                .collect::<Vec<_>>()
        };
        // Readable bytes live at HDR.., writable at DATA..; the header is written there.
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        let mut descs = Vec::new();
        for (off, l) in cut(readable, &mut next) {
            descs.push(Desc {
                addr: GuestAddress(HDR + off),
                len: l as u32,
                writable: false,
            });
        }
        for (off, l) in cut(writable, &mut next) {
            descs.push(Desc {
                addr: GuestAddress(DATA + off),
                len: l as u32,
                writable: true,
            });
        }
        let mut segs = Vec::new();
        let r = parse(&mem, &descs, &limits(), &mut segs)
            .unwrap_or_else(|(e, _)| panic!("case {case}: {e} for {descs:?}"));
        let want = if write {
            Op::Write {
                offset: sector * 512,
                len,
            }
        } else {
            Op::Read {
                offset: sector * 512,
                len,
            }
        };
        assert_eq!(r.op, want, "case {case}");
        assert_eq!(r.status, GuestAddress(DATA + writable - 1), "case {case}");
        assert_eq!(
            segs.iter().map(|s| u64::from(s.len)).sum::<u64>(),
            len,
            "case {case}"
        );
    }
}

/// The guest rewrites the header and the descriptor table after the device checked them (a
/// time-of-check/time-of-use attack): what executes is the request that was checked, because
/// every guest field is read once into the device's own copy.
#[test]
fn rewriting_header_and_descriptors_after_the_check_changes_nothing() {
    let mem = memory();
    let (path, disk) = temp_disk();
    let data = vec![0xa5u8; 1024];
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let d = chain(
        &mem,
        VIRTIO_BLK_T_OUT,
        3,
        &[(HDR, 16, 0), (DATA, 1024, 0), (STATUS, 1, WRITE)],
    );
    let mut segs = Vec::new();
    let limits = Limits {
        capacity: disk.capacity(),
        ..limits()
    };
    let req = parse(&mem, &d, &limits, &mut segs).unwrap();
    // Now a write at the last sector, and a data descriptor spanning all of guest memory.
    let mut h = VIRTIO_BLK_T_OUT.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&(CAPACITY / 512 - 1).to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    // `chain` puts the descriptor table at guest address 0: entry 1 is the data buffer.
    let widened = RawDescriptor::from(SplitDescriptor::new(0, 0x100_0000, NEXT, 2));
    mem.write_obj(widened, GuestAddress(16)).unwrap();
    let serial = *b"serial-under-test\0\0\0";
    let io = SyncIo {
        disk: &disk,
        serial: &serial,
        writethrough: true,
    };
    assert_eq!(
        io.execute(&mem, &req, &segs, &mut Vec::new()),
        Outcome::ok(0)
    );
    let f = std::fs::read(&path.0).unwrap();
    assert_eq!(&f[3 * 512..3 * 512 + 1024], &data[..]);
    assert!(f[..3 * 512].iter().chain(&f[5 * 512..]).all(|&b| b == 0));
}
