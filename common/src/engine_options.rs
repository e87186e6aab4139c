//! How the engine runs queues: options every session is started with (the serve loop passes
//! them down; kept apart so that the session does not depend on the serve loop).

/// How queues are run.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineOptions {
    /// How queues busy-poll after their last work.
    pub poll: crate::idle_poll::PollPolicy,
    /// When completions are published.
    pub completions: crate::pipeline::Completions,
    /// Test-only: accept dirty logging but mark nothing (migration tests' negative control).
    pub break_dirty_log: bool,
    /// Do not offer packed rings (`VIRTIO_F_RING_PACKED`).
    pub no_packed: bool,
}
