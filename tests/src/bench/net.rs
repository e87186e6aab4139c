//! Net placements, all driven by the harness's lean driver: transmit through the device
//! in-process (called directly, or on a worker thread) and out of process (the daemon over
//! vhost-user), beside one thread writing the same frames to a TAP (the kernel crossing alone)
//! and an instant device (the driver's own ceiling); receive through the daemon (and in-process
//! on a worker thread) from injector threads that send frames into the TAP with `sendmmsg`,
//! whose own rate is measured alone and reported beside. Split virtqueues, or packed ones
//! (`packed`: the daemon and the instant device; the in-process placements follow the rings).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bulkhead_common::local::{DirectQueue, LocalRing, ThreadedQueue};
use bulkhead_common::vring::{Layout, RingAddrs};
use bulkhead_common::Device;
use serde::{Deserialize, Serialize};
use vhost_user_net::tap::TapQueue;
use vhost_user_net::{NetDevice, NetOptions};

use super::cpu::{pin, pin_threads, process_cpu, threads_cpu, wait_threads_named, Cpus};
use super::instant::{InstantBackend, InstantThread};
use super::lean_blk::Completions;
use super::lean_net::{LeanRx, LeanTx, NetSample};
use super::raw_ring::thread_cpu;
use crate::fixture::NetFixture;
use crate::frontend::device::F_RING_PACKED;
use crate::frontend::{Connection, Frontend, LocalRings, Setup};
use crate::netload::{frame, raw_tap_write};
use crate::netns::NetNs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetPlacement {
    InProcessDirect,
    InProcessThreaded,
    OutOfProcess,
    /// One thread writing frames to a TAP: the kernel crossing alone.
    RawTapWrite,
    /// A device that completes every frame at once: the driver's own ceiling.
    DriverCeiling,
}

impl NetPlacement {
    pub fn label(self) -> &'static str {
        match self {
            NetPlacement::InProcessDirect => "in-process, direct",
            NetPlacement::InProcessThreaded => "in-process, threaded",
            NetPlacement::OutOfProcess => "out-of-process (vhost-user-net)",
            NetPlacement::RawTapWrite => "raw TAP write (one thread)",
            NetPlacement::DriverCeiling => "driver ceiling (instant device)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Tx,
    Rx,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetPoint {
    pub placement: NetPlacement,
    pub direction: Direction,
    pub frame: usize,
    pub cpus: Cpus,
    pub poll_us: u64,
    /// Packed virtqueues (VIRTIO_F_RING_PACKED) instead of split (reports from before packed
    /// rings measured split ones).
    #[serde(default)]
    pub packed: bool,
    pub frames_per_sec: f64,
    pub gbit_per_sec: f64,
    pub cpu_us_per_frame_driver: f64,
    pub cpu_us_per_frame_device: f64,
    pub kicks_per_frame: f64,
    pub interrupts_per_frame: f64,
    /// Receive: frames the injector sent into the TAP per second during the run.
    pub injected_frames_per_sec: f64,
    /// Receive: what the injector sends per second with nobody receiving (its own ceiling).
    pub injector_alone_frames_per_sec: f64,
    /// Receive: the injector's sender threads (reports from before this field used two).
    #[serde(default = "two_injectors")]
    pub injectors: usize,
}

fn two_injectors() -> usize {
    2
}

/// CSUM, GUEST_CSUM, GUEST_TSO4/6, HOST_TSO4/6, MRG_RXBUF, VERSION_1, INDIRECT, EVENT_IDX.
const FEATURES: u64 = (1 << 29)
    | (1 << 0)
    | (1 << 1)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 12)
    | (1 << 15)
    | (1 << 32)
    | (1 << 28);
const QUEUE_SIZE: u16 = 256;
/// Transmit frames in flight (the driver's ring depth, like a guest's TX ring).
const TX_SLOTS: u16 = 256;
const RX_BUFFERS: u16 = 256;
const RX_BUF_LEN: u32 = 4096;
const WARM_UP: Duration = Duration::from_millis(100);
/// Frames per `sendmmsg` of an injector thread.
const INJECT_BATCH: usize = 64;
/// Injector threads of the receive points: one flow into the one queue pair. One thread with
/// `sendmmsg` offers more than the device takes on a CPU of its own (its alone rate is in the
/// report); a second thread on the same CPU adds no rate (measured 1.06M frames/s with two on
/// one CPU against 1.22M with one: they contend on the TAP's queue) and only takes CPU time
/// from whoever shares that CPU, so it measures the scheduler's fair share, not the device.
pub const RX_INJECTORS: usize = 1;
/// The flood twin of the 64-byte receive points: two sender threads that compete with the
/// driver and the device for the two CPUs (reported beside, not a target).
pub const RX_FLOOD_INJECTORS: usize = 2;

fn setup(packed: bool) -> Setup {
    Setup {
        packed,
        queues: 2,
        queue_size: QUEUE_SIZE,
        device_features: FEATURES,
        ram_layout: vec![(0, 256 << 20)],
        queue_num_is_pairs: true,
        inflight: false,
        ..Setup::default()
    }
}

/// The header and frame a transmit slot carries.
fn wire(size: usize) -> Vec<u8> {
    let (hdr, f) = frame(size);
    let mut w = hdr.to_bytes().to_vec();
    w.extend_from_slice(&f);
    w
}

/// What a net point is: where, which way, how big, on which CPUs, busy-polling how long, on
/// which ring layout.
#[derive(Debug, Clone, Copy)]
pub struct NetCase {
    pub placement: NetPlacement,
    pub direction: Direction,
    pub frame: usize,
    pub cpus: Cpus,
    pub poll_us: u64,
    pub packed: bool,
    /// Receive: injector sender threads (0 for transmit).
    pub injectors: usize,
}

impl NetCase {
    /// One line naming the point (what `--filter` matches).
    pub fn describe(&self) -> String {
        let ring = super::ring_word(self.packed);
        match self.direction {
            Direction::Tx => format!(
                "net tx {:?} {}B {:?} poll={} ring={ring}",
                self.placement,
                self.frame,
                self.cpus,
                super::poll_word(self.poll_us)
            ),
            Direction::Rx => format!(
                "net rx {:?} {}B {:?} injectors={} ring={ring}",
                self.placement, self.frame, self.cpus, self.injectors
            ),
        }
    }
}

/// A point from what was measured.
fn point(case: NetCase, s: &NetSample, cpu_device: Duration) -> NetPoint {
    let n = s.frames.max(1) as f64;
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    NetPoint {
        placement: case.placement,
        direction: case.direction,
        frame: case.frame,
        cpus: case.cpus,
        poll_us: case.poll_us,
        packed: case.packed,
        frames_per_sec: s.frames as f64 / secs,
        gbit_per_sec: s.bytes as f64 * 8.0 / secs / 1e9,
        cpu_us_per_frame_driver: s.driver_cpu.as_secs_f64() * 1e6 / n,
        cpu_us_per_frame_device: cpu_device.as_secs_f64() * 1e6 / n,
        kicks_per_frame: s.kicks as f64 / n,
        interrupts_per_frame: s.interrupts as f64 / n,
        injectors: case.injectors,
        injected_frames_per_sec: 0.0,
        injector_alone_frames_per_sec: 0.0,
    }
}

fn in_process_device(ns: &NetNs, packed: bool) -> Result<(NetDevice, LocalRings)> {
    let taps = ns.run_in(|| {
        let t = TapQueue::open_all("benchtap0", 1)?;
        t[0].set_up()?;
        Ok(t)
    })?;
    let dev = NetDevice::new(
        taps,
        NetOptions {
            queue_size: QUEUE_SIZE,
            mac: None,
            mtu: None,
        },
    );
    let features = dev.features() & FEATURES;
    dev.set_features(features)?;
    Ok((
        dev,
        LocalRings::new(setup(packed), features | ring_feature(packed))?,
    ))
}

/// VIRTIO_F_RING_PACKED when `packed`: the in-process rings' features say the layout too.
fn ring_feature(packed: bool) -> u64 {
    if packed {
        F_RING_PACKED
    } else {
        0
    }
}

fn local_ring(rings: &LocalRings, q: usize) -> LocalRing {
    let dq = &rings.queues[q];
    LocalRing {
        size: dq.size,
        addrs: RingAddrs {
            desc: dq.layout.desc,
            avail: dq.layout.avail,
            used: dq.layout.used,
        },
        event_idx: true,
        indirect: true,
        layout: if dq.is_packed() {
            Layout::Packed
        } else {
            Layout::Split
        },
    }
}

/// Transmit as `case` says, the device busy-polling `poll_us` (daemon and threaded).
pub fn run_tx(case: NetCase, duration: Duration, daemon_args: &[String]) -> Result<NetPoint> {
    let NetCase {
        placement,
        frame: size,
        cpus,
        poll_us,
        packed,
        ..
    } = case;
    anyhow::ensure!(
        case.direction == Direction::Tx,
        "{case:?} is not a transmit case"
    );
    cpus.place_driver(super::cpu_count())?;
    let p = |s: &NetSample, dev: Duration| point(case, s, dev);
    match placement {
        NetPlacement::RawTapWrite => {
            anyhow::ensure!(!packed, "a raw TAP write has no ring");
            let ns = NetNs::create("bench")?;
            let c0 = thread_cpu();
            let r = raw_tap_write(&ns, size, duration)?;
            let s = NetSample {
                frames: r.frames,
                bytes: r.bytes,
                elapsed: r.elapsed,
                driver_cpu: thread_cpu().saturating_sub(c0),
                ..NetSample::default()
            };
            Ok(p(&s, Duration::ZERO))
        }
        NetPlacement::DriverCeiling => {
            let rings = LocalRings::new(setup(packed), FEATURES | ring_feature(packed))?;
            let call = std::os::fd::AsRawFd::as_raw_fd(&rings.queues[1].call);
            let mem = rings.ram.mem().clone();
            let mut d = LeanTx::new(rings, TX_SLOTS, &wire(size))?;
            let dev = InstantBackend::new(d.ring_ptrs(), mem, call, true).without_status();
            if cpus == Cpus::One {
                let mut dev = dev;
                let mut step = || dev.step().map(|_| ());
                d.run(WARM_UP, Completions::Inline(&mut step))?;
                let s = d.run(duration, Completions::Inline(&mut step))?;
                return Ok(p(&s, Duration::ZERO));
            }
            let t = InstantThread::spawn(dev, cpus.device())?;
            d.run(WARM_UP, Completions::Interrupt)?;
            let s = d.run(duration, Completions::Interrupt)?;
            t.stop()?;
            Ok(p(&s, Duration::ZERO))
        }
        NetPlacement::InProcessDirect => {
            let ns = NetNs::create("bench")?;
            let (dev, rings) = in_process_device(&ns, packed)?;
            let ring = local_ring(&rings, 1);
            let mut q = DirectQueue::new(
                dev.queue_handler(1, FEATURES)?,
                rings.ram.mem().clone(),
                ring,
            )?;
            let mut d = LeanTx::new(rings, TX_SLOTS, &wire(size))?;
            let mut device_cpu = Duration::ZERO;
            let mut run = |cpu: &mut Duration| -> Result<()> {
                let c0 = thread_cpu();
                q.run()?;
                *cpu += thread_cpu().saturating_sub(c0);
                Ok(())
            };
            let mut warm = Duration::ZERO;
            d.run(WARM_UP, Completions::Inline(&mut || run(&mut warm)))?;
            let mut s = d.run(duration, Completions::Inline(&mut || run(&mut device_cpu)))?;
            s.driver_cpu = s.driver_cpu.saturating_sub(device_cpu);
            Ok(p(&s, device_cpu))
        }
        NetPlacement::InProcessThreaded => {
            let ns = NetNs::create("bench")?;
            let (dev, rings) = in_process_device(&ns, packed)?;
            let ring = local_ring(&rings, 1);
            let dq = &rings.queues[1];
            let w = ThreadedQueue::spawn(
                dev.queue_handler(1, FEATURES)?,
                rings.ram.mem().clone(),
                ring,
                dq.kick.try_clone()?,
                dq.call.try_clone()?,
                super::poll_policy(poll_us),
            )?;
            let tids = place_threads(cpus)?;
            let mut d = LeanTx::new(rings, TX_SLOTS, &wire(size))?;
            d.run(WARM_UP, Completions::Interrupt)?;
            let c0 = threads_cpu(std::process::id(), &tids)?;
            let s = d.run(duration, Completions::Interrupt)?;
            let cpu = threads_cpu(std::process::id(), &tids)?.saturating_sub(c0);
            w.stop();
            Ok(p(&s, cpu))
        }
        NetPlacement::OutOfProcess => {
            let poll = super::poll_args(poll_us);
            let mut args: Vec<&str> = poll.iter().map(String::as_str).collect();
            args.extend(daemon_args.iter().map(String::as_str));
            let fx = NetFixture::start(&args)?;
            let fe = Frontend::start(Connection::connect(&fx.socket)?, setup(packed))?;
            let mut d = LeanTx::new(fe, TX_SLOTS, &wire(size))?;
            cpus.place_device_process(fx.daemon.pid())?;
            d.run(WARM_UP, Completions::Interrupt)?;
            let d0 = process_cpu(fx.daemon.pid())?;
            let s = d.run(duration, Completions::Interrupt)?;
            let cd = process_cpu(fx.daemon.pid())?.saturating_sub(d0);
            Ok(p(&s, cd))
        }
    }
}

/// Places this process's queue worker threads as `cpus` says; returns their ids.
fn place_threads(cpus: Cpus) -> Result<Vec<i32>> {
    let pid = std::process::id();
    let tids = wait_threads_named(pid, "queue-")?;
    if let Some(cpu) = cpus.device() {
        pin_threads(pid, "queue-", cpu)?;
    }
    Ok(tids)
}

/// Threads sending copies of one frame into a TAP through packet sockets, as fast as they can.
struct Injector {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<u64>>>,
    start: Instant,
}

impl Injector {
    /// Starts `count` threads on `fx`'s TAP; pinned to `cpu` if given.
    fn start(fx: &NetFixture, size: usize, count: usize, cpu: Option<usize>) -> Result<Self> {
        let (hdr, f) = frame(size);
        let gso = size > 1514;
        let mut wire = if gso {
            hdr.to_bytes()[..10].to_vec()
        } else {
            Vec::new()
        };
        wire.extend_from_slice(&f);
        let wire = Arc::new(wire);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..count {
            let sock = fx.packet_socket(gso)?;
            let (stop, wire) = (Arc::clone(&stop), Arc::clone(&wire));
            threads.push(std::thread::spawn(move || -> Result<u64> {
                if let Some(cpu) = cpu {
                    pin(super::cpu::gettid(), cpu)?;
                }
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A full TAP queue drops; the socket still takes the frames.
                    sent += sock.send_many(&wire, INJECT_BATCH).unwrap_or(0) as u64;
                }
                Ok(sent)
            }));
        }
        Ok(Self {
            stop,
            threads,
            start: Instant::now(),
        })
    }

    /// Stops the threads; frames sent per second.
    fn stop(self) -> Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64();
        let mut sent = 0;
        for t in self.threads {
            sent += t
                .join()
                .map_err(|_| anyhow::anyhow!("injector panicked"))??;
        }
        Ok(sent as f64 / secs)
    }
}

/// Where the injector runs: on the CPU the device does not use when the placement pins (one
/// CPU: the other one; two CPUs: the driver's, so the device keeps its CPU as when it
/// transmits), wherever the scheduler puts it when nothing is pinned.
fn injector_cpu(cpus: Cpus) -> Option<usize> {
    match cpus {
        Cpus::One => Some(1 % super::cpu_count()),
        Cpus::TwoPinned => cpus.driver(),
        Cpus::Unpinned => None,
    }
}

/// Receive through the daemon (`OutOfProcess`) from the injector.
pub fn run_rx(case: NetCase, duration: Duration, daemon_args: &[String]) -> Result<NetPoint> {
    let NetCase {
        placement,
        frame: size,
        cpus,
        packed,
        ..
    } = case;
    anyhow::ensure!(
        case.direction == Direction::Rx,
        "{case:?} is not a receive case"
    );
    cpus.place_driver(super::cpu_count())?;
    let args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();
    let fx = NetFixture::start(&args)?;
    fx.ns.ip(&["link", "set", "tap0", "up"]).context("tap up")?;
    // The injector's own rate, nobody receiving (the TAP queue drops what it cannot hold).
    let alone = Injector::start(&fx, size, case.injectors, injector_cpu(cpus))?;
    std::thread::sleep(duration.min(Duration::from_millis(500)));
    let alone = alone.stop()?;
    let (s, cpu_device) = match placement {
        NetPlacement::OutOfProcess => {
            let fe = Frontend::start(Connection::connect(&fx.socket)?, setup(packed))?;
            let mut d = LeanRx::new(fe, RX_BUFFERS, RX_BUF_LEN)?;
            cpus.place_device_process(fx.daemon.pid())?;
            let inj = Injector::start(&fx, size, case.injectors, injector_cpu(cpus))?;
            d.run(WARM_UP)?;
            let d0 = process_cpu(fx.daemon.pid())?;
            let s = d.run(duration);
            let cd = process_cpu(fx.daemon.pid())?.saturating_sub(d0);
            let injected = inj.stop()?;
            (s.map(|s| (s, injected))?, cd)
        }
        other => anyhow::bail!("receive is measured through the daemon, not {other:?}"),
    };
    let (s, injected) = s;
    let mut p = point(case, &s, cpu_device);
    p.injected_frames_per_sec = injected;
    p.injector_alone_frames_per_sec = alone;
    Ok(p)
}
