//! Live migration between two QEMUs on this host: what every migration test needs, whatever the
//! device (a QEMU configuration that migrates under TCG, a destination waiting with `-incoming`,
//! the migration itself with something done while it runs).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Guest, GuestKit, MigrationStats, QemuConfig, Qmp};
use crate::daemon::eventually;

const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// Overrides the QEMU migrations run on (`qemu-system-x86_64` runs them on the system's 7.2).
const MIGRATION_QEMU_ENV: &str = "BULKHEAD_MIGRATION_QEMU";

/// The QEMU that migration tests run on: `$BULKHEAD_MIGRATION_QEMU`, else the QEMU 10.0 that
/// `tests/migration-qemu.sh` (run by `tests/setup.sh`) unpacks under `target/migration-qemu/`.
///
/// Not the system's QEMU 7.2: under TCG its migrations leave the destination guest corrupted now
/// and then whatever the backend, QEMU's own virtio devices included (README, Live migration),
/// so a failure there says nothing about the daemons; the same tests pass on 10.0.
pub fn migration_qemu() -> Result<PathBuf> {
    if let Some(q) = std::env::var_os(MIGRATION_QEMU_ENV) {
        return Ok(PathBuf::from(q));
    }
    let wrapper = super::cache::target_dir()?.join("migration-qemu/qemu-system-x86_64");
    if !wrapper.exists() {
        bail!(
            "{} is missing: run tests/migration-qemu.sh (tests/setup.sh does), or set \
             {MIGRATION_QEMU_ENV} to the QEMU to migrate with",
            wrapper.display()
        );
    }
    Ok(wrapper)
}

static ONE_MIGRATION_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A turn to migrate, held for the whole test: two TCG guests (source and destination) already
/// load both CPUs, and a migration paced to overlap guest activity must not be starved by another
/// test's pair.
pub fn one_migration_at_a_time() -> MutexGuard<'static, ()> {
    ONE_MIGRATION_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a migration runs: slow enough (`max_bandwidth`) and with a short enough pause
/// (`downtime_ms`) that guest activity overlaps it for seconds.
#[derive(Debug, Clone, Copy)]
pub struct MigrationPace {
    pub max_bandwidth: u64,
    pub downtime_ms: u64,
    pub timeout: Duration,
}

impl Default for MigrationPace {
    fn default() -> Self {
        Self {
            max_bandwidth: 32 << 20,
            downtime_ms: 100,
            timeout: Duration::from_secs(240),
        }
    }
}

/// Makes `cfg` a VM that migrates cleanly and lets a test see what a device failed to log (the
/// QEMU to run it on is [`migration_qemu`]'s).
pub fn make_migratable(cfg: &mut QemuConfig) {
    // QEMU 7.2 under TCG loses part of `-cpu max`'s state across a migration: the guest
    // crashes on the destination within seconds (general protection faults on garbage
    // addresses), with qemu-storage-daemon as the backend just the same. qemu64 migrates.
    if cfg.accel == "tcg" {
        cfg.cpu = "qemu64".to_owned();
    }
    // Debian's kernel zeroes every page it allocates (init_on_alloc): a CPU write to each
    // page-cache page or socket buffer just before the device fills it, which QEMU's own
    // tracking sees, hiding a device that does not log its writes.
    if !cfg.append.contains("init_on_alloc") {
        cfg.append = format!("{} init_on_alloc=0", cfg.append).trim().to_owned();
    }
}

/// One migration: the destination QEMU (`dest` builds its configuration from the `-incoming`
/// URI, a unix socket at `listen`; its QMP socket at `dest_qmp`) is started, the VM behind
/// `source_qmp` is migrated to it, `during` runs once the migration is under way, and the call
/// returns when the destination runs. The source QEMU is told to quit.
pub fn migrate(
    kit: &GuestKit,
    source_qmp: &Path,
    dest: impl FnOnce(String) -> QemuConfig,
    dest_qmp: &Path,
    listen: &Path,
    pace: MigrationPace,
    during: impl FnOnce(&mut Qmp) -> Result<()>,
) -> Result<(Guest, MigrationStats)> {
    let uri = incoming_uri(listen);
    let guest = Guest::incoming(kit, &dest(uri.clone()))?;
    let mut dq = Qmp::connect(dest_qmp, QMP_TIMEOUT)?;
    eventually(QMP_TIMEOUT, "the destination to listen", || {
        Ok(listen.exists())
    })?;
    let mut qmp = Qmp::connect(source_qmp, QMP_TIMEOUT)?;
    qmp.start_migration(&uri, pace.max_bandwidth, pace.downtime_ms)?;
    during(&mut qmp)?;
    let stats = qmp
        .wait_migration(pace.timeout)
        .with_context(|| format!("destination console:\n{}", guest.console_log()))?;
    eventually(QMP_TIMEOUT, "the destination to run", || {
        Ok(dq.status()? == "running")
    })?;
    let _ = qmp.execute("quit", serde_json::json!({}));
    Ok((guest, stats))
}

/// The `-incoming` URI of a destination listening on `listen`.
pub fn incoming_uri(listen: &Path) -> String {
    format!("unix:{}", listen.display())
}
