//! Online resize seen by a running QEMU 7.2 guest: the host grows the image and writes into
//! the new area, `bulkhead-ctl resize` takes it up, and the guest's /sys/block/vda/size changes
//! (QEMU re-read the config space on our CONFIG_CHANGE_MSG and raised a config interrupt); the
//! guest then reads the host's data from beyond the old end. Then the daemon grows the image
//! itself (`--size`), and the guest writes into the newest area.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use anyhow::{ensure, Result};
use bulkhead_tests::control::ctl_json;
use bulkhead_tests::daemon::Scratch;
use bulkhead_tests::fixture::{pattern, BlkFixture};
use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Polls the guest's idea of the disk size until it is `sectors`.
fn wait_for_size(g: &mut Guest, sectors: u64) -> Result<()> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let size = g.run_ok("cat /sys/block/vda/size", T)?;
        if size.trim() == sectors.to_string() {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the guest still sees {} sectors, not {sectors}\nconsole:\n{}",
            size.trim(),
            g.console_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_running_guest_sees_the_disk_grow_and_reads_the_new_area() -> Result<()> {
    let kit = GuestKit::ensure()?;
    let scratch = Scratch::new("resize")?;
    let control = scratch.join("ctl.sock");
    let control_arg = control.display().to_string();
    let fx = BlkFixture::start_in(scratch, 32 * MIB, &["--control-socket", &control_arg])?;
    let mut cfg = QemuConfig::default();
    cfg.vhost_user_blk("disk0", &fx.socket, "", "");
    let mut g = Guest::boot(&kit, &cfg)?;
    ensure!(g.run_ok("cat /sys/block/vda/size", T)?.trim() == (32 * MIB / 512).to_string());

    // 1. The host grows the image to 48 MiB and writes a pattern at 40 MiB.
    let host_data = pattern(5, MIB as usize);
    let image = std::fs::OpenOptions::new().write(true).open(&fx.image)?;
    image.set_len(48 * MIB)?;
    image.write_all_at(&host_data, 40 * MIB)?;
    let r = ctl_json(&control, &["resize"])?;
    ensure!(
        r["new_bytes"] == 48 * MIB && r["guest_notified"] == true,
        "resize: {r}\ndaemon log:\n{}",
        fx.daemon.log()
    );
    wait_for_size(&mut g, 48 * MIB / 512)?;
    let got = g.run_ok(
        "dd if=/dev/vda bs=65536 skip=640 count=16 iflag=direct 2>/dev/null | sha256sum",
        T,
    )?;
    ensure!(
        got.starts_with(&sha256_hex(&host_data)),
        "the guest read {got} beyond the old end\nconsole:\n{}",
        g.console_log()
    );

    // 2. The daemon grows the image itself; the guest writes into the newest megabyte.
    let r = ctl_json(&control, &["resize", "--size", &(64 * MIB).to_string()])?;
    ensure!(r["guest_notified"] == true, "resize: {r}");
    wait_for_size(&mut g, 64 * MIB / 512)?;
    let written = g.run_ok(
        "dd if=/dev/urandom of=/tmp/p bs=65536 count=16 2>/dev/null && \
         dd if=/tmp/p of=/dev/vda bs=65536 seek=1008 oflag=direct conv=fsync 2>/dev/null && \
         sha256sum /tmp/p",
        T,
    )?;
    let mut on_disk = vec![0u8; MIB as usize];
    std::fs::File::open(&fx.image)?.read_exact_at(&mut on_disk, 63 * MIB)?;
    ensure!(
        written.starts_with(&sha256_hex(&on_disk)),
        "the image's last megabyte is not what the guest wrote"
    );
    // The guest kernel logged the change (virtio_blk's "new size" message).
    ensure!(
        g.console_log().contains("new size") || g.run_ok("dmesg", T)?.contains("new size"),
        "no capacity change in the guest's kernel log"
    );
    g.poweroff(T)?;
    Ok(())
}
