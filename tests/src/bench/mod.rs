//! The isolation harness: the same device code in-process (called directly, or on a worker
//! thread with eventfds) and out of process (the daemons over vhost-user), against peers, on the
//! same work in one run. Writes `report.json`, `report.md` and SVG plots.

pub mod blk;
pub mod cpu;
pub mod guest;
mod guest_report;
pub mod histogram;
pub mod instant;
pub mod instant_packed;
mod interleave;
pub mod lean_blk;
pub mod lean_net;
mod lean_packed;
pub mod lean_ring;
pub mod net;
pub mod pingpong;
pub mod raw_packed;
pub mod raw_ring;
pub mod report;
mod report_blk;
mod report_net;
mod report_rings;
pub mod stats;
pub mod svg;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use blk::{Backend, BlkCase, BlkPlacement, BlkPoint, Engine};
use cpu::Cpus;
use net::{Direction, NetCase, NetPlacement, NetPoint};

/// How much to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub reps: usize,
    pub seconds: f64,
    /// Run the block placements.
    pub blk: bool,
    /// Run the net placements.
    pub net: bool,
    /// Also boot guests for the guest's view (QEMU built-in devices vs the daemons vs peers).
    pub guest: bool,
    /// Words every point's description must contain (empty: every point).
    pub filter: Vec<String>,
    /// Only the points measured on both ring layouts, split and packed (both of each pair).
    pub ring_pairs: bool,
    /// Extra arguments for the daemons in the out-of-process placements.
    pub daemon_args: Vec<String>,
}

impl Options {
    /// Whether a point described as `what` is to be run.
    pub fn wanted(&self, what: &str) -> bool {
        self.filter.iter().all(|w| what.contains(w.as_str()))
    }
}

impl Options {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    /// Of `cases` (described by `describe`), those to run: wanted by the filter, and with
    /// `ring_pairs` only those whose twin on the other ring layout is among `cases` too.
    fn select<C>(
        &self,
        cases: Vec<C>,
        describe: impl Fn(&C) -> String,
        twin: impl Fn(&C) -> C,
    ) -> Vec<C> {
        let all: HashSet<String> = cases.iter().map(&describe).collect();
        cases
            .into_iter()
            .filter(|c| {
                let what = describe(c);
                self.wanted(&what) && (!self.ring_pairs || all.contains(&describe(&twin(c))))
            })
            .collect()
    }
}

/// The word a point's description carries for its ring layout (`--filter packed`, `split`).
pub(crate) fn ring_word(packed: bool) -> &'static str {
    if packed {
        "packed"
    } else {
        "split"
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub date: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub reps: usize,
    pub seconds_per_point: f64,
    /// Extra arguments the daemons ran with (empty: their defaults).
    #[serde(default)]
    pub daemon_args: Vec<String>,
    /// eventfd round trip between two threads, microseconds (median).
    pub notify_rtt_same_cpu_us: f64,
    pub notify_rtt_cross_cpu_us: f64,
    pub blk: Vec<BlkPoint>,
    pub net_tx: Vec<NetPoint>,
    pub net_rx: Vec<NetPoint>,
    /// Secondary: the same I/O seen from a QEMU guest, when asked for.
    pub guest: Option<guest::GuestView>,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        cpus: cpu_count(),
        cpu_model,
        kernel,
        date,
    }
}

/// Runs `f` `reps` times and keeps, field by field, the medians (via `combine`).
fn median_blk(runs: &[BlkPoint]) -> BlkPoint {
    let m = |g: fn(&BlkPoint) -> f64| stats::median(&runs.iter().map(g).collect::<Vec<_>>());
    BlkPoint {
        ops_per_sec: m(|p| p.ops_per_sec),
        mib_per_sec: m(|p| p.mib_per_sec),
        p50_us: m(|p| p.p50_us),
        p99_us: m(|p| p.p99_us),
        p999_us: m(|p| p.p999_us),
        cpu_us_per_op_driver: m(|p| p.cpu_us_per_op_driver),
        cpu_us_per_op_device: m(|p| p.cpu_us_per_op_device),
        kicks_per_op: m(|p| p.kicks_per_op),
        interrupts_per_op: m(|p| p.interrupts_per_op),
        ..runs[0].clone()
    }
}

fn median_net(runs: &[NetPoint]) -> NetPoint {
    let m = |g: fn(&NetPoint) -> f64| stats::median(&runs.iter().map(g).collect::<Vec<_>>());
    NetPoint {
        frames_per_sec: m(|p| p.frames_per_sec),
        gbit_per_sec: m(|p| p.gbit_per_sec),
        cpu_us_per_frame_driver: m(|p| p.cpu_us_per_frame_driver),
        cpu_us_per_frame_device: m(|p| p.cpu_us_per_frame_device),
        kicks_per_frame: m(|p| p.kicks_per_frame),
        interrupts_per_frame: m(|p| p.interrupts_per_frame),
        injected_frames_per_sec: m(|p| p.injected_frames_per_sec),
        injector_alone_frames_per_sec: m(|p| p.injector_alone_frames_per_sec),
        ..runs[0].clone()
    }
}

/// Busy-polling window of the fixed-polling points.
const POLL_US: u64 = 50;

/// How a point's device polls: `poll_us` 0 is the daemons' default (the adaptive window of
/// `--poll-max-us`), anything else a fixed window (`--poll-us`).
pub fn poll_policy(poll_us: u64) -> bulkhead_common::idle_poll::PollPolicy {
    match poll_us {
        0 => bulkhead_common::idle_poll::PollPolicy::default(),
        us => bulkhead_common::idle_poll::PollPolicy::Fixed(Duration::from_micros(us)),
    }
}

/// The daemon arguments for `poll_us` (see `poll_policy`).
pub fn poll_args(poll_us: u64) -> Vec<String> {
    match poll_us {
        0 => Vec::new(),
        us => vec!["--poll-us".to_owned(), us.to_string()],
    }
}

/// `poll_us` as a point's description says it.
pub fn poll_word(poll_us: u64) -> String {
    match poll_us {
        0 => "adaptive".to_owned(),
        us => us.to_string(),
    }
}

/// The block cases of the suite: every placement (and the driver's ceiling) on the null
/// device and on a tmpfs file, at each queue depth and CPU placement, with packed-ring twins
/// where asked for; then block sizes, EVENT_IDX off, busy polling and the io_uring engine
/// beside the default.
fn blk_cases(quick: bool) -> Vec<BlkCase> {
    use BlkPlacement::*;
    let mut v = Vec::new();
    let case = |placement, backend, depth, cpus| BlkCase {
        placement,
        backend,
        engine: Engine::Default,
        depth,
        block: 4096,
        cpus,
        event_idx: true,
        poll_us: 0,
        stats: true,
        dirty_log: false,
        packed: false,
    };
    // Packed virtqueues beside split ones (the point right before), where the backend offers
    // them: the daemon and the driver's ceiling at QD1/32/64 on each CPU placement, in-process
    // at QD32; in quick mode QD32 only.
    let packed_twin = |p: BlkPlacement, qd: u32| {
        let depths: &[u32] = if quick { &[32] } else { &[1, 32, 64] };
        match p {
            OutOfProcess | DriverCeiling => depths.contains(&qd),
            InProcessDirect | InProcessThreaded => !quick && qd == 32,
            QemuStorageDaemon | ContribVhostUserBlk => false,
        }
    };
    let contrib = blk::contrib_binary().is_some();
    if !contrib {
        eprintln!("contrib vhost-user-blk not built (tests/peers/build-contrib-vhost-user-blk.sh): its points are left out");
    }
    let (null_qds, file_qds, placements): (&[u32], &[u32], &[Cpus]) = if quick {
        (&[1, 32], &[32], &[Cpus::One, Cpus::TwoPinned])
    } else {
        (&[1, 4, 16, 32, 64], &[1, 32, 64], &Cpus::ALL)
    };
    for &cpus in placements {
        for &qd in null_qds {
            for p in [
                DriverCeiling,
                InProcessDirect,
                InProcessThreaded,
                OutOfProcess,
                QemuStorageDaemon,
            ] {
                if p == InProcessDirect && cpus != Cpus::One {
                    continue; // no second thread to place
                }
                v.push(case(p, Backend::Null, qd, cpus));
                if packed_twin(p, qd) {
                    v.push(BlkCase {
                        packed: true,
                        ..case(p, Backend::Null, qd, cpus)
                    });
                }
                let counting_pair = match p {
                    OutOfProcess => !quick || cpus == Cpus::One,
                    // One thread, no wake-ups: the steadiest view of the counters' CPU cost.
                    InProcessDirect => true,
                    _ => false,
                };
                if qd == 32 && counting_pair {
                    v.push(BlkCase {
                        stats: false,
                        ..case(p, Backend::Null, qd, cpus)
                    });
                }
                if qd == 32 && p == OutOfProcess && (!quick || cpus == Cpus::One) {
                    v.push(BlkCase {
                        dirty_log: true,
                        ..case(p, Backend::Null, qd, cpus)
                    });
                }
            }
        }
        for &qd in file_qds {
            for p in [
                InProcessThreaded,
                OutOfProcess,
                QemuStorageDaemon,
                ContribVhostUserBlk,
            ] {
                if p == ContribVhostUserBlk && !contrib {
                    continue;
                }
                if quick && p == InProcessThreaded {
                    continue;
                }
                v.push(case(p, Backend::Tmpfs, qd, cpus));
                if p == OutOfProcess && !quick && packed_twin(p, qd) {
                    v.push(BlkCase {
                        packed: true,
                        ..case(p, Backend::Tmpfs, qd, cpus)
                    });
                }
                if p == OutOfProcess && qd == 32 && !quick {
                    // Right after the main point: what counting costs, and what migration's
                    // dirty logging costs, side by side.
                    v.push(BlkCase {
                        stats: false,
                        ..case(p, Backend::Tmpfs, qd, cpus)
                    });
                    v.push(BlkCase {
                        dirty_log: true,
                        ..case(p, Backend::Tmpfs, qd, cpus)
                    });
                }
            }
            if !quick {
                v.push(BlkCase {
                    engine: Engine::IoUring,
                    ..case(OutOfProcess, Backend::Tmpfs, qd, cpus)
                });
            }
        }
    }
    if !quick {
        for block in [512, 65536, 131072] {
            for p in [InProcessThreaded, OutOfProcess, QemuStorageDaemon] {
                v.push(BlkCase {
                    block,
                    ..case(p, Backend::Null, 32, Cpus::One)
                });
            }
        }
        for cpus in [Cpus::One, Cpus::TwoPinned] {
            for qd in [1, 32] {
                v.push(BlkCase {
                    event_idx: false,
                    ..case(OutOfProcess, Backend::Null, qd, cpus)
                });
            }
        }
    }
    // Busy polling where it can pay: device and driver on different CPUs.
    for qd in [1, 32] {
        for p in [InProcessThreaded, OutOfProcess] {
            v.push(BlkCase {
                poll_us: POLL_US,
                ..case(p, Backend::Null, qd, Cpus::TwoPinned)
            });
        }
    }
    v
}

/// The notification round trip between two threads placed as `cpus` says (unpinned threads
/// have no one placement to measure).
fn round_trip_on(cpus: Cpus, quick: bool) -> Result<Option<f64>> {
    let time = if quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    Ok(match cpus {
        Cpus::One => Some(pingpong::round_trip_us(0, 0, time)?),
        Cpus::TwoPinned => Some(pingpong::round_trip_us(0, 1 % cpu_count(), time)?),
        Cpus::Unpinned => None,
    })
}

/// Runs the suite and writes the report files into `out`.
pub fn run_suite(opts: Options, out: &Path) -> Result<Report> {
    std::fs::create_dir_all(out)?;
    let rtt_time = if opts.quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let rtt_same = pingpong::round_trip_us(0, 0, rtt_time)?;
    let rtt_cross = pingpong::round_trip_us(0, 1 % cpu_count(), rtt_time)?;
    eprintln!("notification round trip: same CPU {rtt_same:.1} us, across CPUs {rtt_cross:.1} us");

    let blk_points = if opts.blk {
        blk_suite(&opts)?
    } else {
        Vec::new()
    };
    let (net_tx, net_rx) = if opts.net {
        (net_tx_suite(&opts)?, net_rx_suite(&opts)?)
    } else {
        (Vec::new(), Vec::new())
    };
    let guest_view = if opts.guest {
        // The harness pinned this thread; the VMs it starts must not inherit that.
        cpu::unpin_self(cpu_count())?;
        Some(guest::run(opts.quick, opts.reps)?)
    } else {
        None
    };
    let r = Report {
        machine: machine(),
        quick: opts.quick,
        reps: opts.reps,
        seconds_per_point: opts.seconds,
        daemon_args: opts.daemon_args.clone(),
        notify_rtt_same_cpu_us: rtt_same,
        notify_rtt_cross_cpu_us: rtt_cross,
        blk: blk_points,
        net_tx,
        net_rx,
        guest: guest_view,
    };
    report::write_all(&r, out)?;
    Ok(r)
}

/// The block placements over the block cases.
fn blk_suite(opts: &Options) -> Result<Vec<BlkPoint>> {
    let d = opts.duration();
    let image = blk::TmpfsImage::create("bench", blk::CAPACITY)?;
    let mut blk_points = Vec::new();
    let cases = opts.select(blk_cases(opts.quick), BlkCase::describe, |c| BlkCase {
        packed: !c.packed,
        ..*c
    });
    // The points one ratio compares: same backend, depth, block size and CPU placement.
    let key = |c: &BlkCase| (c.backend, c.depth, c.block, c.cpus);
    for group in interleave::groups(cases, key) {
        // The latency target's points get the round trip of their own moments: measured right
        // before each of their repetitions (cross-CPU wake-ups drift by tens of µs), the median
        // reported beside the median latency.
        let mut rtt_runs: Vec<Vec<f64>> = group.iter().map(|_| Vec::new()).collect();
        let points = interleave::round_robin(
            &group,
            opts.reps,
            |i, case| {
                if case.depth == 1 && case.placement == BlkPlacement::OutOfProcess {
                    if let (Some(rtt), Some(runs)) =
                        (round_trip_on(case.cpus, opts.quick)?, rtt_runs.get_mut(i))
                    {
                        runs.push(rtt);
                    }
                }
                blk::run(*case, &image.0, d, &opts.daemon_args)
            },
            median_blk,
        )?;
        let rtts = rtt_runs
            .iter()
            .map(|r| (!r.is_empty()).then(|| stats::median(r)));
        for ((case, mut p), rtt) in group.iter().zip(points).zip(rtts) {
            p.notify_rtt_us = rtt;
            eprintln!(
                "blk {}: {:.0} ops/s p50 {:.1} us, CPU/op {:.2}+{:.2} us",
                case.describe(),
                p.ops_per_sec,
                p.p50_us,
                p.cpu_us_per_op_driver,
                p.cpu_us_per_op_device
            );
            blk_points.push(p);
        }
    }
    Ok(blk_points)
}

/// Whether a net point has a packed twin right after it: the daemon and the driver's ceiling,
/// 64-byte frames, no busy polling.
fn net_packed_twin(p: NetPlacement, size: usize, poll: u64) -> bool {
    size == 64 && poll == 0 && matches!(p, NetPlacement::OutOfProcess | NetPlacement::DriverCeiling)
}

/// Net transmit: every placement per frame size and CPU placement (64-byte frames on packed
/// rings too), then busy polling.
fn net_tx_cases(quick: bool) -> Vec<NetCase> {
    let (sizes, placements): (&[usize], &[Cpus]) = if quick {
        (&[64, 65536], &[Cpus::One, Cpus::TwoPinned])
    } else {
        (&[64, 1514, 65536], &Cpus::ALL)
    };
    let case = |placement, frame, cpus, poll_us| NetCase {
        placement,
        direction: Direction::Tx,
        frame,
        cpus,
        poll_us,
        packed: false,
        injectors: 0,
    };
    let mut cases = Vec::new();
    for &size in sizes {
        // One thread writing to a TAP has no second party to place.
        cases.push(case(NetPlacement::RawTapWrite, size, Cpus::One, 0));
        for &cpus in placements {
            for p in [
                NetPlacement::DriverCeiling,
                NetPlacement::InProcessDirect,
                NetPlacement::InProcessThreaded,
                NetPlacement::OutOfProcess,
            ] {
                if p == NetPlacement::InProcessDirect && cpus != Cpus::One {
                    continue;
                }
                cases.push(case(p, size, cpus, 0));
                if net_packed_twin(p, size, 0) {
                    cases.push(NetCase {
                        packed: true,
                        ..case(p, size, cpus, 0)
                    });
                }
            }
        }
    }
    for p in [NetPlacement::InProcessThreaded, NetPlacement::OutOfProcess] {
        cases.push(case(p, 64, Cpus::TwoPinned, POLL_US));
    }
    cases
}

/// Net receive through the daemon, per frame size and CPU placement, from one injector thread
/// (64-byte frames on packed rings too, and from a two-thread flood).
fn net_rx_cases(quick: bool) -> Vec<NetCase> {
    let (sizes, placements): (&[usize], &[Cpus]) = if quick {
        (&[64], &[Cpus::TwoPinned])
    } else {
        (&[64, 1514, 65536], &Cpus::ALL)
    };
    let mut cases = Vec::new();
    for &frame in sizes {
        for &cpus in placements {
            let case = NetCase {
                placement: NetPlacement::OutOfProcess,
                direction: Direction::Rx,
                frame,
                cpus,
                poll_us: 0,
                packed: false,
                injectors: net::RX_INJECTORS,
            };
            cases.push(case);
            if net_packed_twin(case.placement, frame, 0) {
                cases.push(NetCase {
                    packed: true,
                    ..case
                });
            }
            if frame == 64 && !quick {
                cases.push(NetCase {
                    injectors: net::RX_FLOOD_INJECTORS,
                    ..case
                });
            }
        }
    }
    cases
}

/// The other ring layout's twin of a net case.
fn net_twin(c: &NetCase) -> NetCase {
    NetCase {
        packed: !c.packed,
        ..*c
    }
}

/// The points one net ratio compares: same frame size and CPU placement.
fn net_group(c: &NetCase) -> (usize, Cpus) {
    (c.frame, c.cpus)
}

fn net_tx_suite(opts: &Options) -> Result<Vec<NetPoint>> {
    let d = opts.duration();
    let mut net_tx = Vec::new();
    let cases = opts.select(net_tx_cases(opts.quick), NetCase::describe, net_twin);
    for group in interleave::groups(cases, net_group) {
        let points = interleave::round_robin(
            &group,
            opts.reps,
            |_, case| net::run_tx(*case, d, &opts.daemon_args),
            median_net,
        )?;
        for (case, point) in group.iter().zip(points) {
            eprintln!(
                "{}: {:.0} frames/s {:.2} Gbit/s, CPU/frame {:.2}+{:.2} us",
                case.describe(),
                point.frames_per_sec,
                point.gbit_per_sec,
                point.cpu_us_per_frame_driver,
                point.cpu_us_per_frame_device
            );
            net_tx.push(point);
        }
    }
    Ok(net_tx)
}

fn net_rx_suite(opts: &Options) -> Result<Vec<NetPoint>> {
    let d = opts.duration();
    let mut net_rx = Vec::new();
    let cases = opts.select(net_rx_cases(opts.quick), NetCase::describe, net_twin);
    for group in interleave::groups(cases, net_group) {
        let points = interleave::round_robin(
            &group,
            opts.reps,
            |_, case| net::run_rx(*case, d, &opts.daemon_args),
            median_net,
        )?;
        for (case, p) in group.iter().zip(points) {
            eprintln!(
                "{}: {:.0} frames/s of {:.0} injected (injector alone {:.0}), CPU/frame {:.2}+{:.2} us",
                case.describe(),
                p.frames_per_sec,
                p.injected_frames_per_sec,
                p.injector_alone_frames_per_sec,
                p.cpu_us_per_frame_driver,
                p.cpu_us_per_frame_device
            );
            net_rx.push(p);
        }
    }
    Ok(net_rx)
}

/// Online CPUs of the machine (not the calling thread's affinity, which the harness narrows).
pub(crate) fn cpu_count() -> usize {
    // SAFETY: sysconf has no side effects.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
        .unwrap_or(1)
        .max(1)
}
