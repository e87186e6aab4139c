//! vhost-user-blk: a virtio-blk device served over vhost-user, on Bulkhead's engine.
//!
//! The library part exists so that the harness can run the very same device in-process.

#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod config;
pub mod config_space;
pub mod device;
pub mod disk;
pub mod io;
pub mod queue;
pub mod request;
pub mod resize;
pub mod shared;
pub mod stats;

use std::sync::Arc;

use bulkhead_common::capabilities::Capabilities;
use bulkhead_common::sandbox;
use bulkhead_common::serve::{self, ServeError};
use bulkhead_common::signals::Signals;

pub use config::{Args, Config};
pub use device::{BlkDevice, BlkOptions};

/// System calls the block data path adds to the engine's: io_uring, hole punching, flushes,
/// and the discard / zero-out ioctls of block devices.
const SYSCALLS: &[sandbox::Allow] = &[
    sandbox::Allow::any(libc::SYS_io_uring_setup),
    sandbox::Allow::any(libc::SYS_io_uring_enter),
    sandbox::Allow::any(libc::SYS_io_uring_register),
    sandbox::Allow::any(libc::SYS_fallocate),
    sandbox::Allow::any(libc::SYS_fdatasync),
    sandbox::Allow::any(libc::SYS_fsync),
    // BLKGETSIZE64: a resize re-reads a block device's size.
    sandbox::Allow::with_arg1(
        libc::SYS_ioctl,
        &[disk::BLKDISCARD, disk::BLKZEROOUT, disk::BLKGETSIZE64],
    ),
];

/// `--print-capabilities` output.
pub fn capabilities() -> String {
    Capabilities {
        kind: "block",
        features: &["read-only", "blk-file"],
    }
    .to_json()
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the disk")]
    Disk(#[from] disk::DiskError),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("no endpoint to serve on")]
    Endpoint(#[from] bulkhead_common::cli::EndpointError),
    #[error("cannot enter the sandbox")]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Opens the disk, then serves frontends until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), RunError> {
    // Before any thread exists, so that every thread inherits the blocked signal mask.
    let signals = Signals::install().map_err(RunError::Signals)?;
    let disk = match &config.backing {
        config::Backing::File(path) => disk::Disk::open(&disk::DiskOptions {
            path: path.clone(),
            read_only: config.read_only,
            direct: config.direct,
        })?,
        config::Backing::Null(size) => disk::Disk::null(*size, config.read_only)?,
    };
    let engine = config.io_engine.resolve(&disk);
    tracing::info!(
        file = %disk.path().display(),
        capacity = disk.capacity(),
        read_only = config.read_only,
        direct = config.direct,
        engine = ?engine,
        queues = config.queues,
        "disk opened"
    );
    let endpoint = config.serve.endpoint()?.bind()?;
    let control = config.serve.control_listener()?;
    let device = BlkDevice::new(
        disk,
        BlkOptions {
            num_queues: config.queues,
            queue_size: config.queue_size,
            engine,
            serial: config.serial,
            stats: config.stats,
        },
    );
    // Everything privileged is open: confine the daemon before any queue thread exists.
    sandbox::enter(&config.serve.sandbox_options(), SYSCALLS)?;
    serve::serve(
        Arc::new(device),
        endpoint,
        control,
        &signals,
        config.serve.engine_options(),
    )?;
    Ok(())
}
