//! Live migration of a QEMU 7.2 guest (TCG) whose disk is vhost-user-blk: source and
//! destination QEMU on this host, each with its own daemon on the same image. The guest keeps
//! the disk busy across the switch; afterwards what it sees must be exactly the disk's content.
//! The same run against a daemon that does not mark the pages it writes must fail: the negative
//! control that shows the test can see a missing dirty log.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::fixture::pattern;
use bulkhead_tests::guest::{Guest, GuestKit, MigrationStats, QemuConfig, Qmp};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
const IMAGE_MIB: u64 = 64;
/// Slow enough that the guest's I/O overlaps the migration for seconds.
const BANDWIDTH: u64 = 32 * MIB;
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(240);
/// Short: the migration keeps iterating while the guest dirties memory faster than that.
const DOWNTIME_MS: u64 = 100;

/// Keeps guest memory dirty (8 MiB of non-zero data rewritten per round, more than a 100 ms
/// pause can send; zero pages would cost the migration nothing) so the migration does not end
/// until `/tmp/stop` exists.
const DIRTIER: &str = "yes 0123456789abcdef | head -c 8388608 > /dev/shm/src; \
    (while [ ! -e /tmp/stop ]; do cp /dev/shm/src /dev/shm/dirty; done) > /dev/null 2>&1 &";

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One side of a migration: a daemon on the shared image, and the QEMU it serves.
struct Side {
    /// Kept running for the QEMU it serves.
    _daemon: Daemon,
    socket: PathBuf,
    qmp_path: PathBuf,
}

fn daemon(scratch: &Scratch, image: &Path, name: &str, extra: &[&str]) -> Result<Side> {
    let socket = scratch.join(&format!("{name}.sock"));
    // For comparison: the same migration on qemu-storage-daemon.
    if std::env::var_os("BULKHEAD_MIGRATION_PEER").is_some_and(|v| v == "qsd") {
        return Ok(Side {
            _daemon: bulkhead_tests::bench::blk::spawn_qsd(
                scratch,
                &socket,
                bulkhead_tests::bench::blk::Backend::Tmpfs,
                image,
                2,
            )?,
            socket,
            qmp_path: scratch.join(&format!("{name}.qmp")),
        });
    }
    let mut args = vec![
        "--socket-path".to_owned(),
        socket.display().to_string(),
        "--blk-file".to_owned(),
        image.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Ok(Side {
        _daemon: Daemon::start("vhost-user-blk", &args, scratch)?,
        socket,
        qmp_path: scratch.join(&format!("{name}.qmp")),
    })
}

fn config(side: &Side, incoming: Option<String>) -> QemuConfig {
    let mut cfg = QemuConfig::default();
    // QEMU 7.2 under TCG loses part of `-cpu max`'s state across a migration: the guest
    // crashes on the destination within seconds (general protection faults on garbage
    // addresses), qemu-storage-daemon as the backend just the same. qemu64 migrates cleanly.
    if cfg.accel == "tcg" {
        cfg.cpu = "qemu64".to_owned();
    }
    // Debian's kernel zeroes every page it allocates (init_on_alloc): a CPU write to each
    // page-cache page just before the device fills it, which marks it dirty in QEMU's own
    // tracking and hides a device that does not log its writes.
    cfg.append = "init_on_alloc=0".to_owned();
    cfg.vhost_user_blk("disk0", &side.socket, "", "");
    cfg.qmp = Some(side.qmp_path.clone());
    cfg.incoming = incoming;
    cfg
}

/// The image, filled with a pattern that differs per MiB, and each MiB's SHA-256.
fn image(scratch: &Scratch) -> Result<(PathBuf, Vec<String>)> {
    let path = scratch.join("disk.img");
    let f = std::fs::File::create(&path)?;
    let mut sums = Vec::new();
    for i in 0..IMAGE_MIB {
        let chunk = pattern(1000 + i, MIB as usize);
        f.write_all_at(&chunk, i * MIB)?;
        sums.push(sha256_hex(&chunk));
    }
    Ok((path, sums))
}

/// Starts the destination QEMU on `to`, starts migrating the source (QMP at `from`) to it, runs
/// `during` while the migration is under way, and waits for the switch.
fn migrate(
    kit: &GuestKit,
    scratch: &Scratch,
    from: &Side,
    to: &Side,
    name: &str,
    during: impl FnOnce(&mut Qmp) -> Result<()>,
) -> Result<(Guest, MigrationStats)> {
    let listen = scratch.join(&format!("{name}.mig"));
    let uri = format!("unix:{}", listen.display());
    let dest = Guest::incoming(kit, &config(to, Some(uri.clone())))?;
    let mut dq = Qmp::connect(&to.qmp_path, T)?;
    bulkhead_tests::daemon::eventually(T, "the destination to listen", || Ok(listen.exists()))?;
    let mut qmp = Qmp::connect(&from.qmp_path, T)?;
    qmp.start_migration(&uri, BANDWIDTH, DOWNTIME_MS)?;
    during(&mut qmp)?;
    let stats = qmp.wait_migration(MIGRATION_TIMEOUT)?;
    bulkhead_tests::daemon::eventually(T, "the destination to run", || {
        Ok(dq.status()? == "running")
    })?;
    let _ = qmp.execute("quit", serde_json::json!({}));
    Ok((dest, stats))
}

/// Once the migration has sent guest RAM once, the guest reads the whole disk into its page
/// cache (emptied before), in the background: the device fills pages the migration has already
/// sent, so unless the daemon logs its writes the destination gets them stale. Then it lets the
/// migration end.
const FILL_DURING_MIGRATION: &str = "(dd if=/dev/vda of=/dev/null bs=1048576 2>/dev/null; \
    touch /tmp/filled /tmp/stop) > /dev/null 2>&1 &";

/// Per-MiB SHA-256 of the disk as the guest sees it through its page cache (no cache drop:
/// whatever the cache holds came across the migration).
fn guest_sums(g: &mut Guest) -> Result<Vec<String>> {
    let out = g.run_ok(
        &format!(
            "while [ ! -e /tmp/filled ]; do sleep 0.2; done; \
             i=0; while [ $i -lt {IMAGE_MIB} ]; do \
             dd if=/dev/vda bs=1048576 skip=$i count=1 2>/dev/null | sha256sum; i=$((i + 1)); done"
        ),
        Duration::from_secs(180),
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Migrates a guest reading through its page cache; returns the MiBs that came out wrong.
fn migrate_under_reads(source_extra: &[&str]) -> Result<(Vec<u64>, MigrationStats)> {
    let kit = GuestKit::ensure()?;
    let scratch = Scratch::new("migration")?;
    let (image, sums) = image(&scratch)?;
    let a = daemon(&scratch, &image, "a", source_extra)?;
    let b = daemon(&scratch, &image, "b", &[])?;
    let mut src = Guest::boot(&kit, &config(&a, None))?;
    // Linux drops a block device's page cache when its last opener closes it: one opener kept
    // for the whole run makes the destination read what came across, not the disk again.
    src.run_ok(
        "sleep 100000 < /dev/vda > /dev/null 2>&1 & sleep 0.1; echo 3 > /proc/sys/vm/drop_caches",
        T,
    )?;
    src.run_ok(DIRTIER, T)?;
    let (mut dest, stats) = migrate(&kit, &scratch, &a, &b, "ab", |qmp| {
        // All of guest RAM has been sent once: every page the fill lands in is stale on the
        // destination unless it is sent again.
        bulkhead_tests::daemon::eventually(MIGRATION_TIMEOUT, "the second pass", || {
            Ok(qmp.dirty_sync_count()? >= 2)
        })?;
        src.run_ok(FILL_DURING_MIGRATION, T).map(drop)
    })?;
    drop(src);
    let seen = guest_sums(&mut dest).with_context(|| dest.console_log())?;
    ensure!(seen.len() == sums.len(), "the guest printed {seen:?}");
    let wrong = (0..IMAGE_MIB)
        .filter(|i| seen[*i as usize] != sums[*i as usize])
        .collect();
    Ok((wrong, stats))
}

#[test]
fn a_guest_reading_through_its_page_cache_sees_the_disk_exactly_after_a_migration() -> Result<()> {
    let (wrong, stats) = migrate_under_reads(&[])?;
    eprintln!("migration under reads: {stats:?}");
    ensure!(wrong.is_empty(), "MiBs wrong on the destination: {wrong:?}");
    Ok(())
}

#[test]
fn with_the_dirty_log_broken_the_same_migration_corrupts_the_guest() -> Result<()> {
    let (wrong, stats) = migrate_under_reads(&["--test-break-dirty-log"])?;
    eprintln!(
        "migration with a broken log: {stats:?}, {} MiBs wrong",
        wrong.len()
    );
    ensure!(
        !wrong.is_empty(),
        "a daemon that does not log its writes went unnoticed: the test cannot see a missing log"
    );
    Ok(())
}

#[test]
fn idle_guest_migrates_and_reads_on_the_destination() -> Result<()> {
    let kit = GuestKit::ensure()?;
    let scratch = Scratch::new("migration")?;
    let (image, sums) = image(&scratch)?;
    let a = daemon(&scratch, &image, "a", &[])?;
    let b = daemon(&scratch, &image, "b", &[])?;
    let mut src = Guest::boot(&kit, &config(&a, None))?;
    let first = src.run_ok(
        "dd if=/dev/vda bs=1048576 count=1 iflag=direct 2>/dev/null | sha256sum",
        T,
    )?;
    ensure!(first.starts_with(&sums[0]));
    let (mut dest, stats) = migrate(&kit, &scratch, &a, &b, "ab", |_| Ok(()))?;
    eprintln!("idle migration: {stats:?}");
    drop(src);
    let got = dest.run_ok(
        "dd if=/dev/vda bs=1048576 skip=5 count=1 iflag=direct 2>/dev/null | sha256sum",
        T,
    )?;
    ensure!(got.starts_with(&sums[5]), "{got}");
    Ok(())
}
