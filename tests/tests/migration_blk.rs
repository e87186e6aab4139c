//! Live migration of a TCG guest whose disk is vhost-user-blk: source and
//! destination QEMU on this host, each with its own daemon on the same image. The guest keeps
//! the disk busy across the switch (buffered reads into its page cache, numbered direct writes);
//! afterwards what it sees and what the image holds must be exactly right. The same run against
//! a daemon that does not mark the buffers it fills must fail: the negative control that shows
//! the test can see a missing dirty log. Also: a migration after a cancelled one (logging turned
//! off and on again in one session), there and back (A→B→A), save to a file and restore, and a
//! migration right after the source daemon was SIGKILLed and restarted.
//!
//! Migrations run one at a time: two at once on two cores starve each other's guests.
//!
//! The QEMU is `migration_qemu()`'s, 10.0: on the system's 7.2 about one migration in 14 left
//! the destination guest's kernel corrupted right after the switch (a GPF on LIST_POISON in a
//! timer or the page allocator), with qemu-storage-daemon and QEMU's own virtio-blk as well
//! (`BULKHEAD_MIGRATION_QEMU=qemu-system-x86_64` with `BULKHEAD_MIGRATION_PEER=qsd` or
//! `qemu-file` reproduces it).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::control::dirty_pages_logged;
use bulkhead_tests::daemon::{eventually, Daemon, Scratch};
use bulkhead_tests::fixture::{blk_daemon_args, pattern};
use bulkhead_tests::guest::{
    incoming_uri, make_migratable, migrate, migration_qemu, one_migration_at_a_time, Guest,
    GuestKit, MigrationPace, MigrationStats, QemuConfig, Qmp,
};
use bulkhead_tests::supervisor::{Mode, Supervised};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const IMAGE_MIB: u64 = 64;
/// The numbered writes go to blocks from here (MiB 32 on), at most `WRITE_BLOCKS` of them.
const WRITE_BASE: u64 = 32 * MIB / BLOCK;
const WRITE_BLOCKS: u64 = 4096;

/// Keeps guest memory dirty (8 MiB of non-zero data rewritten per round, more than a 100 ms
/// pause can send; zero pages would cost the migration nothing) so the migration does not end
/// until `/tmp/stop` exists.
const DIRTIER: &str = "yes 0123456789abcdef | head -c 8388608 > /dev/shm/src; \
    (while [ ! -e /tmp/stop ]; do cp /dev/shm/src /dev/shm/dirty; done) > /dev/null 2>&1 &";

/// Linux drops a block device's page cache when its last opener closes it: one opener kept for
/// the whole run makes the destination read what came across, not the disk again. Then the
/// cache is emptied, so every page the guest reads next is filled by the device.
const HOLD_AND_DROP_CACHE: &str =
    "sleep 100000 < /dev/vda > /dev/null 2>&1 & sleep 0.1; echo 3 > /proc/sys/vm/drop_caches";

/// Once the migration has sent guest RAM once, the guest reads the whole disk into its page
/// cache, in the background: the device fills pages the migration has already sent, so unless
/// the daemon logs its writes the destination gets them stale. Then it lets the migration end.
const FILL_DURING_MIGRATION: &str = "(dd if=/dev/vda of=/dev/null bs=1048576 2>/dev/null; \
    touch /tmp/filled /tmp/stop) > /dev/null 2>&1 &";

/// Numbered direct-I/O writes (block `WRITE_BASE + i` holds `i`, zero-padded to 4096 bytes),
/// each read back and compared, until `/tmp/wstop` exists; `/tmp/at` is the count so far
/// (replaced by a rename, so never read half-written), `/tmp/count` the final one. Lines
/// without single quotes, so each can be quoted for printf.
const WRITER: &[&str] = &[
    "i=0",
    "while [ ! -e /tmp/wstop ] && [ $i -lt 4096 ]; do",
    "  printf \"%04096d\" $i | dd of=/dev/vda bs=4096 seek=$((8192+i)) count=1 iflag=fullblock oflag=direct conv=notrunc 2>/tmp/werr || { echo WRITE ERROR $i; cat /tmp/werr; exit 1; }",
    "  got=$(dd if=/dev/vda bs=4096 skip=$((8192+i)) count=1 iflag=direct 2>/tmp/werr) || { echo READ ERROR $i; exit 1; }",
    "  [ \"$got\" = \"$(printf \"%04096d\" $i)\" ] || { echo VERIFY ERROR $i; exit 1; }",
    "  i=$((i+1)); echo $i > /tmp/at.new; mv /tmp/at.new /tmp/at",
    "done",
    "echo $i > /tmp/count",
];

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Block `i` of the numbered writes.
fn numbered(i: u64) -> Vec<u8> {
    format!("{i:04096}").into_bytes()
}

enum Backend {
    Plain(Daemon),
    /// For comparison (`BULKHEAD_MIGRATION_PEER=qemu-file`): no backend process, QEMU's own
    /// virtio-blk on the image (the same migration without vhost-user at all).
    Builtin(PathBuf),
    /// Restartable (SIGKILL and start again; QEMU reconnects).
    Supervised(Supervised),
}

/// One side of a migration: a daemon on the shared image, and the QEMU it serves.
struct Side {
    backend: Backend,
    socket: PathBuf,
    qmp: PathBuf,
    chardev_opts: &'static str,
    /// The QEMU binary (`migration_qemu`).
    qemu: PathBuf,
    /// Our daemon's control socket (not for the comparison peers).
    control: Option<PathBuf>,
}

impl Side {
    fn new(scratch: &Scratch, image: &Path, name: &str, extra: &[&str]) -> Result<Self> {
        let socket = scratch.join(&format!("{name}.sock"));
        let qmp = scratch.join(&format!("{name}.qmp"));
        // For comparison: the same migration on qemu-storage-daemon.
        let peer = std::env::var_os("BULKHEAD_MIGRATION_PEER");
        let mut control = None;
        let backend = if peer.as_ref().is_some_and(|v| v == "qemu-file") {
            Backend::Builtin(image.to_owned())
        } else if peer.is_some_and(|v| v == "qsd") {
            Backend::Plain(bulkhead_tests::bench::blk::spawn_qsd(
                scratch,
                &socket,
                bulkhead_tests::bench::blk::Backend::Tmpfs,
                image,
                2,
            )?)
        } else {
            let ctl = scratch.join(&format!("{name}.ctl"));
            let mut args = blk_daemon_args(&socket, image, extra);
            args.extend(["--control-socket".to_owned(), ctl.display().to_string()]);
            control = Some(ctl);
            Backend::Plain(Daemon::start("vhost-user-blk", &args, scratch)?)
        };
        Ok(Self {
            backend,
            socket,
            qmp,
            chardev_opts: "",
            qemu: migration_qemu()?,
            control,
        })
    }

    /// A side whose daemon the test can crash and restart (it listens; QEMU reconnects).
    fn supervised(scratch: &Scratch, image: &Path, name: &str) -> Result<Self> {
        let socket = scratch.join(&format!("{name}.sock"));
        let args = vec!["--blk-file".to_owned(), image.display().to_string()];
        let sup = Supervised::start(
            Mode::Listen,
            "vhost-user-blk",
            &args,
            socket.clone(),
            scratch,
        )?;
        Ok(Self {
            backend: Backend::Supervised(sup),
            socket,
            qmp: scratch.join(&format!("{name}.qmp")),
            chardev_opts: Mode::Listen.chardev_opts(),
            qemu: migration_qemu()?,
            control: None,
        })
    }

    fn log(&self) -> String {
        match &self.backend {
            Backend::Plain(d) => d.log(),
            Backend::Supervised(s) => s.daemon.log(),
            Backend::Builtin(_) => String::new(),
        }
    }

    fn config(&self, incoming: Option<String>) -> QemuConfig {
        let mut cfg = QemuConfig {
            qemu: self.qemu.clone(),
            ..QemuConfig::default()
        };
        make_migratable(&mut cfg);
        match &self.backend {
            Backend::Builtin(image) => cfg.extra_args.extend([
                "-drive".to_owned(),
                format!(
                    "file={},if=none,id=disk0,format=raw,cache=writeback",
                    image.display()
                ),
                "-device".to_owned(),
                "virtio-blk-pci,drive=disk0,id=disk0-dev".to_owned(),
            ]),
            _ => {
                cfg.vhost_user_blk("disk0", &self.socket, self.chardev_opts, "");
            }
        }
        cfg.qmp = Some(self.qmp.clone());
        cfg.incoming = incoming;
        cfg
    }

    fn boot(&self, kit: &GuestKit) -> Result<Guest> {
        Guest::boot(kit, &self.config(None))
    }

    /// Pages the daemon has marked in dirty logs so far, if the side has a control socket.
    fn dirty_pages_logged(&self) -> Result<Option<u64>> {
        dirty_pages_logged(self.control.as_deref())
    }
}

/// Migrates the VM on `from` to a new QEMU on `to`, running `during` while it is under way.
fn migrate_between(
    kit: &GuestKit,
    scratch: &Scratch,
    from: &Side,
    to: &Side,
    name: &str,
    during: impl FnOnce(&mut Qmp) -> Result<()>,
) -> Result<(Guest, MigrationStats)> {
    migrate(
        kit,
        &from.qmp,
        |uri| to.config(Some(uri)),
        &to.qmp,
        &scratch.join(&format!("{name}.mig")),
        MigrationPace::default(),
        during,
    )
    .with_context(|| {
        format!(
            "source daemon:\n{}\ndestination daemon:\n{}",
            from.log(),
            to.log()
        )
    })
}

/// What most migration tests start from: the one-at-a-time turn, the guest kit, the image and
/// its per-MiB checksums, and a plain daemon on each side. (Fields in drop order, last first.)
struct Pair {
    _serial: std::sync::MutexGuard<'static, ()>,
    kit: GuestKit,
    scratch: Scratch,
    image: PathBuf,
    sums: Vec<String>,
    a: Side,
    b: Side,
}

impl Pair {
    fn new() -> Result<Self> {
        let serial = one_migration_at_a_time();
        let kit = GuestKit::ensure()?;
        let scratch = Scratch::new("migration")?;
        let (image, sums) = image(&scratch)?;
        let a = Side::new(&scratch, &image, "a", &[])?;
        let b = Side::new(&scratch, &image, "b", &[])?;
        Ok(Self {
            _serial: serial,
            kit,
            scratch,
            image,
            sums,
            a,
            b,
        })
    }
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

/// Per-MiB SHA-256 of the disk as the guest sees it through its page cache (no cache drop:
/// whatever the cache holds came across the migration), once the fill is done.
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

/// The SHA-256 of MiB `i` read with direct I/O (from the device, not the cache).
fn direct_sum(g: &mut Guest, i: u64) -> Result<String> {
    let out = g.run_ok(
        &format!("dd if=/dev/vda bs=1048576 skip={i} count=1 iflag=direct 2>/dev/null | sha256sum"),
        T,
    )?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// What happens to the source before the migration under reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Before {
    Nothing,
    /// A migration started and cancelled: logging on, then off again, in the same sessions.
    CancelledMigration,
    /// The source daemon SIGKILLed and restarted under guest I/O (the inflight region in use).
    DaemonRestart,
}

/// What a migration under reads came to.
struct UnderReads {
    /// MiBs that came out wrong on the destination.
    wrong: Vec<u64>,
    stats: MigrationStats,
    /// Pages the source daemon marked in the dirty log during the migration (none for peers).
    logged: Option<u64>,
}

/// Migrates a guest reading through its page cache.
fn migrate_under_reads(source_extra: &[&str], before: Before) -> Result<UnderReads> {
    let _serial = one_migration_at_a_time();
    let kit = GuestKit::ensure()?;
    let scratch = Scratch::new("migration")?;
    let (image, sums) = image(&scratch)?;
    let mut a = if before == Before::DaemonRestart {
        Side::supervised(&scratch, &image, "a")?
    } else {
        Side::new(&scratch, &image, "a", source_extra)?
    };
    let b = Side::new(&scratch, &image, "b", &[])?;
    let mut src = a.boot(&kit)?;
    match before {
        Before::Nothing => {}
        Before::CancelledMigration => {
            let listen = scratch.join("cancelled.mig");
            let mut dest = Guest::incoming(&kit, &b.config(Some(incoming_uri(&listen))))?;
            eventually(T, "the destination to listen", || Ok(listen.exists()))?;
            let mut qmp = Qmp::connect(&a.qmp, T)?;
            src.run_ok(DIRTIER, T)?;
            let pace = MigrationPace::default();
            qmp.start_migration(&incoming_uri(&listen), pace.max_bandwidth, pace.downtime_ms)?;
            eventually(T, "the first pass", || Ok(qmp.dirty_sync_count()? >= 1))?;
            src.run_ok(
                "dd if=/dev/vda of=/dev/null bs=1048576 count=4 iflag=direct",
                T,
            )?;
            qmp.cancel_migration(T)?;
            eventually(T, "the cancelled destination to exit", || {
                Ok(!dest.running())
            })?;
        }
        Before::DaemonRestart => {
            src.run_ok(
                "dd if=/dev/vda of=/dev/null bs=4096 count=4096 iflag=direct",
                T,
            )?;
            if let Backend::Supervised(s) = &mut a.backend {
                s.crash_and_restart(&scratch)?;
            }
            let first = direct_sum(&mut src, 3)?;
            ensure!(
                first == sums[3],
                "after the restart the guest reads {first}"
            );
        }
    }
    src.run_ok(HOLD_AND_DROP_CACHE, T)?;
    if before != Before::CancelledMigration {
        src.run_ok(DIRTIER, T)?;
    }
    let logged_before = a.dirty_pages_logged()?;
    let (mut dest, stats) = migrate_between(&kit, &scratch, &a, &b, "ab", |qmp| {
        // All of guest RAM has been sent once: every page the fill lands in is stale on the
        // destination unless it is sent again.
        eventually(Duration::from_secs(240), "the second pass", || {
            Ok(qmp.dirty_sync_count()? >= 2)
        })?;
        src.run_ok(FILL_DURING_MIGRATION, T).map(drop)
    })?;
    drop(src);
    let logged = match (logged_before, a.dirty_pages_logged()?) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    let seen = guest_sums(&mut dest).with_context(|| dest.console_log())?;
    ensure!(seen.len() == sums.len(), "the guest printed {seen:?}");
    let wrong = (0..IMAGE_MIB)
        .filter(|i| seen[*i as usize] != sums[*i as usize])
        .collect();
    Ok(UnderReads {
        wrong,
        stats,
        logged,
    })
}

/// Migrates under reads and requires every MiB right on the destination, and (on our daemon) at
/// least the pages the guest read during the migration marked in the log.
fn reads_exactly_after(source_extra: &[&str], before: Before, what: &str) -> Result<()> {
    let UnderReads {
        wrong,
        stats,
        logged,
    } = migrate_under_reads(source_extra, before)?;
    eprintln!("{what}: {stats:?}; {}", logged_rate(logged, &stats));
    ensure!(wrong.is_empty(), "MiBs wrong on the destination: {wrong:?}");
    if let Some(pages) = logged {
        // The guest reads the whole image into fresh page-cache pages during the migration;
        // every one of them is a page the daemon wrote and must have marked at least once.
        ensure!(
            pages >= IMAGE_MIB * MIB / 4096,
            "the daemon counted only {pages} pages logged while the guest read {IMAGE_MIB} MiB"
        );
    }
    Ok(())
}

/// "N pages logged by the source daemon (R/s)" for a migration's report.
fn logged_rate(logged: Option<u64>, stats: &MigrationStats) -> String {
    match logged {
        Some(pages) => format!(
            "{pages} pages logged by the source daemon, {:.0}/s over the migration",
            pages as f64 * 1000.0 / stats.total_ms.max(1) as f64
        ),
        None => "no control socket on this backend".to_owned(),
    }
}

#[test]
fn a_guest_reading_through_its_page_cache_sees_the_disk_exactly_after_a_migration() -> Result<()> {
    reads_exactly_after(&[], Before::Nothing, "migration under reads")
}

#[test]
fn with_the_dirty_log_broken_the_same_migration_corrupts_the_guest() -> Result<()> {
    let UnderReads {
        wrong,
        stats,
        logged,
    } = migrate_under_reads(&["--test-break-dirty-log"], Before::Nothing)?;
    eprintln!(
        "migration with a broken log: {stats:?}, {} MiBs wrong; {}",
        wrong.len(),
        logged_rate(logged, &stats)
    );
    ensure!(
        !wrong.is_empty(),
        "a daemon that does not log its writes went unnoticed: the test cannot see a missing log"
    );
    Ok(())
}

#[test]
fn a_migration_after_a_cancelled_one_still_logs_every_page() -> Result<()> {
    reads_exactly_after(
        &[],
        Before::CancelledMigration,
        "migration after a cancelled one",
    )
}

#[test]
fn a_migration_right_after_a_daemon_restart_keeps_the_guest_reading_right() -> Result<()> {
    reads_exactly_after(
        &[],
        Before::DaemonRestart,
        "migration after a daemon restart",
    )
}

#[test]
fn numbered_direct_writes_across_a_migration_are_all_on_the_image_and_read_back() -> Result<()> {
    let Pair {
        _serial,
        kit,
        scratch,
        image,
        sums,
        a,
        b,
    } = Pair::new()?;
    let mut src = a.boot(&kit)?;
    let script = WRITER
        .iter()
        .map(|l| format!("'{l}'"))
        .collect::<Vec<_>>()
        .join(" ");
    src.run_ok(&format!("printf '%s\\n' {script} > /tmp/w.sh"), T)?;
    src.run_ok("sh /tmp/w.sh > /tmp/wout 2>&1 &", T)?;
    src.run_ok(DIRTIER, T)?;
    let mut before_switch = 0;
    let (mut dest, stats) = migrate_between(&kit, &scratch, &a, &b, "ab", |qmp| {
        eventually(Duration::from_secs(240), "the second pass", || {
            Ok(qmp.dirty_sync_count()? >= 2)
        })?;
        before_switch = src.run_ok("cat /tmp/at", T)?.trim().parse()?;
        src.run_ok("touch /tmp/stop", T).map(drop)
    })?;
    drop(src);
    // The writer goes on on the destination for a while, then stops.
    let at_switch: u64 = dest.run_ok("cat /tmp/at", T)?.trim().parse()?;
    eventually(T, "writes on the destination", || {
        Ok(dest.run_ok("cat /tmp/at", T)?.trim().parse::<u64>()? > at_switch + 20)
    })?;
    dest.run_ok(
        "touch /tmp/wstop; while [ ! -e /tmp/count ]; do sleep 0.1; done",
        T,
    )?;
    let count: u64 = dest.run_ok("cat /tmp/count", T)?.trim().parse()?;
    let wout = dest.run_ok("cat /tmp/wout", T)?;
    ensure!(wout.trim().is_empty(), "the writer failed: {wout}");
    eprintln!(
        "migration under numbered writes: {stats:?}; {before_switch} blocks written before the \
         migration's end, {count} in all"
    );
    ensure!(
        before_switch > 0 && count > at_switch,
        "no writes on one side of the switch"
    );
    let img = std::fs::File::open(&image)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut expected_all = Vec::new();
    for i in 0..count {
        img.read_exact_at(&mut buf, (WRITE_BASE + i) * BLOCK)?;
        ensure!(
            buf == numbered(i),
            "block {i} of {count} is wrong on the image"
        );
        expected_all.extend_from_slice(&buf);
    }
    let guest = dest.run_ok(
        &format!(
            "dd if=/dev/vda bs=4096 skip={WRITE_BASE} count={count} iflag=direct 2>/dev/null | sha256sum"
        ),
        T,
    )?;
    ensure!(
        guest.starts_with(&sha256_hex(&expected_all)),
        "the destination reads the written blocks back differently"
    );
    ensure!(direct_sum(&mut dest, 1)? == sums[1], "MiB 1 changed");
    ensure!(
        count < WRITE_BLOCKS,
        "the writer ran out of blocks before it was stopped"
    );
    Ok(())
}

#[test]
fn a_guest_migrates_there_and_back_and_reads_the_disk_on_each_side() -> Result<()> {
    let Pair {
        _serial,
        kit,
        scratch,
        image: _,
        sums,
        a,
        b,
    } = Pair::new()?;
    let mut on_a = a.boot(&kit)?;
    ensure!(direct_sum(&mut on_a, 0)? == sums[0]);
    let (mut on_b, there) = migrate_between(&kit, &scratch, &a, &b, "ab", |_| Ok(()))?;
    drop(on_a);
    ensure!(direct_sum(&mut on_b, 5)? == sums[5], "wrong MiB 5 on B");
    // Back to A's daemon, which now serves its second QEMU.
    let (mut back_on_a, back) = migrate_between(&kit, &scratch, &b, &a, "ba", |_| Ok(()))?;
    drop(on_b);
    ensure!(
        direct_sum(&mut back_on_a, 9)? == sums[9],
        "wrong MiB 9 back on A"
    );
    eprintln!("idle migration A→B: {there:?}; B→A: {back:?}");
    Ok(())
}

#[test]
fn a_guest_saved_to_a_file_restores_on_another_daemon() -> Result<()> {
    let Pair {
        _serial,
        kit,
        scratch,
        image: _,
        sums,
        a,
        b,
    } = Pair::new()?;
    let mut src = a.boot(&kit)?;
    // Cached before the save: after the restore the guest reads it from its memory.
    src.run_ok(HOLD_AND_DROP_CACHE, T)?;
    src.run_ok(
        "dd if=/dev/vda of=/dev/null bs=1048576 count=8 2>/dev/null",
        T,
    )?;
    let saved = scratch.join("vm.state");
    let mut qmp = Qmp::connect(&a.qmp, T)?;
    let stats = qmp.migrate(
        &format!("exec:cat > {}", saved.display()),
        0,
        Duration::from_secs(120),
    )?;
    let _ = qmp.execute("quit", serde_json::json!({}));
    drop(src);
    let mut restored = Guest::incoming(
        &kit,
        &b.config(Some(format!("exec:cat {}", saved.display()))),
    )?;
    let mut rq = Qmp::connect(&b.qmp, T)?;
    eventually(
        T,
        "the restored VM to run",
        || Ok(rq.status()? == "running"),
    )?;
    let cached = restored.run_ok(
        "dd if=/dev/vda bs=1048576 skip=2 count=1 2>/dev/null | sha256sum",
        T,
    )?;
    ensure!(
        cached.starts_with(&sums[2]),
        "wrong cached MiB 2 after the restore"
    );
    ensure!(
        direct_sum(&mut restored, 40)? == sums[40],
        "wrong MiB 40 after the restore"
    );
    eprintln!(
        "save: {stats:?}, state file {} bytes",
        std::fs::metadata(&saved)?.len()
    );
    Ok(())
}
