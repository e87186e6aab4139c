//! The VMM's side of Bulkhead: a synthetic vhost-user frontend (guest RAM, rings, device drivers),
//! a kit to run the daemons, and a guest kit that boots QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bench;
pub mod control;
pub mod daemon;
pub mod fixture;
pub mod frontend;
pub mod guest;
pub mod guest_disk;
pub mod guest_upload;
pub mod hostile;
pub mod layouts;
pub mod load;
pub mod netload;
pub mod netns;
pub mod supervisor;
