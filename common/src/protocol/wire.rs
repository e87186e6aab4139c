//! The vhost-user message header and payload limits.
//!
//! `vhost` keeps its header type crate-private, so the 12-byte header is defined here; the payload
//! structs (`VhostUserMemory`, `VhostUserVringState`, ...) are reused from `vhost`.

use vm_memory::ByteValued;

/// Size of the fixed message header: request, flags, payload size (all u32, native endian).
pub const HEADER_SIZE: usize = 12;

/// Largest payload accepted. The biggest message QEMU sends a blk or net backend is
/// `SET_MEM_TABLE` with 8 regions (264 bytes) or `SET_CONFIG` (12 + up to 256 bytes); the
/// vhost-user spec bounds config payloads by 4 KiB, which is what we accept.
pub const MAX_PAYLOAD_SIZE: usize = 4096;

/// Most file descriptors a single message may carry (`SET_MEM_TABLE` with 8 regions).
pub const MAX_FDS: usize = 8;

/// Protocol version carried in the low two flag bits.
pub const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
/// Flag: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Flag: the sender wants a REPLY_ACK for this request.
pub const FLAG_NEED_REPLY: u32 = 0x8;
const KNOWN_FLAGS: u32 = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("unsupported protocol version {0}")]
    Version(u32),
    #[error("unknown flag bits {0:#x}")]
    UnknownFlags(u32),
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD_SIZE}-byte limit")]
    Oversized(u32),
}

/// The fixed header preceding every vhost-user message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

// SAFETY: `Header` is `repr(C)`, made only of u32 fields, has no padding, and every bit pattern is
// a valid value.
unsafe impl ByteValued for Header {}

impl Header {
    /// A request header (used by frontends).
    pub fn request(request: u32, size: u32, need_reply: bool) -> Self {
        let flags = VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        Self {
            request,
            flags,
            size,
        }
    }

    /// The header of a reply to `self` carrying `size` payload bytes.
    pub fn reply(&self, size: u32) -> Self {
        Self {
            request: self.request,
            flags: VERSION | FLAG_REPLY,
            size,
        }
    }

    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Checks version, flags and size before any payload is read.
    pub fn validate(&self) -> Result<(), HeaderError> {
        let version = self.flags & VERSION_MASK;
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let unknown = self.flags & !KNOWN_FLAGS;
        if unknown != 0 {
            return Err(HeaderError::UnknownFlags(unknown));
        }
        if self.size as usize > MAX_PAYLOAD_SIZE {
            return Err(HeaderError::Oversized(self.size));
        }
        Ok(())
    }
}

/// Decodes a fixed-size payload, refusing any other length.
pub fn decode_exact<T: ByteValued>(payload: &[u8]) -> Option<T> {
    if payload.len() != std::mem::size_of::<T>() {
        return None;
    }
    T::from_slice(payload).copied()
}

/// Decodes a fixed-size prefix of a payload, returning it and the rest.
pub fn decode_prefix<T: ByteValued>(payload: &[u8]) -> Option<(T, &[u8])> {
    let size = std::mem::size_of::<T>();
    let head = payload.get(..size)?;
    let rest = payload.get(size..)?;
    Some((T::from_slice(head).copied()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_with_wrong_version_is_refused() {
        let h = Header {
            request: 1,
            flags: 2,
            size: 0,
        };
        assert_eq!(h.validate(), Err(HeaderError::Version(2)));
    }

    #[test]
    fn header_with_unknown_flags_is_refused() {
        let h = Header {
            request: 1,
            flags: VERSION | 0x100,
            size: 0,
        };
        assert_eq!(h.validate(), Err(HeaderError::UnknownFlags(0x100)));
    }

    #[test]
    fn oversized_payload_is_refused_before_reading() {
        let h = Header {
            request: 1,
            flags: VERSION,
            size: 4097,
        };
        assert_eq!(h.validate(), Err(HeaderError::Oversized(4097)));
    }

    #[test]
    fn reply_header_sets_reply_flag_and_keeps_request() {
        let h = Header::request(5, 8, true);
        assert!(h.need_reply());
        let r = h.reply(8);
        assert!(r.is_reply());
        assert!(!r.need_reply());
        assert_eq!(r.request, 5);
        assert_eq!(r.validate(), Ok(()));
    }

    #[test]
    fn decode_exact_refuses_wrong_length() {
        assert_eq!(decode_exact::<u64>(&[0u8; 7]), None);
        assert_eq!(decode_exact::<u64>(&[1, 0, 0, 0, 0, 0, 0, 0]), Some(1));
    }
}
