//! The RARP frame that announces a MAC address on a network (as QEMU's `announce_self` sends
//! it): broadcast, ethertype 0x8035, a reverse request with the MAC as sender and target.

const ETH_P_RARP: u16 = 0x8035;
const ARPHRD_ETHER: u16 = 1;
const ETH_P_IP: u16 = 0x0800;
const ARPOP_RREQUEST: u16 = 3;
/// Ethernet's minimum frame (without the FCS).
const MIN_FRAME: usize = 60;

/// The announcement for `mac`, padded to the minimum Ethernet frame.
pub fn frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
    f.extend_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&ARPOP_RREQUEST.to_be_bytes());
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(MIN_FRAME, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_reverse_request_for_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3], "opcode: reverse request");
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
