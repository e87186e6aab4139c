//! Eventfds the frontend gives us to signal the guest (call) or report a broken ring (err).
//! The frontend may replace them while the queue runs, hence the per-queue lock (never shared
//! between queues, held only for one `write`).

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Default)]
pub struct Signal {
    fd: Mutex<Option<EventFd>>,
}

impl Signal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the eventfd (`None`: the frontend polls instead).
    pub fn set(&self, fd: Option<EventFd>) {
        if let Ok(mut g) = self.fd.lock() {
            *g = fd;
        }
    }

    pub fn is_set(&self) -> bool {
        self.fd.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    /// Signals the eventfd if there is one. A failed write (counter overflow) cannot lose the
    /// notification: the counter is then already non-zero.
    pub fn signal(&self) {
        if let Ok(g) = self.fd.lock() {
            if let Some(fd) = g.as_ref() {
                let _ = fd.write(1);
            }
        }
    }
}
