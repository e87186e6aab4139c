//! vhost-user-net's header and chain handling with arbitrary layouts: transmit chain checks
//! (header split over any number of descriptors), receive spreading, header sizes and offloads.
#![no_main]

use arbitrary::Arbitrary;
use bulkhead_common::vring::Desc;
use libfuzzer_sys::fuzz_target;
use vhost_user_net::rx::spread;
use vhost_user_net::tx::check_tx_chain;
use vhost_user_net::vnet::{header_len, max_rx_frame, tap_offloads};
use vm_memory::GuestAddress;

#[derive(Debug, Arbitrary)]
struct Input {
    descs: Vec<(u64, u32, bool)>,
    features: u64,
    mtu: u16,
    frame: u32,
    capacities: Vec<u32>,
}

fuzz_target!(|input: Input| {
    let descs: Vec<Desc> = input.descs.iter().take(64).map(|&(a, l, w)| Desc { addr: GuestAddress(a), len: l, writable: w }).collect();
    let hdr = header_len(input.features);
    assert!(hdr == 10 || hdr == 12);
    if let Ok(total) = check_tx_chain(&descs, hdr) {
        assert!(total >= hdr as u64);
        assert!(descs.iter().all(|d| !d.writable));
    }
    let _ = tap_offloads(input.features);
    let max = max_rx_frame(input.features, input.mtu);
    assert!(max >= hdr);
    let mut used = Vec::new();
    spread(input.frame as usize, input.capacities.iter().take(64).copied(), &mut used);
    let sum: u64 = used.iter().map(|u| u64::from(*u)).sum();
    assert!(sum <= u64::from(input.frame));
    for (u, c) in used.iter().zip(&input.capacities) {
        assert!(u <= c);
    }
});
