//! The control socket's thread: a poll loop over the listening socket and its clients. Every
//! client is non-blocking and bounded (request length, pending output, idle time, number of
//! clients), so no client can make the daemon allocate without bound, block this thread, or
//! reach the data path.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{self, ErrorKind, Reply, Request, MAX_REQUEST_BYTES};
use crate::fd::set_nonblocking;
use crate::socket_access::{AccessError, SocketAccess};

/// Clients served at once; one more is told so and closed.
pub const MAX_CLIENTS: usize = 32;
/// Replies waiting for a client that does not read; beyond this it is not read from either.
const MAX_PENDING_OUTPUT: usize = 1024 * 1024;
/// A client silent this long (neither sending nor taking its replies) is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL_MS: i32 = 1000;
const READ_CHUNK: usize = 4096;

/// Answers one request.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: &Request) -> Reply;
}

/// A bound control socket, made before the daemon confines itself.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    pub fn bind(path: &Path, access: &SocketAccess) -> Result<Self, AccessError> {
        let listener = access.listen(path)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }
}

/// The running control thread; dropping it stops the thread and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ControlServer {
    pub fn spawn(listener: ControlListener, handler: Arc<dyn Handler>) -> io::Result<Self> {
        set_nonblocking(listener.listener.as_fd())?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_for_thread = stop.try_clone()?;
        let path = listener.path.clone();
        tracing::info!(path = %path.display(), "control socket listening");
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || run(&listener.listener, &stop_for_thread, handler.as_ref()))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            path,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once the output is written (the client ended its input, or broke the protocol).
    closing: bool,
    dead: bool,
    last_active: Instant,
}

impl Client {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            closing: false,
            dead: false,
            last_active: Instant::now(),
        }
    }

    fn wants_input(&self) -> bool {
        !self.closing && self.output.len() < MAX_PENDING_OUTPUT
    }

    fn read(&mut self, handler: &dyn Handler) {
        let mut chunk = [0u8; READ_CHUNK];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                // End of input: a last request without its newline still counts.
                let rest = std::mem::take(&mut self.input);
                self.answer(&rest, handler);
                self.closing = true;
            }
            Ok(n) => {
                self.last_active = Instant::now();
                self.input
                    .extend_from_slice(chunk.get(..n).unwrap_or_default());
                self.answer_complete_lines(handler);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.dead = true,
        }
    }

    fn answer_complete_lines(&mut self, handler: &dyn Handler) {
        while let Some(pos) = self.input.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=pos).collect();
            self.answer(line.get(..pos).unwrap_or_default(), handler);
        }
        if self.input.len() > MAX_REQUEST_BYTES {
            self.input = Vec::new();
            self.output.extend(
                Reply::error(
                    ErrorKind::BadRequest,
                    format!("request longer than {MAX_REQUEST_BYTES} bytes"),
                )
                .to_line(),
            );
            self.closing = true;
        }
    }

    fn answer(&mut self, line: &[u8], handler: &dyn Handler) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let reply = match protocol::parse(line) {
            Ok(req) => handler.handle(&req),
            Err(reply) => reply,
        };
        self.output.extend(reply.to_line());
    }

    fn write(&mut self) {
        match self.stream.write(&self.output) {
            Ok(n) => {
                self.output.drain(..n);
                self.last_active = Instant::now();
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.dead = true,
        }
    }

    fn finished(&self, now: Instant) -> bool {
        self.dead
            || (self.closing && self.output.is_empty())
            || now.duration_since(self.last_active) > IDLE_TIMEOUT
    }
}

fn run(listener: &UnixListener, stop: &EventFd, handler: &dyn Handler) {
    let mut clients: Vec<Client> = Vec::new();
    loop {
        let mut fds = Vec::with_capacity(clients.len().saturating_add(2));
        fds.push(pollfd(stop.as_raw_fd(), libc::POLLIN));
        fds.push(pollfd(listener.as_fd().as_raw_fd(), libc::POLLIN));
        for c in &clients {
            let mut events = 0;
            if c.wants_input() {
                events |= libc::POLLIN;
            }
            if !c.output.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(pollfd(c.stream.as_raw_fd(), events));
        }
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: `fds` is a valid array of `nfds` pollfd structures for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, POLL_INTERVAL_MS) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Not reachable by a client (poll fails only on bad arguments or no memory).
            tracing::event!(
                tracing::Level::WARN,
                "control socket: poll failed, control socket closed: {e}"
            );
            return;
        }
        let revents = |i: usize| fds.get(i).map_or(0, |p| p.revents);
        if revents(0) != 0 {
            return;
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let ev = revents(i.saturating_add(2));
            if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && c.wants_input() {
                c.read(handler);
            } else if ev & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 && !c.wants_input()
            {
                c.dead = c.dead || ev & (libc::POLLERR | libc::POLLNVAL) != 0;
            }
            if !c.output.is_empty() && !c.dead {
                c.write();
            }
        }
        if revents(1) & libc::POLLIN != 0 {
            accept(listener, &mut clients);
        }
        let now = Instant::now();
        clients.retain(|c| !c.finished(now));
    }
}

/// Takes every pending connection; beyond [`MAX_CLIENTS`] they are told and closed.
fn accept(listener: &UnixListener, clients: &mut Vec<Client>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if set_nonblocking(stream.as_fd()).is_err() {
                    continue;
                }
                if clients.len() >= MAX_CLIENTS {
                    let mut stream = stream;
                    let _ = stream.write(
                        &Reply::error(
                            ErrorKind::Refused,
                            format!("too many control clients (at most {MAX_CLIENTS})"),
                        )
                        .to_line(),
                    );
                    continue;
                }
                clients.push(Client::new(stream));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                // EMFILE and the like: the connection stays pending and the socket readable;
                // pause this thread (only this one) rather than spin on it.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        }
    }
}

fn pollfd(fd: std::os::fd::RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
