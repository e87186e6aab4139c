//! Split vs packed virtqueues in the report: each packed point beside the split point that ran
//! right before it (the same in every other respect, the same lean driver), for block and net,
//! and the driver's own ceiling on packed rings checked as the split one is.

use std::fmt::Write as _;

use super::blk::{Backend, BlkPlacement, BlkPoint};
use super::cpu::Cpus;
use super::net::{NetPlacement, NetPoint};
use super::report::Target;
use super::Report;

/// The split point a packed block point ran beside.
fn blk_twin<'a>(r: &'a Report, p: &BlkPoint) -> Option<&'a BlkPoint> {
    r.blk.iter().find(|x| {
        x.packed != p.packed
            && x.placement == p.placement
            && x.backend == p.backend
            && x.engine == p.engine
            && x.depth == p.depth
            && x.block == p.block
            && x.cpus == p.cpus
            && x.event_idx == p.event_idx
            && x.poll_us == p.poll_us
            && x.stats == p.stats
            && x.dirty_log == p.dirty_log
    })
}

/// The driver against the instant backend, on the layout of `like`, at its depth and CPUs.
fn blk_ceiling<'a>(r: &'a Report, like: &BlkPoint) -> Option<&'a BlkPoint> {
    r.blk.iter().find(|x| {
        x.placement == BlkPlacement::DriverCeiling
            && x.packed == like.packed
            && x.depth == like.depth
            && x.cpus == like.cpus
            && x.block == like.block
            && x.event_idx == like.event_idx
            && x.poll_us == 0
    })
}

/// Table order of the block placements.
fn blk_rank(p: BlkPlacement) -> u8 {
    match p {
        BlkPlacement::InProcessDirect => 0,
        BlkPlacement::InProcessThreaded => 1,
        BlkPlacement::OutOfProcess => 2,
        BlkPlacement::QemuStorageDaemon => 3,
        BlkPlacement::ContribVhostUserBlk => 4,
        BlkPlacement::DriverCeiling => 5,
    }
}

/// "ceiling ÷ rate" for a backend's row, empty for the ceiling's own.
fn headroom(rate: f64, ceiling: Option<f64>, is_backend: bool) -> String {
    match ceiling {
        Some(c) if is_backend && rate > 0.0 => format!("{:.1}×", c / rate),
        _ => "–".into(),
    }
}

pub fn blk_markdown(r: &Report, s: &mut String) {
    let mut rows: Vec<(&BlkPoint, &BlkPoint)> = r
        .blk
        .iter()
        .filter(|p| p.packed)
        .filter_map(|p| blk_twin(r, p).map(|split| (split, p)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let cpus_rank = |c: Cpus| Cpus::ALL.iter().position(|x| *x == c);
    rows.sort_by_key(|(_, p)| {
        (
            p.backend == Backend::Tmpfs,
            cpus_rank(p.cpus),
            p.depth,
            blk_rank(p.placement),
        )
    });
    let _ = writeln!(s, "\n## Block, split vs packed virtqueues (VIRTIO_F_RING_PACKED)\n\nEach packed point ran right after its split twin, with the same driver (three descriptors per request on both layouts; on packed they are written into the descriptor ring for each request), 4 KiB random reads over 1 GiB, medians of the repetitions. The ceiling rows are the driver against an instant backend on each layout; the last column is that ceiling over the row's rate (the driver must not be what a row measures).\n\n| placement | backend | QD | CPUs | ops/s split | ops/s packed | packed ÷ split | p50 µs split / packed | CPU µs/op split, driver + device | CPU µs/op packed, driver + device | driver ceiling ÷ this, split / packed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (split, packed) in rows {
        let backend = packed.placement.is_backend();
        let _ = writeln!(
            s,
            "| {} | {:?} | {} | {} | {:.0} | {:.0} | {:.3} | {:.1} / {:.1} | {:.2} + {:.2} | {:.2} + {:.2} | {} / {} |",
            packed.placement.label(),
            packed.backend,
            packed.depth,
            packed.cpus.label(),
            split.ops_per_sec,
            packed.ops_per_sec,
            packed.ops_per_sec / split.ops_per_sec.max(1.0),
            split.p50_us,
            packed.p50_us,
            split.cpu_us_per_op_driver,
            split.cpu_us_per_op_device,
            packed.cpu_us_per_op_driver,
            packed.cpu_us_per_op_device,
            headroom(split.ops_per_sec, blk_ceiling(r, split).map(|c| c.ops_per_sec), backend),
            headroom(packed.ops_per_sec, blk_ceiling(r, packed).map(|c| c.ops_per_sec), backend),
        );
    }
}

/// The split twin of a packed net point in `points`.
fn net_twin<'a>(points: &'a [NetPoint], p: &NetPoint) -> Option<&'a NetPoint> {
    points.iter().find(|x| {
        x.packed != p.packed
            && x.placement == p.placement
            && x.frame == p.frame
            && x.cpus == p.cpus
            && x.poll_us == p.poll_us
            && x.injectors == p.injectors
    })
}

fn net_ceiling<'a>(r: &'a Report, like: &NetPoint) -> Option<&'a NetPoint> {
    r.net_tx.iter().find(|x| {
        x.placement == NetPlacement::DriverCeiling
            && x.packed == like.packed
            && x.frame == like.frame
            && x.cpus == like.cpus
            && x.poll_us == 0
    })
}

fn net_pairs(points: &[NetPoint]) -> Vec<(&NetPoint, &NetPoint)> {
    points
        .iter()
        .filter(|p| p.packed)
        .filter_map(|p| net_twin(points, p).map(|split| (split, p)))
        .collect()
}

pub fn net_markdown(r: &Report, s: &mut String) {
    let tx = net_pairs(&r.net_tx);
    let rx = net_pairs(&r.net_rx);
    if tx.is_empty() && rx.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## Net, split vs packed virtqueues (VIRTIO_F_RING_PACKED)\n\nEach packed point ran right after its split twin, with the same driver, one queue pair; medians of the repetitions.");
    if !tx.is_empty() {
        let _ = writeln!(s, "\nTransmit (the ceiling rows: the driver against an instant device on each layout; the last column is that ceiling over the row's rate):\n\n| placement | frame | CPUs | frames/s split | frames/s packed | packed ÷ split | CPU µs/frame split, driver + device | CPU µs/frame packed, driver + device | kicks/frame split / packed | interrupts/frame split / packed | driver ceiling ÷ this, split / packed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for (split, packed) in tx {
            let device = packed.placement != NetPlacement::DriverCeiling;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.2} + {:.2} | {:.2} + {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {} / {} |",
                packed.placement.label(),
                packed.frame,
                packed.cpus.label(),
                split.frames_per_sec,
                packed.frames_per_sec,
                packed.frames_per_sec / split.frames_per_sec.max(1.0),
                split.cpu_us_per_frame_driver,
                split.cpu_us_per_frame_device,
                packed.cpu_us_per_frame_driver,
                packed.cpu_us_per_frame_device,
                split.kicks_per_frame,
                packed.kicks_per_frame,
                split.interrupts_per_frame,
                packed.interrupts_per_frame,
                headroom(split.frames_per_sec, net_ceiling(r, split).map(|c| c.frames_per_sec), device),
                headroom(packed.frames_per_sec, net_ceiling(r, packed).map(|c| c.frames_per_sec), device),
            );
        }
    }
    if !rx.is_empty() {
        let _ = writeln!(s, "\nReceive through vhost-user-net (frames injected into the TAP with sendmmsg):\n\n| frame | CPUs | frames/s split | frames/s packed | packed ÷ split | injected frames/s split / packed | CPU µs/frame split, driver + device | CPU µs/frame packed, driver + device | interrupts/frame split / packed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for (split, packed) in rx {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.3} | {:.0} / {:.0} | {:.2} + {:.2} | {:.2} + {:.2} | {:.3} / {:.3} |",
                packed.frame,
                packed.cpus.label(),
                split.frames_per_sec,
                packed.frames_per_sec,
                packed.frames_per_sec / split.frames_per_sec.max(1.0),
                split.injected_frames_per_sec,
                packed.injected_frames_per_sec,
                split.cpu_us_per_frame_driver,
                split.cpu_us_per_frame_device,
                packed.cpu_us_per_frame_driver,
                packed.cpu_us_per_frame_device,
                split.interrupts_per_frame,
                packed.interrupts_per_frame,
            );
        }
    }
}

/// The lowest `ceiling ÷ rate` seen so far, and where.
type Worst = Option<(f64, String)>;

fn note_worst(worst: &mut Worst, ratio: f64, at: impl FnOnce() -> String) {
    if worst.as_ref().is_none_or(|(w, _)| ratio < *w) {
        *worst = Some((ratio, at()));
    }
}

/// The packed driver's ceiling, checked as the split one is: against an instant backend across
/// CPUs (block) or on every placement (net transmit), at least twice the fastest packed backend.
pub fn targets(r: &Report, t: &mut Vec<Target>) {
    let mut worst: Worst = None;
    let mut checked = 0;
    for backend in [Backend::Null, Backend::Tmpfs] {
        for cpus in [Cpus::TwoPinned, Cpus::Unpinned] {
            let mut depths: Vec<u32> = r
                .blk
                .iter()
                .filter(|p| p.packed && p.backend == backend && p.cpus == cpus)
                .map(|p| p.depth)
                .collect();
            depths.sort_unstable();
            depths.dedup();
            // As for split rings: below this depth the driver's wake-ups bound every backend.
            for qd in depths
                .into_iter()
                .filter(|qd| *qd >= super::report_blk::CEILING_FROM_QD)
            {
                let best = r
                    .blk
                    .iter()
                    .filter(|x| {
                        x.packed
                            && x.placement.is_backend()
                            && x.placement != BlkPlacement::InProcessDirect
                            && x.backend == backend
                            && x.depth == qd
                            && x.cpus == cpus
                    })
                    .max_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
                let (Some(best), Some(ceiling)) = (best, best.and_then(|b| blk_ceiling(r, b)))
                else {
                    continue;
                };
                checked += 1;
                note_worst(&mut worst, ceiling.ops_per_sec / best.ops_per_sec, || {
                    format!(
                        "{backend:?} QD{qd} {}: ceiling {:.0} vs best {:.0} ({})",
                        cpus.label(),
                        ceiling.ops_per_sec,
                        best.ops_per_sec,
                        best.placement.label()
                    )
                });
            }
        }
    }
    if let Some((ratio, at)) = worst {
        t.push(Target {
            what: format!("packed rings: the harness's driver against an instant backend across CPUs reaches ≥ 2 × the best packed backend's rate at every packed block point from QD{} up", super::report_blk::CEILING_FROM_QD),
            measured: format!("lowest ratio {ratio:.2}× over {checked} points, at {at}"),
            met: Some(ratio >= 2.0),
        });
    }
    let mut worst: Worst = None;
    let mut checked = 0;
    for p in r
        .net_tx
        .iter()
        .filter(|p| p.packed && p.placement != NetPlacement::DriverCeiling && p.poll_us == 0)
    {
        let Some(ceiling) = net_ceiling(r, p) else {
            continue;
        };
        checked += 1;
        note_worst(
            &mut worst,
            ceiling.frames_per_sec / p.frames_per_sec,
            || {
                format!(
                    "{} B {}: ceiling {:.0} vs {:.0} ({})",
                    p.frame,
                    p.cpus.label(),
                    ceiling.frames_per_sec,
                    p.frames_per_sec,
                    p.placement.label()
                )
            },
        );
    }
    if let Some((ratio, at)) = worst {
        t.push(Target {
            what: "packed rings: the harness's driver reaches ≥ 2 × every device's packed transmit rate".into(),
            measured: format!("lowest ratio {ratio:.2}× over {checked} points, at {at}"),
            met: Some(ratio >= 2.0),
        });
    }
}
