//! Online resize (`bulkhead-ctl resize`): take up a new size of the backing store, grown by the
//! operator or by us (`--size` on an image file), and expose it as the new capacity. The engine
//! then tells the frontend (CONFIG_CHANGE_MSG) and QEMU tells the guest.
//!
//! Growing is always allowed. Shrinking through `--size` is refused: the guest may keep data
//! beyond the new end, and qemu-storage-daemon likewise refuses to shrink without `force`. A
//! backing store that someone else already shrank is taken as it is (its data is gone
//! already; pretending otherwise would only turn reads into errors later), with a warning.

use crate::disk::{Disk, DiskKind};
use crate::request::SECTOR_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("--size grows image files; a block device is resized by its owner (then resize without --size)")]
    NotAFile,
    #[error("size {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("size {requested} is smaller than the current {current} bytes: shrinking a disk in use would cut off what the guest keeps there (shrink it offline)")]
    Shrink { current: u64, requested: u64 },
    #[error("the backing store is now smaller than one sector")]
    TooSmall,
    #[error("cannot grow the image file")]
    Grow(#[source] std::io::Error),
    #[error("cannot read the size of the backing store")]
    Measure(#[source] std::io::Error),
}

/// Capacities before and after a resize, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    pub old: u64,
    pub new: u64,
}

/// Grows the image to `size` (if given), then takes up the store's size as the capacity.
pub fn resize(disk: &Disk, size: Option<u64>) -> Result<Resized, ResizeError> {
    let old = disk.capacity();
    let new = match size {
        Some(n) => {
            if n % SECTOR_SIZE != 0 {
                return Err(ResizeError::Unaligned(n));
            }
            if n < old {
                return Err(ResizeError::Shrink {
                    current: old,
                    requested: n,
                });
            }
            match disk.kind() {
                DiskKind::BlockDevice => return Err(ResizeError::NotAFile),
                _ if disk.read_only() => return Err(ResizeError::ReadOnly),
                DiskKind::Null => n,
                DiskKind::File => {
                    if disk.measure().map_err(ResizeError::Measure)? < n {
                        disk.file().set_len(n).map_err(ResizeError::Grow)?;
                    }
                    disk.measure().map_err(ResizeError::Measure)?
                }
            }
        }
        None => disk.measure().map_err(ResizeError::Measure)?,
    };
    if new == 0 {
        return Err(ResizeError::TooSmall);
    }
    if new < old {
        // Operator-triggered (a control request), never by a guest.
        tracing::event!(
            tracing::Level::WARN,
            old,
            new,
            "the backing store shrank under the running disk"
        );
    }
    disk.set_capacity(new);
    if new != old {
        tracing::info!(old, new, "disk resized");
    }
    Ok(Resized { old, new })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;

    fn image(bytes: u64) -> (tempdir::Dir, Disk) {
        let dir = tempdir::Dir::new();
        let path = dir.path.join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let disk = Disk::open(&DiskOptions {
            path,
            read_only: false,
            direct: false,
        })
        .unwrap();
        (dir, disk)
    }

    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("bulkhead-resize-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Self { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn size_grows_the_image_file_and_the_capacity() {
        let (_d, disk) = image(1 << 20);
        let r = resize(&disk, Some(4 << 20)).unwrap();
        assert_eq!(
            r,
            Resized {
                old: 1 << 20,
                new: 4 << 20
            }
        );
        assert_eq!(disk.capacity(), 4 << 20);
        assert_eq!(disk.file().metadata().unwrap().len(), 4 << 20);
    }

    #[test]
    fn shrinking_through_size_is_refused_and_changes_nothing() {
        let (_d, disk) = image(4 << 20);
        assert!(matches!(
            resize(&disk, Some(1 << 20)),
            Err(ResizeError::Shrink { .. })
        ));
        assert_eq!(disk.capacity(), 4 << 20);
    }

    #[test]
    fn unaligned_sizes_are_refused() {
        let (_d, disk) = image(1 << 20);
        assert!(matches!(
            resize(&disk, Some((2 << 20) + 1)),
            Err(ResizeError::Unaligned(_))
        ));
    }

    #[test]
    fn a_file_grown_by_someone_else_is_taken_up() {
        let (_d, disk) = image(1 << 20);
        disk.file().set_len((3 << 20) + 100).unwrap();
        let r = resize(&disk, None).unwrap();
        assert_eq!(r.new, 3 << 20);
        assert_eq!(disk.capacity(), 3 << 20);
    }
}
