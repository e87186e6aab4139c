//! The control socket: an operator's way to ask a running daemon what it is doing (status,
//! statistics) and to tell it things (resize), without touching the data path.
//!
//! One dedicated thread serves it ([`server`]), so a slow or hostile client can never delay the
//! frontend's requests or a queue. What it reports comes from [`state::EngineState`] (written
//! by the session thread on control-plane events) and from per-queue counters that only the
//! queue's worker writes ([`counters`]). The protocol is in [`protocol`]; `bulkhead-ctl` is its
//! client ([`client`]).

pub mod client;
mod commands;
pub mod counters;
pub mod metrics;
pub mod protocol;
mod server;
pub mod state;

pub use commands::Engine;
pub use server::{ControlListener, ControlServer, Handler};
