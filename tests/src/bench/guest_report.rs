//! The guest's view in the report: tables relative to QEMU's built-in devices, and a plot.

use std::fmt::Write as _;

use super::guest::{GuestBlkBackend, GuestNetBackend, GuestView};
use super::svg::{bars, Series};

fn blk_workloads(v: &GuestView) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in &v.blk {
        if !names.contains(&p.workload) {
            names.push(p.workload.clone());
        }
    }
    names
}

fn blk_ops(v: &GuestView, backend: GuestBlkBackend, workload: &str) -> Option<f64> {
    v.blk
        .iter()
        .find(|p| p.backend == backend && p.workload == workload)
        .map(|p| p.ops_per_sec)
}

pub fn markdown(v: &GuestView) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Secondary: the guest's view ({}, accel={}, {} vCPUs, {} MiB, guest kernel {})\n",
        v.qemu, v.accel, v.vcpus, v.memory_mb, v.guest_kernel
    );
    let _ = writeln!(
        s,
        "Busybox `dd`/`nc`/`ping` inside the guest, timed on the host. Under TCG the guest CPU is \
         emulated: absolute numbers say more about TCG than about the device path; the columns \
         compare backends on the same image and run. The disk is a 256 MiB file on tmpfs.\n"
    );
    let _ = writeln!(
        s,
        "| workload | backend | ops/s | MiB/s | vs QEMU built-in |\n| --- | --- | --- | --- | --- |"
    );
    for w in blk_workloads(v) {
        let base = blk_ops(v, GuestBlkBackend::QemuBuiltin, &w);
        for p in v.blk.iter().filter(|p| p.workload == w) {
            let ratio = base.map_or("n/a".to_owned(), |b| format!("{:.2}×", p.ops_per_sec / b));
            let _ = writeln!(
                s,
                "| {w} | {} | {:.0} | {:.1} | {ratio} |",
                p.backend.label(),
                p.ops_per_sec,
                p.mib_per_sec
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| workload | backend | result | vs QEMU built-in |\n| --- | --- | --- | --- |"
    );
    for p in &v.net {
        let base = v
            .net
            .iter()
            .find(|b| b.backend == GuestNetBackend::QemuBuiltinTap && b.workload == p.workload);
        let (result, ratio) = match (p.mbit_per_sec, p.rtt_ms) {
            (Some(m), _) => (
                format!("{m:.0} Mbit/s"),
                base.and_then(|b| b.mbit_per_sec)
                    .map_or("n/a".to_owned(), |b| format!("{:.2}×", m / b)),
            ),
            (None, Some(ms)) => (
                format!("{ms:.3} ms median RTT"),
                base.and_then(|b| b.rtt_ms)
                    .map_or("n/a".to_owned(), |b| format!("{:.2}× the latency", ms / b)),
            ),
            (None, None) => ("n/a".to_owned(), "n/a".to_owned()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {result} | {ratio} |",
            p.workload,
            p.backend.label()
        );
    }
    if v.accel == "tcg" {
        let _ = writeln!(
            s,
            "\nUnder TCG the vhost-user-net device runs with `vectors=0` (legacy interrupts): QEMU \
             7.2 crashes setting up MSI-X for a vhost-user netdev under TCG (see README)."
        );
    }
    s
}

/// Block operations per second of each backend relative to QEMU's built-in device.
pub fn blk_svg(v: &GuestView) -> Option<String> {
    let workloads = blk_workloads(v);
    if workloads.is_empty() {
        return None;
    }
    let series: Vec<Series> = GuestBlkBackend::ALL
        .iter()
        .map(|&b| Series {
            name: b.label().to_owned(),
            values: workloads
                .iter()
                .map(|w| {
                    let base = blk_ops(v, GuestBlkBackend::QemuBuiltin, w)?;
                    Some(100.0 * blk_ops(v, b, w)? / base)
                })
                .collect(),
        })
        .collect();
    Some(bars(
        &format!(
            "Guest block I/O relative to QEMU's built-in virtio-blk ({})",
            v.accel
        ),
        "workload in the guest",
        "% of QEMU built-in ops/s",
        &workloads,
        &series,
    ))
}
