//! vhost-user-net: a virtio-net device over a Linux TAP, served over vhost-user on Bulkhead's
//! engine. The library part lets the harness run the same device in-process.

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
pub mod rarp;
pub mod rx;
pub mod stats;
pub mod tap;
pub mod tx;
pub mod vnet;

use std::sync::Arc;

use bulkhead_common::capabilities::Capabilities;
use bulkhead_common::sandbox;
use bulkhead_common::serve::{self, ServeError};
use bulkhead_common::signals::Signals;

pub use config::{Args, Config, TapSource};
pub use device::{NetDevice, NetOptions};
use tap::{TapError, TapQueue};

/// System calls the network data path adds to the engine's: the TAP ioctls the guest's
/// feature negotiation needs (header size, offloads) and attaching a queue when a guest starts
/// it, detaching it when it stops.
const SYSCALLS: &[sandbox::Allow] = &[sandbox::Allow::with_arg1(
    libc::SYS_ioctl,
    &[
        libc::TUNSETVNETHDRSZ,
        libc::TUNSETOFFLOAD,
        libc::TUNGETIFF,
        libc::TUNSETQUEUE,
    ],
)];

/// `--print-capabilities` output (QEMU's schema defines no net features).
pub fn capabilities() -> String {
    Capabilities {
        kind: "net",
        features: &[],
    }
    .to_json()
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up the TAP")]
    Tap(#[from] TapError),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("no endpoint to serve on")]
    Endpoint(#[from] bulkhead_common::cli::EndpointError),
    #[error("cannot enter the sandbox")]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Opens the TAP queues, then serves frontends until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), RunError> {
    // Before any thread exists, so that every thread inherits the blocked signal mask.
    let signals = Signals::install().map_err(RunError::Signals)?;
    let taps = match &config.tap {
        TapSource::Name(name) => TapQueue::open_all(name, config.queue_pairs)?,
        TapSource::Fds(fds) => fds
            .iter()
            .map(|fd| TapQueue::from_raw(*fd))
            .collect::<Result<_, _>>()?,
    };
    let name = taps
        .first()
        .map(TapQueue::name)
        .transpose()?
        .unwrap_or_default();
    if let TapSource::Name(_) = config.tap {
        if let Some(t) = taps.first() {
            // A crash must not take the interface (and its configuration) with it.
            if let Err(e) = t.set_persistent() {
                // Not guest-triggerable: start-up only
                tracing::event!(
                    tracing::Level::WARN,
                    "cannot make {name} persistent; a restart recreates it unconfigured: {}",
                    bulkhead_common::logging::chain(&e)
                );
            }
            if let Err(e) = t.set_up() {
                // Not guest-triggerable: start-up only
                tracing::event!(
                    tracing::Level::WARN,
                    "cannot bring {name} up (do it yourself): {}",
                    bulkhead_common::logging::chain(&e)
                );
            }
        }
    }
    tracing::info!(tap = %name, queue_pairs = config.queue_pairs, "TAP ready");
    let endpoint = config.serve.endpoint()?.bind()?;
    let control = config.serve.control_listener()?;
    let device = NetDevice::new(
        taps,
        NetOptions {
            queue_size: config.queue_size,
            mac: config.mac,
            mtu: config.mtu,
        },
    );
    // The TAP is open: confine the daemon before any queue thread exists.
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
