//! vhost-user-net driven by the synthetic frontend over a real socket, with a real TAP inside a
//! network namespace the test creates: frames sent on TX come out of the TAP, frames injected
//! into the TAP land in RX buffers. No traffic leaves the namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::fixture::{pattern, NetFixture};
use bulkhead_tests::frontend::net::{ethernet, F_NEEDS_CSUM, GSO_TCPV4};
use bulkhead_tests::frontend::{NetDriver, Setup, VnetHdr};

const SRC: [u8; 6] = [0x52, 0x54, 0, 0xbb, 0, 1];
const ETHERTYPE: u16 = 0x88b5;
const W: Duration = Duration::from_secs(5);

fn f(bits: &[u32]) -> u64 {
    bits.iter().fold(0, |a, b| a | 1u64 << b)
}

/// GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN, MRG_RXBUF, CSUM, HOST_TSO4.
fn offload_features() -> u64 {
    f(&[1, 7, 8, 9, 15, 0, 11])
}

fn setup(pairs: u16, event_idx: bool, features: u64) -> Setup {
    Setup {
        queues: pairs * 2,
        queue_size: 256,
        event_idx,
        device_features: features,
        ram_layout: vec![(0, 128 << 20)],
        queue_num_is_pairs: true,
        ..Setup::default()
    }
}

/// Frames of our test ethertype only.
fn recv_ours(sock: &bulkhead_tests::netns::PacketSocket) -> Result<Vec<u8>> {
    loop {
        let frame = sock.recv(W)?.context("no frame came out of the TAP")?;
        if frame.len() >= 14 && frame[12..14] == ETHERTYPE.to_be_bytes() {
            return Ok(frame);
        }
    }
}

#[test]
fn transmitted_frames_come_out_of_the_tap() -> Result<()> {
    for event_idx in [true, false] {
        let fx = NetFixture::start(&[])?;
        let sock = fx.packet_socket(false)?;
        let mut d = fx.driver(setup(1, event_idx, offload_features()), 4096, 64, 16)?;
        for (i, size) in [64usize, 1514, 9000].into_iter().enumerate() {
            let frame = ethernet(SRC, ETHERTYPE, &pattern(i as u64, size - 14));
            d.send(0, &VnetHdr::default(), &frame, i + 1)?;
            ensure!(
                recv_ours(&sock)? == frame,
                "frame of {size} bytes differs (event_idx={event_idx})"
            );
        }
    }
    Ok(())
}

#[test]
fn injected_frames_land_in_receive_buffers() -> Result<()> {
    for (event_idx, features) in [(true, offload_features()), (false, f(&[]))] {
        let fx = NetFixture::start(&[])?;
        let sock = fx.packet_socket(false)?;
        let mut d = fx.driver(setup(1, event_idx, features), 2048, 128, 16)?;
        d.post_rx(0, 128)?;
        for (i, size) in [64usize, 1514, 600].into_iter().enumerate() {
            let frame = ethernet(SRC, ETHERTYPE, &pattern(10 + i as u64, size - 14));
            sock.send(&frame)?;
            let got = d.recv(0, W)?.context("frame not received")?;
            ensure!(
                got.data == frame,
                "frame of {size} bytes differs (event_idx={event_idx})"
            );
            ensure!(got.hdr.num_buffers == 1);
        }
    }
    Ok(())
}

/// A 64 KiB TCP segment that the kernel hands over unsegmented (TSO) arrives whole, spread
/// over 4 KiB mergeable buffers, with its GSO header.
#[test]
fn a_64k_offloaded_tcp_segment_arrives_whole_over_mergeable_buffers() -> Result<()> {
    let fx = NetFixture::start(&[])?;
    let sock = fx.packet_socket(true)?;
    let mut d = fx.driver(setup(1, true, offload_features()), 4096, 256, 16)?;
    ensure!(d.mergeable, "MRG_RXBUF not negotiated");
    d.post_rx(0, 256)?;
    let payload = pattern(77, 64000);
    let frame = tcp_ipv4_frame(&payload);
    // virtio_net_hdr for the packet socket (10 bytes): needs checksum, TCPv4 GSO of 1448.
    let mut hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
    .to_bytes()[..10]
        .to_vec();
    hdr.extend_from_slice(&frame);
    sock.send(&hdr)?;
    let got = d.recv(0, W)?.context("segment not received")?;
    ensure!(
        got.hdr.gso_type == GSO_TCPV4,
        "gso_type {} (segmented on the way?)",
        got.hdr.gso_type
    );
    ensure!(got.hdr.gso_size == 1448);
    ensure!(
        got.data.len() == frame.len(),
        "received {} bytes of {}",
        got.data.len(),
        frame.len()
    );
    ensure!(got.data[54..] == payload[..], "payload differs");
    let expected_buffers = (frame.len() + 12).div_ceil(4096);
    ensure!(
        got.buffers == expected_buffers,
        "{} buffers, expected {expected_buffers}",
        got.buffers
    );
    Ok(())
}

/// Ethernet + IPv4 + TCP headers around `payload`, as a TSO sender would build them.
fn tcp_ipv4_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0x12, 0x34, 0x56];
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = 20 + 20 + payload.len();
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![
        0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ];
    // Pseudo-header sum in the checksum field, as CHECKSUM_PARTIAL expects.
    let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6];
    pseudo.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    let p = !checksum(&pseudo);
    tcp[16..18].copy_from_slice(&p.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn without_receive_buffers_frames_wait_in_the_tap_and_arrive_after_a_kick() -> Result<()> {
    let fx = NetFixture::start(&[])?;
    let sock = fx.packet_socket(false)?;
    let mut d = fx.driver(setup(1, true, offload_features()), 4096, 256, 16)?;
    let frames: Vec<Vec<u8>> = (0..50)
        .map(|i| ethernet(SRC, ETHERTYPE, &pattern(100 + i, 200)))
        .collect();
    for fr in &frames {
        sock.send(fr)?;
    }
    // Give the daemon time to (wrongly) consume them; it must not, having no buffers.
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = bulkhead_tests::daemon::cpu_time(fx.daemon.pid())?;
    std::thread::sleep(Duration::from_millis(300));
    let busy = bulkhead_tests::daemon::cpu_time(fx.daemon.pid())? - cpu_before;
    ensure!(
        busy < Duration::from_millis(50),
        "daemon burnt {busy:?} of CPU waiting for buffers"
    );
    d.post_rx(0, 256)?;
    for (i, fr) in frames.iter().enumerate() {
        let got = d.recv(0, W)?.with_context(|| format!("frame {i} lost"))?;
        ensure!(&got.data == fr, "frame {i} differs or out of order");
    }
    Ok(())
}

#[test]
fn two_queue_pairs_carry_traffic_both_ways() -> Result<()> {
    let fx = NetFixture::start(&["--queues", "2"])?;
    let sock = fx.packet_socket(false)?;
    let mut d = fx.driver(setup(2, true, offload_features()), 2048, 128, 16)?;
    for pair in 0..2u16 {
        let frame = ethernet(SRC, ETHERTYPE, &pattern(200 + u64::from(pair), 500));
        d.send(pair, &VnetHdr::default(), &frame, 2)?;
        ensure!(recv_ours(&sock)? == frame, "pair {pair} transmit");
    }
    d.post_rx(0, 128)?;
    d.post_rx(1, 128)?;
    let sent: Vec<Vec<u8>> = (0..40u64)
        .map(|i| {
            // Different IPv4 flows so the TAP may spread them over its queues.
            let mut payload = vec![
                0x45, 0, 0, 40, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, i as u8, 10, 0, 1, 2,
            ];
            payload.extend_from_slice(&pattern(i, 20));
            ethernet(SRC, 0x0800, &payload)
        })
        .collect();
    for fr in &sent {
        sock.send(fr)?;
    }
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < sent.len() && std::time::Instant::now() < deadline {
        for pair in 0..2 {
            if let Some(fr) = d.recv(pair, Duration::from_millis(50))? {
                got.push(fr.data);
            }
        }
    }
    got.sort();
    let mut want = sent.clone();
    want.sort();
    ensure!(
        got == want,
        "received {} of {} frames",
        got.len(),
        sent.len()
    );
    Ok(())
}

#[test]
fn malformed_transmit_chains_are_dropped_counted_and_the_queue_goes_on() -> Result<()> {
    use bulkhead_tests::frontend::Buf;
    use vm_memory::GuestAddress;
    let mut fx = NetFixture::start(&[])?;
    let sock = fx.packet_socket(false)?;
    let mut d: NetDriver = fx.driver(setup(1, true, offload_features()), 2048, 16, 16)?;
    let mem = d.fe.ram.mem().clone();
    let scratch = GuestAddress(100 << 20);
    let q = d.fe.queue(1);
    // Shorter than the header; a device-writable buffer; a buffer outside guest memory.
    for bufs in [
        vec![Buf::readable(scratch, 8)],
        vec![Buf::readable(scratch, 12), Buf::writable(scratch, 64)],
        vec![
            Buf::readable(scratch, 12),
            Buf::readable(GuestAddress(1 << 40), 64),
        ],
    ] {
        q.add(&mem, &bufs)?;
    }
    q.kick_now(&mem)?;
    for _ in 0..3 {
        let u = q.wait(&mem, W)?;
        ensure!(u.len == 0);
    }
    let frame = ethernet(SRC, ETHERTYPE, &pattern(5, 100));
    d.send(0, &VnetHdr::default(), &frame, 1)?;
    ensure!(recv_ours(&sock)? == frame);
    // SIGUSR1 logs the counters.
    // SAFETY: signalling our child.
    unsafe { libc::kill(fx.daemon.pid() as i32, libc::SIGUSR1) };
    bulkhead_tests::daemon::eventually(W, "counters in the log", || {
        Ok(fx
            .daemon
            .log()
            .lines()
            .any(|l| l.contains("queue=1 ") && l.contains("packets=1 ") && l.contains("errors=3")))
    })
    .with_context(|| fx.daemon.log())?;
    fx.daemon.stop_with(libc::SIGTERM, W)?;
    Ok(())
}

/// More chains than one transmit batch takes, malformed ones among them, made available
/// together: every good frame comes out of the TAP once and in order, and every chain is
/// completed exactly once.
#[test]
fn a_burst_spanning_batches_with_malformed_chains_goes_out_in_order_each_completed_once(
) -> Result<()> {
    use bulkhead_tests::frontend::Buf;
    use std::collections::BTreeSet;
    use vm_memory::GuestAddress;
    const GOOD: usize = 72;
    let mut fx = NetFixture::start(&[])?;
    let sock = fx.packet_socket(false)?;
    let mut d: NetDriver = fx.driver(setup(1, true, offload_features()), 2048, 16, GOOD as u32)?;
    let mem = d.fe.ram.mem().clone();
    let scratch = GuestAddress(100 << 20);
    let mut frames = Vec::new();
    let mut heads = BTreeSet::new();
    let mut bad = 0;
    for i in 0..GOOD {
        if i % 5 == 2 {
            // Shorter than the virtio-net header.
            let h = d.fe.queue(1).add(&mem, &[Buf::readable(scratch, 8)])?;
            heads.insert(h.context("no room for a malformed chain")?);
            bad += 1;
        }
        let frame = ethernet(SRC, ETHERTYPE, &pattern(i as u64, 50 + i * 7));
        let h = d.submit_tx(0, &VnetHdr::default(), &frame, i % 3)?;
        heads.insert(h.context("no transmit slot")?);
        frames.push(frame);
    }
    ensure!(heads.len() == GOOD + bad, "heads were reused");
    d.fe.queue(1).kick_now(&mem)?;
    let mut completed = BTreeSet::new();
    for _ in 0..heads.len() {
        let u = d.fe.queue(1).wait(&mem, W)?;
        ensure!(
            u.len == 0,
            "transmit chain {} completed with length {}",
            u.head,
            u.len
        );
        ensure!(completed.insert(u.head), "chain {} completed twice", u.head);
    }
    ensure!(
        completed == heads,
        "completed chains differ from those made available"
    );
    ensure!(
        d.fe.queue(1).poll(&mem)?.is_none(),
        "a completion beyond the chains made available"
    );
    for (i, want) in frames.iter().enumerate() {
        ensure!(
            &recv_ours(&sock)? == want,
            "frame {i} missing or out of order"
        );
    }
    // SAFETY: signalling our child.
    unsafe { libc::kill(fx.daemon.pid() as i32, libc::SIGUSR1) };
    let counters = format!("packets={GOOD} ");
    let errors = format!("errors={bad}");
    bulkhead_tests::daemon::eventually(W, "counters in the log", || {
        Ok(fx
            .daemon
            .log()
            .lines()
            .any(|l| l.contains("queue=1 ") && l.contains(&counters) && l.contains(&errors)))
    })
    .with_context(|| fx.daemon.log())?;
    fx.daemon.stop_with(libc::SIGTERM, W)?;
    Ok(())
}

#[test]
fn print_capabilities_says_net() -> Result<()> {
    let out = std::process::Command::new(bulkhead_tests::daemon::binary("vhost-user-net")?)
        .arg("--print-capabilities")
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["type"] == "net");
    Ok(())
}

/// A privileged parent opens the TAP queues; the daemon gets them with --tap-fd and runs as
/// `nobody` with no capabilities, and still moves frames.
#[test]
fn tap_fds_from_a_parent_let_an_unprivileged_daemon_serve() -> Result<()> {
    use bulkhead_tests::daemon::{Daemon, Scratch};
    use bulkhead_tests::netns::{NetNs, PacketSocket};
    use std::os::fd::IntoRawFd;
    use std::os::unix::process::CommandExt;
    use vhost_user_net::tap::TapQueue;

    let scratch = Scratch::new("tapfd")?;
    std::fs::set_permissions(
        &scratch.path,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    let ns = NetNs::create("tapfd")?;
    let fds: Vec<i32> = ns.run_in(|| {
        let qs = TapQueue::open_all("tapfd0", 2)?;
        qs[0].set_up()?;
        Ok(qs.into_iter().map(|q| q.into_fd().into_raw_fd()).collect())
    })?;
    let socket = scratch.join("net.sock");
    let args: Vec<String> = [
        "--socket-path",
        socket.to_str().unwrap(),
        "--tap-fd",
        "10",
        "--tap-fd",
        "11",
    ]
    .map(String::from)
    .to_vec();
    let (a, b) = (fds[0], fds[1]);
    let mut daemon = Daemon::spawn("vhost-user-net", &args, &scratch, |cmd| {
        let hook = move || {
            let ok = |r: i32| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            // Each call is async-signal-safe and affects only the child between fork and exec.
            bulkhead_tests::daemon::place_fds_in_child(&[(a, 10), (b, 11)])?;
            // SAFETY: changes only the child's credentials; async-signal-safe, no memory involved.
            ok(unsafe { libc::setgroups(0, std::ptr::null()) })?;
            // SAFETY: as above.
            ok(unsafe { libc::setgid(65534) })?;
            // SAFETY: as above.
            ok(unsafe { libc::setuid(65534) })
        };
        // SAFETY: the hook only makes async-signal-safe calls.
        unsafe { cmd.pre_exec(hook) };
    })?;
    daemon.wait_ready(W)?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()))?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "daemon not unprivileged:\n{status}"
    );
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("CapEff:") && l.ends_with("0000000000000000")),
        "daemon has capabilities"
    );
    let ifindex = ns.ifindex("tapfd0")?;
    let sock = ns.run_in(move || PacketSocket::bind(ifindex, false))?;
    let fe = bulkhead_tests::frontend::Frontend::start(
        bulkhead_tests::frontend::Connection::connect(&socket)?,
        setup(2, true, offload_features()),
    )?;
    let mut d = NetDriver::new(fe, 2048, 64, 16)?;
    for pair in 0..2 {
        let frame = ethernet(SRC, ETHERTYPE, &pattern(300 + u64::from(pair), 300));
        d.send(pair, &VnetHdr::default(), &frame, 1)?;
        ensure!(recv_ours(&sock)? == frame, "pair {pair}");
    }
    for fd in fds {
        // SAFETY: closing our copies of the descriptors handed to the daemon.
        unsafe { libc::close(fd) };
    }
    Ok(())
}
