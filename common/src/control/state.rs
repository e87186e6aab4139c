//! What the control socket reports about the engine: per-process totals, the current frontend
//! session and where each queue's ring stands. The session thread writes the session part on
//! control-plane events (a lock nobody on the data path takes); each queue's worker publishes
//! its ring indices after every pass into its own cache line.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;

use crate::protocol::backend::{BackendChannel, BackendError};

/// Where a queue's ring stands, published by its worker.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueProgress {
    running: AtomicBool,
    /// The device's next available index (what GET_VRING_BASE would return).
    next_avail: AtomicU16,
    /// The next used index the device writes.
    next_used: AtomicU16,
}

impl QueueProgress {
    /// Called by the queue's worker after a pass (two plain stores).
    pub(crate) fn publish(&self, next_avail: u16, next_used: u16) {
        self.next_avail.store(next_avail, Ordering::Relaxed);
        self.next_used.store(next_used, Ordering::Relaxed);
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }
}

/// Per-queue configuration as the frontend set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    pub enabled: bool,
    /// Ring addresses and a kick descriptor are set.
    pub configured: bool,
}

/// The current frontend, as the session last described it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStatus {
    pub connected_at: Option<Instant>,
    pub features: u64,
    pub protocol_features: Option<u64>,
    pub inflight_tracking: bool,
    pub dirty_logging: bool,
    pub queues: Vec<QueueConfig>,
}

/// Engine-wide state shared by the serve loop, the session, the workers and the control thread.
#[derive(Debug)]
pub struct EngineState {
    started: Instant,
    /// Frontend connections served by this process.
    sessions: AtomicU64,
    /// Sessions that resumed a frontend's earlier state (SET_INFLIGHT_FD with our device state
    /// in it): each is a restart of this daemon, or a reconnection, seen by a running VM.
    resumed: AtomicU64,
    /// Requests resubmitted from inflight regions after restarts.
    resubmitted: AtomicU64,
    /// Pages marked in migration dirty logs (see `DirtyLog::counting_into`).
    dirty_pages: Arc<AtomicU64>,
    session: Mutex<SessionStatus>,
    queues: Vec<Arc<QueueProgress>>,
    backend: Mutex<Option<BackendChannel>>,
}

/// A status report (`status`).
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub pid: u32,
    pub uptime_s: f64,
    pub sessions: u64,
    pub resumed_sessions: u64,
    pub requests_resubmitted: u64,
    /// Guest pages this daemon marked dirty in migration logs, each time its bit went from
    /// clear to set.
    pub dirty_pages_logged: u64,
    pub frontend: FrontendReport,
    pub queues: Vec<QueueReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrontendReport {
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_s: Option<f64>,
    /// Acked virtio features (hex).
    pub features: String,
    /// Acked protocol features (hex), once negotiated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_features: Option<String>,
    pub inflight_tracking: bool,
    pub dirty_logging: bool,
    pub backend_channel: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    #[serde(flatten)]
    pub config: QueueConfig,
    pub running: bool,
    pub last_avail_idx: u16,
    pub used_idx: u16,
    /// Chains taken and not yet returned.
    pub in_flight: u16,
}

impl EngineState {
    pub fn new(num_queues: u16) -> Self {
        Self {
            started: Instant::now(),
            sessions: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            resubmitted: AtomicU64::new(0),
            dirty_pages: Arc::new(AtomicU64::new(0)),
            session: Mutex::new(SessionStatus::default()),
            queues: (0..num_queues)
                .map(|_| Arc::new(QueueProgress::default()))
                .collect(),
            backend: Mutex::new(None),
        }
    }

    pub(crate) fn queue(&self, index: u16) -> Arc<QueueProgress> {
        self.queues
            .get(usize::from(index))
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn session_started(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        *lock(&self.session) = SessionStatus {
            connected_at: Some(Instant::now()),
            ..SessionStatus::default()
        };
    }

    pub(crate) fn session_ended(&self) {
        *lock(&self.session) = SessionStatus::default();
        *lock(&self.backend) = None;
        for q in &self.queues {
            q.set_running(false);
        }
    }

    pub(crate) fn resumed(&self) {
        self.resumed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_resubmitted(&self, n: u64) {
        self.resubmitted.fetch_add(n, Ordering::Relaxed);
    }

    /// The counter every dirty log of this daemon adds the pages it marks to.
    pub(crate) fn dirty_page_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dirty_pages)
    }

    /// Replaces the session's description (the session calls this after each request).
    pub(crate) fn describe_session(&self, f: impl FnOnce(&mut SessionStatus)) {
        f(&mut lock(&self.session));
    }

    pub(crate) fn set_backend(&self, channel: Option<BackendChannel>) {
        *lock(&self.backend) = channel;
    }

    /// Tells the frontend that the config space changed. `Ok(false)`: there is no backend
    /// channel (the frontend did not negotiate BACKEND_REQ, or none is connected).
    pub fn notify_config_change(&self) -> Result<bool, BackendError> {
        let mut backend = lock(&self.backend);
        let Some(channel) = backend.as_mut() else {
            return Ok(false);
        };
        match channel.config_changed() {
            Ok(()) => Ok(true),
            Err(e) => {
                // A channel that failed once is out of step: drop it.
                *backend = None;
                Err(e)
            }
        }
    }

    pub fn status(&self) -> StatusReport {
        let s = lock(&self.session).clone();
        let backend_channel = lock(&self.backend).is_some();
        let now = Instant::now();
        let queues = s
            .queues
            .iter()
            .map(|c| {
                let p = self.queue(c.index);
                let running = p.running.load(Ordering::Relaxed);
                let (avail, used) = (
                    p.next_avail.load(Ordering::Relaxed),
                    p.next_used.load(Ordering::Relaxed),
                );
                QueueReport {
                    config: c.clone(),
                    running,
                    last_avail_idx: avail,
                    used_idx: used,
                    in_flight: if running { avail.wrapping_sub(used) } else { 0 },
                }
            })
            .collect();
        StatusReport {
            pid: std::process::id(),
            uptime_s: now.duration_since(self.started).as_secs_f64(),
            sessions: self.sessions.load(Ordering::Relaxed),
            resumed_sessions: self.resumed.load(Ordering::Relaxed),
            requests_resubmitted: self.resubmitted.load(Ordering::Relaxed),
            dirty_pages_logged: self.dirty_pages.load(Ordering::Relaxed),
            frontend: FrontendReport {
                connected: s.connected_at.is_some(),
                connected_s: s.connected_at.map(|t| now.duration_since(t).as_secs_f64()),
                features: format!("{:#x}", s.features),
                protocol_features: s.protocol_features.map(|p| format!("{p:#x}")),
                inflight_tracking: s.inflight_tracking,
                dirty_logging: s.dirty_logging,
                backend_channel,
            },
            queues,
        }
    }
}

/// A poisoned lock only means a panic elsewhere; the data (plain values) is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
