//! Restart on crash under a real guest: four writers in a QEMU guest write and read back numbered
//! blocks with direct I/O while the host SIGKILLs vhost-user-blk again and again and a supervisor
//! restarts it, in each way of running it (daemon listens, QEMU listens, systemd-style socket
//! activation, inherited --fd). The guest must see no I/O error and every block must hold what
//! the guest wrote. Prints the time from each SIGKILL to the first guest write completed after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::daemon::Scratch;
use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};
use bulkhead_tests::supervisor::{Mode, Supervised};

const WRITERS: u64 = 4;
/// Blocks between two writers' areas.
const STRIDE: u64 = 100_000;
const T: Duration = Duration::from_secs(120);

fn kills() -> u32 {
    std::env::var("BULKHEAD_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(10)
}

/// Block `i` of writer `w`: its number, zero-padded to 4096 bytes.
fn expected(w: u64, i: u64) -> Vec<u8> {
    format!("{:04096}", w * 1_000_000 + i).into_bytes()
}

/// The writer, as shell lines (no single quotes, so each line can be quoted for printf).
const WRITER: &[&str] = &[
    "w=$1; i=0; base=$((w*100000))",
    "while [ ! -e /tmp/stop ]; do",
    "  n=$((w*1000000+i))",
    "  printf \"%04096d\" $n | dd of=/dev/vda bs=4096 seek=$((base+i)) count=1 iflag=fullblock oflag=direct conv=notrunc 2>/tmp/err.$w || { echo WRITE ERROR w=$w i=$i; cat /tmp/err.$w; exit 1; }",
    "  got=$(dd if=/dev/vda bs=4096 skip=$((base+i)) count=1 iflag=direct 2>/tmp/err.$w) || { echo READ ERROR w=$w i=$i; cat /tmp/err.$w; exit 1; }",
    "  [ \"$got\" = \"$(printf \"%04096d\" $n)\" ] || { echo VERIFY ERROR w=$w i=$i; exit 1; }",
    "  i=$((i+1))",
    "done",
    "echo $i > /tmp/count.$w",
];

/// How many blocks each writer has completed, as far as the image shows; advances `counts`.
fn progress(image: &File, counts: &mut [u64]) -> Result<u64> {
    let mut buf = vec![0u8; 4096];
    for (w, c) in counts.iter_mut().enumerate() {
        let w = w as u64;
        loop {
            image.read_exact_at(&mut buf, (w * STRIDE + *c) * 4096)?;
            if buf != expected(w, *c) {
                break;
            }
            *c += 1;
        }
    }
    Ok(counts.iter().sum())
}

fn run(mode: Mode, packed: bool) -> Result<()> {
    let kit = GuestKit::ensure()?;
    let scratch = Scratch::new("crash")?;
    let image = scratch.join("disk.img");
    File::create(&image)?.set_len((WRITERS * STRIDE + 1024) * 4096)?;
    let socket = scratch.join("blk.sock");
    let args: Vec<String> = ["--blk-file", image.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    let mut sup = Supervised::start(mode, "vhost-user-blk", &args, socket.clone(), &scratch)?;
    let mut cfg = QemuConfig {
        packed,
        ..QemuConfig::default()
    };
    cfg.vhost_user_blk("disk0", &socket, mode.chardev_opts(), "");
    let mut g = Guest::boot(&kit, &cfg)?;
    if packed {
        ensure!(
            guest_has_packed_rings(&mut g)?,
            "the guest did not negotiate packed rings"
        );
    }
    let script = WRITER
        .iter()
        .map(|l| format!("'{l}'"))
        .collect::<Vec<_>>()
        .join(" ");
    g.run_ok(&format!("printf '%s\\n' {script} > /tmp/w.sh"), T)?;
    g.run_ok(
        "for w in 0 1 2 3; do sh /tmp/w.sh $w > /tmp/out.$w 2>&1 & done; echo started",
        T,
    )?;
    let img = File::open(&image)?;
    let mut counts = vec![0u64; WRITERS as usize];
    let wait_for =
        |counts: &mut Vec<u64>, target: u64, limit: Duration| -> Result<Option<Duration>> {
            let start = Instant::now();
            while start.elapsed() < limit {
                if progress(&img, counts)? >= target {
                    return Ok(Some(start.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None)
        };
    wait_for(&mut counts, 20, Duration::from_secs(60))?.context("writers make no progress")?;
    let mut recovery = Vec::new();
    for k in 0..kills() {
        let before = progress(&img, &mut counts)?;
        let t0 = Instant::now();
        sup.crash_and_restart(&scratch)?;
        let after =
            wait_for(&mut counts, before + 1, Duration::from_secs(30))?.with_context(|| {
                format!(
                    "no guest I/O after restart {k}; console:\n{}\nlog:\n{}",
                    g.console_log(),
                    sup.daemon.log()
                )
            })?;
        recovery.push(t0.elapsed().max(after));
        // Let the writers run a little between crashes.
        wait_for(&mut counts, before + 8, Duration::from_secs(30))?;
    }
    g.run_ok("touch /tmp/stop; while [ $(ls /tmp/count.* 2>/dev/null | wc -l) -lt 4 ]; do sleep 0.2; done; echo done", T)?;
    let outputs = g.run_ok("cat /tmp/out.*", T)?;
    ensure!(!outputs.contains("ERROR"), "guest saw errors:\n{outputs}");
    let dmesg = g.run_ok(
        "dmesg | grep -i -E 'I/O error|blk_update_request|timeout' || true",
        T,
    )?;
    ensure!(
        dmesg.trim().is_empty(),
        "guest kernel reported errors:\n{dmesg}"
    );
    let guest_counts: Vec<u64> = g
        .run_ok("cat /tmp/count.0 /tmp/count.1 /tmp/count.2 /tmp/count.3", T)?
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    g.poweroff(T)?;
    // Every block every writer completed holds what it wrote.
    progress(&img, &mut counts)?;
    for (w, (&guest, &host)) in guest_counts.iter().zip(&counts).enumerate() {
        ensure!(
            host >= guest,
            "writer {w} completed {guest} blocks but the image holds {host} intact"
        );
    }
    recovery.sort();
    let ms: Vec<f64> = recovery.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    eprintln!(
        "{mode:?} (packed: {packed}): {} kills, {} blocks written and verified, SIGKILL to first guest I/O: median {:.0} ms, max {:.0} ms",
        sup.restarts,
        guest_counts.iter().sum::<u64>(),
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
    Ok(())
}

/// Whether the guest's virtio-blk device runs packed rings (feature bit 34 as the guest sees it).
fn guest_has_packed_rings(g: &mut Guest) -> Result<bool> {
    Ok(g.run_ok("cut -c35 /sys/block/vda/device/features", T)?
        .trim()
        == "1")
}

#[test]
fn guest_io_survives_daemon_crashes_when_the_daemon_listens() -> Result<()> {
    run(Mode::Listen, false)
}

#[test]
fn guest_io_survives_daemon_crashes_when_qemu_listens() -> Result<()> {
    run(Mode::Client, false)
}

#[test]
fn guest_io_survives_daemon_crashes_with_socket_activation() -> Result<()> {
    run(Mode::SocketActivation, false)
}

#[test]
fn guest_io_survives_daemon_crashes_with_an_inherited_fd() -> Result<()> {
    run(Mode::InheritedFd, false)
}

#[test]
fn guest_io_on_packed_rings_survives_daemon_crashes_when_the_daemon_listens() -> Result<()> {
    run(Mode::Listen, true)
}

#[test]
fn guest_io_on_packed_rings_survives_daemon_crashes_when_qemu_listens() -> Result<()> {
    run(Mode::Client, true)
}

#[test]
fn guest_io_on_packed_rings_survives_daemon_crashes_with_socket_activation() -> Result<()> {
    run(Mode::SocketActivation, true)
}

#[test]
fn guest_io_on_packed_rings_survives_daemon_crashes_with_an_inherited_fd() -> Result<()> {
    run(Mode::InheritedFd, true)
}
