//! The shipped systemd units pass `systemd-analyze verify`, and socket activation works with
//! systemd's own tool (`systemd-socket-activate` passes the listening socket via LISTEN_FDS).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::daemon::{bin_dir, eventually, Daemon, Scratch};
use bulkhead_tests::fixture::pattern;
use bulkhead_tests::frontend::{BlkDriver, Connection, Frontend, Setup};

fn units_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// Copies the units with ExecStart pointing at the binaries just built (verify checks that the
/// executable exists) and verifies an instance of each.
#[test]
fn units_pass_systemd_analyze_verify() -> Result<()> {
    let scratch = Scratch::new("units")?;
    let bins = bin_dir()?;
    for entry in std::fs::read_dir(units_dir())? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?
            .replace("/usr/local/libexec/", &format!("{}/", bins.display()));
        std::fs::write(
            scratch.join(
                path.file_name()
                    .context("unit name")?
                    .to_str()
                    .context("utf-8")?,
            ),
            text,
        )?;
    }
    for unit in [
        "vhost-user-blk@disk0.service",
        "vhost-user-blk@disk0.socket",
        "vhost-user-net@net0.service",
        "vhost-user-net@net0.socket",
    ] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(scratch.join(unit))
            .output()
            .context("systemd-analyze")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && stderr.trim().is_empty(),
            "{unit}: {}\n{stderr}",
            out.status
        );
    }
    Ok(())
}

#[test]
fn socket_activation_by_systemd_socket_activate_serves_io() -> Result<()> {
    let scratch = Scratch::new("activate")?;
    let image = scratch.join("disk.img");
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    let socket = scratch.join("blk.sock");
    let daemon_bin = bulkhead_tests::daemon::binary("vhost-user-blk")?;
    let args: Vec<String> = [
        "-l",
        socket.to_str().unwrap(),
        daemon_bin.to_str().unwrap(),
        "--blk-file",
        image.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    // systemd-socket-activate listens first and starts the daemon on the first connection.
    let d = Daemon::spawn_program(
        Path::new("/usr/bin/systemd-socket-activate"),
        &args,
        "vhost-user-blk",
        &scratch,
        |_| {},
    )?;
    eventually(
        std::time::Duration::from_secs(10),
        "the activation socket",
        || Ok(socket.exists()),
    )?;
    let fe = Frontend::start(Connection::connect(&socket)?, Setup::default())?;
    let mut drv = BlkDriver::new(fe, 8, 4096)?;
    drv.write(0, 0, &pattern(4, 4096))?;
    ensure!(drv.read(0, 0, 4096)? == pattern(4, 4096));
    eventually(
        std::time::Duration::from_secs(5),
        "the daemon's log line",
        || Ok(d.log().contains("frontend connected")),
    )?;
    Ok(())
}

/// The description files management tools read (QEMU's `@VhostUserBackend`) name each daemon
/// with the type its `--print-capabilities` reports.
#[test]
fn backend_description_files_match_the_binaries() -> Result<()> {
    for (daemon, file) in [
        ("vhost-user-blk", "blk/50-bulkhead-vhost-user-blk.json"),
        ("vhost-user-net", "net/50-bulkhead-vhost-user-net.json"),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../daemons")
            .join(file);
        let desc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let caps = Command::new(bulkhead_tests::daemon::binary(daemon)?)
            .arg("--print-capabilities")
            .output()?;
        let caps: serde_json::Value = serde_json::from_slice(&caps.stdout)?;
        ensure!(
            desc["type"] == caps["type"],
            "{file}: type {} vs {}",
            desc["type"],
            caps["type"]
        );
        ensure!(desc["description"].as_str().is_some_and(|d| !d.is_empty()));
        let binary = desc["binary"].as_str().context("binary")?;
        ensure!(
            binary.starts_with('/') && binary.ends_with(daemon),
            "{file}: binary {binary}"
        );
    }
    Ok(())
}
