//! The serve loop: get a frontend connection (listen, connect, or an inherited socket), run a
//! session until it ends, and go back for the next frontend, until a termination signal.
//!
//! The device is fully built before this is called, so no connection is ever accepted by a daemon
//! that cannot serve it (QEMU 7.2 wedges if a handshake is cut short).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::control::state::EngineState;
use crate::control::{ControlListener, ControlServer};
use crate::device::Device;
pub use crate::sd_notify::sd_notify;
use crate::session::{Session, SessionEnd};
use crate::signals::{Signals, Wait};
use crate::socket_access::SocketAccess;

pub use crate::engine_options::EngineOptions;

/// Where frontends come from.
#[derive(Debug)]
pub enum Endpoint {
    /// Create a listening socket at this path (a stale socket file is replaced), with this
    /// ownership and mode.
    Listen(PathBuf, SocketAccess),
    /// Connect to a frontend listening at this path (`--client`), retrying with backoff.
    Connect(PathBuf),
    /// An inherited socket: listening (accept frontends) or connected (serve it once).
    Inherited(OwnedFd),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] crate::socket_access::AccessError),
    #[error("cannot accept a connection")]
    Accept(#[source] io::Error),
    #[error("inherited descriptor {fd} is not a unix stream socket")]
    NotASocket {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("systemd passed {0} sockets; exactly one is supported")]
    ListenFds(usize),
    #[error("cannot start the control socket's thread")]
    Control(#[source] io::Error),
    #[error("cannot install the guard against revoked guest memory (SIGBUS)")]
    Revoke(#[source] io::Error),
}

const BACKOFF_START_MS: u64 = 10;
const BACKOFF_MAX_MS: u64 = 1000;
/// First descriptor systemd passes (sd_listen_fds(3)).
const SD_LISTEN_FDS_START: RawFd = 3;

/// An endpoint made ready before the daemon confines itself: the listening socket is bound
/// (which needs the file system and `bind`, both gone once the sandbox is on).
#[derive(Debug)]
pub enum Bound {
    Listener {
        listener: UnixListener,
        /// The socket file we created, removed when the daemon exits.
        path: Option<PathBuf>,
    },
    Connect(PathBuf),
    Connected(UnixStream),
}

impl Endpoint {
    /// Binds a listening socket, or checks an inherited descriptor.
    pub fn bind(self) -> Result<Bound, ServeError> {
        match self {
            Endpoint::Listen(path, access) => Ok(Bound::Listener {
                listener: access.listen(&path)?,
                path: Some(path),
            }),
            Endpoint::Connect(path) => Ok(Bound::Connect(path)),
            Endpoint::Inherited(fd) => {
                let raw = fd.as_raw_fd();
                if is_listening(&fd).map_err(|source| ServeError::NotASocket { fd: raw, source })? {
                    Ok(Bound::Listener {
                        listener: UnixListener::from(fd),
                        path: None,
                    })
                } else {
                    Ok(Bound::Connected(UnixStream::from(fd)))
                }
            }
        }
    }
}

/// Serves frontends until SIGTERM/SIGINT. Returns `Ok` on a clean shutdown, or when an inherited
/// connected socket's single session ended.
pub fn serve<D: Device>(
    device: Arc<D>,
    endpoint: Bound,
    control: Option<ControlListener>,
    signals: &Signals,
    opts: EngineOptions,
) -> Result<(), ServeError> {
    crate::revoke::install().map_err(ServeError::Revoke)?;
    let state = Arc::new(EngineState::new(device.num_queues()));
    // Stopped (and its socket removed) when serving ends.
    let _control = control
        .map(|l| {
            let engine = crate::control::Engine::new(Arc::clone(&device), Arc::clone(&state));
            ControlServer::spawn(l, Arc::new(engine))
        })
        .transpose()
        .map_err(ServeError::Control)?;
    let serving = Serving {
        device: &device,
        state: &state,
        signals,
        opts,
    };
    match endpoint {
        Bound::Listener { listener, path } => {
            let _cleanup = path.map(RemoveOnDrop);
            accept_loop(&serving, &listener)
        }
        Bound::Connect(path) => {
            sd_notify("READY=1");
            while let Some(stream) = connect_with_backoff(&path, signals) {
                tracing::info!(path = %path.display(), "connected to frontend");
                if serving.session(stream) == SessionEnd::Shutdown {
                    break;
                }
            }
            Ok(())
        }
        Bound::Connected(stream) => {
            sd_notify("READY=1");
            serving.session(stream);
            Ok(())
        }
    }
}

/// What every session of this daemon is run with.
struct Serving<'a, D> {
    device: &'a Arc<D>,
    state: &'a Arc<EngineState>,
    signals: &'a Signals,
    opts: EngineOptions,
}

impl<D: Device> Serving<'_, D> {
    fn session(&self, stream: UnixStream) -> SessionEnd {
        let session = Session::new(
            Arc::clone(self.device),
            stream,
            self.opts,
            Arc::clone(self.state),
        );
        let end = session.run(self.signals);
        match end {
            SessionEnd::Disconnected => tracing::info!("frontend disconnected"),
            SessionEnd::Shutdown => {
                sd_notify("STOPPING=1");
                tracing::info!("shutting down");
            }
        }
        end
    }
}

/// The socket systemd passed (`LISTEN_PID`/`LISTEN_FDS`), if any; consumed once.
pub fn systemd_socket() -> Result<Option<OwnedFd>, ServeError> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok());
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    match (pid_matches, count) {
        (true, Some(1)) => {
            set_cloexec(SD_LISTEN_FDS_START);
            // SAFETY: systemd handed this process descriptor 3 for it to own.
            Ok(Some(unsafe { OwnedFd::from_raw_fd(SD_LISTEN_FDS_START) }))
        }
        (true, Some(0)) | (false, _) | (_, None) => Ok(None),
        (true, Some(n)) => Err(ServeError::ListenFds(n)),
    }
}

/// Takes ownership of an inherited descriptor number (`--fd N`).
pub fn inherited_fd(fd: RawFd) -> Result<OwnedFd, ServeError> {
    // SAFETY: F_GETFD only queries the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ServeError::NotASocket {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    set_cloexec(fd);
    // SAFETY: the user told us this descriptor is ours; it is open (checked above).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn accept_loop<D: Device>(
    serving: &Serving<'_, D>,
    listener: &UnixListener,
) -> Result<(), ServeError> {
    let signals = serving.signals;
    sd_notify("READY=1");
    tracing::info!("waiting for frontends");
    loop {
        match signals.wait_readable(listener.as_fd()) {
            Wait::Shutdown => return Ok(()),
            Wait::Report => {
                serving.device.report();
                continue;
            }
            // Only sessions wait on a second descriptor.
            Wait::Other => continue,
            Wait::Readable => {}
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(ServeError::Accept(e)),
        };
        tracing::info!("frontend connected");
        if serving.session(stream) == SessionEnd::Shutdown {
            return Ok(());
        }
    }
}

fn connect_with_backoff(path: &Path, signals: &Signals) -> Option<UnixStream> {
    let mut delay = BACKOFF_START_MS;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Some(s),
            Err(e) => tracing::debug!(path = %path.display(), "connect failed, retrying: {e}"),
        }
        let ms = i32::try_from(delay).unwrap_or(i32::MAX);
        if signals.sleep(ms) == Some(Wait::Shutdown) {
            return None;
        }
        delay = (delay.saturating_mul(2)).min(BACKOFF_MAX_MS);
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN | libc::EMFILE | libc::ENFILE)
    )
}

fn is_listening(fd: &OwnedFd) -> io::Result<bool> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut val).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val != 0)
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: sets FD_CLOEXEC on a descriptor this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Removes the socket file we created when the daemon exits.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sleeps between retries in tests and tools without a signal set.
pub fn backoff_delay(attempt: u32) -> Duration {
    let ms = BACKOFF_START_MS
        .saturating_mul(1u64 << attempt.min(10))
        .min(BACKOFF_MAX_MS);
    Duration::from_millis(ms)
}
