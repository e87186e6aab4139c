//! Net placements on the transmit path (the guest sending frames), all driven by the same
//! synthetic driver: the device in-process and called directly, in-process on a worker thread,
//! the real daemon over vhost-user; beside one thread writing the same frames to a TAP (the
//! kernel crossing alone). Receive through the daemon as well.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bulkhead_common::local::{DirectQueue, LocalRing, ThreadedQueue};
use bulkhead_common::vring::RingAddrs;
use bulkhead_common::Device;
use serde::{Deserialize, Serialize};
use vhost_user_net::tap::TapQueue;
use vhost_user_net::{NetDevice, NetOptions};

use super::cpu::{gettid, own_cpu, pin, pin_process, pin_threads, process_cpu};
use crate::fixture::NetFixture;
use crate::frontend::{LocalRings, NetDriver, Rings, Setup};
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
    pub same_cpu: bool,
    pub poll_us: u64,
    pub frames_per_sec: f64,
    pub gbit_per_sec: f64,
    pub cpu_us_per_frame_frontend: f64,
    pub cpu_us_per_frame_device: f64,
}

/// CSUM, GUEST_CSUM, GUEST_TSO4/6, HOST_TSO4/6, MRG_RXBUF, VERSION_1, INDIRECT.
const FEATURES: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 12)
    | (1 << 15)
    | (1 << 32)
    | (1 << 28);
const BATCH: usize = 128;

fn setup() -> Setup {
    Setup {
        queues: 2,
        queue_size: 256,
        device_features: FEATURES,
        ram_layout: vec![(0, 256 << 20)],
        queue_num_is_pairs: true,
        inflight: false,
        ..Setup::default()
    }
}

fn device_cpu(same: bool) -> usize {
    if same {
        0
    } else {
        1
    }
}

/// What a timed run produced.
struct Measured {
    frames: u64,
    elapsed: Duration,
    cpu_frontend: Duration,
    cpu_device: Duration,
}

fn point(
    placement: NetPlacement,
    direction: Direction,
    size: usize,
    same_cpu: bool,
    m: Measured,
) -> NetPoint {
    let n = m.frames.max(1) as f64;
    let secs = m.elapsed.as_secs_f64();
    NetPoint {
        placement,
        direction,
        frame: size,
        same_cpu,
        poll_us: 0,
        frames_per_sec: m.frames as f64 / secs,
        gbit_per_sec: m.frames as f64 * size as f64 * 8.0 / secs / 1e9,
        cpu_us_per_frame_frontend: m.cpu_frontend.as_secs_f64() * 1e6 / n,
        cpu_us_per_frame_device: m.cpu_device.as_secs_f64() * 1e6 / n,
    }
}

/// Transmit loop for placements that notify: the load tool's, so both measure the same way.
fn tx_loop<R: Rings>(
    d: &mut NetDriver<R>,
    size: usize,
    duration: Duration,
) -> Result<(u64, Duration)> {
    let rate = crate::netload::tx(d, size, BATCH, duration)?;
    Ok((rate.frames, rate.elapsed))
}

fn in_process_device(ns: &NetNs) -> Result<(NetDevice, LocalRings)> {
    let taps = ns.run_in(|| {
        let t = TapQueue::open_all("benchtap0", 1)?;
        t[0].set_up()?;
        Ok(t)
    })?;
    let dev = NetDevice::new(
        taps,
        NetOptions {
            queue_size: 256,
            mac: None,
            mtu: None,
        },
    );
    let features = dev.features() & FEATURES;
    dev.set_features(features)?;
    Ok((dev, LocalRings::new(setup(), features)?))
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
    }
}

/// Transmit through `placement`, the device busy-polling `poll_us` (daemon and threaded).
pub fn run_tx(
    placement: NetPlacement,
    size: usize,
    same_cpu: bool,
    poll_us: u64,
    duration: Duration,
) -> Result<NetPoint> {
    let mut p = run_tx_inner(placement, size, same_cpu, poll_us, duration)?;
    p.poll_us = poll_us;
    Ok(p)
}

fn run_tx_inner(
    placement: NetPlacement,
    size: usize,
    same_cpu: bool,
    poll_us: u64,
    duration: Duration,
) -> Result<NetPoint> {
    pin(gettid(), 0)?;
    let ns = NetNs::create("bench")?;
    match placement {
        NetPlacement::RawTapWrite => {
            let c0 = own_cpu()?;
            let r = raw_tap_write(&ns, size, duration)?;
            Ok(point(
                placement,
                Direction::Tx,
                size,
                true,
                Measured {
                    frames: r.frames,
                    elapsed: r.elapsed,
                    cpu_frontend: own_cpu()? - c0,
                    cpu_device: Duration::ZERO,
                },
            ))
        }
        NetPlacement::InProcessDirect => {
            let (dev, rings) = in_process_device(&ns)?;
            let ring = local_ring(&rings, 1);
            let mut q = DirectQueue::new(
                dev.queue_handler(1, FEATURES)?,
                rings.ram.mem().clone(),
                ring,
            )?;
            let mut d = NetDriver::new(rings, 2048, 16, BATCH as u32)?;
            let (hdr, f) = frame(size);
            let c0 = own_cpu()?;
            let start = Instant::now();
            let mut frames = 0u64;
            while start.elapsed() < duration {
                while d.submit_tx(0, &hdr, &f, 0)?.is_some() {}
                let (mem, dq) = d.fe.mem_and_queue(1);
                dq.publish(mem)?;
                q.run()?;
                frames += d.reap_tx(0)? as u64;
            }
            let elapsed = start.elapsed();
            Ok(point(
                placement,
                Direction::Tx,
                size,
                true,
                Measured {
                    frames,
                    elapsed,
                    cpu_frontend: own_cpu()? - c0,
                    cpu_device: Duration::ZERO,
                },
            ))
        }
        NetPlacement::InProcessThreaded => {
            let (dev, rings) = in_process_device(&ns)?;
            let ring = local_ring(&rings, 1);
            let dq = &rings.queues[1];
            let w = ThreadedQueue::spawn(
                dev.queue_handler(1, FEATURES)?,
                rings.ram.mem().clone(),
                ring,
                dq.kick.try_clone()?,
                dq.call.try_clone()?,
                Duration::from_micros(poll_us),
            )?;
            pin_threads(std::process::id(), "queue-", device_cpu(same_cpu))?;
            let mut d = NetDriver::new(rings, 2048, 16, BATCH as u32)?;
            tx_loop(&mut d, size, Duration::from_millis(100))?;
            let c0 = own_cpu()?;
            let (frames, elapsed) = tx_loop(&mut d, size, duration)?;
            let cpu = own_cpu()? - c0;
            w.stop();
            Ok(point(
                placement,
                Direction::Tx,
                size,
                same_cpu,
                Measured {
                    frames,
                    elapsed,
                    cpu_frontend: cpu,
                    cpu_device: Duration::ZERO,
                },
            ))
        }
        NetPlacement::OutOfProcess => {
            drop(ns);
            let fx = NetFixture::start(&["--poll-us", &poll_us.to_string()])?;
            let mut d = fx.driver(setup(), 2048, 16, BATCH as u32)?;
            pin_process(fx.daemon.pid(), device_cpu(same_cpu))?;
            tx_loop(&mut d, size, Duration::from_millis(100))?;
            let (c0, d0) = (own_cpu()?, process_cpu(fx.daemon.pid())?);
            let (frames, elapsed) = tx_loop(&mut d, size, duration)?;
            let (cf, cd) = (own_cpu()? - c0, process_cpu(fx.daemon.pid())? - d0);
            Ok(point(
                placement,
                Direction::Tx,
                size,
                same_cpu,
                Measured {
                    frames,
                    elapsed,
                    cpu_frontend: cf,
                    cpu_device: cd,
                },
            ))
        }
    }
}

/// Receive through the daemon: a thread in the namespace injects frames as fast as it can.
pub fn run_rx(size: usize, duration: Duration) -> Result<(NetPoint, f64)> {
    pin(gettid(), 0)?;
    let fx = NetFixture::start(&[])?;
    fx.ns.ip(&["link", "set", "tap0", "up"]).context("tap up")?;
    let mut d = fx.driver(setup(), 4096, 256, 16)?;
    let d0 = process_cpu(fx.daemon.pid())?;
    let c0 = own_cpu()?;
    let (got, injected) = crate::netload::rx(&fx, &mut d, size, duration)?;
    let (cf, cd) = (own_cpu()? - c0, process_cpu(fx.daemon.pid())? - d0);
    let m = Measured {
        frames: got.frames,
        elapsed: got.elapsed,
        cpu_frontend: cf,
        cpu_device: cd,
    };
    let mut p = point(NetPlacement::OutOfProcess, Direction::Rx, size, false, m);
    // Count what arrived: the kernel may split a super-frame on its way into the TAP.
    p.gbit_per_sec = got.gbit_per_sec();
    Ok((p, injected.frames_per_sec()))
}
