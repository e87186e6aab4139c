//! The guest's view (secondary): a real QEMU guest doing the same I/O through QEMU's built-in
//! devices, through Bulkhead's daemons and through qemu-storage-daemon. Under TCG the guest CPU
//! is emulated, so absolute numbers measure TCG as much as the device path: what counts is the
//! comparison between backends measured in one run on one image.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::blk::{spawn_qsd, Backend, TmpfsImage};
use super::stats::median;
use crate::daemon::{Daemon, Scratch};
use crate::fixture::NetFixture;
use crate::guest::{Guest, GuestKit, QemuConfig};
use crate::netns::NetNs;

const MIB: u64 = 1 << 20;
/// Large enough for the biggest sequential workload.
const IMAGE_BYTES: u64 = 256 * MIB;
const GUEST_MAC: &str = "52:54:00:12:34:56";
const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";
/// Generous: a TCG guest is slow, and a command that hangs must still end the run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestBlkBackend {
    /// `virtio-blk-pci` with the disk served by an iothread inside QEMU.
    QemuBuiltin,
    /// The daemon with its default engine, io_uring.
    VhostUserBlk,
    /// The daemon with `--io-engine sync`.
    VhostUserBlkSync,
    QemuStorageDaemon,
}

impl GuestBlkBackend {
    pub const ALL: [GuestBlkBackend; 4] = [
        GuestBlkBackend::QemuBuiltin,
        GuestBlkBackend::VhostUserBlk,
        GuestBlkBackend::VhostUserBlkSync,
        GuestBlkBackend::QemuStorageDaemon,
    ];

    pub fn label(self) -> &'static str {
        match self {
            GuestBlkBackend::QemuBuiltin => "QEMU virtio-blk (built-in, iothread)",
            GuestBlkBackend::VhostUserBlk => "vhost-user-blk (Bulkhead, io-uring)",
            GuestBlkBackend::VhostUserBlkSync => "vhost-user-blk (Bulkhead, sync)",
            GuestBlkBackend::QemuStorageDaemon => "qemu-storage-daemon vhost-user-blk",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestNetBackend {
    /// `virtio-net-pci` on `-netdev tap` inside QEMU (no vhost-net on this host).
    QemuBuiltinTap,
    VhostUserNet,
}

impl GuestNetBackend {
    pub const ALL: [GuestNetBackend; 2] = [
        GuestNetBackend::QemuBuiltinTap,
        GuestNetBackend::VhostUserNet,
    ];

    pub fn label(self) -> &'static str {
        match self {
            GuestNetBackend::QemuBuiltinTap => "QEMU virtio-net + TAP (built-in)",
            GuestNetBackend::VhostUserNet => "vhost-user-net (Bulkhead)",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestBlkPoint {
    pub backend: GuestBlkBackend,
    pub workload: String,
    pub ops_per_sec: f64,
    pub mib_per_sec: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestNetPoint {
    pub backend: GuestNetBackend,
    pub workload: String,
    /// Throughput workloads: megabits per second; `None` for latency workloads.
    pub mbit_per_sec: Option<f64>,
    /// Latency workloads: median round trip in milliseconds.
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestView {
    pub accel: String,
    pub qemu: String,
    pub guest_kernel: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub blk: Vec<GuestBlkPoint>,
    pub net: Vec<GuestNetPoint>,
}

/// One block workload: a shell command run in the guest and what it moves.
struct BlkWorkload {
    name: &'static str,
    command: String,
    ops: u64,
    bytes: u64,
}

fn blk_workloads(quick: bool) -> Vec<BlkWorkload> {
    // Sized for a few seconds each under TCG (quick: a fraction of a second).
    let small: u64 = if quick { 1024 } else { 8192 };
    let big: u64 = if quick { 16 } else { 128 };
    let per_reader = small / 4;
    vec![
        BlkWorkload {
            name: "4 KiB direct reads, 1 reader",
            command: format!("dd if=/dev/vda of=/dev/null bs=4096 count={small} iflag=direct"),
            ops: small,
            bytes: small * 4096,
        },
        BlkWorkload {
            name: "4 KiB direct reads, 4 readers",
            // Every reader's status counts: a bare `wait` would report success regardless.
            command: format!(
                "pids=; for i in 0 1 2 3; do dd if=/dev/vda of=/dev/null bs=4096 \
                 count={per_reader} skip=$((i * {per_reader})) iflag=direct 2>/dev/null & \
                 pids=\"$pids $!\"; done; rc=0; for p in $pids; do wait $p || rc=1; done; \
                 exit $rc"
            ),
            ops: per_reader * 4,
            bytes: per_reader * 4 * 4096,
        },
        BlkWorkload {
            name: "4 KiB direct writes, 1 writer",
            command: format!("dd if=/dev/zero of=/dev/vda bs=4096 count={small} oflag=direct"),
            ops: small,
            bytes: small * 4096,
        },
        BlkWorkload {
            name: "1 MiB direct reads, 1 reader",
            command: format!("dd if=/dev/vda of=/dev/null bs=1048576 count={big} iflag=direct"),
            ops: big,
            bytes: big * MIB,
        },
    ]
}

/// Boots guests on every backend and runs the workloads `reps` times each (medians).
pub fn run(quick: bool, reps: usize) -> Result<GuestView> {
    let kit = GuestKit::ensure()?;
    let cfg = QemuConfig::default();
    let mut view = GuestView {
        accel: cfg.accel.clone(),
        qemu: qemu_version(&cfg.qemu),
        guest_kernel: kit.kernel_release.clone(),
        vcpus: cfg.smp,
        memory_mb: cfg.memory_mb,
        blk: Vec::new(),
        net: Vec::new(),
    };
    let scratch = Scratch::new("guestbench")?;
    // The guest's disk, on tmpfs as in the rest of the harness.
    let image = TmpfsImage::create("guest", IMAGE_BYTES)?;
    for backend in GuestBlkBackend::ALL {
        let points = blk_backend(&kit, &scratch, &image.0, backend, quick, reps)
            .with_context(|| format!("guest view, {}", backend.label()))?;
        view.blk.extend(points);
    }
    drop(image);
    let mib = if quick { 8 } else { 32 };
    for backend in GuestNetBackend::ALL {
        let points = net_backend(&kit, &scratch, backend, mib, quick, reps)
            .with_context(|| format!("guest view, {}", backend.label()))?;
        view.net.extend(points);
    }
    Ok(view)
}

fn qemu_version(qemu: &Path) -> String {
    std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn blk_backend(
    kit: &GuestKit,
    scratch: &Scratch,
    image: &Path,
    backend: GuestBlkBackend,
    quick: bool,
    reps: usize,
) -> Result<Vec<GuestBlkPoint>> {
    let mut cfg = QemuConfig::default();
    let socket = scratch.join("guest-blk.sock");
    let _ = std::fs::remove_file(&socket);
    // Kept alive until the guest is gone.
    let _daemon: Option<Daemon> = match backend {
        GuestBlkBackend::QemuBuiltin => {
            cfg.extra_args.extend([
                "-object".to_owned(),
                "iothread,id=io0".to_owned(),
                "-drive".to_owned(),
                format!(
                    "file={},if=none,id=d0,format=raw,cache=writeback,aio=threads",
                    image.display()
                ),
                "-device".to_owned(),
                "virtio-blk-pci,drive=d0,iothread=io0".to_owned(),
            ]);
            None
        }
        GuestBlkBackend::VhostUserBlk | GuestBlkBackend::VhostUserBlkSync => {
            let engine = if backend == GuestBlkBackend::VhostUserBlk {
                "io-uring"
            } else {
                "sync"
            };
            let args = [
                "--socket-path".to_owned(),
                socket.display().to_string(),
                "--blk-file".to_owned(),
                image.display().to_string(),
                "--io-engine".to_owned(),
                engine.to_owned(),
            ];
            let d = Daemon::start("vhost-user-blk", &args, scratch)?;
            cfg.vhost_user_blk("disk0", &socket, "", "");
            Some(d)
        }
        GuestBlkBackend::QemuStorageDaemon => {
            let d = spawn_qsd(scratch, &socket, Backend::Tmpfs, image, cfg.smp)?;
            cfg.vhost_user_blk("disk0", &socket, "", "");
            Some(d)
        }
    };
    let mut g = Guest::boot(kit, &cfg)?;
    let mut points = Vec::new();
    for w in blk_workloads(quick) {
        let mut seconds = Vec::new();
        for _ in 0..reps.max(1) {
            seconds.push(timed(&mut g, &w.command)?);
        }
        let s = median(&seconds);
        eprintln!(
            "guest blk {}: {}: {:.0} ops/s",
            backend.label(),
            w.name,
            w.ops as f64 / s
        );
        points.push(GuestBlkPoint {
            backend,
            workload: w.name.to_owned(),
            ops_per_sec: w.ops as f64 / s,
            mib_per_sec: w.bytes as f64 / MIB as f64 / s,
        });
    }
    g.poweroff(Duration::from_secs(30))?;
    Ok(points)
}

/// Seconds the guest took for `command`, timed on the host around the console exchange (a few
/// milliseconds of console overhead against workloads of seconds).
fn timed(g: &mut Guest, command: &str) -> Result<f64> {
    let started = Instant::now();
    g.run_ok(&format!("{command} 2>/dev/null"), COMMAND_TIMEOUT)?;
    Ok(started.elapsed().as_secs_f64())
}

fn net_backend(
    kit: &GuestKit,
    scratch: &Scratch,
    backend: GuestNetBackend,
    mib: u64,
    quick: bool,
    reps: usize,
) -> Result<Vec<GuestNetPoint>> {
    let mut cfg = QemuConfig::default();
    // Declared before the guest, so they outlive it: the namespace (and the daemon).
    let own_ns;
    let fixture;
    let ns: &NetNs = match backend {
        GuestNetBackend::QemuBuiltinTap => {
            own_ns = NetNs::create("guestbench")?;
            // QEMU creates its TAP in its own namespace: start it inside ours.
            cfg.qemu = qemu_in_namespace(scratch, &own_ns, &cfg.qemu)?;
            cfg.extra_args.extend([
                "-netdev".to_owned(),
                "tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=off".to_owned(),
                "-device".to_owned(),
                format!("virtio-net-pci,netdev=net0,mac={GUEST_MAC}"),
            ]);
            &own_ns
        }
        GuestNetBackend::VhostUserNet => {
            fixture = NetFixture::start(&[])?;
            cfg.vhost_user_net("net0", &fixture.socket, "", 1, GUEST_MAC);
            &fixture.ns
        }
    };
    let mut g = Guest::boot(kit, &cfg)?;
    let points = net_workloads(&mut g, ns, backend, mib, quick, reps)?;
    g.poweroff(Duration::from_secs(30))?;
    Ok(points)
}

fn net_workloads(
    g: &mut Guest,
    ns: &NetNs,
    backend: GuestNetBackend,
    mib: u64,
    quick: bool,
    reps: usize,
) -> Result<Vec<GuestNetPoint>> {
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"])?;
    ns.ip(&["link", "set", "tap0", "up"])?;
    g.run_ok(
        &format!("ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"),
        COMMAND_TIMEOUT,
    )?;
    g.run_ok(&format!("ping -c 1 -W 10 {HOST_IP}"), COMMAND_TIMEOUT)?;
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut rtt = Vec::new();
    for _ in 0..reps.max(1) {
        up.push(guest_to_host(g, ns, mib)?);
        down.push(host_to_guest(g, ns, mib)?);
        rtt.push(ping_rtt_ms(g, if quick { 5 } else { 20 })?);
    }
    let label = backend.label();
    let up = median(&up);
    let down = median(&down);
    let rtt = median(&rtt);
    eprintln!("guest net {label}: TCP out {up:.0} Mbit/s, in {down:.0} Mbit/s, ping {rtt:.3} ms");
    Ok(vec![
        GuestNetPoint {
            backend,
            workload: format!("TCP guest → host, {mib} MiB"),
            mbit_per_sec: Some(up),
            rtt_ms: None,
        },
        GuestNetPoint {
            backend,
            workload: format!("TCP host → guest, {mib} MiB"),
            mbit_per_sec: Some(down),
            rtt_ms: None,
        },
        GuestNetPoint {
            backend,
            workload: "ping guest → host".to_owned(),
            mbit_per_sec: None,
            rtt_ms: Some(rtt),
        },
    ])
}

/// A wrapper script that runs QEMU inside `ns` (`ip netns exec` execs it, so QEMU keeps the
/// pid and the parent-death signal).
fn qemu_in_namespace(scratch: &Scratch, ns: &NetNs, qemu: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = scratch.join("qemu-in-netns");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec ip netns exec '{}' '{}' \"$@\"\n",
            ns.name,
            qemu.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Megabits per second of a TCP stream from the guest, timed from accept to end of stream.
fn guest_to_host(g: &mut Guest, ns: &NetNs, mib: u64) -> Result<f64> {
    let listener = ns.run_in(|| Ok(TcpListener::bind((HOST_IP, 5000))?))?;
    let receiver = std::thread::spawn(move || -> Result<(u64, Duration)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let started = Instant::now();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((total, started.elapsed()));
            }
            total += n as u64;
        }
    });
    g.run_ok(
        &format!(
            "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {HOST_IP} 5000",
            mib * 16
        ),
        COMMAND_TIMEOUT,
    )?;
    let (bytes, took) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    ensure!(
        bytes == mib * MIB,
        "received {bytes} bytes of {}",
        mib * MIB
    );
    Ok(bytes as f64 * 8.0 / 1e6 / took.as_secs_f64())
}

/// Megabits per second of a TCP stream into the guest, timed from connect until the guest,
/// having read everything, closes its end.
fn host_to_guest(g: &mut Guest, ns: &NetNs, mib: u64) -> Result<f64> {
    g.run_ok(
        "(nc -l -p 5001 > /dev/null 2>&1 &) ; echo listening",
        COMMAND_TIMEOUT,
    )?;
    let bytes = mib * MIB;
    let took = ns.run_in(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match TcpStream::connect((GUEST_IP, 5001)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e).context("connecting to the guest"),
            }
        };
        s.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let started = Instant::now();
        let chunk = vec![0x5au8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut rest = [0u8; 64];
        if s.read(&mut rest)? != 0 {
            bail!("the guest's listener sent data");
        }
        Ok(started.elapsed())
    })?;
    Ok(bytes as f64 * 8.0 / 1e6 / took.as_secs_f64())
}

/// Median of `count` ping round trips from the guest, in milliseconds.
fn ping_rtt_ms(g: &mut Guest, count: u32) -> Result<f64> {
    let out = g.run_ok(
        &format!("ping -c {count} -i 0.2 -W 10 {HOST_IP}"),
        COMMAND_TIMEOUT,
    )?;
    let samples: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .collect();
    ensure!(!samples.is_empty(), "no ping replies: {out}");
    Ok(median(&samples))
}
