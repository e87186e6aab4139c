//! Parsing a virtio-blk request out of a descriptor chain: pure code over the descriptors already
//! copied from guest memory, separate from executing it.
//!
//! The chain is treated as a byte stream (any layout, as VIRTIO 1.0 allows): the first 16
//! device-readable bytes are the header, the last device-writable byte is the status, and what
//! lies between is data. Every limit is checked with checked arithmetic; a request that breaks one
//! is answered with an error status.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use bulkhead_common::guest_access::GuestAccess;
use bulkhead_common::vring::Desc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;
const HEADER_SIZE: u32 = 16;
const SEGMENT_SIZE: u32 = 16;
/// Most discard / write-zeroes segments per request (advertised in the config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest discard / write-zeroes segment, in sectors (advertised in the config space).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// The request header as the guest lays it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: repr(C), integers only, no padding (4 + 4 + 8), any bit pattern valid.
unsafe impl ByteValued for RawHeader {}

/// One discard / write-zeroes segment as the guest lays it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: repr(C), integers only, no padding (8 + 4 + 4), any bit pattern valid.
unsafe impl ByteValued for RawSegment {}

/// A contiguous piece of guest memory carrying request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// What a valid request asks for. Data segments are returned separately (see [`parse`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    GetId { len: u32 },
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    #[error("header is shorter than 16 bytes")]
    ShortHeader,
    #[error("header cannot be read from guest memory")]
    UnreadableHeader,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data buffers have the wrong direction for the request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("request reaches beyond the end of the disk")]
    BeyondCapacity,
    #[error("too many data segments ({0})")]
    TooManySegments(usize),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("discard / write-zeroes payload is malformed")]
    BadRanges,
    #[error("discard / write-zeroes segment has unsupported flags {0:#x}")]
    BadRangeFlags(u32),
    #[error("flush or get-id with an unexpected data buffer")]
    UnexpectedData,
}

impl ParseError {
    /// The status the guest gets back; `None` when there is nowhere to write it.
    /// Exhaustive on purpose: a new error must decide its status.
    pub fn status(&self) -> Option<u8> {
        let s = match self {
            ParseError::NoStatus => return None,
            ParseError::Unsupported(_) | ParseError::BadRangeFlags(_) => VIRTIO_BLK_S_UNSUPP,
            ParseError::ShortHeader
            | ParseError::UnreadableHeader
            | ParseError::WrongDirection
            | ParseError::UnalignedLength(_)
            | ParseError::BeyondCapacity
            | ParseError::TooManySegments(_)
            | ParseError::ReadOnly
            | ParseError::BadRanges
            | ParseError::UnexpectedData => VIRTIO_BLK_S_IOERR,
        };
        u8::try_from(s).ok()
    }
}

/// Device parameters requests are checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity: u64,
    pub read_only: bool,
    pub max_segments: usize,
}

/// Parses the chain in `descs`. On success the data segments are in `data` (cleared first); on
/// failure the status address, if there is one, is returned alongside the error.
pub fn parse(
    mem: &GuestAccess,
    descs: &[Desc],
    limits: &Limits,
    data: &mut Vec<Segment>,
) -> Result<Request, (ParseError, Option<GuestAddress>)> {
    data.clear();
    let status = status_byte(descs).ok_or((ParseError::NoStatus, None))?;
    parse_body(mem, descs, limits, data)
        .map(|op| Request { op, status })
        .map_err(|e| (e, Some(status)))
}

/// The last byte of the last descriptor, which must be device-writable.
fn status_byte(descs: &[Desc]) -> Option<GuestAddress> {
    let last = descs.last()?;
    if !last.writable || last.len == 0 {
        return None;
    }
    last.addr
        .0
        .checked_add(u64::from(last.len).checked_sub(1)?)
        .map(GuestAddress)
}

fn parse_body(
    mem: &GuestAccess,
    descs: &[Desc],
    limits: &Limits,
    data: &mut Vec<Segment>,
) -> Result<Op, ParseError> {
    let header: RawHeader = read_readable(mem, descs, 0)?;
    let (out_bytes, in_bytes) = split_data(descs, data, limits.max_segments)?;
    let kind = u32::from_le(header.kind);
    let sector = u64::from_le(header.sector);
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            let (len, wrong) = if write {
                (out_bytes, in_bytes)
            } else {
                (in_bytes, out_bytes)
            };
            if wrong != 0 {
                return Err(ParseError::WrongDirection);
            }
            if len % SECTOR_SIZE != 0 {
                return Err(ParseError::UnalignedLength(len));
            }
            let offset = check_range(sector, len, limits.capacity)?;
            if write && limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            Ok(if write {
                Op::Write { offset, len }
            } else {
                Op::Read { offset, len }
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            if out_bytes != 0 || in_bytes != 0 {
                return Err(ParseError::UnexpectedData);
            }
            Ok(Op::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_bytes != 0 || in_bytes == 0 {
                return Err(ParseError::UnexpectedData);
            }
            Ok(Op::GetId {
                len: u32::try_from(in_bytes).unwrap_or(u32::MAX),
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            if in_bytes != 0 {
                return Err(ParseError::WrongDirection);
            }
            let ranges = read_ranges(mem, descs, out_bytes, zeroes, limits.capacity)?;
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            Ok(if zeroes {
                Op::WriteZeroes(ranges)
            } else {
                Op::Discard(ranges)
            })
        }
        other => Err(ParseError::Unsupported(other)),
    }
}

/// Byte offset of `sector` after checking that `len` bytes from there fit the disk.
fn check_range(sector: u64, len: u64, capacity: u64) -> Result<u64, ParseError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(ParseError::BeyondCapacity)?;
    let end = offset.checked_add(len).ok_or(ParseError::BeyondCapacity)?;
    if end > capacity {
        return Err(ParseError::BeyondCapacity);
    }
    Ok(offset)
}

/// Collects the data segments (everything but the header and the status byte) and returns the
/// device-readable and device-writable data byte counts.
fn split_data(
    descs: &[Desc],
    data: &mut Vec<Segment>,
    max_segments: usize,
) -> Result<(u64, u64), ParseError> {
    let mut skip_header = u64::from(HEADER_SIZE);
    let mut out_bytes = 0u64;
    let mut in_bytes = 0u64;
    let last = descs.len().checked_sub(1).ok_or(ParseError::NoStatus)?;
    for (i, d) in descs.iter().enumerate() {
        let mut addr = d.addr.0;
        let mut len = u64::from(d.len);
        if !d.writable {
            let skip = skip_header.min(len);
            skip_header = skip_header.saturating_sub(skip);
            addr = addr.checked_add(skip).ok_or(ParseError::ShortHeader)?;
            len = len.saturating_sub(skip);
        } else if i == last {
            len = len.saturating_sub(1);
        }
        if len == 0 {
            continue;
        }
        if data.len() >= max_segments {
            return Err(ParseError::TooManySegments(data.len().saturating_add(1)));
        }
        // Each descriptor is at most 4 GiB - 1, so its remainder fits u32.
        let len32 = u32::try_from(len).map_err(|_| ParseError::BadRanges)?;
        data.push(Segment {
            addr: GuestAddress(addr),
            len: len32,
        });
        if d.writable {
            in_bytes = in_bytes.saturating_add(len);
        } else {
            out_bytes = out_bytes.saturating_add(len);
        }
    }
    if skip_header != 0 {
        return Err(ParseError::ShortHeader);
    }
    Ok((out_bytes, in_bytes))
}

/// Reads a `T` from the device-readable bytes starting `at` bytes into the chain, across
/// descriptor boundaries.
fn read_readable<T: ByteValued + Default>(
    mem: &GuestAccess,
    descs: &[Desc],
    at: u64,
) -> Result<T, ParseError> {
    // Fast path: the value lies in the first descriptor (nearly always).
    if let Some(d) = descs.first().filter(|d| !d.writable) {
        let end = at.checked_add(std::mem::size_of::<T>() as u64);
        if end.is_some_and(|end| end <= u64::from(d.len)) {
            if let Some(v) = d
                .addr
                .0
                .checked_add(at)
                .and_then(|a| mem.read_val::<T>(GuestAddress(a)))
            {
                return Ok(v);
            }
        }
    }
    let mut value = T::default();
    let buf = value.as_mut_slice();
    let mut filled = 0usize;
    let mut skip = at;
    for d in descs.iter().take_while(|d| !d.writable) {
        if filled == buf.len() {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip = skip.saturating_sub(len);
            continue;
        }
        let avail = usize::try_from(len.saturating_sub(skip)).unwrap_or(usize::MAX);
        let want = buf.len().saturating_sub(filled).min(avail);
        let dst = buf
            .get_mut(filled..filled.saturating_add(want))
            .ok_or(ParseError::ShortHeader)?;
        let src = d
            .addr
            .0
            .checked_add(skip)
            .ok_or(ParseError::UnreadableHeader)?;
        mem.read_slice(dst, GuestAddress(src))
            .map_err(|_| ParseError::UnreadableHeader)?;
        filled = filled.saturating_add(want);
        skip = 0;
    }
    if filled != buf.len() {
        return Err(ParseError::ShortHeader);
    }
    Ok(value)
}

fn read_ranges(
    mem: &GuestAccess,
    descs: &[Desc],
    bytes: u64,
    zeroes: bool,
    capacity: u64,
) -> Result<Vec<Range>, ParseError> {
    let seg = u64::from(SEGMENT_SIZE);
    let count = bytes.checked_div(seg).unwrap_or(0);
    if count == 0 || !bytes.is_multiple_of(seg) || count > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(ParseError::BadRanges);
    }
    let mut ranges = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        let at = u64::from(HEADER_SIZE).saturating_add(i.saturating_mul(seg));
        let raw: RawSegment = read_readable(mem, descs, at).map_err(|_| ParseError::BadRanges)?;
        let flags = u32::from_le(raw.flags);
        let allowed = if zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(ParseError::BadRangeFlags(flags));
        }
        let num = u32::from_le(raw.num_sectors);
        if num > MAX_DISCARD_SECTORS {
            return Err(ParseError::BadRanges);
        }
        let len = u64::from(num) << SECTOR_SHIFT;
        let offset = check_range(u64::from_le(raw.sector), len, capacity)?;
        ranges.push(Range {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
