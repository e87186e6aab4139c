//! The synthetic VMM: guest RAM, the vhost-user connection, driver-side rings and device drivers.

pub mod blk;
pub mod connection;
pub mod device;
pub mod net;
pub mod packed;
#[cfg(test)]
mod packed_tests;
pub mod queue;
pub mod ram;
pub mod rings;
mod split;

pub use blk::{BlkDriver, BlkOp, Completion};
pub use connection::Connection;
pub use device::{Frontend, Setup};
pub use net::{NetDriver, RxFrame, VnetHdr};
pub use queue::{Buf, DriverQueue, RingLayout};
pub use ram::GuestRam;
pub use rings::{LocalRings, Rings};
