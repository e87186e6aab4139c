//! The control socket (`--control-socket`, `bulkhead-ctl`) against the real daemons: counters
//! that match exactly what a frontend did, Prometheus text a real parser reads, status that
//! mirrors the session, resize announced on the backend channel, socket ownership for a VMM in
//! another group, and clients that misbehave while the data path keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::control::{call, ctl, ctl_json, sample};
use bulkhead_tests::daemon::{eventually, Daemon, Scratch};
use bulkhead_tests::fixture::{pattern, BlkFixture, NetFixture};
use bulkhead_tests::frontend::blk::{S_IOERR, S_OK, S_UNSUPP};
use bulkhead_tests::frontend::net::ethernet;
use bulkhead_tests::frontend::{BlkOp, Setup, VnetHdr};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// The Python that has Debian's python3-prometheus-client (tests/setup.sh installs it).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

fn blk_with_control(extra: &[&str]) -> Result<(BlkFixture, PathBuf)> {
    let scratch = Scratch::new("ctl")?;
    let control = scratch.join("ctl.sock");
    let control_arg = control.display().to_string();
    let mut args = vec!["--control-socket", control_arg.as_str()];
    args.extend_from_slice(extra);
    let fx = BlkFixture::start_in(scratch, DISK, &args)?;
    Ok((fx, control))
}

fn stats(socket: &Path) -> Result<Value> {
    ctl_json(socket, &["stats"])
}

/// Exactly these requests: 5 writes of 8 KiB, 3 reads of 4 KiB, a flush, a GET_ID, one
/// request of an unknown type and one read beyond the end of the disk.
fn blk_workload(fx: &BlkFixture) -> Result<()> {
    let mut d = fx.driver(Setup::default(), 8, 64 * 1024)?;
    for i in 0..5 {
        d.write(0, i * 16, &pattern(i, 8192))?;
    }
    for i in 0..3 {
        d.read(0, i * 16, 4096)?;
    }
    ensure!(d.run(0, &BlkOp::Flush)?.status == S_OK);
    ensure!(d.run(0, &BlkOp::GetId)?.status == S_OK);
    let raw = BlkOp::Raw {
        kind: 99,
        sector: 0,
        out_len: 0,
        in_len: 512,
    };
    ensure!(d.run(0, &raw)?.status == S_UNSUPP);
    let beyond = BlkOp::Read {
        sector: DISK / 512,
        len: 4096,
    };
    ensure!(d.run(0, &beyond)?.status == S_IOERR);
    Ok(())
}

#[test]
fn blk_stats_count_exactly_what_the_frontend_did() -> Result<()> {
    for engine in ["sync", "io-uring"] {
        let (fx, control) = blk_with_control(&["--io-engine", engine])?;
        blk_workload(&fx)?;
        let s = stats(&control)?;
        let q0 = |t: &str| {
            sample(
                &s,
                "bulkhead_blk_requests_total",
                &[("queue", "0"), ("type", t)],
            )
        };
        for (kind, n) in [
            ("read", 3.0),
            ("write", 5.0),
            ("flush", 1.0),
            ("get_id", 1.0),
            ("unsupported", 1.0),
            ("invalid", 1.0),
            ("discard", 0.0),
            ("write_zeroes", 0.0),
        ] {
            assert_eq!(q0(kind)?, n, "{engine}: {kind} requests");
        }
        let bytes = |d: &str| {
            sample(
                &s,
                "bulkhead_blk_bytes_total",
                &[("queue", "0"), ("direction", d)],
            )
        };
        assert_eq!(bytes("read")?, 3.0 * 4096.0, "{engine}");
        assert_eq!(bytes("written")?, 5.0 * 8192.0, "{engine}");
        let errors = |st: &str| {
            sample(
                &s,
                "bulkhead_blk_errors_total",
                &[("queue", "0"), ("status", st)],
            )
        };
        assert_eq!(errors("ioerr")?, 1.0, "{engine}");
        assert_eq!(errors("unsupp")?, 1.0, "{engine}");
        assert_eq!(errors("none")?, 0.0, "{engine}");
        let latency = sample(
            &s,
            "bulkhead_blk_request_duration_seconds",
            &[("queue", "0")],
        )?;
        assert_eq!(latency, 12.0, "{engine}: every request is in the histogram");
        assert_eq!(sample(&s, "bulkhead_blk_capacity_bytes", &[])?, DISK as f64);
    }
    Ok(())
}

#[test]
fn blk_stats_with_counting_off_stay_zero() -> Result<()> {
    let (fx, control) = blk_with_control(&["--no-stats"])?;
    blk_workload(&fx)?;
    let s = stats(&control)?;
    let n = sample(
        &s,
        "bulkhead_blk_requests_total",
        &[("queue", "0"), ("type", "read")],
    )?;
    assert_eq!(n, 0.0);
    Ok(())
}

/// The parser of the Prometheus project's own Python client reads every sample, and its
/// values are the JSON ones.
#[test]
fn prometheus_text_parses_with_the_prometheus_client_and_matches_the_json() -> Result<()> {
    let (fx, control) = blk_with_control(&[])?;
    blk_workload(&fx)?;
    let out = ctl(&control, &["stats", "--prometheus"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        key = s.name + "|" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[key] = s.value
    out["type:" + fam.name] = fam.type
print(json.dumps(out))
"#;
    let mut py = std::process::Command::new(SYSTEM_PYTHON)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running the Prometheus parser (python3-prometheus-client)")?;
    py.stdin.take().unwrap().write_all(text.as_bytes())?;
    let done = py.wait_with_output()?;
    ensure!(
        done.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&done.stderr)
    );
    let parsed: Value = serde_json::from_slice(&done.stdout)?;
    let get = |k: &str| {
        parsed[k]
            .as_f64()
            .with_context(|| format!("parser has no {k}"))
    };
    assert_eq!(get("bulkhead_blk_requests_total|queue=0,type=write")?, 5.0);
    assert_eq!(
        get("bulkhead_blk_bytes_total|direction=read,queue=0")?,
        12288.0
    );
    assert_eq!(get("bulkhead_blk_errors_total|queue=0,status=unsupp")?, 1.0);
    assert_eq!(
        get("bulkhead_blk_request_duration_seconds_count|queue=0")?,
        12.0
    );
    assert_eq!(
        get("bulkhead_blk_request_duration_seconds_bucket|le=+Inf,queue=0")?,
        12.0
    );
    assert_eq!(
        parsed["type:bulkhead_blk_request_duration_seconds"],
        "histogram"
    );
    // The prometheus parser names counter families without _total.
    assert_eq!(parsed["type:bulkhead_blk_requests"], "counter");
    Ok(())
}

#[test]
fn status_mirrors_the_session_and_the_ring_indices() -> Result<()> {
    let (fx, control) = blk_with_control(&[])?;
    let idle = ctl_json(&control, &["status"])?;
    assert_eq!(idle["device"], "block");
    assert_eq!(idle["frontend"]["connected"], false);
    let mut d = fx.driver(Setup::default(), 8, 4096)?;
    for i in 0..7 {
        d.write(0, i, &pattern(i, 512))?;
    }
    let s = ctl_json(&control, &["status"])?;
    let f = &s["frontend"];
    assert_eq!(f["connected"], true);
    assert_eq!(f["features"], format!("{:#x}", d.fe.acked));
    assert_eq!(
        f["protocol_features"],
        format!("{:#x}", d.fe.protocol.bits())
    );
    assert_eq!(f["inflight_tracking"], true);
    assert_eq!(f["dirty_logging"], false);
    assert_eq!(s["sessions"], 1);
    let q = &s["queues"][0];
    assert_eq!(q["index"], 0);
    assert_eq!(q["size"], 128);
    assert_eq!(q["enabled"], true);
    assert_eq!(q["running"], true);
    assert_eq!(q["last_avail_idx"], 7);
    assert_eq!(q["used_idx"], 7);
    assert_eq!(q["in_flight"], 0);
    drop(d);
    eventually(
        Duration::from_secs(5),
        "the frontend to be seen gone",
        || {
            let s = ctl_json(&control, &["status"])?;
            Ok(s["frontend"]["connected"] == false)
        },
    )?;
    Ok(())
}

#[test]
fn status_after_a_crash_counts_the_resumed_session() -> Result<()> {
    let (mut fx, control) = blk_with_control(&[])?;
    let mut d = fx.driver(Setup::default(), 8, 4096)?;
    d.write(0, 0, &pattern(1, 4096))?;
    fx.crash_and_restart()?;
    let fresh = ctl_json(&control, &["status"])?;
    assert_eq!(fresh["sessions"], 0, "a new process: {fresh}");
    d.fe.reconnect(fx.connect()?)?;
    d.write(0, 8, &pattern(2, 4096))?;
    let s = ctl_json(&control, &["status"])?;
    assert_eq!(s["sessions"], 1);
    assert_eq!(
        s["resumed_sessions"], 1,
        "QEMU handed back the inflight region: {s}"
    );
    assert_eq!(s["frontend"]["inflight_tracking"], true);
    let st = stats(&control)?;
    let writes = sample(
        &st,
        "bulkhead_blk_requests_total",
        &[("queue", "0"), ("type", "write")],
    )?;
    assert_eq!(writes, 1.0, "the restarted daemon counts from zero");
    Ok(())
}

/// The frontend's side of CONFIG_CHANGE_MSG: read it, check it asks for an ack, ack it.
fn ack_config_change(backend: &mut UnixStream) -> Result<()> {
    backend.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut h = [0u8; 12];
    backend.read_exact(&mut h)?;
    let request = u32::from_ne_bytes(h[0..4].try_into()?);
    let flags = u32::from_ne_bytes(h[4..8].try_into()?);
    let size = u32::from_ne_bytes(h[8..12].try_into()?);
    ensure!(request == CONFIG_CHANGE_MSG, "backend request {request}");
    ensure!(
        flags & 0x8 != 0,
        "CONFIG_CHANGE_MSG without NEED_REPLY (flags {flags:#x})"
    );
    ensure!(size == 0, "CONFIG_CHANGE_MSG with a payload of {size}");
    let mut reply = Vec::new();
    reply.extend_from_slice(&CONFIG_CHANGE_MSG.to_ne_bytes());
    reply.extend_from_slice(&0x5u32.to_ne_bytes());
    reply.extend_from_slice(&8u32.to_ne_bytes());
    reply.extend_from_slice(&0u64.to_ne_bytes());
    backend.write_all(&reply)?;
    Ok(())
}

#[test]
fn resize_grows_the_image_and_tells_the_frontend_on_the_backend_channel() -> Result<()> {
    let (fx, control) = blk_with_control(&[])?;
    let setup = Setup {
        backend_channel: true,
        ..Setup::default()
    };
    let mut d = fx.driver(setup, 8, 4096)?;
    let mut backend =
        d.fe.backend
            .take()
            .context("the daemon did not take a backend channel")?;
    let frontend = std::thread::spawn(move || ack_config_change(&mut backend));
    let new_size = 32 * MIB;
    let r = ctl_json(&control, &["resize", "--size", &new_size.to_string()])?;
    frontend.join().unwrap()?;
    assert_eq!(r["old_bytes"], DISK);
    assert_eq!(r["new_bytes"], new_size);
    assert_eq!(r["guest_notified"], true);
    assert_eq!(std::fs::metadata(&fx.image)?.len(), new_size);
    // The config space says so, and the new area is usable.
    let cap = d.fe.conn.get_config(0, 8)?.context("GET_CONFIG refused")?;
    assert_eq!(u64::from_le_bytes(cap[..8].try_into()?), new_size / 512);
    let data = pattern(9, 4096);
    d.write(0, DISK / 512 + 8, &data)?;
    assert_eq!(d.read(0, DISK / 512 + 8, 4096)?, data);
    Ok(())
}

#[test]
fn resize_takes_up_a_file_grown_by_the_host_and_refuses_to_shrink() -> Result<()> {
    let (fx, control) = blk_with_control(&[])?;
    // No frontend: nothing to tell, and the reply says so.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.image)?
        .set_len(20 * MIB + 100)?;
    let r = ctl_json(&control, &["resize"])?;
    assert_eq!(r["new_bytes"], 20 * MIB, "whole sectors only");
    assert_eq!(r["guest_notified"], false);
    let out = ctl(&control, &["resize", "--size", &(4 * MIB).to_string()])?;
    ensure!(!out.status.success(), "shrinking was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("shrink") && err.contains("refused"), "{err}");
    let reply = call(&control, "resize", json!({"size": "big"}))?;
    assert!(!reply.ok);
    assert_eq!(
        serde_json::to_value(reply.error.unwrap().kind)?,
        "bad-arguments"
    );
    assert_eq!(std::fs::metadata(&fx.image)?.len(), 20 * MIB + 100);
    Ok(())
}

#[test]
fn net_stats_count_transmitted_frames_per_queue() -> Result<()> {
    let scratch = Scratch::new("netctl")?;
    let control = scratch.join("ctl.sock");
    let control_arg = control.display().to_string();
    let fx = NetFixture::start(&["--control-socket", &control_arg])?;
    let setup = Setup {
        queues: 2,
        queue_size: 256,
        ram_layout: vec![(0, 128 << 20)],
        queue_num_is_pairs: true,
        ..Setup::default()
    };
    let mut d = fx.driver(setup, 2048, 64, 16)?;
    let sizes = [64usize, 1514, 600, 60];
    for (i, size) in sizes.iter().enumerate() {
        let frame = ethernet(
            [0x52, 0x54, 0, 0xbb, 0, 1],
            0x88b5,
            &pattern(i as u64, size - 14),
        );
        d.send(0, &VnetHdr::default(), &frame, 1)?;
    }
    let s = ctl_json(&control, &["stats"])?;
    let tx = [("queue", "1"), ("direction", "tx")];
    assert_eq!(
        sample(&s, "bulkhead_net_frames_total", &tx)?,
        sizes.len() as f64
    );
    assert_eq!(
        sample(&s, "bulkhead_net_bytes_total", &tx)?,
        sizes.iter().sum::<usize>() as f64
    );
    assert_eq!(sample(&s, "bulkhead_net_errors_total", &tx)?, 0.0);
    let st = ctl_json(&control, &["status"])?;
    assert_eq!(st["device"], "net");
    assert_eq!(st["frontend"]["connected"], true);
    Ok(())
}

/// Runs `bulkhead-ctl status` as user nobody with only group `gid`.
fn status_as_nobody(control: &Path, gid: &str) -> Result<std::process::Output> {
    Ok(std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            &format!("--regid={gid}"),
            "--clear-groups",
        ])
        .arg(bulkhead_tests::daemon::binary("bulkhead-ctl")?)
        .arg("--socket")
        .arg(control)
        .arg("status")
        .output()?)
}

#[test]
fn socket_group_lets_members_of_the_group_connect_and_nobody_else() -> Result<()> {
    let scratch = Scratch::new("group")?;
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o755))?;
    let image = scratch.join("disk.img");
    std::fs::File::create(&image)?.set_len(DISK)?;
    let sock = scratch.join("blk.sock");
    let control = scratch.join("ctl.sock");
    let args = |group: bool| {
        let mut a = vec![
            "--socket-path".to_owned(),
            sock.display().to_string(),
            "--blk-file".to_owned(),
            image.display().to_string(),
            "--control-socket".to_owned(),
            control.display().to_string(),
        ];
        if group {
            a.extend(["--socket-group".to_owned(), "nogroup".to_owned()]);
        }
        a
    };
    let nogroup = {
        let d = Daemon::start("vhost-user-blk", &args(true), &scratch)?;
        let gid = std::fs::metadata(&sock)?.gid();
        for path in [&sock, &control] {
            let m = std::fs::metadata(path)?;
            assert_eq!(m.permissions().mode() & 0o777, 0o660, "{}", path.display());
            assert_eq!(m.gid(), gid, "{}", path.display());
        }
        let member = status_as_nobody(&control, &gid.to_string())?;
        ensure!(
            member.status.success(),
            "a member of the socket's group could not connect: {}",
            String::from_utf8_lossy(&member.stderr)
        );
        let outsider = status_as_nobody(&control, "1")?;
        ensure!(
            !outsider.status.success(),
            "someone outside the group connected"
        );
        // The VMM socket too: connect as an outsider fails with EACCES.
        drop(d);
        gid
    };
    // Without --socket-group the member of that group is an outsider as well.
    let _d = Daemon::start("vhost-user-blk", &args(false), &scratch)?;
    let out = status_as_nobody(&control, &nogroup.to_string())?;
    ensure!(
        !out.status.success(),
        "the default socket let another user in"
    );
    Ok(())
}

#[test]
fn control_socket_serves_after_dropping_privileges_under_seccomp() -> Result<()> {
    let (fx, control) = blk_with_control(&["--user", "nobody"])?;
    blk_workload(&fx)?;
    let s = stats(&control)?;
    assert_eq!(
        sample(
            &s,
            "bulkhead_blk_requests_total",
            &[("queue", "0"), ("type", "write")]
        )?,
        5.0
    );
    ctl_json(&control, &["resize", "--size", &(24 * MIB).to_string()])?;
    assert_eq!(std::fs::metadata(&fx.image)?.len(), 24 * MIB);
    let mut daemon = fx.daemon;
    ensure!(
        daemon.try_wait()?.is_none(),
        "daemon died: {}",
        daemon.log()
    );
    Ok(())
}

#[test]
fn socket_options_without_a_socket_the_daemon_creates_are_refused() -> Result<()> {
    let scratch = Scratch::new("noopt")?;
    let image = scratch.join("disk.img");
    std::fs::File::create(&image)?.set_len(DISK)?;
    let out = std::process::Command::new(bulkhead_tests::daemon::binary("vhost-user-blk")?)
        .args(["--client", "--socket-path"])
        .arg(scratch.join("vmm.sock"))
        .arg("--blk-file")
        .arg(&image)
        .args(["--socket-group", "nogroup"])
        .output()?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("--socket-group"), "{err}");
    Ok(())
}

/// Misbehaving control clients, all at once, while a frontend runs I/O: none of them stops
/// the data path, the daemon stays up, every client gets a bounded answer, and the control
/// socket serves a well-behaved client afterwards.
#[test]
fn hostile_control_clients_never_disturb_the_data_path() -> Result<()> {
    let (fx, control) = blk_with_control(&[])?;
    let base_fds = fx.daemon.fd_count()?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let longest_gap_ms = Arc::new(AtomicU64::new(0));
    let mut d = fx.driver(Setup::default(), 8, 4096)?;
    let io = {
        let (stop, done, gap) = (
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&longest_gap_ms),
        );
        std::thread::spawn(move || -> Result<()> {
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                d.read(0, 0, 4096)?;
                done.fetch_add(1, Ordering::Relaxed);
                let ms = last.elapsed().as_millis() as u64;
                gap.fetch_max(ms, Ordering::Relaxed);
                last = Instant::now();
            }
            Ok(())
        })
    };
    let before = done.load(Ordering::Relaxed);

    // Malformed requests on one connection: each gets an error, the connection stays usable.
    let mut c = UnixStream::connect(&control)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"{not json\n\x00\xff\xfe garbage\n{\"version\":9,\"command\":\"status\"}\n[]\n{\"version\":1,\"command\":\"status\"}\n")?;
    let mut replies = String::new();
    while replies.lines().count() < 5 {
        let mut buf = [0u8; 65536];
        let n = c.read(&mut buf)?;
        ensure!(n > 0, "connection closed after {replies}");
        replies.push_str(std::str::from_utf8(&buf[..n])?);
    }
    let lines: Vec<Value> = replies
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    for l in &lines[..4] {
        assert_eq!(l["ok"], false, "{l}");
    }
    assert_eq!(lines[2]["error"]["kind"], "version");
    assert_eq!(lines[4]["ok"], true);

    // A line that never ends: refused once it passes 64 KiB, then closed.
    let mut huge = UnixStream::connect(&control)?;
    huge.set_read_timeout(Some(Duration::from_secs(5)))?;
    huge.set_write_timeout(Some(Duration::from_secs(5)))?;
    let chunk = vec![b'x'; 1 << 16];
    let mut sent = 0usize;
    while sent < 4 << 20 {
        match huge.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let mut answer = String::new();
    let _ = huge.read_to_string(&mut answer);
    ensure!(
        answer.contains("bad-request"),
        "huge line answered with {answer:?}"
    );

    // More clients than the daemon serves: the extra ones are told and closed.
    let crowd: Vec<UnixStream> = (0..48)
        .map(|_| UnixStream::connect(&control))
        .collect::<Result<_, _>>()?;
    let mut refused = 0;
    for mut s in crowd.iter().skip(40) {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        if buf.contains("too many") {
            refused += 1;
        }
    }
    ensure!(
        refused == 8,
        "{refused} of the 8 clients beyond 40 were refused"
    );
    drop(crowd);

    // A client that sends requests and never reads its replies.
    let mut deaf = UnixStream::connect(&control)?;
    deaf.set_nonblocking(true)?;
    let req = b"{\"version\":1,\"command\":\"stats\"}\n".repeat(1000);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let _ = deaf.write(&req);
        std::thread::sleep(Duration::from_millis(10));
    }

    // Meanwhile a well-behaved client is served.
    let s = ctl_json(&control, &["status"])?;
    assert_eq!(s["frontend"]["connected"], true);
    let during = done.load(Ordering::Relaxed) - before;
    drop(deaf);
    stop.store(true, Ordering::Relaxed);
    io.join().unwrap()?;
    eprintln!(
        "reads completed during the hostile clients: {during}; longest gap between reads: {} ms",
        longest_gap_ms.load(Ordering::Relaxed)
    );
    ensure!(during > 100, "the data path stalled: {during} reads");
    ensure!(
        longest_gap_ms.load(Ordering::Relaxed) < 1000,
        "a read waited {} ms",
        longest_gap_ms.load(Ordering::Relaxed)
    );
    let mut daemon = fx.daemon;
    ensure!(
        daemon.try_wait()?.is_none(),
        "daemon died: {}",
        daemon.log()
    );
    eventually(
        Duration::from_secs(10),
        "the clients' descriptors to be closed",
        || Ok(daemon.fd_count()? <= base_fds + 2),
    )?;
    Ok(())
}
