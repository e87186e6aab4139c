//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL`, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While the frontend migrates the guest, it copies guest memory to the destination and must
//! copy again every page written since; it cannot see the daemon's writes, so the daemon marks
//! them in a bitmap the frontend shares (`SET_LOG_BASE`): one bit per 4 KiB page of guest
//! physical memory, set with an atomic OR (several queue threads share it). Marking happens
//! after the write and before the used entry that tells the guest about it is published; a mark
//! before the write could be consumed by the frontend's sync before the data landed.
//!
//! The log may be replaced while queues run (a second migration, memory hot-plug): workers take
//! up the current one at their next completion (`log_cursor`), and an old one is unmapped when
//! the last worker holding it let go. When logging is off nothing is marked and workers only
//! compare a generation counter per completion.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{FileOffset, MmapRegion};

/// Bytes of guest memory one bit of the log stands for.
pub const LOG_PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log of size 0")]
    Empty,
    #[error("log offset {0:#x} is not page aligned or overflows")]
    BadOffset(u64),
    #[error("log file holds {file_size:#x} bytes but the log needs {needed:#x}")]
    FileTooSmall { file_size: u64, needed: u64 },
    #[error("log descriptor is not a regular file or memfd")]
    NotAFile,
    #[error("cannot inspect the log file")]
    Stat(#[source] std::io::Error),
    #[error("cannot map the log")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
}

/// One mapped log.
#[derive(Debug)]
pub struct DirtyLog {
    map: MmapRegion<()>,
    /// Pages whose bit this daemon turned from clear to set (the control socket's
    /// `dirty_pages_logged`): the frontend clears bits as it syncs, so over a migration this is
    /// how many page copies the daemon's writes caused. Added to once per `mark` call.
    newly_marked: Option<Arc<AtomicU64>>,
    /// The frontend may shrink the file under us: the mapping is guarded like guest memory.
    /// Declared after `map`, so the mapping goes first.
    _guard: Option<crate::revoke::Guard>,
}

impl DirtyLog {
    /// Maps `size` bytes of `fd` at `offset`, validated like every region a frontend hands us.
    pub fn map(fd: OwnedFd, size: u64, offset: u64) -> Result<Self, LogError> {
        if size == 0 {
            return Err(LogError::Empty);
        }
        if !offset.is_multiple_of(4096) {
            return Err(LogError::BadOffset(offset));
        }
        let needed = offset
            .checked_add(size)
            .ok_or(LogError::BadOffset(offset))?;
        let len = usize::try_from(size).map_err(|_| LogError::BadOffset(offset))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(LogError::Stat)?;
        if !meta.file_type().is_file() {
            return Err(LogError::NotAFile);
        }
        if meta.len() < needed {
            return Err(LogError::FileTooSmall {
                file_size: meta.len(),
                needed,
            });
        }
        let map = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(LogError::Mmap)?;
        let _guard = crate::revoke::guard(map.as_ptr(), len);
        Ok(Self {
            map,
            newly_marked: None,
            _guard,
        })
    }

    /// Counts the pages this log's marks turn from clear to set into `counter`.
    pub fn counting_into(mut self, counter: Arc<AtomicU64>) -> Self {
        self.newly_marked = Some(counter);
        self
    }

    /// Bytes of the bitmap.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    pub fn is_empty(&self) -> bool {
        self.map.size() == 0
    }

    /// The bitmap byte holding page `page`'s bit, if the log covers it.
    fn byte(&self, index: u64) -> Option<&AtomicU8> {
        let index = usize::try_from(index).ok()?;
        if index >= self.map.size() {
            return None;
        }
        let p = self.map.as_ptr().wrapping_add(index);
        // SAFETY: `index` is inside the mapping, which lives as long as `self`; AtomicU8 has the
        // size and alignment of u8, and the bitmap is shared memory written atomically by all.
        Some(unsafe { &*p.cast::<AtomicU8>() })
    }

    /// Marks every page of `[gpa, gpa + len)` dirty. Pages beyond the log (the frontend sized
    /// it for its memory; a hostile one may size it smaller) are not marked.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len.saturating_sub(1)) / LOG_PAGE;
        let mut page = first;
        let mut newly: u64 = 0;
        while page <= last {
            let Some(b) = self.byte(page / 8) else { break };
            let bit = 1u8 << (page % 8);
            if b.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                newly = newly.saturating_add(1);
            }
            page = page.saturating_add(1);
            if page == 0 {
                break;
            }
        }
        if let (Some(counter), 1..) = (&self.newly_marked, newly) {
            counter.fetch_add(newly, Ordering::Relaxed);
        }
    }

    /// Whether page `page` is marked (tests and diagnostics).
    pub fn is_marked(&self, page: u64) -> bool {
        self.byte(page / 8)
            .is_some_and(|b| b.load(Ordering::Relaxed) & (1 << (page % 8)) != 0)
    }
}

/// Logging state of one session, shared by its queue workers.
#[derive(Debug, Default)]
pub struct LogState {
    /// `VHOST_F_LOG_ALL` is in the acked features.
    enabled: AtomicBool,
    /// Test-only: mark the rings but not the buffers the device fills (the negative control of
    /// the migration tests, proving they can see data the log missed; the guest's rings stay
    /// consistent, so what it gets is stale data rather than a hang).
    broken: AtomicBool,
    /// Counts changes to what workers should mark into (logging on or off, a new log, a used
    /// ring's logging address); workers compare it at every completion.
    generation: AtomicU64,
    current: Mutex<Option<Arc<DirtyLog>>>,
}

impl LogState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
        self.changed();
    }

    /// Tells the workers that what they mark into changed (see `generation`).
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The count of changes so far.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn set_broken_for_tests(&self, broken: bool) {
        self.broken.store(broken, Ordering::Relaxed);
    }

    /// Whether the buffers the device fills are logged (always, outside tests).
    pub fn buffers_logged(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }

    /// Installs a new log; the old one is unmapped once no worker holds it any more.
    pub fn replace(&self, log: Option<DirtyLog>) {
        if let Ok(mut g) = self.current.lock() {
            *g = log.map(Arc::new);
        }
        self.changed();
    }

    /// The log to mark into: `None` (without touching the lock) unless logging is on and a log
    /// was given.
    pub fn current(&self) -> Option<Arc<DirtyLog>> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        self.current.lock().ok().and_then(|g| g.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn log_of(bytes: u64) -> (DirtyLog, File) {
        let fd = crate::memfd::create("log-test").unwrap();
        let file = File::from(fd.try_clone().unwrap());
        file.set_len(bytes).unwrap();
        (DirtyLog::map(fd, bytes, 0).unwrap(), file)
    }

    #[test]
    fn a_range_marks_every_page_it_touches_and_nothing_else() {
        let (log, _f) = log_of(4096);
        // 10 bytes straddling pages 2 and 3.
        log.mark(3 * LOG_PAGE - 4, 10);
        let marked: Vec<u64> = (0..16).filter(|p| log.is_marked(*p)).collect();
        assert_eq!(marked, vec![2, 3]);
        // A range across a bitmap byte (pages 7..=9) and across regions' worth of memory.
        log.mark(7 * LOG_PAGE, 3 * LOG_PAGE);
        assert!(log.is_marked(7) && log.is_marked(8) && log.is_marked(9));
        assert!(!log.is_marked(10));
    }

    #[test]
    fn only_pages_turned_from_clear_to_set_are_counted() {
        let (log, _f) = log_of(4096);
        let counter = Arc::new(AtomicU64::new(0));
        let log = log.counting_into(Arc::clone(&counter));
        log.mark(0, 3 * LOG_PAGE);
        assert_eq!(counter.load(Ordering::Relaxed), 3);
        // Pages 1 and 2 are already set (the frontend has not synced): only page 3 is new.
        log.mark(LOG_PAGE, 3 * LOG_PAGE);
        assert_eq!(counter.load(Ordering::Relaxed), 4);
        // The frontend's sync clears a bit; the next write to that page counts again.
        log.byte(0).unwrap().fetch_and(!1, Ordering::Relaxed);
        log.mark(10, 1);
        assert_eq!(counter.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn pages_beyond_the_log_are_not_marked_and_nothing_overflows() {
        let (log, _f) = log_of(4096); // 32768 pages
        log.mark(32767 * LOG_PAGE, 3 * LOG_PAGE);
        assert!(log.is_marked(32767));
        log.mark(u64::MAX - 10, 100);
        log.mark(0, 0);
        assert!(!log.is_marked(0));
    }

    #[test]
    fn hostile_logs_are_refused() {
        let fd = crate::memfd::create("log-test").unwrap();
        File::from(fd.try_clone().unwrap()).set_len(4096).unwrap();
        let again = || fd.try_clone().unwrap();
        assert!(matches!(DirtyLog::map(again(), 0, 0), Err(LogError::Empty)));
        assert!(matches!(
            DirtyLog::map(again(), 8192, 0),
            Err(LogError::FileTooSmall { .. })
        ));
        assert!(matches!(
            DirtyLog::map(again(), 4096, 12),
            Err(LogError::BadOffset(12))
        ));
        assert!(matches!(
            DirtyLog::map(again(), 4096, u64::MAX - 4095),
            Err(LogError::BadOffset(_))
        ));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            DirtyLog::map(OwnedFd::from(a), 4096, 0),
            Err(LogError::NotAFile)
        ));
    }

    #[test]
    fn a_replaced_log_lives_until_the_last_holder_lets_go_and_every_change_counts() {
        let state = LogState::new();
        let g0 = state.generation();
        state.set_enabled(true);
        let (first, _f1) = log_of(4096);
        state.replace(Some(first));
        let held = state.current().unwrap();
        let g1 = state.generation();
        assert!(g1 > g0);
        let (second, _f2) = log_of(4096);
        state.replace(Some(second));
        assert!(
            state.generation() > g1,
            "a replaced log is a change workers must see"
        );
        // A worker that has not looked yet still marks into the log it holds, still mapped.
        held.mark(0, 1);
        assert!(held.is_marked(0));
        assert!(!state.current().unwrap().is_marked(0));
        let g2 = state.generation();
        state.set_enabled(false);
        assert!(state.generation() > g2);
        assert!(state.current().is_none());
    }
}
