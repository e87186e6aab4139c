//! vhost-user-blk under a real QEMU 7.2 guest (TCG): `-smp 2` and `-device vhost-user-blk-pci`
//! with default options. The guest reads what the host wrote, writes its own data, discards a
//! range; the host checks the image. Then a second QEMU attaches to the same running daemon.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use anyhow::{ensure, Result};
use bulkhead_tests::fixture::{pattern, BlkFixture};
use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};
use bulkhead_tests::guest_disk::sha256_hex;

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Boots a guest on the daemon, on packed rings or split ones, and checks which it got.
fn boot_on(fx: &BlkFixture, kit: &GuestKit, packed: bool) -> Result<Guest> {
    let mut cfg = QemuConfig {
        packed,
        ..QemuConfig::default()
    };
    cfg.vhost_user_blk("disk0", &fx.socket, "", "");
    let mut g = Guest::boot(kit, &cfg)?;
    // The guest's view of feature bit 34 (VIRTIO_F_RING_PACKED).
    let bit = g.run_ok("cut -c35 /sys/block/vda/device/features", T)?;
    ensure!(
        (bit.trim() == "1") == packed,
        "guest asked for packed rings: {packed}, negotiated bit 34: {bit}"
    );
    Ok(g)
}

fn image_range(fx: &BlkFixture, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(&fx.image)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

#[test]
fn guest_reads_writes_and_discards_then_a_second_vm_attaches() -> Result<()> {
    reads_writes_discards_then_a_second_vm(false, false)
}

/// The same on packed rings; the second VM, on split rings, attaches to the same daemon.
#[test]
fn guest_on_packed_rings_reads_writes_and_discards_then_a_split_ring_vm_attaches() -> Result<()> {
    reads_writes_discards_then_a_second_vm(true, false)
}

fn reads_writes_discards_then_a_second_vm(packed: bool, second_packed: bool) -> Result<()> {
    let kit = GuestKit::ensure()?;
    let fx = BlkFixture::start(64 * MIB, &["--serial", "bulkhead-guest-test"])?;
    let host_data = pattern(1, MIB as usize);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.image)?
        .write_all_at(&host_data, 0)?;

    let mut g = boot_on(&fx, &kit, packed)?;
    let fail = |g: &Guest, what: &str| {
        format!(
            "{what}\nconsole:\n{}\ndaemon log:\n{}",
            g.console_log(),
            fx.daemon.log()
        )
    };
    // QEMU's default num-queues is the vCPU count: 2 queues in use.
    let queues = g.run_ok("ls /sys/block/vda/mq | wc -l", T)?;
    ensure!(
        queues.trim() == "2",
        "{}",
        fail(&g, &format!("queues: {queues}"))
    );
    let size = g.run_ok("cat /sys/block/vda/size", T)?;
    ensure!(size.trim() == (64 * MIB / 512).to_string(), "size {size}");
    let serial = g.run_ok("cat /sys/block/vda/serial", T)?;
    ensure!(serial.trim() == "bulkhead-guest-test", "serial {serial}");
    ensure!(g.run_ok("cat /sys/block/vda/queue/write_cache", T)?.trim() == "write back");

    // 1. The guest reads the host's pattern.
    let got = g.run_ok(
        "dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | sha256sum",
        T,
    )?;
    ensure!(
        got.starts_with(&sha256_hex(&host_data)),
        "{}",
        fail(&g, &format!("guest read {got}"))
    );

    // 2. The guest writes its own data at 8 MiB with direct I/O and tells us its hash.
    let written = g.run_ok(
        "dd if=/dev/urandom of=/tmp/p bs=65536 count=32 2>/dev/null && \
         dd if=/tmp/p of=/dev/vda bs=65536 seek=128 oflag=direct conv=fsync 2>/dev/null && \
         sha256sum /tmp/p",
        T,
    )?;
    let guest_hash = written
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        sha256_hex(&image_range(&fx, 8 * MIB, 2 * MIB as usize)?) == guest_hash,
        "image differs from what the guest wrote"
    );

    // 3. Discard the host pattern's first 512 KiB; it must read back as zeroes on the host.
    g.run_ok("blkdiscard -o 0 -l 524288 /dev/vda && sync", T)?;
    ensure!(
        image_range(&fx, 0, 512 * 1024)?.iter().all(|b| *b == 0),
        "discarded range not zero"
    );
    ensure!(
        image_range(&fx, 512 * 1024, 512 * 1024)? == host_data[512 * 1024..],
        "data past the discard changed"
    );

    // 4. A flush from the guest (sync on the block device) completes.
    g.run_ok("sync", T)?;
    g.poweroff(T)?;

    // 5. A second VM attaches to the same, still running daemon and sees the first one's data.
    let mut g2 = boot_on(&fx, &kit, second_packed)?;
    let again = g2.run_ok(
        "dd if=/dev/vda bs=65536 skip=128 count=32 iflag=direct 2>/dev/null | sha256sum",
        T,
    )?;
    ensure!(
        again.starts_with(&guest_hash),
        "{}",
        fail(&g2, &format!("second VM read {again}"))
    );
    g2.poweroff(T)?;
    ensure!(
        fx.daemon.log().matches("frontend connected").count() == 2,
        "daemon log:\n{}",
        fx.daemon.log()
    );
    Ok(())
}

#[test]
fn read_only_disk_is_read_only_in_the_guest_and_the_image_stays_intact() -> Result<()> {
    let kit = GuestKit::ensure()?;
    let fx = BlkFixture::start(16 * MIB, &["--read-only"])?;
    let data = pattern(3, 16 * MIB as usize);
    std::fs::write(&fx.image, &data)?;
    let mut g = boot_on(&fx, &kit, false)?;
    ensure!(g.run_ok("cat /sys/block/vda/ro", T)?.trim() == "1");
    let w = g.run(
        "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync",
        T,
    )?;
    ensure!(w.status != 0, "write to a read-only disk succeeded");
    let got = g.run_ok(
        "dd if=/dev/vda bs=1048576 count=16 2>/dev/null | sha256sum",
        T,
    )?;
    ensure!(got.starts_with(&sha256_hex(&data)), "guest read {got}");
    g.poweroff(T)?;
    ensure!(std::fs::read(&fx.image)? == data, "image changed");
    Ok(())
}
