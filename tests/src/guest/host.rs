//! Running the host tools the kit relies on (apt-get, dpkg, xz/zstd), with errors that say
//! which command failed and what it printed.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `cmd` to completion and returns its stdout; a non-zero exit is an error carrying stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}
