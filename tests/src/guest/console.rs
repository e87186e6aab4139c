//! The console stream: a background thread drains a QEMU output pipe into a shared buffer
//! (so nothing is lost while no one is looking and QEMU never blocks on a full pipe), and
//! waiters sleep on a condition variable until what they want arrived, the stream ended,
//! or their timeout passed.

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Everything read from one pipe so far.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    bytes: Vec<u8>,
    /// The writer closed its end (QEMU exited) or reading failed.
    closed: bool,
}

impl Stream {
    /// Starts a thread that appends everything `reader` produces, until end of file.
    pub(crate) fn spawn_reader(
        self: &Arc<Self>,
        name: &str,
        mut reader: impl Read + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let stream = Arc::clone(self);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut chunk = [0u8; 4096];
                loop {
                    match reader.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            stream.lock().bytes.extend_from_slice(&chunk[..n]);
                            stream.changed.notify_all();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                stream.lock().closed = true;
                stream.changed.notify_all();
            })
    }

    /// A poisoned lock only means a reader thread panicked mid-append; the bytes are still
    /// the best record we have, so keep using them rather than propagating the panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of bytes received so far (an offset for `wait`).
    pub(crate) fn len(&self) -> usize {
        self.lock().bytes.len()
    }

    /// Everything received, as text with carriage returns removed.
    pub(crate) fn text(&self) -> String {
        clean(&self.lock().bytes)
    }

    /// Calls `check(text_since_offset, closed)` whenever new bytes arrive, until it returns
    /// `Some`; returns `None` if `timeout` passes first.
    pub(crate) fn wait<T>(
        &self,
        offset: usize,
        timeout: Duration,
        mut check: impl FnMut(&str, bool) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let since = state.bytes.get(offset..).unwrap_or_default();
            if let Some(found) = check(&clean(since), state.closed) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Bytes as text: invalid UTF-8 replaced, `\r` dropped (the tty turns `\n` into `\r\n`).
fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\r', "")
}
