//! The backing store: a raw image file or a block device, opened once at start-up.
//!
//! Offsets and lengths given to these methods have already been checked against the capacity by
//! request parsing; the methods still use checked arithmetic.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::request::SECTOR_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    #[error("cannot query the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
}

/// What the backing store is; decides how discard and zeroing are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    File,
    BlockDevice,
    /// No storage: writes are dropped, reads leave the guest's buffers untouched (like
    /// qemu-storage-daemon's `null-co`); for measuring the device path alone.
    Null,
}

/// How to open the disk.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub read_only: bool,
    pub direct: bool,
}

#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    /// Capacity in bytes, a multiple of 512 (a trailing partial sector is not exposed); changed
    /// only by a resize on the control thread, read by every request's bounds check.
    capacity: AtomicU64,
    logical_block: u32,
    physical_block: u32,
    read_only: bool,
    direct: bool,
}

// Block device ioctls (linux/fs.h); `libc` does not export these request numbers.
const BLKSSZGET: libc::c_ulong = 0x1268;
pub const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKPBSZGET: libc::c_ulong = 0x127b;
pub const BLKDISCARD: libc::c_ulong = 0x1277;
pub const BLKZEROOUT: libc::c_ulong = 0x127f;

impl Disk {
    pub fn open(opts: &DiskOptions) -> Result<Self, DiskError> {
        let path = opts.path.clone();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        // No access-time update per read (a few percent of a 4 KiB read on tmpfs); allowed only
        // to the file's owner, so fall back to a plain open when refused.
        let mut noatime = oo.clone();
        noatime.custom_flags(if opts.direct { libc::O_DIRECT } else { 0 } | libc::O_NOATIME);
        let file = match noatime.open(&path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                oo.open(&path).map_err(|source| DiskError::Open {
                    path: path.clone(),
                    source,
                })?
            }
            Err(source) => {
                return Err(DiskError::Open {
                    path: path.clone(),
                    source,
                })
            }
        };
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        let (kind, bytes, logical, physical) = if ft.is_file() {
            (DiskKind::File, meta.len(), 512, 4096)
        } else if ft.is_block_device() {
            let size = |source| DiskError::Size {
                path: path.clone(),
                source,
            };
            let bytes = ioctl_u64(&file, BLKGETSIZE64).map_err(size)?;
            let logical = ioctl_u32(&file, BLKSSZGET).map_err(size)?;
            let physical = ioctl_u32(&file, BLKPBSZGET).map_err(size)?;
            (
                DiskKind::BlockDevice,
                bytes,
                logical.max(512),
                physical.max(logical).max(512),
            )
        } else {
            return Err(DiskError::NotADisk(path));
        };
        let capacity = bytes - bytes % SECTOR_SIZE;
        if capacity == 0 {
            return Err(DiskError::TooSmall(path));
        }
        Ok(Self {
            file,
            path,
            kind,
            capacity: AtomicU64::new(capacity),
            logical_block: logical,
            physical_block: physical,
            read_only: opts.read_only,
            direct: opts.direct,
        })
    }

    /// A null disk of `capacity` bytes (rounded down to 512).
    pub fn null(capacity: u64, read_only: bool) -> Result<Self, DiskError> {
        let path = PathBuf::from("null");
        let capacity = capacity - capacity % SECTOR_SIZE;
        if capacity == 0 {
            return Err(DiskError::TooSmall(path));
        }
        // A descriptor keeps the type uniform; nothing is ever read or written through it.
        let file = File::open("/dev/null").map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            file,
            path,
            kind: DiskKind::Null,
            capacity: AtomicU64::new(capacity),
            logical_block: 512,
            physical_block: 4096,
            read_only,
            direct: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn kind(&self) -> DiskKind {
        self.kind
    }
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    pub(crate) fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Relaxed);
    }

    /// The size of the file or device now, in bytes (whole sectors); a null disk has no size
    /// of its own and answers its capacity.
    pub(crate) fn measure(&self) -> io::Result<u64> {
        let bytes = match self.kind {
            DiskKind::File => self.file.metadata()?.len(),
            DiskKind::BlockDevice => ioctl_u64(&self.file, BLKGETSIZE64)?,
            DiskKind::Null => self.capacity(),
        };
        Ok(bytes - bytes % SECTOR_SIZE)
    }
    pub fn logical_block(&self) -> u32 {
        self.logical_block
    }
    pub fn physical_block(&self) -> u32 {
        self.physical_block
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        if self.kind == DiskKind::Null {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Drops the range's data; reads return zeroes afterwards on files. Discard is a hint: where
    /// the store cannot do it, succeeding without effect is correct.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = match self.kind {
            DiskKind::File => fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            DiskKind::BlockDevice => ioctl_range(&self.file, BLKDISCARD, offset, len),
            DiskKind::Null => Ok(()),
        };
        match r {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes the range read as zeroes, deallocating it if `unmap` allows.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let attempt = match self.kind {
            DiskKind::File if unmap => fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            DiskKind::File => fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .or_else(|e| {
                if unsupported(&e) {
                    // tmpfs has no ZERO_RANGE; a hole reads as zeroes too.
                    fallocate(
                        &self.file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                } else {
                    Err(e)
                }
            }),
            DiskKind::BlockDevice => ioctl_range(&self.file, BLKZEROOUT, offset, len),
            DiskKind::Null => Ok(()),
        };
        match attempt {
            Err(e) if unsupported(&e) => self.write_zero_buffers(offset, len),
            other => other,
        }
    }

    /// Last resort for zeroing: write zero-filled blocks.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const CHUNK: u64 = 1 << 20;
        let zeroes = AlignedBuf::zeroed(CHUNK as usize)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let buf = zeroes.as_slice().get(..n as usize).unwrap_or_default();
            self.file.write_all_at(buf, at)?;
            done += n;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::ENOSYS)
    )
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_range(file: &File, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read a [u64; 2] from the pointer, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_u64(file: &File, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `v`.
    if unsafe { libc::ioctl(file.as_raw_fd(), req, &raw mut v) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_u32(file: &File, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the ioctl writes one int into `v`.
    if unsafe { libc::ioctl(file.as_raw_fd(), req, &raw mut v) } < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A zeroed, page-aligned heap buffer (O_DIRECT needs aligned memory).
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

pub const BUF_ALIGN: usize = 4096;

impl AlignedBuf {
    pub fn zeroed(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), BUF_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Self { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live, initialised (zeroed) allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}
