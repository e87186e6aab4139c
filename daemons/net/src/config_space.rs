//! The virtio-net config space (`struct virtio_net_config`) as the guest reads it.

use std::mem::offset_of;

use virtio_bindings::virtio_net::{virtio_net_config, VIRTIO_NET_S_LINK_UP};

/// Bytes we define: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = offset_of!(virtio_net_config, mtu) + 2;

#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    pub mtu: u16,
}

pub fn build(c: &NetConfig) -> [u8; CONFIG_LEN] {
    let mut out = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = out.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    type C = virtio_net_config;
    put(offset_of!(C, mac), &c.mac);
    // The link is reported up: the TAP is ours for the daemon's whole life.
    put(
        offset_of!(C, status),
        &u16::try_from(VIRTIO_NET_S_LINK_UP)
            .unwrap_or(1)
            .to_le_bytes(),
    );
    put(
        offset_of!(C, max_virtqueue_pairs),
        &c.queue_pairs.to_le_bytes(),
    );
    put(offset_of!(C, mtu), &c.mtu.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_at_the_virtio_spec_offsets() {
        let c = build(&NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            queue_pairs: 4,
            mtu: 9000,
        });
        assert_eq!(CONFIG_LEN, 12);
        assert_eq!(&c[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    }
}
