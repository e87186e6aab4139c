//! Checks a guest makes of its virtio-blk disk (`/dev/vda`) against the image on the host.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use sha2::{Digest, Sha256};

use crate::guest::Guest;

const MIB: u64 = 1 << 20;

/// Lower-case hex SHA-256, as the guest's `sha256sum` prints it.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The guest reads one MiB of its disk at `mib` (direct I/O), and it must be `expected`.
pub fn guest_reads(g: &mut Guest, mib: u64, expected: &[u8], timeout: Duration) -> Result<()> {
    let got = g.run_ok(
        &format!(
            "dd if=/dev/vda bs=65536 skip={} count=16 iflag=direct 2>/dev/null | sha256sum",
            mib * 16
        ),
        timeout,
    )?;
    ensure!(
        got.starts_with(&sha256_hex(expected)),
        "the guest read {got} at MiB {mib}"
    );
    Ok(())
}

/// The guest writes one MiB of random data at `mib` (direct I/O, fsync), and the image on the
/// host must hold exactly that.
pub fn guest_writes(g: &mut Guest, image: &Path, mib: u64, timeout: Duration) -> Result<()> {
    let written = g.run_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/p bs=65536 count=16 2>/dev/null && \
             dd if=/tmp/p of=/dev/vda bs=65536 seek={} oflag=direct conv=fsync 2>/dev/null && \
             sha256sum /tmp/p",
            mib * 16
        ),
        timeout,
    )?;
    let mut on_disk = vec![0u8; MIB as usize];
    std::fs::File::open(image)?.read_exact_at(&mut on_disk, mib * MIB)?;
    ensure!(
        written.starts_with(&sha256_hex(&on_disk)),
        "the image's MiB {mib} is not what the guest wrote"
    );
    Ok(())
}
