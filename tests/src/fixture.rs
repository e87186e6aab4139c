//! Ready-made set-ups shared by integration tests and the harness: a disk image and a running
//! vhost-user-blk daemon serving it.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::daemon::{Daemon, Scratch};
use crate::frontend::{BlkDriver, Connection, Frontend, Setup};

/// A disk image and the daemon serving it.
#[derive(Debug)]
pub struct BlkFixture {
    pub daemon: Daemon,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub scratch: Scratch,
    args: Vec<String>,
}

impl BlkFixture {
    /// Creates a sparse image of `size` bytes and starts `vhost-user-blk` on it with `extra` args.
    pub fn start(size: u64, extra: &[&str]) -> Result<Self> {
        Self::start_in(Scratch::new("blk")?, size, extra)
    }

    /// As [`start`](Self::start), in a scratch directory the caller made (so that `extra` can
    /// name paths inside it).
    pub fn start_in(scratch: Scratch, size: u64, extra: &[&str]) -> Result<Self> {
        let image = scratch.join("disk.img");
        File::create(&image)?.set_len(size)?;
        let socket = scratch.join("blk.sock");
        let args = blk_daemon_args(&socket, &image, extra);
        let daemon = Daemon::start("vhost-user-blk", &args, &scratch)?;
        Ok(Self {
            daemon,
            image,
            socket,
            scratch,
            args,
        })
    }

    /// SIGKILLs the daemon (a crash) and starts a new one on the same image and socket.
    pub fn crash_and_restart(&mut self) -> Result<()> {
        self.daemon.kill()?;
        self.daemon = Daemon::start("vhost-user-blk", &self.args, &self.scratch)?;
        Ok(())
    }

    pub fn connect(&self) -> Result<Connection> {
        Connection::connect(&self.socket)
    }

    /// Connects and starts a driver with `setup`, `depth` requests per queue of up to `max_data`.
    pub fn driver(&self, setup: Setup, depth: u32, max_data: u32) -> Result<BlkDriver> {
        let fe = Frontend::start(self.connect()?, setup)?;
        BlkDriver::new(fe, depth, max_data)
    }

    pub fn image_bytes(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(&self.image)?)
    }
}

/// Deterministic test data: a pattern that differs per `seed` and per position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `vhost-user-blk`'s arguments to listen on `socket` and serve `image`, then `extra`.
pub fn blk_daemon_args(socket: &Path, image: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--socket-path".to_owned(),
        socket.display().to_string(),
        "--blk-file".to_owned(),
        image.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// A network namespace with a `vhost-user-net` daemon inside it that owns TAP `tap0`.
#[derive(Debug)]
pub struct NetFixture {
    pub daemon: Daemon,
    pub ns: crate::netns::NetNs,
    pub socket: PathBuf,
    pub tap: String,
    pub scratch: Scratch,
}

impl NetFixture {
    /// Starts `vhost-user-net --tap tap0` with `extra` args inside a fresh namespace.
    pub fn start(extra: &[&str]) -> Result<Self> {
        let scratch = Scratch::new("net")?;
        let ns = crate::netns::NetNs::create("net")?;
        let socket = scratch.join("net.sock");
        let tap = "tap0".to_owned();
        let mut args = vec![
            "--socket-path".to_owned(),
            socket.display().to_string(),
            "--tap".to_owned(),
            tap.clone(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let daemon = spawn_in_netns("vhost-user-net", &args, &scratch, &ns)?;
        Ok(Self {
            daemon,
            ns,
            socket,
            tap,
            scratch,
        })
    }

    pub fn connect(&self) -> Result<Connection> {
        Connection::connect(&self.socket)
    }

    /// Connects a net driver: `setup.queues` must be twice the queue pairs.
    pub fn driver(
        &self,
        setup: Setup,
        rx_buf: u32,
        rx_depth: u32,
        tx_depth: u32,
    ) -> Result<crate::frontend::NetDriver> {
        let fe = Frontend::start(self.connect()?, setup)?;
        crate::frontend::NetDriver::new(fe, rx_buf, rx_depth, tx_depth)
    }

    /// A packet socket on the TAP, inside the namespace.
    pub fn packet_socket(&self, vnet_hdr: bool) -> Result<crate::netns::PacketSocket> {
        let ifindex = self.ns.ifindex(&self.tap)?;
        self.ns
            .run_in(move || crate::netns::PacketSocket::bind(ifindex, vnet_hdr))
    }
}

/// Starts a daemon whose process lives in `ns` (it enters the namespace before exec).
pub fn spawn_in_netns(
    binary: &str,
    args: &[String],
    scratch: &Scratch,
    ns: &crate::netns::NetNs,
) -> Result<Daemon> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let handle = ns.open()?;
    let raw = handle.as_raw_fd();
    let enter = move || {
        // SAFETY: setns is async-signal-safe and only changes the child's namespace before exec.
        if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let mut d = Daemon::spawn(binary, args, scratch, |cmd| {
        // SAFETY: the hook only calls setns (async-signal-safe) between fork and exec.
        unsafe { cmd.pre_exec(enter) };
    })?;
    drop(handle);
    d.wait_ready(std::time::Duration::from_secs(20))?;
    Ok(d)
}
