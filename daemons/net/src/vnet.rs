//! The virtio-net header: its size for the negotiated features, and which TAP receive offloads
//! follow from what the guest accepts.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_MRG_RXBUF,
};

/// Header without `num_buffers` (legacy, no MRG_RXBUF).
pub const HDR_LEN_LEGACY: usize = 10;
/// Header with `num_buffers` (VERSION_1 or MRG_RXBUF).
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// Largest frame a GSO offload can produce (an IP packet of 64 KiB plus Ethernet and VLAN).
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HLEN + VLAN_HLEN;

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// Header size the guest and the TAP use with these features.
pub fn header_len(features: u64) -> usize {
    if has(features, VIRTIO_F_VERSION_1) || has(features, VIRTIO_NET_F_MRG_RXBUF) {
        HDR_LEN
    } else {
        HDR_LEN_LEGACY
    }
}

/// TUN_F_* flags: what the TAP may deliver to the guest given the guest's receive features.
/// Segmentation offloads are only valid together with checksum offload.
pub fn tap_offloads(features: u64) -> libc::c_uint {
    if !has(features, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    let map = [
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_ECN, libc::TUN_F_TSO_ECN),
        (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
        (VIRTIO_NET_F_GUEST_USO4, libc::TUN_F_USO4),
        (VIRTIO_NET_F_GUEST_USO6, libc::TUN_F_USO6),
    ];
    for (bit, flag) in map {
        if has(features, bit) {
            f |= flag;
        }
    }
    f
}

/// Largest frame (header included) the TAP may hand us: a GSO super-frame when the guest
/// accepts segmentation offloads, otherwise an MTU-sized frame.
pub fn max_rx_frame(features: u64, mtu: u16) -> usize {
    let gso = [
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_GUEST_USO6,
    ]
    .iter()
    .any(|b| has(features, *b));
    let frame = if gso {
        MAX_GSO_FRAME
    } else {
        usize::from(mtu) + ETH_HLEN + VLAN_HLEN
    };
    header_len(features) + frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(list: &[u32]) -> u64 {
        list.iter().fold(0, |f, b| f | 1u64 << b)
    }

    #[test]
    fn header_is_twelve_bytes_with_version_1_or_mergeable_buffers() {
        assert_eq!(header_len(bits(&[VIRTIO_F_VERSION_1])), 12);
        assert_eq!(header_len(bits(&[VIRTIO_NET_F_MRG_RXBUF])), 12);
        assert_eq!(header_len(0), 10);
    }

    #[test]
    fn offloads_follow_the_guest_receive_features() {
        assert_eq!(
            tap_offloads(bits(&[VIRTIO_NET_F_GUEST_TSO4])),
            0,
            "no TSO without checksum offload"
        );
        assert_eq!(
            tap_offloads(bits(&[VIRTIO_NET_F_GUEST_CSUM])),
            libc::TUN_F_CSUM
        );
        let all = bits(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_GUEST_USO4,
            VIRTIO_NET_F_GUEST_USO6,
        ]);
        assert_eq!(
            tap_offloads(all),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
                | libc::TUN_F_USO4
                | libc::TUN_F_USO6
        );
    }

    #[test]
    fn receive_frames_are_mtu_sized_unless_the_guest_takes_gso() {
        assert_eq!(max_rx_frame(bits(&[VIRTIO_F_VERSION_1]), 1500), 12 + 1518);
        assert_eq!(
            max_rx_frame(bits(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_GUEST_TSO4]), 1500),
            12 + MAX_GSO_FRAME
        );
    }
}
