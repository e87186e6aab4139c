//! Bulkhead's shared engine: the backend side of vhost-user for devices that run as their own
//! process. It owns the protocol, the guest memory table, split virtqueues, the per-queue worker
//! threads and the serve loop; devices plug in through [`device::Device`].

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

pub mod capabilities;
pub mod cli;
pub mod control;
pub mod device;
pub mod dirty_log;
pub mod engine_options;
pub mod fd;
pub mod guest_access;
pub mod idle_poll;
pub mod inflight;
pub mod inflight_packed;
pub mod iov;
pub mod local;
mod log_cursor;
pub mod logging;
pub mod memfd;
pub mod memory;
pub mod notify;
pub mod pipeline;
pub mod protocol;
mod queue_ctx;
pub mod ratelimit;
pub mod revoke;
pub mod sandbox;
pub mod sd_notify;
pub mod serve;
pub mod session;
pub mod signals;
pub mod socket_access;
pub mod vring;
mod worker;

pub use device::{Device, DeviceError, Progress, QueueCtx, QueueHandler};
pub use memory::GuestMemory;
