//! Picks the kernel modules the guest needs and orders them for `insmod`: the kit names a few
//! root modules, their dependencies come from each module's own `.modinfo` (`depends=`), because
//! a package extracted with `dpkg -x` has no `modules.dep` (depmod runs at install time).
//! Built-in drivers (listed in `modules.builtin`) are skipped. Compressed modules are
//! decompressed here, because busybox `insmod` cannot.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::elf;
use super::host;

/// What the guest must be able to drive: virtio over PCI, virtio-net, virtio-blk, and packet
/// sockets for networking tools. Dependencies (virtio, virtio_ring, failover, ...) follow.
pub(crate) const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtio_blk", "af_packet"];

/// A module ready to be put in the initramfs: uncompressed object code.
#[derive(Debug, Clone)]
pub(crate) struct Module {
    pub name: String,
    pub object: Vec<u8>,
}

/// The modules to load, dependencies first. Roots that are built into the kernel are skipped.
pub(crate) fn resolve(modules_dir: &Path, roots: &[&str]) -> Result<Vec<Module>> {
    let builtin = builtin_names(modules_dir)?;
    let mut files = BTreeMap::new();
    index(&modules_dir.join("kernel"), &mut files)?;
    let mut ordered = Vec::new();
    let mut done = BTreeSet::new();
    for root in roots {
        let root = normalize(root);
        if !builtin.contains(&root) {
            visit(
                &root,
                &files,
                &builtin,
                &mut done,
                &mut Vec::new(),
                &mut ordered,
            )?;
        }
    }
    Ok(ordered)
}

/// Depth-first post-order walk: a module is pushed after everything it depends on.
fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    done: &mut BTreeSet<String>,
    path: &mut Vec<String>,
    ordered: &mut Vec<Module>,
) -> Result<()> {
    if done.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    if path.iter().any(|n| n == name) {
        bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
    }
    let file = files
        .get(name)
        .with_context(|| format!("kernel module {name} not found"))?;
    let object = load(file)?;
    let deps = depends(&object).with_context(|| format!("reading {}", file.display()))?;
    path.push(name.to_owned());
    for dep in deps {
        visit(&dep, files, builtin, done, path, ordered)?;
    }
    path.pop();
    done.insert(name.to_owned());
    ordered.push(Module {
        name: name.to_owned(),
        object,
    });
    Ok(())
}

/// `depends=` from the module's `.modinfo` section (NUL-separated `key=value` strings).
fn depends(object: &[u8]) -> Result<Vec<String>> {
    let modinfo = elf::section(object, ".modinfo")?.context("no .modinfo section")?;
    let deps = modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|dep| !dep.is_empty())
        .map(|dep| normalize(&String::from_utf8_lossy(dep)))
        .collect();
    Ok(deps)
}

/// Module names use `_`; file names may use `-` (e.g. `virtio-rng.ko`).
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Splits `foo.ko`, `foo.ko.xz`, `foo.ko.zst`, `foo.ko.gz` into (module name, compression).
fn module_file_name(file_name: &str) -> Option<(String, &str)> {
    let (stem, compression) = match file_name.split_once(".ko") {
        Some((stem, "")) => (stem, ""),
        Some((stem, ext @ (".xz" | ".zst" | ".gz"))) => (stem, ext),
        _ => return None,
    };
    Some((normalize(stem), compression))
}

fn builtin_names(modules_dir: &Path) -> Result<BTreeSet<String>> {
    let path = modules_dir.join("modules.builtin");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .filter_map(module_file_name)
        .map(|(name, _)| name)
        .collect())
}

/// Maps every module name under `dir` to its file.
fn index(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index(&path, files)?;
        } else if let Some((name, _)) = entry.file_name().to_str().and_then(module_file_name) {
            files.insert(name, path);
        }
    }
    Ok(())
}

/// Reads a module, decompressing with the host's xz/zstd/gzip when needed (the Debian 6.1
/// cloud kernel ships uncompressed modules; later kernels use .ko.xz).
fn load(path: &Path) -> Result<Vec<u8>> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let tool = match module_file_name(file_name) {
        Some((_, ".xz")) => "xz",
        Some((_, ".zst")) => "zstd",
        Some((_, ".gz")) => "gzip",
        _ => return fs::read(path).with_context(|| format!("cannot read {}", path.display())),
    };
    host::run(Command::new(tool).arg("-dc").arg(path)).with_context(|| {
        format!(
            "cannot decompress {} (is {tool} installed?)",
            path.display()
        )
    })
}
