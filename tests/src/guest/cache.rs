//! Where the guest kit keeps what it downloads and builds, and how parallel test processes
//! share it without racing: one directory under the workspace's `target/`, one `flock`ed lock
//! file, and files that appear atomically (write to a temporary name, then rename).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Overrides the cache directory (useful when `target/` is read-only or shared).
const CACHE_ENV: &str = "BULKHEAD_GUEST_CACHE";
/// Name of the cache directory inside the workspace's target directory.
const CACHE_NAME: &str = "bulkhead-guest";

/// The cache directory, created if missing: `$BULKHEAD_GUEST_CACHE`, else
/// `$CARGO_TARGET_DIR/bulkhead-guest`, else `<workspace>/target/bulkhead-guest` where the
/// workspace is the nearest ancestor of `CARGO_MANIFEST_DIR` that holds `Cargo.lock`.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(CACHE_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => target_dir()?.join(CACHE_NAME),
    };
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the guest cache {}", dir.display()))?;
    Ok(dir)
}

/// The workspace's target directory (`$CARGO_TARGET_DIR` or `<workspace>/target`).
pub(crate) fn target_dir() -> Result<PathBuf> {
    let workspace = workspace_root()?;
    match std::env::var_os("CARGO_TARGET_DIR") {
        // A relative CARGO_TARGET_DIR is relative to where cargo ran; the workspace root is the
        // usual place, and tests run with the package directory as cwd, so anchor it there.
        Some(dir) => Ok(workspace.join(dir)),
        None => Ok(workspace.join("target")),
    }
}

fn workspace_root() -> Result<PathBuf> {
    // Prefer the runtime variable (set by `cargo test`/`cargo run`), fall back to the value
    // baked in at compile time so a test binary run by hand still finds its workspace.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for dir in manifest.ancestors() {
        if dir.join("Cargo.lock").is_file() {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "no Cargo.lock above {}: cannot locate the workspace target directory (set {CACHE_ENV})",
        manifest.display()
    )
}

/// An exclusive `flock` on `<cache>/lock`, held until dropped (closing the file releases it).
#[derive(Debug)]
pub(crate) struct CacheLock {
    _file: File,
}

/// Blocks until this process holds the cache lock.
pub(crate) fn lock(cache: &Path) -> Result<CacheLock> {
    let path = cache.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    loop {
        // SAFETY: flock only takes an fd, which `file` keeps open for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(CacheLock { _file: file });
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
}

/// Writes `bytes` to `path` so that readers see either nothing or the whole file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file =
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

/// FNV-1a, 64 bits: a content hash that is stable across Rust releases (unlike `DefaultHasher`),
/// used to name build products after their content.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
