//! Boots the kit's guest with no extra devices and holds a short conversation with it.
//! Needs QEMU (qemu-system-x86) and busybox-static; fails, never skips, when they are missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};

const CMD_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn guest_boots_and_runs_commands() {
    let started = Instant::now();
    let kit = GuestKit::ensure().expect("guest kit");
    eprintln!(
        "kit ready in {:?}: {} ({}), modules {:?}, initrd {}",
        started.elapsed(),
        kit.kernel_package,
        kit.kernel_release,
        kit.modules,
        kit.initrd.display()
    );

    let mut guest = Guest::boot(&kit, &QemuConfig::default()).expect("boot");
    eprintln!(
        "booted in {:?} (qemu pid {})",
        guest.boot_time(),
        guest.qemu_pid()
    );

    let release = guest.run_ok("uname -r", CMD_TIMEOUT).unwrap();
    assert_eq!(
        release.trim(),
        kit.kernel_release,
        "console:\n{}",
        guest.console_log()
    );

    assert_eq!(guest.run_ok("echo hello", CMD_TIMEOUT).unwrap(), "hello\n");

    let failed = guest.run("false", CMD_TIMEOUT).unwrap();
    assert_eq!(failed.status, 1);
    assert_eq!(failed.stdout, "");

    let mixed = guest
        .run("echo out; echo err >&2; exit 3", CMD_TIMEOUT)
        .unwrap();
    assert_eq!(
        (mixed.stdout.as_str(), mixed.stderr.as_str(), mixed.status),
        ("out\n", "err\n", 3)
    );

    let no_newline = guest.run_ok("printf abc", CMD_TIMEOUT).unwrap();
    assert_eq!(no_newline, "abc");

    let err = guest.run_ok("exit 7", CMD_TIMEOUT).unwrap_err();
    assert!(format!("{err:#}").contains("status 7"), "{err:#}");

    let drivers = guest
        .run_ok("ls /sys/bus/virtio/drivers", CMD_TIMEOUT)
        .unwrap();
    let drivers: Vec<&str> = drivers.split_whitespace().collect();
    for driver in ["virtio_blk", "virtio_net"] {
        assert!(
            drivers.contains(&driver),
            "{driver} missing from {drivers:?}"
        );
    }

    // A command that overruns its timeout is interrupted (^C) and the shell carries on.
    let err = guest.run("sleep 30", Duration::from_secs(1)).unwrap_err();
    assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    assert_eq!(
        guest.run_ok("echo still here", CMD_TIMEOUT).unwrap(),
        "still here\n"
    );

    let shutdown = Instant::now();
    guest.poweroff(CMD_TIMEOUT).expect("poweroff");
    eprintln!(
        "powered off in {:?}; total {:?}",
        shutdown.elapsed(),
        started.elapsed()
    );
}
