//! Ready-made set-ups shared by integration tests and the harness: a disk image and a running
//! vhost-user-blk daemon serving it.

use std::fs::File;
use std::path::PathBuf;

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
}

impl BlkFixture {
    /// Creates a sparse image of `size` bytes and starts `vhost-user-blk` on it with `extra` args.
    pub fn start(size: u64, extra: &[&str]) -> Result<Self> {
        let scratch = Scratch::new("blk")?;
        let image = scratch.join("disk.img");
        File::create(&image)?.set_len(size)?;
        let socket = scratch.join("blk.sock");
        let mut args = vec![
            "--socket-path".to_owned(),
            socket.display().to_string(),
            "--blk-file".to_owned(),
            image.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let daemon = Daemon::start("vhost-user-blk", &args, &scratch)?;
        Ok(Self {
            daemon,
            image,
            socket,
            scratch,
        })
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
