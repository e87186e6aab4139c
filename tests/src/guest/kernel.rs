//! Fetches Debian's cloud kernel without installing it: `apt-get download` the metapackage,
//! read which versioned package it depends on, download that, and `dpkg -x` it into the cache.
//! Done once; later calls find the extracted tree through a stamp file and touch no network.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cache;
use super::host;

/// The metapackage that always points at the current cloud kernel of the release.
const METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Records which versioned package the cache holds, so later runs skip apt entirely.
const STAMP: &str = "kernel-package";
/// Written inside an extracted tree once extraction finished.
const COMPLETE: &str = ".complete";

/// An extracted kernel package.
#[derive(Debug, Clone)]
pub(crate) struct KernelTree {
    /// The versioned Debian package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` inside the extracted tree.
    pub modules_dir: PathBuf,
}

/// Returns the cached kernel, fetching it first if needed. The caller holds the cache lock.
pub(crate) fn ensure(cache_dir: &Path) -> Result<KernelTree> {
    let stamp = cache_dir.join(STAMP);
    if let Ok(package) = fs::read_to_string(&stamp) {
        let package = package.trim();
        let tree = cache_dir.join(package);
        if tree.join(COMPLETE).is_file() {
            return locate(package, &tree);
        }
    }
    let package = fetch(cache_dir)?;
    cache::write_atomic(&stamp, format!("{package}\n").as_bytes())?;
    locate(&package, &cache_dir.join(&package))
}

/// Downloads and extracts the kernel, returning the versioned package name.
fn fetch(cache_dir: &Path) -> Result<String> {
    let incoming = cache_dir.join("incoming");
    reset_dir(&incoming)?;
    let meta = download(&incoming, METAPACKAGE)?;
    let package = kernel_dependency(&meta)?;
    let deb = download(&incoming, &package)?;

    let tree = cache_dir.join(&package);
    let partial = cache_dir.join(format!("{package}.partial"));
    reset_dir(&partial)?;
    host::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    fs::write(partial.join(COMPLETE), b"")?;
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    }
    fs::rename(&partial, &tree).with_context(|| format!("cannot rename to {}", tree.display()))?;
    // The .debs are not needed once extracted (~27 MB); the tree is the cache.
    fs::remove_dir_all(&incoming)
        .with_context(|| format!("cannot remove {}", incoming.display()))?;
    Ok(package)
}

/// `apt-get download PACKAGE` into `dir`; returns the .deb's path. Retries once after
/// `apt-get update`, because stale package lists point at versions the mirror has dropped.
fn download(dir: &Path, package: &str) -> Result<PathBuf> {
    let attempt = || {
        // Downloading as root into a directory `_apt` cannot write makes apt warn; allow it.
        host::run(
            Command::new("apt-get")
                .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
                .current_dir(dir),
        )
    };
    if let Err(first) = attempt() {
        host::run(Command::new("apt-get").args(["-q", "update"]))
            .with_context(|| format!("apt-get download {package} failed: {first:#}"))?;
        attempt()?;
    }
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!(
        "apt-get download {package} left no .deb in {}",
        dir.display()
    )
}

/// The `linux-image-*` package the metapackage depends on, from its control file.
fn kernel_dependency(meta_deb: &Path) -> Result<String> {
    let out = host::run(
        Command::new("dpkg-deb")
            .arg("-f")
            .arg(meta_deb)
            .arg("Depends"),
    )?;
    let depends = String::from_utf8_lossy(&out);
    // Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)[, other | alternatives]
    depends
        .split([',', '|'])
        .filter_map(|dep| dep.split_whitespace().next())
        .find(|name| name.starts_with("linux-image-"))
        .map(str::to_owned)
        .with_context(|| format!("no linux-image dependency in {METAPACKAGE}: {depends:?}"))
}

/// Finds vmlinuz and the modules directory in an extracted tree.
fn locate(package: &str, tree: &Path) -> Result<KernelTree> {
    let boot = tree.join("boot");
    let mut found = None;
    for entry in fs::read_dir(&boot).with_context(|| format!("cannot list {}", boot.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            if found.is_some() {
                bail!("more than one vmlinuz in {}", boot.display());
            }
            found = Some((release.to_owned(), path.clone()));
        }
    }
    let (release, vmlinuz) = found.with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let modules_dir = tree.join("lib/modules").join(&release);
    if !modules_dir.is_dir() {
        bail!("{} is missing", modules_dir.display());
    }
    Ok(KernelTree {
        package: package.to_owned(),
        release,
        vmlinuz,
        modules_dir,
    })
}

fn reset_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
