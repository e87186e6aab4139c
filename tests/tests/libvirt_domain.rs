//! Both daemons behind a real libvirt 9.0 (Debian's libvirt-daemon-system): a TCG domain with
//! direct kernel boot, memfd shared memory, `<disk type='vhostuser'>` and
//! `<interface type='vhostuser'>`. libvirt runs QEMU as `libvirt-qemu` (group `kvm`); the
//! daemons give their sockets to that group with `--socket-group kvm`, which is all it takes.
//! The guest's shell is reached through a `<serial type='unix'>` socket; it checks the disk
//! (size, a write read back and found in the image) and pings the TAP, which lives in a network
//! namespace the test creates.
//!
//! Under TCG, QEMU 7.2 crashes when a vhost-user-net device uses MSI-X; libvirt picks
//! `vectors` itself, so the domain overrides it with `<qemu:override>` (property `vectors` = 0
//! on the NIC, whose user alias `ua-net0` is its QEMU device id).

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::daemon::Scratch;
use bulkhead_tests::fixture::{pattern, BlkFixture, NetFixture};
use bulkhead_tests::guest::{Guest, GuestKit};
use bulkhead_tests::guest_disk::{guest_reads, guest_writes};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
const URI: &str = "qemu:///system";
const GUEST_MAC: &str = "52:54:00:77:00:02";

/// `virsh` may wait without end (libvirt 9.0's `start` with `<reconnect>` and a socket QEMU
/// cannot open): every call is bounded.
const VIRSH_TIMEOUT: &str = "120";

fn virsh(args: &[&str]) -> Result<std::process::Output> {
    Command::new("timeout")
        .args([VIRSH_TIMEOUT, "virsh", "-q", "-c", URI])
        .args(args)
        .output()
        .context("running virsh (is libvirt-clients installed? tests/setup.sh installs it)")
}

fn virsh_ok(args: &[&str]) -> Result<String> {
    let out = virsh(args)?;
    ensure!(
        out.status.success(),
        "virsh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts virtlogd and libvirtd by hand when they are not running (there is no systemd as
/// PID 1 here), and waits until libvirtd answers.
fn ensure_libvirtd() -> Result<()> {
    if virsh(&["version"]).is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    for daemon in ["virtlogd", "libvirtd"] {
        let running = Command::new("pgrep").args(["-x", daemon]).output()?;
        if !running.status.success() {
            let st = Command::new(daemon)
                .arg("-d")
                .status()
                .with_context(|| format!("starting {daemon}"))?;
            ensure!(st.success(), "{daemon} -d failed: {st}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if virsh(&["version"]).is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("libvirtd does not answer on {URI}")
}

/// Destroys and undefines the domain, however the test ends.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

fn domain_xml(name: &str, dir: &Path, blk: &Path, net: &Path, console: &Path) -> String {
    let p = |x: &Path| x.display().to_string();
    format!(
        r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw'/>
      <source type='unix' path='{blk}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='vhostuser'>
      <mac address='{GUEST_MAC}'/>
      <source type='unix' path='{net}' mode='client'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type='virtio'/>
      <alias name='ua-net0'/>
    </interface>
    <controller type='usb' model='none'/>
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='ua-net0'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"#,
        kernel = p(&dir.join("vmlinuz")),
        initrd = p(&dir.join("initrd.cpio")),
        blk = p(blk),
        net = p(net),
        console = p(console),
    )
}

#[test]
fn a_libvirt_domain_runs_its_disk_and_nic_on_the_daemons_with_sockets_given_to_kvm() -> Result<()> {
    ensure_libvirtd()?;
    let kit = GuestKit::ensure()?;
    // The domain's files in a directory of its own that QEMU (libvirt-qemu) may enter and write
    // (it creates the console socket there): libvirt's relabelling never touches the shared
    // guest kit.
    let scratch = Scratch::new("libvirt")?;
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o777))?;
    std::fs::copy(&kit.kernel, scratch.join("vmlinuz"))?;
    std::fs::copy(&kit.initrd, scratch.join("initrd.cpio"))?;

    let blk_dir = Scratch::new("libvirt-blk")?;
    std::fs::set_permissions(&blk_dir.path, std::fs::Permissions::from_mode(0o755))?;
    let blk = BlkFixture::start_in(blk_dir, 64 * MIB, &["--socket-group", "kvm"])?;
    let net = NetFixture::start(&["--socket-group", "kvm"])?;
    std::fs::set_permissions(&net.scratch.path, std::fs::Permissions::from_mode(0o755))?;
    net.ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"])?;
    net.ns.ip(&["link", "set", "tap0", "up"])?;
    let host_data = pattern(21, MIB as usize);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blk.image)?
        .write_all_at(&host_data, 0)?;

    let name = format!("bulkhead-test-{}", std::process::id());
    let console = scratch.join("console.sock");
    let xml = scratch.join("domain.xml");
    std::fs::write(
        &xml,
        domain_xml(&name, &scratch.path, &blk.socket, &net.socket, &console),
    )?;
    let _ = virsh(&["destroy", &name]);
    let _ = virsh(&["undefine", &name]);
    virsh_ok(&["define", &xml.display().to_string()])?;
    let domain = Domain(name.clone());
    let log = format!("/var/log/libvirt/qemu/{name}.log");
    // `virsh start` returns once QEMU runs; QEMU connects to both daemons before that.
    let t0 = Instant::now();
    let start = virsh(&["start", &name])?;
    eprintln!("virsh start: {:?}", t0.elapsed());
    ensure!(
        start.status.success(),
        "virsh start failed: {}\nqemu log:\n{}",
        String::from_utf8_lossy(&start.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let pid: u32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))?
        .trim()
        .parse()?;
    let qemu_ids = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid_line = qemu_ids
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    ensure!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "libvirt's QEMU runs as root ({uid_line}): the test would prove nothing about --socket-group"
    );
    let stream = UnixStream::connect(&console).context("connecting to the domain's console")?;
    let mut g = Guest::attach(
        stream,
        pid,
        &format!("libvirt domain {name} (QEMU pid {pid})"),
        T,
    )
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;

    eprintln!("guest shell answered after {:?}", t0.elapsed());
    let size = g.run_ok("cat /sys/block/vda/size", T)?;
    ensure!(
        size.trim() == (64 * MIB / 512).to_string(),
        "disk size {size}"
    );
    guest_reads(&mut g, 0, &host_data, T)?;
    guest_writes(&mut g, &blk.image, 16, T)?;
    let mac = g.run_ok("cat /sys/class/net/eth0/address", T)?;
    ensure!(mac.trim() == GUEST_MAC, "NIC MAC {mac}");
    g.run_ok("ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up", T)?;
    let ping = g.run_ok("ping -c 3 -W 5 10.0.0.1", T)?;
    ensure!(ping.contains("3 packets received"), "{ping}");
    // libvirt left our sockets as the daemons made them.
    let m = std::fs::metadata(&blk.socket)?;
    ensure!(
        m.permissions().mode() & 0o777 == 0o660,
        "socket mode changed"
    );

    eprintln!("checks done after {:?}", t0.elapsed());
    g.poweroff(T)?;
    eprintln!("console closed after {:?}", t0.elapsed());
    let deadline = Instant::now() + T;
    while virsh_ok(&["domstate", &name])?.trim() != "shut off" {
        ensure!(Instant::now() < deadline, "the domain did not shut off");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(domain);
    let mut blk_daemon = blk.daemon;
    ensure!(
        blk_daemon.try_wait()?.is_none(),
        "vhost-user-blk exited: {}",
        blk_daemon.log()
    );
    Ok(())
}
