//! The demo: starts Bulkhead's daemons as separate processes, boots a QEMU guest attached to them
//! over vhost-user, and shows the guest using them (a filesystem on the vhost-user-blk disk), then
//! grows the disk while the guest runs and prints what the block daemon counted.
//! Run through `tests/demo.sh`, which installs what is needed and builds the daemons first.

use std::time::Duration;

use anyhow::{Context, Result};
use bulkhead_tests::fixture::{BlkFixture, NetFixture};
use bulkhead_tests::guest::{Guest, GuestKit, QemuConfig};

const T: Duration = Duration::from_secs(120);

fn step(g: &mut Guest, what: &str, cmd: &str) -> Result<()> {
    println!("\n== {what}\n$ {cmd}");
    let out = g
        .run_ok(cmd, T)
        .with_context(|| format!("guest command failed: {cmd}"))?;
    print!("{out}");
    Ok(())
}

fn main() -> Result<()> {
    println!("Preparing the guest kernel and initramfs (cached after the first run)...");
    let kit = GuestKit::ensure()?;
    let scratch = bulkhead_tests::daemon::Scratch::new("demo")?;
    let blk_ctl = scratch.join("blk.ctl");
    let blk_ctl_arg = blk_ctl.display().to_string();
    let blk = BlkFixture::start_in(
        scratch,
        256 << 20,
        &[
            "--serial",
            "bulkhead-demo",
            "--control-socket",
            &blk_ctl_arg,
        ],
    )?;
    println!(
        "vhost-user-blk running as its own process (pid {}), serving {} on {}",
        blk.daemon.pid(),
        blk.image.display(),
        blk.socket.display()
    );
    let net = NetFixture::start(&["--queues", "2"])?;
    net.ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"])?;
    net.ns.ip(&["link", "set", "tap0", "up"])?;
    println!(
        "vhost-user-net running as its own process (pid {}), TAP tap0 (10.0.0.1/24) in network namespace {}",
        net.daemon.pid(),
        net.ns.name
    );
    let mut cfg = QemuConfig::default();
    cfg.vhost_user_blk("disk0", &blk.socket, "", "");
    cfg.vhost_user_net("net0", &net.socket, "", 2, "52:54:00:12:34:56");
    println!("Booting QEMU: {}", cfg.args(&kit).join(" "));
    let mut g = Guest::boot(&kit, &cfg)?;
    println!(
        "Guest up in {:.1} s (QEMU pid {}).",
        g.boot_time().as_secs_f64(),
        g.qemu_pid()
    );

    step(
        &mut g,
        "The disk, as the guest sees it",
        "cat /sys/block/vda/serial; echo; cat /sys/block/vda/size; ls /sys/block/vda/mq",
    )?;
    step(
        &mut g,
        "Make a filesystem on it",
        "mke2fs -q /dev/vda && mount /dev/vda /mnt && df -h /mnt",
    )?;
    step(
        &mut g,
        "Write 32 MiB of data and remember its checksum",
        "dd if=/dev/urandom of=/mnt/data bs=1048576 count=32 2>/dev/null && sync && sha256sum /mnt/data | tee /tmp/sum",
    )?;
    step(&mut g, "Unmount, drop caches, mount again and verify", "umount /mnt && echo 3 > /proc/sys/vm/drop_caches && mount /dev/vda /mnt && sha256sum -c /tmp/sum")?;
    step(
        &mut g,
        "The network: two queue pairs over vhost-user-net",
        "ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ls /sys/class/net/eth0/queues",
    )?;
    step(
        &mut g,
        "Ping the host side of the TAP",
        "ping -c 3 10.0.0.1",
    )?;
    let listener = net
        .ns
        .run_in(|| Ok(std::net::TcpListener::bind("10.0.0.1:5000")?))?;
    let sink = std::thread::spawn(move || -> Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = Vec::new();
        Ok(std::io::Read::read_to_end(&mut s, &mut buf)?)
    });
    step(
        &mut g,
        "Send 16 MiB over TCP to the host",
        "time dd if=/dev/zero bs=1048576 count=16 2>/dev/null | nc 10.0.0.1 5000",
    )?;
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
    println!("host side received {received} bytes");
    step(
        &mut g,
        "Discard free space (fstrim-like: delete and discard)",
        "rm /mnt/data && umount /mnt && blkdiscard /dev/vda && echo discarded",
    )?;
    let grow = blk_ctl.display().to_string();
    println!("\n== Grow the disk while the guest runs\n$ bulkhead-ctl --socket {grow} resize --size 536870912");
    let r = bulkhead_tests::control::ctl_json(&blk_ctl, &["resize", "--size", "536870912"])?;
    println!("{r}");
    step(
        &mut g,
        "The guest sees the new size (sectors)",
        "while [ \"$(cat /sys/block/vda/size)\" != 1048576 ]; do sleep 0.1; done; cat /sys/block/vda/size",
    )?;
    println!("\n== What the block daemon counted\n$ bulkhead-ctl --socket {grow} stats --prometheus | grep requests_total");
    let out = bulkhead_tests::control::ctl(&blk_ctl, &["stats", "--prometheus"])?;
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("bulkhead_blk_requests_total") && !l.ends_with(" 0"))
    {
        println!("{line}");
    }
    g.poweroff(T)?;
    println!("\nGuest powered off; both daemons keep serving for the next VM.");
    Ok(())
}
