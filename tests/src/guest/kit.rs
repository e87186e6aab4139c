//! `GuestKit`: the kernel and initramfs a test boots, fetched and built once per workspace and
//! cached under `target/bulkhead-guest/`.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result};

use super::{cache, initramfs, kernel, modules};

/// A bootable kernel + initramfs pair.
#[derive(Debug, Clone)]
pub struct GuestKit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The guest's `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// The Debian package the kernel came from, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub kernel_package: String,
    /// The modules `/init` loads, in load order.
    pub modules: Vec<String>,
}

/// Built once per process; the files behind it are shared between processes.
static KIT: OnceLock<GuestKit> = OnceLock::new();

impl GuestKit {
    /// Fetches the kernel and builds the initramfs on first use, then returns the cached
    /// paths. Holds an exclusive lock on the cache while working, so parallel test processes
    /// wait for each other instead of racing. The first call needs apt's package lists and
    /// network access; later calls touch neither. Delete `target/bulkhead-guest` to refetch.
    pub fn ensure() -> Result<GuestKit> {
        if let Some(kit) = KIT.get() {
            return Ok(kit.clone());
        }
        let kit = Self::build().context("cannot prepare the guest kernel and initramfs")?;
        // Another thread may have won the race; either value describes the same files.
        Ok(KIT.get_or_init(|| kit).clone())
    }

    fn build() -> Result<GuestKit> {
        let dir = cache::cache_dir()?;
        let _lock = cache::lock(&dir)?;
        let tree = kernel::ensure(&dir)?;
        let modules = modules::resolve(&tree.modules_dir, modules::ROOT_MODULES)?;
        // Rebuilt in memory every time (a few MB, milliseconds) and named after its content:
        // a changed recipe gives a new file and never rewrites one a running QEMU has open.
        let image = initramfs::build(&modules)?;
        let initrd = dir.join(format!(
            "initramfs-{}-{:016x}.cpio",
            tree.release,
            cache::fnv1a64(&image)
        ));
        if !initrd.is_file() {
            cache::write_atomic(&initrd, &image)?;
        }
        Ok(GuestKit {
            kernel: tree.vmlinuz,
            initrd,
            kernel_release: tree.release,
            kernel_package: tree.package,
            modules: modules.into_iter().map(|m| m.name).collect(),
        })
    }
}
