//! Command-line options every daemon shares, following QEMU's vhost-user "backend program
//! conventions": `--socket-path`, `--fd`, `--print-capabilities`; plus `--client` and
//! `--log-level`. Daemons embed [`ServeArgs`] with `#[command(flatten)]`.

use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::control::ControlListener;
use crate::serve::{inherited_fd, systemd_socket, Endpoint, EngineOptions, ServeError};
use crate::socket_access::SocketAccess;

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

    /// Busy-poll each queue for exactly this many microseconds after its last request before
    /// sleeping, instead of the adaptive window of --poll-max-us (0: never poll).
    #[arg(long, value_name = "MICROSECONDS", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: Option<u64>,

    /// Adaptive busy-polling: after its last request a queue polls for a window that grows
    /// while the guest's next requests arrive within this many microseconds and shrinks while
    /// they do not (QEMU's poll-max-ns), so a guest submitting again soon needs no kick and the
    /// queue no wake-up; the poll yields the CPU at every turn. 0 turns it off.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = crate::idle_poll::DEFAULT_MAX.as_micros() as u64, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_max_us: u64,

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

    /// Do not offer packed virtqueues (VIRTIO_F_RING_PACKED): guests then use split rings.
    #[arg(long)]
    pub no_packed: bool,

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

    /// Give the sockets the daemon creates (--socket-path, --control-socket) to this group
    /// (name or id), so that a VMM running as another user in that group can connect (QEMU under
    /// libvirt on Debian runs as libvirt-qemu, group kvm). Sockets systemd passes are set up by
    /// the unit's SocketGroup= instead.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Mode of the sockets the daemon creates, in octal (default 0660 with --socket-group,
    /// otherwise what the umask gives).
    #[arg(long, value_name = "MODE", value_parser = crate::socket_access::parse_mode)]
    pub socket_mode: Option<u32>,

    /// Also listen on this unix socket for control requests (status, statistics, resize: see
    /// `bulkhead-ctl`). Off by default; same --socket-group/--socket-mode rules.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

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
    #[error("--socket-group and --socket-mode apply to sockets the daemon creates, not to --fd, --client or a systemd socket")]
    AccessWithoutSocket,
    #[error("bad socket ownership")]
    Access(#[from] crate::socket_access::AccessError),
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
            poll: match (self.poll_us, self.poll_max_us) {
                (Some(0), _) | (None, 0) => crate::idle_poll::PollPolicy::Off,
                (Some(us), _) => {
                    crate::idle_poll::PollPolicy::Fixed(std::time::Duration::from_micros(us))
                }
                (None, max) => {
                    crate::idle_poll::PollPolicy::Adaptive(std::time::Duration::from_micros(max))
                }
            },
            completions: self.completions,
            break_dirty_log: self.test_break_dirty_log,
            no_packed: self.no_packed,
        }
    }
    /// Binds `--control-socket` (before the daemon confines itself), if given.
    pub fn control_listener(&self) -> Result<Option<ControlListener>, EndpointError> {
        let access = self.socket_access()?;
        self.control_socket
            .as_deref()
            .map(|p| ControlListener::bind(p, &access))
            .transpose()
            .map_err(EndpointError::Access)
    }

    /// `--socket-group` / `--socket-mode`.
    pub fn socket_access(&self) -> Result<SocketAccess, EndpointError> {
        Ok(SocketAccess::new(
            self.socket_group.as_deref(),
            self.socket_mode,
        )?)
    }

    /// Where frontends come from: `--fd`, then a systemd-activated socket, then `--socket-path`.
    /// Ownership options are refused where the daemon creates no frontend socket, unless a
    /// control socket is there to take them.
    pub fn endpoint(&self) -> Result<Endpoint, EndpointError> {
        let access = self.socket_access()?;
        let endpoint = self.frontend_endpoint(access)?;
        let creates_socket =
            matches!(endpoint, Endpoint::Listen(..)) || self.control_socket.is_some();
        if access.is_set() && !creates_socket {
            return Err(EndpointError::AccessWithoutSocket);
        }
        Ok(endpoint)
    }

    fn frontend_endpoint(&self, access: SocketAccess) -> Result<Endpoint, EndpointError> {
        if let Some(fd) = self.fd {
            return Ok(Endpoint::Inherited(inherited_fd(fd)?));
        }
        if let Some(fd) = systemd_socket()? {
            return Ok(Endpoint::Inherited(fd));
        }
        match (&self.socket_path, self.client) {
            (Some(p), true) => Ok(Endpoint::Connect(p.clone())),
            (Some(p), false) => Ok(Endpoint::Listen(p.clone(), access)),
            (None, _) => Err(EndpointError::Missing),
        }
    }
}
