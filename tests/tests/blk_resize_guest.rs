//! Online resize seen by a running QEMU 7.2 guest: the host grows the image and writes into
//! the new area, `bulkhead-ctl resize` takes it up, and the guest's /sys/block/vda/size changes
//! (QEMU re-read the config space on our CONFIG_CHANGE_MSG and raised a config interrupt); the
//! guest then reads the host's data from beyond the old end. Then the daemon grows the image
//! itself (`--size`), and the guest writes into the newest area.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::control::ctl_json;
use bulkhead_tests::daemon::Scratch;
use bulkhead_tests::fixture::{pattern, BlkFixture};
use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};
use bulkhead_tests::guest_disk::{guest_reads, guest_writes};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

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
    guest_reads(&mut g, 40, &host_data, T).context("beyond the old end")?;

    // 2. The daemon grows the image itself; the guest writes into the newest megabyte.
    let r = ctl_json(&control, &["resize", "--size", &(64 * MIB).to_string()])?;
    ensure!(r["guest_notified"] == true, "resize: {r}");
    wait_for_size(&mut g, 64 * MIB / 512)?;
    guest_writes(&mut g, &fx.image, 63, T).context("the newest megabyte")?;
    // The guest kernel logged the change (virtio_blk's "new size" message).
    ensure!(
        g.console_log().contains("new size") || g.run_ok("dmesg", T)?.contains("new size"),
        "no capacity change in the guest's kernel log"
    );
    g.poweroff(T)?;
    Ok(())
}
