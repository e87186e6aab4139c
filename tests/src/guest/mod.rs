//! The guest kit: boots a small Linux guest under QEMU (TCG by default) for integration tests
//! and demos, and talks to it over its serial console.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};
//! let kit = GuestKit::ensure()?; // Debian cloud kernel + busybox initramfs, cached in target/
//! let mut guest = Guest::boot(&kit, &QemuConfig::default())?;
//! let release = guest.run_ok("uname -r", Duration::from_secs(10))?;
//! guest.poweroff(Duration::from_secs(30))?;
//! # Ok(()) }
//! ```
//!
//! Files: `cache` (where and how things are cached), `host` (running host tools), `kernel`
//! (fetch + extract the kernel package), `elf` + `modules` (which modules, in which order),
//! `cpio` + `initramfs` (the initramfs), `kit` (`GuestKit`), `qemu` (`QemuConfig`),
//! `console` (reading QEMU's output), `conversation` (the shell protocol), `vm` (`Guest`),
//! `qmp` (QEMU's monitor), `migration` (one VM moved between two QEMUs).

mod cache;
mod console;
mod conversation;
mod cpio;
mod elf;
mod host;
mod initramfs;
mod kernel;
mod kit;
mod migration;
mod modules;
mod qemu;
mod qmp;
mod vm;

pub use conversation::CmdOutput;
pub use kit::GuestKit;
pub use migration::{
    incoming_uri, make_migratable, migrate, migration_qemu, one_migration_at_a_time, MigrationPace,
};
pub use qemu::QemuConfig;
pub use qmp::{MigrationStats, Qmp};
pub use vm::Guest;
