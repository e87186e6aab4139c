//! A writer for the "newc" cpio format the kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst). Written in Rust so the kit
//! needs no cpio tool; every header field is fixed (mtime 0, uid/gid 0, inodes numbered in
//! order), so the same entries always give the same bytes.

use anyhow::{Context, Result};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Builds an archive in memory. Parents must be added before their children.
#[derive(Debug, Default)]
pub(crate) struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    pub(crate) fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[])
    }

    pub(crate) fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data)
    }

    pub(crate) fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Appends the trailer and returns the archive.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let name = path.trim_start_matches('/');
        let namesize = u32::try_from(name.len() + 1).context("cpio path too long")?;
        let filesize = u32::try_from(data.len()).context("cpio entries are limited to 4 GiB")?;
        // Inodes start at 1; the kernel only uses them to spot hard links (nlink > 1 files).
        self.next_ino = self.next_ino.wrapping_add(1);
        let ino = self.next_ino;
        let fields = [
            ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// Header+name and data are each padded to a multiple of four bytes.
    fn pad(&mut self) {
        let padded = self.out.len().next_multiple_of(4);
        self.out.resize(padded, 0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn newc_layout() {
        let mut cpio = Cpio::default();
        cpio.file("/init", 0o755, b"abc").unwrap();
        let out = cpio.finish().unwrap();
        // 110-byte header + "init\0" = 115 -> padded to 116, then 3 bytes data -> 120.
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..119], b"abc");
        assert_eq!(&out[120..126], b"070701");
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
