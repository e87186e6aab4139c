//! Command line → validated configuration.

use std::path::PathBuf;

use bulkhead_common::cli::ServeArgs;
use bulkhead_common::vring::MAX_QUEUE_SIZE;

use crate::io::sync::ID_BYTES;
use crate::io::IoEngine;

/// Default number of queues offered. QEMU's `vhost-user-blk-pci` asks for one queue per vCPU by
/// default and refuses a backend offering fewer; unused queues cost nothing.
pub const DEFAULT_QUEUES: u16 = 64;
/// Largest queue size accepted by default (QEMU's own limit for a virtqueue).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// vhost-user-blk: a virtio-blk device backed by a raw image or block device.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,

    /// Raw disk image or block device to serve.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["print_capabilities", "null"])]
    pub blk_file: Option<PathBuf>,

    /// Serve a null device of this many bytes instead of a file: writes are dropped and reads
    /// leave the guest's buffers untouched. For measuring the device path alone.
    #[arg(long, value_name = "BYTES", conflicts_with = "blk_file")]
    pub null: Option<u64>,

    /// Expose the disk read-only (writes fail with an I/O error; the file is opened read-only).
    #[arg(long)]
    pub read_only: bool,

    /// Most queues offered to the frontend.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUES)]
    pub queues: u16,

    /// Largest queue size accepted (a power of two).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: u16,

    /// Serial number reported to the guest (GET_ID, up to 20 bytes). Default: derived from the
    /// file's canonical path, so it is stable across restarts.
    #[arg(long, value_name = "STR")]
    pub serial: Option<String>,

    /// Open the disk with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// How requests are executed.
    #[arg(long, value_enum, default_value_t = IoEngine::Auto)]
    pub io_engine: IoEngine,

    /// Do not count requests (the control socket's `stats` then reports zeroes); the harness
    /// uses it to measure what counting costs.
    #[arg(long)]
    pub no_stats: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--blk-file (or --null) is required")]
    MissingFile,
    #[error("--queues must be between 1 and 1024, got {0}")]
    Queues(u16),
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, got {0}")]
    QueueSize(u16),
    #[error("--serial is longer than {ID_BYTES} bytes")]
    Serial,
}

/// What the device stores data in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    File(PathBuf),
    Null(u64),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub serve: ServeArgs,
    pub backing: Backing,
    pub read_only: bool,
    pub queues: u16,
    pub queue_size: u16,
    pub serial: [u8; ID_BYTES],
    pub direct: bool,
    pub io_engine: IoEngine,
    pub stats: bool,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let backing = match (a.blk_file, a.null) {
            (Some(p), _) => Backing::File(p),
            (None, Some(n)) => Backing::Null(n),
            (None, None) => return Err(ConfigError::MissingFile),
        };
        if a.queues == 0 || a.queues > 1024 {
            return Err(ConfigError::Queues(a.queues));
        }
        if a.queue_size < 2 || a.queue_size > MAX_QUEUE_SIZE || !a.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        let serial = match (a.serial, &backing) {
            (Some(s), _) => serial_bytes(s.as_bytes()).ok_or(ConfigError::Serial)?,
            (None, Backing::File(p)) => default_serial(p),
            (None, Backing::Null(_)) => serial_bytes(b"bh-null").unwrap_or_default(),
        };
        Ok(Config {
            serve: a.serve,
            backing,
            read_only: a.read_only,
            queues: a.queues,
            queue_size: a.queue_size,
            serial,
            direct: a.direct,
            io_engine: a.io_engine,
            stats: !a.no_stats,
        })
    }
}

fn serial_bytes(s: &[u8]) -> Option<[u8; ID_BYTES]> {
    let mut out = [0u8; ID_BYTES];
    out.get_mut(..s.len())?.copy_from_slice(s);
    Some(out)
}

/// "bh-" and 16 hex digits of an FNV-1a hash of the canonical path.
fn default_serial(path: &std::path::Path) -> [u8; ID_BYTES] {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    serial_bytes(format!("bh-{h:016x}").as_bytes()).unwrap_or([0; ID_BYTES])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["vhost-user-blk"];
        v.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn default_serial_is_stable_and_fits_get_id() {
        let a = parse(&["--socket-path", "/tmp/x", "--blk-file", "/tmp/disk.img"]).unwrap();
        let b = parse(&["--socket-path", "/tmp/y", "--blk-file", "/tmp/disk.img"]).unwrap();
        assert_eq!(a.serial, b.serial);
        assert!(a.serial.starts_with(b"bh-"));
        assert_ne!(
            a.serial,
            parse(&["--blk-file", "/tmp/other.img"]).unwrap().serial
        );
    }

    #[test]
    fn queue_size_must_be_a_power_of_two() {
        assert!(matches!(
            parse(&["--blk-file", "x", "--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        ));
    }

    #[test]
    fn long_serial_is_refused() {
        assert!(matches!(
            parse(&["--blk-file", "x", "--serial", "123456789012345678901"]),
            Err(ConfigError::Serial)
        ));
    }

    #[test]
    fn client_mode_requires_a_socket_path() {
        assert!(Args::try_parse_from(["vhost-user-blk", "--blk-file", "x", "--client"]).is_err());
    }
}
