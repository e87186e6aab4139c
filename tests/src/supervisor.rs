//! A supervisor for the tests: starts a daemon in one of the ways a user would run it, and after
//! a crash starts it again at once, keeping whatever must outlive the daemon (the listening
//! socket, for socket activation and `--fd`).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::Result;

use crate::daemon::{binary, Daemon, Scratch};

/// How the daemon and the VMM find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The daemon listens (`--socket-path`); QEMU reconnects (`reconnect=1`).
    Listen,
    /// QEMU listens (`server=on,wait=off`); the daemon connects (`--client`).
    Client,
    /// The supervisor owns the listening socket and passes it as systemd does (`LISTEN_FDS`).
    SocketActivation,
    /// The supervisor owns the listening socket and passes it with `--fd 3`.
    InheritedFd,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Listen,
        Mode::Client,
        Mode::SocketActivation,
        Mode::InheritedFd,
    ];

    /// `-chardev socket` options for QEMU in this mode.
    pub fn chardev_opts(self) -> &'static str {
        match self {
            Mode::Client => ",server=on,wait=off",
            Mode::Listen | Mode::SocketActivation | Mode::InheritedFd => ",reconnect=1",
        }
    }
}

/// A daemon kept running by the test.
#[derive(Debug)]
pub struct Supervised {
    pub mode: Mode,
    pub daemon: Daemon,
    pub socket: PathBuf,
    binary: String,
    args: Vec<String>,
    listener: Option<UnixListener>,
    /// Network namespace the daemon runs in (net daemons and their TAP).
    netns: Option<std::fs::File>,
    pub restarts: u32,
}

impl Supervised {
    /// Starts `binary` with `args` (everything but the endpoint) serving `socket` in `mode`.
    pub fn start(
        mode: Mode,
        binary_name: &str,
        args: &[String],
        socket: PathBuf,
        scratch: &Scratch,
    ) -> Result<Self> {
        Self::start_in(mode, binary_name, args, socket, scratch, None)
    }

    /// Like [`start`](Self::start), with the daemon inside network namespace `netns`.
    pub fn start_in(
        mode: Mode,
        binary_name: &str,
        args: &[String],
        socket: PathBuf,
        scratch: &Scratch,
        netns: Option<&crate::netns::NetNs>,
    ) -> Result<Self> {
        let netns = netns.map(crate::netns::NetNs::open).transpose()?;
        let listener = match mode {
            Mode::SocketActivation | Mode::InheritedFd => Some(UnixListener::bind(&socket)?),
            Mode::Listen | Mode::Client => None,
        };
        let mut s = Self {
            mode,
            daemon: spawn(
                mode,
                binary_name,
                args,
                &socket,
                listener.as_ref(),
                netns.as_ref(),
                scratch,
            )?,
            socket,
            binary: binary_name.to_owned(),
            args: args.to_vec(),
            listener,
            netns,
            restarts: 0,
        };
        s.daemon.wait_ready(std::time::Duration::from_secs(20))?;
        Ok(s)
    }

    /// SIGKILL, then a new daemon at once.
    pub fn crash_and_restart(&mut self, scratch: &Scratch) -> Result<()> {
        self.daemon.kill()?;
        self.daemon = spawn(
            self.mode,
            &self.binary,
            &self.args,
            &self.socket,
            self.listener.as_ref(),
            self.netns.as_ref(),
            scratch,
        )?;
        self.daemon.wait_ready(std::time::Duration::from_secs(20))?;
        self.restarts += 1;
        Ok(())
    }
}

fn spawn(
    mode: Mode,
    binary_name: &str,
    args: &[String],
    socket: &std::path::Path,
    listener: Option<&UnixListener>,
    netns: Option<&std::fs::File>,
    scratch: &Scratch,
) -> Result<Daemon> {
    let path = socket.display().to_string();
    let mut full: Vec<String> = args.to_vec();
    match mode {
        Mode::Listen => full.extend(["--socket-path".to_owned(), path]),
        Mode::Client => full.extend(["--client".to_owned(), "--socket-path".to_owned(), path]),
        Mode::InheritedFd => full.extend(["--fd".to_owned(), "3".to_owned()]),
        Mode::SocketActivation => {}
    }
    let inherit = listener.map(|l| l.as_raw_fd());
    let ns = netns.map(|f| f.as_raw_fd());
    let place_fd = move |cmd: &mut std::process::Command| {
        let hook = move || {
            if let Some(ns) = ns {
                // SAFETY: setns is async-signal-safe and moves only the child.
                if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = inherit {
                // The listening socket at fd 3, without close-on-exec, in the child only.
                crate::daemon::place_fds_in_child(&[(fd, 3)])?;
            }
            Ok(())
        };
        // SAFETY: the hook only calls setns, fcntl, dup2 and close (async-signal-safe).
        unsafe { cmd.pre_exec(hook) };
    };
    if mode == Mode::SocketActivation {
        // systemd sets LISTEN_PID to the daemon's own pid: a shell that exec's keeps its pid.
        let mut sh_args = vec![
            "-c".to_owned(),
            "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"".to_owned(),
        ];
        sh_args.push(binary(binary_name)?.display().to_string());
        sh_args.extend(full);
        Daemon::spawn_program(
            std::path::Path::new("/bin/sh"),
            &sh_args,
            binary_name,
            scratch,
            place_fd,
        )
    } else {
        Daemon::spawn(binary_name, &full, scratch, place_fd)
    }
}
