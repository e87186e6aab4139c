//! `QemuConfig`: what the guest's VM looks like, and the QEMU command line that makes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kit::GuestKit;

/// Overrides the accelerator (`tcg` by default; `kvm` on real hardware).
const ACCEL_ENV: &str = "BULKHEAD_QEMU_ACCEL";
/// Overrides the QEMU binary.
const QEMU_ENV: &str = "BULKHEAD_QEMU";

/// The VM a `Guest` boots. `Default` gives 512 MiB, 2 vCPUs, TCG, q35, no devices.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub memory_mb: u32,
    pub smp: u32,
    /// Appended verbatim to the command line (e.g. from `vhost_user_blk`).
    pub extra_args: Vec<String>,
    /// Extra kernel command line, after the kit's own `console=ttyS0 panic=-1 quiet`.
    pub append: String,
    /// `qemu-system-x86_64` unless `$BULKHEAD_QEMU` says otherwise.
    pub qemu: PathBuf,
    /// `-accel`: `tcg` unless `$BULKHEAD_QEMU_ACCEL` says otherwise. This machine's `/dev/kvm`
    /// (nested kvm_pvm) cannot run a stock kernel, so KVM is opt-in.
    pub accel: String,
    pub machine: String,
    /// `-cpu` (`max` by default).
    pub cpu: String,
    /// How long `Guest::boot` waits for the shell.
    pub boot_timeout: Duration,
    /// Kill QEMU (SIGKILL) when the thread that booted it dies, so an aborted test run leaves
    /// no VM behind. This is `PR_SET_PDEATHSIG`, which fires on the *thread's* exit: turn it
    /// off when booting from a short-lived thread whose `Guest` outlives it.
    pub die_with_parent: bool,
    /// A QMP socket QEMU listens on (for migration).
    pub qmp: Option<PathBuf>,
    /// `-incoming URI`: the VM arrives by migration instead of booting.
    pub incoming: Option<String>,
    /// Give the vhost-user devices added after this is set packed virtqueues (`packed=on`).
    pub packed: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            memory_mb: 512,
            smp: 2,
            extra_args: Vec::new(),
            append: String::new(),
            qemu: std::env::var_os(QEMU_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            accel: std::env::var(ACCEL_ENV).unwrap_or_else(|_| "tcg".to_owned()),
            machine: "q35".to_owned(),
            cpu: "max".to_owned(),
            boot_timeout: Duration::from_secs(120),
            die_with_parent: true,
            qmp: None,
            incoming: None,
            packed: false,
        }
    }
}

impl QemuConfig {
    /// Adds a vhost-user-blk-pci device whose backend listens on (or, with
    /// `chardev_opts = ",server=on,wait=off"`, connects to) `socket`.
    /// `chardev_opts`: e.g. `""`, `",reconnect=1"`. `device_opts`: e.g. `",num-queues=2"`.
    /// QEMU defaults `num-queues` to the vCPU count and refuses a backend with fewer queues.
    pub fn vhost_user_blk(
        &mut self,
        id: &str,
        socket: &Path,
        chardev_opts: &str,
        device_opts: &str,
    ) -> &mut Self {
        let chardev = self.chardev(id, socket, chardev_opts);
        self.extra_args.extend([
            "-device".to_owned(),
            format!(
                "vhost-user-blk-pci,id={id},chardev={chardev}{device_opts}{}",
                self.packed_opt()
            ),
        ]);
        self
    }

    /// Adds a virtio-net-pci device backed by a vhost-user netdev with `queues` queue pairs.
    pub fn vhost_user_net(
        &mut self,
        id: &str,
        socket: &Path,
        chardev_opts: &str,
        queues: u16,
        mac: &str,
    ) -> &mut Self {
        let chardev = self.chardev(id, socket, chardev_opts);
        // One MSI-X vector per virtqueue (rx+tx per pair), one for config, one for control.
        // Under TCG, QEMU 7.2 dereferences a missing vhost peer when it sets up the control
        // queue's MSI-X notifier and segfaults as the guest driver starts, whatever the backend
        // (reproduced: any feature set, 1 or 2 queue pairs; ctrl_vq=off or vectors=0 avoid it).
        // Legacy interrupts keep multiqueue and sidestep it; KVM uses irqfds instead.
        let vectors = if self.accel == "tcg" {
            0
        } else {
            2 * u32::from(queues) + 2
        };
        self.extra_args.extend([
            "-netdev".to_owned(),
            format!("vhost-user,id={id},chardev={chardev},queues={queues}"),
            "-device".to_owned(),
            format!(
                "virtio-net-pci,id={id}-dev,netdev={id},mq=on,vectors={vectors},mac={mac}{}",
                self.packed_opt()
            ),
        ]);
        self
    }

    fn packed_opt(&self) -> &'static str {
        if self.packed {
            ",packed=on"
        } else {
            ""
        }
    }

    /// Adds `-chardev socket` for a vhost-user device and returns its id.
    fn chardev(&mut self, id: &str, socket: &Path, opts: &str) -> String {
        let chardev = format!("{id}-chr");
        self.extra_args.extend([
            "-chardev".to_owned(),
            format!("socket,id={chardev},path={}{opts}", escape(socket)),
        ]);
        chardev
    }

    /// The full argument list (without the binary) for booting `kit`. The serial console is
    /// QEMU's stdio, which `Guest` connects to pipes.
    pub fn args(&self, kit: &GuestKit) -> Vec<String> {
        let mem = self.memory_mb;
        let mut args: Vec<String> = [
            "-accel",
            &self.accel,
            "-machine",
            &self.machine,
            "-cpu",
            &self.cpu,
            "-m",
            &format!("{mem}M"),
            "-smp",
            &self.smp.to_string(),
            // vhost-user backends map guest RAM, so it must be a shareable memfd.
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-numa",
            "node,memdev=mem",
            "-kernel",
            &kit.kernel.display().to_string(),
            "-initrd",
            &kit.initrd.display().to_string(),
            "-append",
            format!("console=ttyS0 panic=-1 quiet {}", self.append).trim_end(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
            // signal=off: a ^C byte goes to the guest (to interrupt a command), not to QEMU.
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            // With panic=-1 a guest panic reboots, and -no-reboot turns that into an exit.
            "-no-reboot",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(qmp) = &self.qmp {
            args.extend([
                "-qmp".to_owned(),
                format!("unix:{},server=on,wait=off", escape(qmp)),
            ]);
        }
        if let Some(uri) = &self.incoming {
            args.extend(["-incoming".to_owned(), uri.clone()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// QEMU option values escape a comma by doubling it.
fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}
