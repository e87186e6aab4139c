//! Block placements, all driven by the same synthetic driver (random reads at a queue depth):
//! the device in-process and called directly, in-process on a worker thread, the real daemon
//! over vhost-user, and qemu-storage-daemon's vhost-user-blk export.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bulkhead_common::local::{DirectQueue, LocalRing, ThreadedQueue};
use bulkhead_common::vring::RingAddrs;
use bulkhead_common::Device;
use serde::{Deserialize, Serialize};
use vhost_user_blk::disk::{Disk, DiskOptions};
use vhost_user_blk::io::IoEngine;
use vhost_user_blk::{BlkDevice, BlkOptions};

use super::cpu::{gettid, own_cpu, pin, pin_process, pin_threads, process_cpu};
use crate::daemon::{Daemon, Scratch};
use crate::frontend::{
    BlkDriver, BlkOp, Connection, DriverQueue, Frontend, LocalRings, Rings, Setup,
};

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
}

/// What the device stores into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Null,
    /// A file on tmpfs.
    Tmpfs,
}

/// One measured point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlkPoint {
    pub placement: BlkPlacement,
    pub backend: Backend,
    pub depth: u32,
    pub block: u32,
    pub same_cpu: bool,
    pub event_idx: bool,
    /// Busy-polling of the device's queue, microseconds (0: none).
    pub poll_us: u64,
    pub ops_per_sec: f64,
    pub mib_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU time per operation: the harness process (frontend, and the device when in-process).
    pub cpu_us_per_op_frontend: f64,
    /// CPU time per operation of the separate device process (0 in-process).
    pub cpu_us_per_op_device: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct BlkCase {
    pub placement: BlkPlacement,
    pub backend: Backend,
    pub depth: u32,
    pub block: u32,
    pub same_cpu: bool,
    pub event_idx: bool,
    pub poll_us: u64,
}

pub const CAPACITY: u64 = 1 << 30;
const FRONTEND_CPU: usize = 0;
const QUEUE_SIZE: u16 = 256;

fn device_cpu(same: bool) -> usize {
    if same {
        FRONTEND_CPU
    } else {
        1
    }
}

fn setup(event_idx: bool) -> Setup {
    Setup {
        queue_size: QUEUE_SIZE,
        event_idx,
        ram_layout: vec![(0, 512 << 20)],
        ..Setup::default()
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

/// Runs one case for `duration` after a short warm-up.
pub fn run(case: BlkCase, image: &std::path::Path, duration: Duration) -> Result<BlkPoint> {
    pin(gettid(), FRONTEND_CPU)?;
    match case.placement {
        BlkPlacement::InProcessDirect => run_direct(case, image, duration),
        BlkPlacement::InProcessThreaded => run_threaded(case, image, duration),
        BlkPlacement::OutOfProcess | BlkPlacement::QemuStorageDaemon => {
            run_remote(case, image, duration)
        }
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

fn in_process_device(
    case: &BlkCase,
    image: &std::path::Path,
) -> Result<(BlkDevice, LocalRings, u64)> {
    let dev = BlkDevice::new(
        disk(case.backend, image)?,
        BlkOptions {
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            engine: IoEngine::Sync,
            serial: [0; 20],
        },
    );
    let s = setup(case.event_idx);
    let mut features = dev.features() & ((1 << 32) | (1 << 28) | (1 << 9));
    if case.event_idx {
        features |= 1 << 29;
    }
    dev.set_features(features)?;
    let rings = LocalRings::new(s, features)?;
    Ok((dev, rings, features))
}

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
    }
}

/// Random request offsets, a fixed sequence for every placement.
struct Offsets(u64);

impl Offsets {
    fn next(&mut self, block: u32) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (CAPACITY / u64::from(block))) * u64::from(block) / 512
    }
}

struct Sample {
    ops: u64,
    elapsed: Duration,
    lat: Vec<u64>,
}

/// The closed loop used by every placement that notifies: keep `depth` reads in flight, kick,
/// sleep on the interrupt eventfd, reap.
fn closed_loop<R: Rings>(
    d: &mut BlkDriver<R>,
    depth: u32,
    block: u32,
    duration: Duration,
) -> Result<Sample> {
    let mut offsets = Offsets(0x2545_f491_4f6c_dd1d);
    let mut started = std::collections::HashMap::new();
    let mut lat = Vec::new();
    let begin = Instant::now();
    let end = begin + duration;
    let mut ops = 0u64;
    loop {
        let old = d.fe.queue(0).avail_idx();
        let now = Instant::now();
        let mut added = false;
        while now < end && d.in_flight(0) < depth as usize {
            let head = d
                .submit(
                    0,
                    &BlkOp::Read {
                        sector: offsets.next(block),
                        len: block,
                    },
                )?
                .context("no slot")?;
            started.insert(head, Instant::now());
            added = true;
        }
        if added {
            d.kick(0, old)?;
        }
        if d.in_flight(0) == 0 {
            break;
        }
        let c = d.wait(0)?;
        anyhow::ensure!(c.status == 0, "status {}", c.status);
        if let Some(t) = started.remove(&c.head) {
            lat.push(t.elapsed().as_nanos() as u64);
        }
        ops += 1;
        while let Some(c) = d.poll(0)? {
            if let Some(t) = started.remove(&c.head) {
                lat.push(t.elapsed().as_nanos() as u64);
            }
            ops += 1;
        }
    }
    lat.sort_unstable();
    Ok(Sample {
        ops,
        elapsed: begin.elapsed(),
        lat,
    })
}

fn point(case: BlkCase, s: &Sample, cpu_front: Duration, cpu_dev: Duration) -> BlkPoint {
    let secs = s.elapsed.as_secs_f64();
    let ops = s.ops.max(1) as f64;
    BlkPoint {
        placement: case.placement,
        backend: case.backend,
        depth: case.depth,
        block: case.block,
        same_cpu: case.same_cpu,
        event_idx: case.event_idx,
        poll_us: case.poll_us,
        ops_per_sec: s.ops as f64 / secs,
        mib_per_sec: s.ops as f64 * f64::from(case.block) / secs / (1 << 20) as f64,
        p50_us: super::stats::percentile_us(&s.lat, 50.0),
        p99_us: super::stats::percentile_us(&s.lat, 99.0),
        p999_us: super::stats::percentile_us(&s.lat, 99.9),
        cpu_us_per_op_frontend: cpu_front.as_secs_f64() * 1e6 / ops,
        cpu_us_per_op_device: cpu_dev.as_secs_f64() * 1e6 / ops,
    }
}

fn run_direct(case: BlkCase, image: &std::path::Path, duration: Duration) -> Result<BlkPoint> {
    let (dev, rings, _) = in_process_device(&case, image)?;
    let ring = local_ring(&rings.queues[0], case.event_idx);
    let mem = rings.ram.mem().clone();
    let mut queue = DirectQueue::new(dev.queue_handler(0, 0)?, mem, ring)?;
    let mut d = BlkDriver::new(rings, case.depth, case.block)?;
    let mut offsets = Offsets(0x2545_f491_4f6c_dd1d);
    let mut measure = |d: &mut BlkDriver<LocalRings>, dur: Duration| -> Result<Sample> {
        let mut started = std::collections::HashMap::new();
        let mut lat = Vec::new();
        let begin = Instant::now();
        let mut ops = 0u64;
        while begin.elapsed() < dur {
            while d.in_flight(0) < case.depth as usize {
                let head = d
                    .submit(
                        0,
                        &BlkOp::Read {
                            sector: offsets.next(case.block),
                            len: case.block,
                        },
                    )?
                    .context("no slot")?;
                started.insert(head, Instant::now());
            }
            let (mem, q) = d.fe.mem_and_queue(0);
            q.publish(mem)?;
            queue.run()?;
            while let Some(c) = d.poll(0)? {
                if let Some(t) = started.remove(&c.head) {
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                ops += 1;
            }
        }
        queue.drain()?;
        while d.poll(0)?.is_some() {}
        lat.sort_unstable();
        Ok(Sample {
            ops,
            elapsed: begin.elapsed(),
            lat,
        })
    };
    measure(&mut d, Duration::from_millis(100))?;
    let c0 = own_cpu()?;
    let s = measure(&mut d, duration)?;
    Ok(point(case, &s, own_cpu()? - c0, Duration::ZERO))
}

fn run_threaded(case: BlkCase, image: &std::path::Path, duration: Duration) -> Result<BlkPoint> {
    let (dev, rings, _) = in_process_device(&case, image)?;
    let q = &rings.queues[0];
    let ring = local_ring(q, case.event_idx);
    let worker = ThreadedQueue::spawn(
        dev.queue_handler(0, 0)?,
        rings.ram.mem().clone(),
        ring,
        q.kick.try_clone()?,
        q.call.try_clone()?,
        Duration::from_micros(case.poll_us),
    )?;
    pin_threads(std::process::id(), "queue-", device_cpu(case.same_cpu))?;
    let mut d = BlkDriver::new(rings, case.depth, case.block)?;
    closed_loop(&mut d, case.depth, case.block, Duration::from_millis(100))?;
    let c0 = own_cpu()?;
    let s = closed_loop(&mut d, case.depth, case.block, duration)?;
    let cpu = own_cpu()? - c0;
    worker.stop();
    Ok(point(case, &s, cpu, Duration::ZERO))
}

fn run_remote(case: BlkCase, image: &std::path::Path, duration: Duration) -> Result<BlkPoint> {
    let scratch = Scratch::new("bench")?;
    let socket = scratch.join("blk.sock");
    let daemon = match case.placement {
        BlkPlacement::QemuStorageDaemon => spawn_qsd(&scratch, &socket, case.backend, image, 1)?,
        _ => {
            let mut args = vec![
                "--socket-path".to_owned(),
                socket.display().to_string(),
                "--io-engine".to_owned(),
                "sync".to_owned(),
                "--queues".to_owned(),
                "1".to_owned(),
                "--poll-us".to_owned(),
                case.poll_us.to_string(),
            ];
            match case.backend {
                Backend::Null => args.extend(["--null".to_owned(), CAPACITY.to_string()]),
                Backend::Tmpfs => {
                    args.extend(["--blk-file".to_owned(), image.display().to_string()])
                }
            }
            Daemon::start("vhost-user-blk", &args, &scratch)?
        }
    };
    let fe = Frontend::start(
        Connection::connect(&socket)?,
        Setup {
            inflight: false,
            ..setup(case.event_idx)
        },
    )?;
    let mut d = BlkDriver::new(fe, case.depth, case.block)?;
    // Workers exist once the queue started: pin the whole device process.
    pin_process(daemon.pid(), device_cpu(case.same_cpu))?;
    closed_loop(&mut d, case.depth, case.block, Duration::from_millis(100))?;
    let (c0, d0) = (own_cpu()?, process_cpu(daemon.pid())?);
    let s = closed_loop(&mut d, case.depth, case.block, duration)?;
    let (cf, cd) = (own_cpu()? - c0, process_cpu(daemon.pid())? - d0);
    Ok(point(case, &s, cf, cd))
}

/// qemu-storage-daemon exporting a null-co or file node over vhost-user-blk with `queues`
/// queues.
pub(crate) fn spawn_qsd(
    scratch: &Scratch,
    socket: &std::path::Path,
    backend: Backend,
    image: &std::path::Path,
    queues: u32,
) -> Result<Daemon> {
    let node = match backend {
        Backend::Null => format!("driver=null-co,node-name=disk,size={CAPACITY}"),
        Backend::Tmpfs => format!(
            "driver=file,node-name=disk,filename={},cache.direct=off",
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
