//! vhost-user-net under real QEMU 7.2 guests (TCG): `-netdev vhost-user,queues=2` and
//! `virtio-net-pci,mq=on`, the TAP inside a namespace the test creates (10.0.0.1/24, the guest is
//! 10.0.0.2). Ping, then multi-megabyte TCP transfers both ways checked by SHA-256, then a second
//! QEMU attaches to the same running daemon. No traffic leaves the namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::fixture::{pattern, NetFixture};
use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;
const GUEST_MAC: &str = "52:54:00:12:34:56";

fn hex(d: &[u8]) -> String {
    Sha256::digest(d)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn boot(fx: &NetFixture, kit: &GuestKit) -> Result<Guest> {
    boot_with(fx, kit, false)
}

/// Boots a guest on split or packed rings and checks which it got (feature bit 34).
fn boot_with(fx: &NetFixture, kit: &GuestKit, packed: bool) -> Result<Guest> {
    let mut cfg = QemuConfig {
        packed,
        ..QemuConfig::default()
    };
    cfg.vhost_user_net("net0", &fx.socket, "", 2, GUEST_MAC);
    let mut g = Guest::boot(kit, &cfg)?;
    let bit = g.run_ok("cut -c35 /sys/class/net/eth0/device/features", T)?;
    ensure!(
        (bit.trim() == "1") == packed,
        "guest asked for packed rings: {packed}, negotiated bit 34: {bit}"
    );
    g.run_ok("ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up", T)?;
    Ok(g)
}

/// Guest → host: the guest sends `len` random bytes with nc; a listener in the namespace
/// receives them. Returns (guest's hash, host's hash).
fn guest_to_host(fx: &NetFixture, g: &mut Guest, len: usize) -> Result<(String, String)> {
    let listener = fx.ns.run_in(|| Ok(TcpListener::bind("10.0.0.1:5000")?))?;
    let receiver = std::thread::spawn(move || -> Result<Vec<u8>> {
        let (mut s, _) = listener.accept()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf)
    });
    let out = g.run_ok(
        &format!("dd if=/dev/urandom of=/tmp/up bs={MIB} count={} 2>/dev/null && sha256sum /tmp/up && nc 10.0.0.1 5000 < /tmp/up", len / MIB),
        T,
    )?;
    let got = receiver.join().expect("receiver thread")?;
    Ok((
        out.split_whitespace().next().unwrap_or_default().to_owned(),
        hex(&got),
    ))
}

/// Host → guest: the guest listens with nc; the host connects from the namespace and sends.
fn host_to_guest(fx: &NetFixture, g: &mut Guest, data: &[u8]) -> Result<String> {
    g.run_ok(
        "rm -f /tmp/down; (nc -l -p 5001 > /tmp/down 2>/dev/null &) ; echo listening",
        T,
    )?;
    let payload = data.to_vec();
    fx.ns.run_in(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match TcpStream::connect("10.0.0.2:5001") {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).context("connecting to the guest"),
            }
        };
        s.write_all(&payload)?;
        Ok(())
    })?;
    let out = g.run_ok(
        "while pidof nc >/dev/null; do sleep 0.1; done; sha256sum /tmp/down",
        T,
    )?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

#[test]
fn guests_ping_and_transfer_megabytes_both_ways_then_a_second_vm_attaches() -> Result<()> {
    ping_and_transfer_then_a_second_vm(false)
}

/// The same with the first guest on packed rings (the second, on split rings, attaches to the
/// same daemon).
#[test]
fn guests_on_packed_rings_ping_and_transfer_megabytes_both_ways() -> Result<()> {
    ping_and_transfer_then_a_second_vm(true)
}

fn ping_and_transfer_then_a_second_vm(packed: bool) -> Result<()> {
    let kit = GuestKit::ensure()?;
    let fx = NetFixture::start(&["--queues", "2"])?;
    fx.ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"])?;
    fx.ns.ip(&["link", "set", "tap0", "up"])?;
    let mut g = boot_with(&fx, &kit, packed)?;
    let ctx = |g: &Guest| {
        format!(
            "console:\n{}\ndaemon log:\n{}",
            g.console_log(),
            fx.daemon.log()
        )
    };
    let channels = g.run_ok("ls /sys/class/net/eth0/queues | grep -c rx", T)?;
    ensure!(channels.trim() == "2", "guest sees {channels} rx queues");
    let ping = g.run("ping -c 3 -W 5 10.0.0.1", T)?;
    ensure!(
        ping.status == 0,
        "ping failed: {}\n{}",
        ping.stdout,
        ctx(&g)
    );

    let (sent, received) = guest_to_host(&fx, &mut g, 8 * MIB)?;
    ensure!(
        sent == received,
        "guest→host transfer corrupted\n{}",
        ctx(&g)
    );
    let data = pattern(42, 8 * MIB);
    let got = host_to_guest(&fx, &mut g, &data)?;
    ensure!(
        got == hex(&data),
        "host→guest transfer corrupted\n{}",
        ctx(&g)
    );
    g.poweroff(T)?;

    // A second VM attaches to the same, still running daemon.
    let mut g2 = boot(&fx, &kit)?;
    let ping = g2.run("ping -c 2 -W 5 10.0.0.1", T)?;
    ensure!(
        ping.status == 0,
        "second VM cannot ping: {}\n{}",
        ping.stdout,
        ctx(&g2)
    );
    let (sent, received) = guest_to_host(&fx, &mut g2, 2 * MIB)?;
    ensure!(sent == received, "second VM transfer corrupted");
    g2.poweroff(T)?;
    Ok(())
}

/// A TCP transfer from the guest is in progress while vhost-user-net is SIGKILLed and restarted
/// (QEMU reconnects; the TAP persists with its address): the transfer completes with the right
/// checksum and ping works afterwards.
#[test]
fn tcp_transfer_survives_daemon_crashes() -> Result<()> {
    crash_transfer(false)
}

/// The same on packed rings, where the restarted daemon finds its place in the ring from the
/// descriptors (QEMU resends a stale one and keeps no inflight region for net).
#[test]
fn tcp_transfer_on_packed_rings_survives_daemon_crashes() -> Result<()> {
    crash_transfer(true)
}

fn crash_transfer(packed: bool) -> Result<()> {
    use bulkhead_tests::daemon::Scratch;
    use bulkhead_tests::guest_upload;
    use bulkhead_tests::netns::NetNs;
    use bulkhead_tests::supervisor::{Mode, Supervised};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let kit = GuestKit::ensure()?;
    for mode in [Mode::Client, Mode::Listen] {
        let scratch = Scratch::new("netcrash")?;
        let ns = NetNs::create("netcrash")?;
        let socket = scratch.join("net.sock");
        let args: Vec<String> = ["--tap", "tap0", "--queues", "2"]
            .map(String::from)
            .to_vec();
        let mut sup = Supervised::start_in(
            mode,
            "vhost-user-net",
            &args,
            socket.clone(),
            &scratch,
            Some(&ns),
        )?;
        ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"])?;
        ns.ip(&["link", "set", "tap0", "up"])?;
        let mut cfg = QemuConfig {
            packed,
            ..QemuConfig::default()
        };
        cfg.vhost_user_net("net0", &socket, mode.chardev_opts(), 2, GUEST_MAC);
        let mut g = Guest::boot(&kit, &cfg)?;
        g.run_ok("ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up", T)?;
        g.run_ok("ping -c 1 -W 5 10.0.0.1", T)?;
        let listener = ns.run_in(|| Ok(TcpListener::bind("10.0.0.1:5000")?))?;
        let received = Arc::new(AtomicUsize::new(0));
        let receiver = guest_upload::receive(listener, Arc::clone(&received), None, None);
        let kills: usize = std::env::var("BULKHEAD_KILLS")
            .ok()
            .and_then(|k| k.parse().ok())
            .unwrap_or(3);
        let size = (24 * MIB).max(kills * 3 * MIB);
        guest_upload::start(&mut g, size / MIB, "10.0.0.1", 5000, T)?;
        // Crash the daemon (three times by default) while the bytes are flowing.
        let mut resumed = Vec::new();
        for k in 1..=kills {
            let mark = k * size / (kills + 2);
            let start = Instant::now();
            while received.load(Ordering::Relaxed) < mark {
                ensure!(
                    start.elapsed() < Duration::from_secs(120),
                    "{mode:?}: transfer stalled at {} bytes",
                    received.load(Ordering::Relaxed)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let killed_at = received.load(Ordering::Relaxed);
            let t0 = Instant::now();
            sup.crash_and_restart(&scratch)?;
            // Time from SIGKILL until the transfer moves again (TCP retransmission included).
            while received.load(Ordering::Relaxed) == killed_at
                && t0.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            resumed.push(t0.elapsed());
        }
        let got = receiver.join().expect("receiver")?;
        guest_upload::check(&mut g, &got, T).with_context(|| format!("{mode:?}"))?;
        let ping = g.run("ping -c 2 -W 5 10.0.0.1", T)?;
        ensure!(
            ping.status == 0,
            "{mode:?}: ping after restarts failed: {}",
            ping.stdout
        );
        g.poweroff(T)?;
        resumed.sort();
        let ms: Vec<u128> = resumed.iter().map(Duration::as_millis).collect();
        eprintln!(
            "{mode:?} (packed: {packed}): {} MiB across {} daemon crashes, checksum matches; SIGKILL to data flowing again: {ms:?} ms",
            size / MIB,
            sup.restarts
        );
    }
    Ok(())
}
