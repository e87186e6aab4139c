//! Command-line options every daemon shares, following QEMU's vhost-user "backend program
//! conventions": `--socket-path`, `--fd`, `--print-capabilities`; plus `--client` and
//! `--log-level`. Daemons embed [`ServeArgs`] with `#[command(flatten)]`.

use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::serve::{inherited_fd, systemd_socket, Endpoint, EngineOptions, ServeError};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Unix socket to listen on for the VMM (or, with --client, to connect to).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Inherited socket descriptor: a listening socket (frontends are accepted on it) or a
    /// connected one (served once).
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<RawFd>,

    /// Connect to a VMM listening on --socket-path (QEMU `-chardev socket,server=on,wait=off`)
    /// instead of listening; reconnects with backoff whenever the connection drops.
    #[arg(long, requires = "socket_path")]
    pub client: bool,

    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Busy-poll each queue for this many microseconds after its last request before sleeping:
    /// a guest submitting again soon needs no kick and the queue no wake-up. Costs CPU; pays
    /// when the guest and the daemon run on different CPUs. 0 (default): never poll.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: u64,

    /// When completions become visible to the guest: `adaptive` (default) publishes each at
    /// once and interrupts as soon as the guest asks while that overlaps its work with ours,
    /// and batches per pass when an interrupt would preempt us (guest on our CPU);
    /// `pipelined` and `batched` fix one behaviour (for measurements).
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = crate::pipeline::Completions::Adaptive)]
    pub completions: crate::pipeline::Completions,

    /// Test-only: accept migration's dirty logging but mark nothing, so that a migration
    /// corrupts the guest (the migration tests' negative control). Never use it otherwise.
    #[arg(long, hide = true)]
    pub test_break_dirty_log: bool,

    /// After set-up, switch to this user (and its group): open the image, TAP and socket as
    /// root, serve as nobody.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// After set-up, switch to this group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Do not confine the daemon to its system-call allow-list (seccomp). For debugging only.
    #[arg(long)]
    pub no_seccomp: bool,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive); overrides RUST_LOG.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("one of --socket-path, --fd or a systemd socket (LISTEN_FDS) is required")]
    Missing,
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl ServeArgs {
    /// Containment to enter once set-up is over.
    pub fn sandbox_options(&self) -> crate::sandbox::SandboxOptions {
        crate::sandbox::SandboxOptions {
            user: self.user.clone(),
            group: self.group.clone(),
            seccomp: !self.no_seccomp,
        }
    }

    /// Options for the queue workers.
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            poll: std::time::Duration::from_micros(self.poll_us),
            completions: self.completions,
            break_dirty_log: self.test_break_dirty_log,
        }
    }
    /// Where frontends come from: `--fd`, then a systemd-activated socket, then `--socket-path`.
    pub fn endpoint(&self) -> Result<Endpoint, EndpointError> {
        if let Some(fd) = self.fd {
            return Ok(Endpoint::Inherited(inherited_fd(fd)?));
        }
        if let Some(fd) = systemd_socket()? {
            return Ok(Endpoint::Inherited(fd));
        }
        match (&self.socket_path, self.client) {
            (Some(p), true) => Ok(Endpoint::Connect(p.clone())),
            (Some(p), false) => Ok(Endpoint::Listen(p.clone())),
            (None, _) => Err(EndpointError::Missing),
        }
    }
}
