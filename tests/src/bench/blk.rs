//! Block placements, all driven by the same synthetic driver (random reads at a queue depth):
//! the device in-process and called directly, in-process on a worker thread, the real daemon
//! over vhost-user, and qemu-storage-daemon's vhost-user-blk export; on split virtqueues, and on
//! packed ones where the backend offers them (not the C peers).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_common::local::{DirectQueue, LocalRing, ThreadedQueue};
use bulkhead_common::vring::{Layout, RingAddrs};
use bulkhead_common::Device;
use serde::{Deserialize, Serialize};
use vhost_user_blk::disk::{Disk, DiskOptions};
use vhost_user_blk::io::IoEngine;
use vhost_user_blk::{BlkDevice, BlkOptions};

use super::cpu::{pin_threads, process_cpu, Cpus};
use super::instant::{InstantBackend, InstantThread};
use super::lean_blk::{thread_cpu, Completions, LeanBlk, Sample};
use crate::daemon::{Daemon, Scratch};
use crate::frontend::device::F_RING_PACKED;
use crate::frontend::{Connection, DriverQueue, Frontend, LocalRings, Rings, Setup};

/// Where the device code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlkPlacement {
    /// In the harness, called directly: no notifications (the floor).
    InProcessDirect,
    /// In the harness, on a worker thread, eventfd kick and call.
    InProcessThreaded,
    /// The vhost-user-blk daemon over vhost-user.
    OutOfProcess,
    /// qemu-storage-daemon's vhost-user-blk export.
    QemuStorageDaemon,
    /// QEMU's contrib vhost-user-blk (libvhost-user, synchronous preadv).
    ContribVhostUserBlk,
    /// A backend that completes every request at once (busy-polling on its own thread, or
    /// called inline on one CPU): the driver's own ceiling.
    DriverCeiling,
}

impl BlkPlacement {
    pub fn label(self) -> &'static str {
        match self {
            BlkPlacement::InProcessDirect => "in-process, direct",
            BlkPlacement::InProcessThreaded => "in-process, threaded",
            BlkPlacement::OutOfProcess => "out-of-process (vhost-user-blk)",
            BlkPlacement::QemuStorageDaemon => "qemu-storage-daemon",
            BlkPlacement::ContribVhostUserBlk => "contrib vhost-user-blk (libvhost-user)",
            BlkPlacement::DriverCeiling => "driver ceiling (instant backend)",
        }
    }

    /// Placements that are a real backend (not the driver's yardstick).
    pub fn is_backend(self) -> bool {
        self != BlkPlacement::DriverCeiling
    }
}

/// What the device stores into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Null,
    /// A file on tmpfs.
    Tmpfs,
}

/// vhost-user-blk's I/O engine for a point (other placements ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// What the daemon picks when not told.
    Default,
    Sync,
    IoUring,
}

/// One measured point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlkPoint {
    pub placement: BlkPlacement,
    pub backend: Backend,
    pub engine: Engine,
    pub depth: u32,
    pub block: u32,
    pub cpus: Cpus,
    pub event_idx: bool,
    /// Busy-polling of the device's queue: a fixed window in microseconds, or 0 for the
    /// daemons' adaptive default (reports from before it existed: no polling).
    pub poll_us: u64,
    /// The device counted its requests (vhost-user-blk's default; `--no-stats` otherwise).
    #[serde(default = "counting_default")]
    pub stats: bool,
    /// Migration's dirty logging was on (LOG_ALL, a shared log, used rings logged).
    #[serde(default)]
    pub dirty_log: bool,
    /// With `dirty_log`: distinct guest pages the log held at the end of the point.
    #[serde(default)]
    pub pages_logged: u64,
    /// Packed virtqueue (VIRTIO_F_RING_PACKED) instead of split (reports from before packed
    /// rings measured split ones).
    #[serde(default)]
    pub packed: bool,
    /// At queue depth 1: the notification round trip on this point's CPUs, measured right
    /// before it (cross-CPU wake-ups drift by tens of microseconds over a run on these
    /// machines, so a QD1 latency is compared with the round trip of its own moment).
    #[serde(default)]
    pub notify_rtt_us: Option<f64>,
    pub ops_per_sec: f64,
    pub mib_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU time per operation of the driver's own thread.
    pub cpu_us_per_op_driver: f64,
    /// CPU time per operation of the device: its process, or its thread when in-process.
    pub cpu_us_per_op_device: f64,
    /// Kicks the driver sent and interrupts it waited for, per operation.
    pub kicks_per_op: f64,
    pub interrupts_per_op: f64,
}

/// Reports written before counting existed measured devices that did not count.
fn counting_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy)]
pub struct BlkCase {
    pub placement: BlkPlacement,
    pub backend: Backend,
    pub engine: Engine,
    pub depth: u32,
    pub block: u32,
    pub cpus: Cpus,
    pub event_idx: bool,
    pub poll_us: u64,
    /// vhost-user-blk counts requests (false: `--no-stats`, to measure what counting costs).
    pub stats: bool,
    /// The frontend turns on migration's dirty logging before the point (out of process only).
    pub dirty_log: bool,
    /// Packed virtqueue instead of split (vhost-user-blk, in-process and the driver ceiling:
    /// the C peers do not offer packed rings).
    pub packed: bool,
}

impl BlkCase {
    /// One line naming the point (what `--filter` matches).
    pub fn describe(&self) -> String {
        format!(
            "{:?} {:?} {:?} qd{} {}B {:?} event_idx={} poll={} stats={} log={} ring={}",
            self.placement,
            self.backend,
            self.engine,
            self.depth,
            self.block,
            self.cpus,
            self.event_idx,
            super::poll_word(self.poll_us),
            self.stats,
            self.dirty_log,
            super::ring_word(self.packed)
        )
    }
}

pub const CAPACITY: u64 = 1 << 30;
const QUEUE_SIZE: u16 = 256;
const WARM_UP: Duration = Duration::from_millis(100);

fn setup(case: &BlkCase) -> Setup {
    Setup {
        queue_size: QUEUE_SIZE,
        event_idx: case.event_idx,
        packed: case.packed,
        ram_layout: vec![(0, 512 << 20)],
        ..Setup::default()
    }
}

/// VIRTIO_F_RING_PACKED when `packed`: the in-process rings' features say the layout too.
fn ring_feature(packed: bool) -> u64 {
    if packed {
        F_RING_PACKED
    } else {
        0
    }
}

/// A file on tmpfs filled with a pattern (so reads hit real pages rather than holes), shared by
/// the runs of a suite and removed on drop.
#[derive(Debug)]
pub struct TmpfsImage(pub PathBuf);

impl TmpfsImage {
    /// `bytes` rounded down to whole MiB, named after `tag` and this process.
    pub fn create(tag: &str, bytes: u64) -> Result<Self> {
        let image = TmpfsImage(PathBuf::from(format!(
            "/dev/shm/bulkhead-{tag}-{}.img",
            std::process::id()
        )));
        let f = std::fs::File::create(&image.0)?;
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..(bytes >> 20) {
            std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i << 20)?;
        }
        Ok(image)
    }
}

impl Drop for TmpfsImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The contrib vhost-user-blk binary `tests/peers/build-contrib-vhost-user-blk.sh` builds, if
/// it was built.
pub fn contrib_binary() -> Option<PathBuf> {
    let p = crate::daemon::bin_dir()
        .ok()?
        .parent()?
        .join("peers/vhost-user-blk-contrib");
    p.exists().then_some(p)
}

/// Runs one case for `duration` after a short warm-up.
/// `daemon_args` go to vhost-user-blk in the out-of-process placement (e.g. a completion
/// policy, for a comparison).
pub fn run(
    case: BlkCase,
    image: &std::path::Path,
    duration: Duration,
    daemon_args: &[String],
) -> Result<BlkPoint> {
    case.cpus.place_driver(super::cpu_count())?;
    match case.placement {
        BlkPlacement::InProcessDirect => run_direct(case, image, duration),
        BlkPlacement::InProcessThreaded => run_threaded(case, image, duration),
        BlkPlacement::DriverCeiling => run_ceiling(case, duration),
        BlkPlacement::OutOfProcess
        | BlkPlacement::QemuStorageDaemon
        | BlkPlacement::ContribVhostUserBlk => run_remote(case, image, duration, daemon_args),
    }
}

fn disk(backend: Backend, image: &std::path::Path) -> Result<Disk> {
    Ok(match backend {
        Backend::Null => Disk::null(CAPACITY, false)?,
        Backend::Tmpfs => Disk::open(&DiskOptions {
            path: image.to_owned(),
            read_only: false,
            direct: false,
        })?,
    })
}

fn io_engine(engine: Engine, disk: &Disk) -> IoEngine {
    match engine {
        Engine::Default => IoEngine::Auto.resolve(disk),
        Engine::Sync => IoEngine::Sync,
        Engine::IoUring => IoEngine::IoUring,
    }
}

fn in_process_device(case: &BlkCase, image: &std::path::Path) -> Result<(BlkDevice, LocalRings)> {
    let disk = disk(case.backend, image)?;
    let engine = io_engine(case.engine, &disk);
    let dev = BlkDevice::new(
        disk,
        BlkOptions {
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            engine,
            serial: [0; 20],
            // As the daemon runs by default: counting is part of the device logic compared
            // (off only in the points that measure what it costs).
            stats: case.stats,
        },
    );
    let s = setup(case);
    let mut features = dev.features() & ((1 << 32) | (1 << 28) | (1 << 9));
    if case.event_idx {
        features |= 1 << 29;
    }
    dev.set_features(features)?;
    let rings = LocalRings::new(s, features | ring_feature(case.packed))?;
    Ok((dev, rings))
}

/// The device side of the harness's queue `q`, in the layout the queue was built with.
fn local_ring(q: &DriverQueue, event_idx: bool) -> LocalRing {
    LocalRing {
        size: q.size,
        addrs: RingAddrs {
            desc: q.layout.desc,
            avail: q.layout.avail,
            used: q.layout.used,
        },
        event_idx,
        indirect: true,
        layout: if q.is_packed() {
            Layout::Packed
        } else {
            Layout::Split
        },
    }
}

fn lean<R: Rings>(rings: R, case: &BlkCase) -> Result<LeanBlk<R>> {
    LeanBlk::new(
        rings,
        u16::try_from(case.depth)?,
        case.block,
        CAPACITY,
        false,
    )
}

fn point(case: BlkCase, s: &Sample, cpu_dev: Duration) -> BlkPoint {
    let secs = s.elapsed.as_secs_f64();
    let ops = s.ops.max(1) as f64;
    BlkPoint {
        placement: case.placement,
        backend: case.backend,
        engine: case.engine,
        depth: case.depth,
        block: case.block,
        cpus: case.cpus,
        event_idx: case.event_idx,
        poll_us: case.poll_us,
        stats: case.stats,
        dirty_log: case.dirty_log,
        pages_logged: 0,
        packed: case.packed,
        notify_rtt_us: None,
        ops_per_sec: s.ops as f64 / secs,
        mib_per_sec: s.ops as f64 * f64::from(case.block) / secs / (1 << 20) as f64,
        p50_us: s.latency.percentile_us(50.0),
        p99_us: s.latency.percentile_us(99.0),
        p999_us: s.latency.percentile_us(99.9),
        cpu_us_per_op_driver: s.driver_cpu.as_secs_f64() * 1e6 / ops,
        cpu_us_per_op_device: cpu_dev.as_secs_f64() * 1e6 / ops,
        kicks_per_op: s.kicks as f64 / ops,
        interrupts_per_op: s.interrupts as f64 / ops,
    }
}

fn run_direct(case: BlkCase, image: &std::path::Path, duration: Duration) -> Result<BlkPoint> {
    let (dev, rings) = in_process_device(&case, image)?;
    let ring = local_ring(&rings.queues[0], case.event_idx);
    let mem = rings.ram.mem().clone();
    let mut queue = DirectQueue::new(dev.queue_handler(0, 0)?, mem, ring)?;
    let mut d = lean(rings, &case)?;
    let mut device_cpu = Duration::ZERO;
    let mut run_device = || -> Result<()> {
        let c0 = thread_cpu();
        queue.run()?;
        device_cpu += thread_cpu().saturating_sub(c0);
        Ok(())
    };
    d.run(WARM_UP, Completions::Inline(&mut run_device))?;
    let mut device_cpu = Duration::ZERO;
    let mut run_device = || -> Result<()> {
        let c0 = thread_cpu();
        queue.run()?;
        device_cpu += thread_cpu().saturating_sub(c0);
        Ok(())
    };
    let mut s = d.run(duration, Completions::Inline(&mut run_device))?;
    // The driver's thread ran the device too: split the two.
    s.driver_cpu = s.driver_cpu.saturating_sub(device_cpu);
    Ok(point(case, &s, device_cpu))
}

fn run_threaded(case: BlkCase, image: &std::path::Path, duration: Duration) -> Result<BlkPoint> {
    let (dev, rings) = in_process_device(&case, image)?;
    let q = &rings.queues[0];
    let ring = local_ring(q, case.event_idx);
    let worker = ThreadedQueue::spawn(
        dev.queue_handler(0, 0)?,
        rings.ram.mem().clone(),
        ring,
        q.kick.try_clone()?,
        q.call.try_clone()?,
        super::poll_policy(case.poll_us),
    )?;
    let tids = super::cpu::wait_threads_named(std::process::id(), "queue-")?;
    if let Some(cpu) = case.cpus.device() {
        pin_threads(std::process::id(), "queue-", cpu)?;
    }
    let mut d = lean(rings, &case)?;
    d.run(WARM_UP, Completions::Interrupt)?;
    let c0 = super::cpu::threads_cpu(std::process::id(), &tids)?;
    let s = d.run(duration, Completions::Interrupt)?;
    let cpu = super::cpu::threads_cpu(std::process::id(), &tids)?.saturating_sub(c0);
    worker.stop();
    Ok(point(case, &s, cpu))
}

fn run_ceiling(case: BlkCase, duration: Duration) -> Result<BlkPoint> {
    let s = setup(&case);
    let features = if case.event_idx { 1 << 29 } else { 0 };
    let rings = LocalRings::new(s, features | (1 << 32) | ring_feature(case.packed))?;
    let call = rings.queues[0].call.as_raw_fd();
    let mem = rings.ram.mem().clone();
    let mut d = lean(rings, &case)?;
    let ring = d.ring_ptrs();
    if case.cpus == Cpus::One {
        let mut dev = InstantBackend::new(ring, mem, call, case.event_idx);
        let mut device_cpu = Duration::ZERO;
        let mut step = || -> Result<()> {
            let c0 = thread_cpu();
            dev.step()?;
            device_cpu += thread_cpu().saturating_sub(c0);
            Ok(())
        };
        d.run(WARM_UP, Completions::Inline(&mut step))?;
        let mut device_cpu = Duration::ZERO;
        let mut step = || -> Result<()> {
            let c0 = thread_cpu();
            dev.step()?;
            device_cpu += thread_cpu().saturating_sub(c0);
            Ok(())
        };
        let mut s = d.run(duration, Completions::Inline(&mut step))?;
        s.driver_cpu = s.driver_cpu.saturating_sub(device_cpu);
        return Ok(point(case, &s, device_cpu));
    }
    let dev = InstantThread::spawn(
        InstantBackend::new(ring, mem, call, case.event_idx),
        case.cpus.device(),
    )?;
    let s = d
        .run(WARM_UP, Completions::Interrupt)
        .and_then(|_| d.run(duration, Completions::Interrupt));
    let stopped = dev.stop();
    let s = match (s, stopped) {
        (Ok(s), Ok(())) => s,
        (Err(e), Err(dev)) => return Err(e.context(format!("the instant device failed: {dev:#}"))),
        (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
    };
    // The instant device busy-polls a whole CPU by design; its CPU time says nothing.
    Ok(point(case, &s, Duration::ZERO))
}

fn run_remote(
    case: BlkCase,
    image: &std::path::Path,
    duration: Duration,
    daemon_args: &[String],
) -> Result<BlkPoint> {
    ensure!(
        !case.packed || case.placement == BlkPlacement::OutOfProcess,
        "{:?} does not offer packed rings",
        case.placement
    );
    let scratch = Scratch::new("bench")?;
    let socket = scratch.join("blk.sock");
    let daemon = match case.placement {
        BlkPlacement::QemuStorageDaemon => spawn_qsd(&scratch, &socket, case.backend, image, 1)?,
        BlkPlacement::ContribVhostUserBlk => spawn_contrib(&scratch, &socket, case.backend, image)?,
        _ => {
            let mut args = vec![
                "--socket-path".to_owned(),
                socket.display().to_string(),
                "--queues".to_owned(),
                "1".to_owned(),
            ];
            args.extend(super::poll_args(case.poll_us));
            if !case.stats {
                args.push("--no-stats".to_owned());
            }
            match case.engine {
                Engine::Default => {}
                Engine::Sync => args.extend(["--io-engine".to_owned(), "sync".to_owned()]),
                Engine::IoUring => args.extend(["--io-engine".to_owned(), "io-uring".to_owned()]),
            }
            match case.backend {
                Backend::Null => args.extend(["--null".to_owned(), CAPACITY.to_string()]),
                Backend::Tmpfs => {
                    args.extend(["--blk-file".to_owned(), image.display().to_string()])
                }
            }
            args.extend_from_slice(daemon_args);
            Daemon::start("vhost-user-blk", &args, &scratch)?
        }
    };
    let mut fe = Frontend::start(
        Connection::connect(&socket)?,
        Setup {
            inflight: false,
            ..setup(&case)
        },
    )?;
    // As QEMU does while migrating: the log stays shared for the whole point.
    let log = if case.dirty_log {
        Some(fe.start_dirty_log()?)
    } else {
        None
    };
    let mut d = lean(fe, &case)?;
    // Workers exist once the queue started: place the whole device process.
    case.cpus.place_device_process(daemon.pid())?;
    d.run(WARM_UP, Completions::Interrupt)?;
    let d0 = process_cpu(daemon.pid())?;
    let s = d.run(duration, Completions::Interrupt)?;
    let cd = process_cpu(daemon.pid())?.saturating_sub(d0);
    let mut p = point(case, &s, cd);
    p.pages_logged = log.map_or(0, |l| l.dirty_pages().len() as u64);
    Ok(p)
}

/// QEMU's contrib vhost-user-blk on the image (it has no null device: a null case runs it on
/// the image too, and is reported as such).
fn spawn_contrib(
    scratch: &Scratch,
    socket: &std::path::Path,
    backend: Backend,
    image: &std::path::Path,
) -> Result<Daemon> {
    anyhow::ensure!(
        backend == Backend::Tmpfs,
        "contrib vhost-user-blk serves files only"
    );
    let bin = contrib_binary().context(
        "contrib vhost-user-blk is not built (tests/peers/build-contrib-vhost-user-blk.sh)",
    )?;
    let args = vec![
        "-b".to_owned(),
        image.display().to_string(),
        "-s".to_owned(),
        socket.display().to_string(),
    ];
    let mut d = Daemon::spawn_program(&bin, &args, "vhost-user-blk-contrib", scratch, |_| {})?;
    crate::daemon::eventually(
        Duration::from_secs(10),
        "contrib vhost-user-blk's socket",
        || Ok(socket.exists()),
    )?;
    if let Some(status) = d.try_wait()? {
        anyhow::bail!("contrib vhost-user-blk exited: {status}\n{}", d.log());
    }
    Ok(d)
}

/// qemu-storage-daemon exporting a null-co or file node over vhost-user-blk with `queues`
/// queues.
pub fn spawn_qsd(
    scratch: &Scratch,
    socket: &std::path::Path,
    backend: Backend,
    image: &std::path::Path,
    queues: u32,
) -> Result<Daemon> {
    let node = match backend {
        Backend::Null => format!("driver=null-co,node-name=disk,size={CAPACITY}"),
        Backend::Tmpfs => format!(
            // locking=off: a second instance may serve the same image (a migration's target).
            "driver=file,node-name=disk,filename={},cache.direct=off,locking=off",
            image.display()
        ),
    };
    let export = format!("type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},num-queues={queues},writable=on", socket.display());
    let args = vec!["--blockdev".to_owned(), node, "--export".to_owned(), export];
    let mut d = Daemon::spawn_program(
        std::path::Path::new("/usr/bin/qemu-storage-daemon"),
        &args,
        "qemu-storage-daemon",
        scratch,
        |_| {},
    )?;
    crate::daemon::eventually(
        Duration::from_secs(10),
        "qemu-storage-daemon's socket",
        || Ok(socket.exists()),
    )?;
    if let Some(status) = d.try_wait()? {
        anyhow::bail!("qemu-storage-daemon exited: {status}\n{}", d.log());
    }
    Ok(d)
}
