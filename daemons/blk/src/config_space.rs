//! The virtio-blk config space (`struct virtio_blk_config`, little endian) as the guest reads it.

use virtio_bindings::virtio_blk::virtio_blk_config;

use crate::request::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};

/// Bytes of the config space we define (up to and including the write-zeroes fields, the layout
/// QEMU 7.2 knows); reads beyond return zeroes.
pub const CONFIG_LEN: usize = 60;
/// Offset of the `wce` (writeback) byte, the only field the guest may write.
pub const WCE_OFFSET: usize = std::mem::offset_of!(virtio_blk_config, wce);

/// Values the config space is built from.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub capacity_bytes: u64,
    pub seg_max: u32,
    pub logical_block: u32,
    pub physical_block: u32,
    pub num_queues: u16,
}

/// Serialises the config space; `writeback` is the current cache mode.
pub fn build(g: &Geometry, writeback: bool) -> [u8; CONFIG_LEN] {
    let mut out = [0u8; CONFIG_LEN];
    let exp = (g.physical_block / g.logical_block.max(1))
        .max(1)
        .trailing_zeros();
    let discard_alignment = (g.physical_block / SECTOR_SIZE as u32).max(1);
    let mut put = |field: usize, bytes: &[u8]| {
        if let Some(dst) = out.get_mut(field..field + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    use std::mem::offset_of;
    type C = virtio_blk_config;
    put(
        offset_of!(C, capacity),
        &(g.capacity_bytes / SECTOR_SIZE).to_le_bytes(),
    );
    put(offset_of!(C, seg_max), &g.seg_max.to_le_bytes());
    put(offset_of!(C, blk_size), &g.logical_block.to_le_bytes());
    put(
        offset_of!(C, physical_block_exp),
        &[u8::try_from(exp).unwrap_or(0)],
    );
    put(offset_of!(C, min_io_size), &1u16.to_le_bytes());
    put(WCE_OFFSET, &[u8::from(writeback)]);
    put(offset_of!(C, num_queues), &g.num_queues.to_le_bytes());
    put(
        offset_of!(C, max_discard_sectors),
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(C, max_discard_seg),
        &MAX_DISCARD_SEGMENTS.to_le_bytes(),
    );
    put(
        offset_of!(C, discard_sector_alignment),
        &discard_alignment.to_le_bytes(),
    );
    put(
        offset_of!(C, max_write_zeroes_sectors),
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(C, max_write_zeroes_seg),
        &MAX_DISCARD_SEGMENTS.to_le_bytes(),
    );
    put(offset_of!(C, write_zeroes_may_unmap), &[1]);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn layout_matches_the_virtio_spec_offsets() {
        let g = Geometry {
            capacity_bytes: 1 << 30,
            seg_max: 126,
            logical_block: 512,
            physical_block: 4096,
            num_queues: 4,
        };
        let c = build(&g, true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "4096 / 512 = 2^3");
        assert_eq!(WCE_OFFSET, 32);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_DISCARD_SEGMENTS
        );
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
        assert_eq!(build(&g, false)[32], 0);
    }
}
