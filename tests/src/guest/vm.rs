//! `Guest`: one QEMU process running the kit's guest, and the conversation with its shell
//! over the serial console (QEMU's stdio, connected to pipes).

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::console::Stream;
use super::conversation::{self, CmdOutput};
use super::initramfs::{MODULE_FAILED_MARKER, READY_MARKER};
use super::kit::GuestKit;
use super::qemu::QemuConfig;

/// How much of the console goes into an error message (the full log: `console_log`).
const LOG_TAIL: usize = 6000;

/// Where console input goes: QEMU's stdin, or a console socket (a VM that libvirt started).
struct ConsoleInput(Box<dyn Write + Send>);

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleInput")
    }
}

/// A running guest. Dropping it kills QEMU (SIGKILL) and reaps it, if this process started it.
#[derive(Debug)]
pub struct Guest {
    child: Option<Child>,
    pid: u32,
    /// The console's input; `None` once closed.
    stdin: Option<ConsoleInput>,
    console: Arc<Stream>,
    stderr: Arc<Stream>,
    readers: Vec<JoinHandle<()>>,
    command_line: String,
    next_id: u64,
    boot_time: Duration,
    /// The console socket of an attached guest, shut down on drop so its reader ends.
    socket: Option<std::os::unix::net::UnixStream>,
}

impl Guest {
    /// Starts QEMU and waits (up to `cfg.boot_timeout`) until the guest's shell answers.
    pub fn boot(kit: &GuestKit, cfg: &QemuConfig) -> Result<Guest> {
        let started = Instant::now();
        let args = cfg.args(kit);
        let command_line = std::iter::once(cfg.qemu.display().to_string())
            .chain(args.iter().map(|a| shell_quote(a)))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if cfg.die_with_parent {
            // SAFETY: `die_with_parent` runs in the forked child before exec; it only calls
            // prctl, which is async-signal-safe, and allocates nothing.
            unsafe {
                cmd.pre_exec(die_with_parent);
            }
        }
        let mut child = cmd.spawn().with_context(|| {
            format!("cannot start QEMU (is qemu-system-x86 installed?): {command_line}")
        })?;
        let pid = child.id();
        let console = Arc::new(Stream::default());
        let stderr = Arc::new(Stream::default());
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let mut guest = Guest {
            child: Some(child),
            pid,
            stdin: pipes.0.map(|s| ConsoleInput(Box::new(s))),
            console,
            stderr,
            readers: Vec::new(),
            command_line,
            next_id: 0,
            boot_time: Duration::ZERO,
            socket: None,
        };
        // From here on, dropping `guest` on an error kills QEMU.
        let (Some(out), Some(err)) = (pipes.1, pipes.2) else {
            bail!("QEMU's pipes were not created");
        };
        let console_reader = guest.console.spawn_reader("guest-console", out)?;
        guest.readers.push(console_reader);
        let stderr_reader = guest.stderr.spawn_reader("qemu-stderr", err)?;
        guest.readers.push(stderr_reader);
        if cfg.incoming.is_none() {
            guest.wait_ready(cfg.boot_timeout)?;
        }
        guest.boot_time = started.elapsed();
        Ok(guest)
    }

    /// Talks to a guest that someone else started (libvirt) over its serial console socket
    /// (`<serial type='unix'>`, QEMU listening), and waits until its shell answers. `pid` is
    /// QEMU's, for the record; nothing here kills it.
    pub fn attach(
        console: std::os::unix::net::UnixStream,
        pid: u32,
        description: &str,
        timeout: Duration,
    ) -> Result<Guest> {
        let started = Instant::now();
        let input = console
            .try_clone()
            .context("cannot clone the console socket")?;
        let mut guest = Guest {
            child: None,
            pid,
            stdin: Some(ConsoleInput(Box::new(input))),
            console: Arc::new(Stream::default()),
            stderr: Arc::new(Stream::default()),
            readers: Vec::new(),
            command_line: description.to_owned(),
            next_id: 0,
            boot_time: Duration::ZERO,
            socket: Some(
                console
                    .try_clone()
                    .context("cannot clone the console socket")?,
            ),
        };
        let reader = guest.console.spawn_reader("guest-console", console)?;
        guest.readers.push(reader);
        guest.wait_ready(timeout)?;
        guest.boot_time = started.elapsed();
        Ok(guest)
    }

    /// Starts QEMU waiting for the guest to arrive by migration (`cfg.incoming` set): the shell
    /// answers on this QEMU's console once the migration completed.
    pub fn incoming(kit: &GuestKit, cfg: &QemuConfig) -> Result<Guest> {
        anyhow::ensure!(cfg.incoming.is_some(), "no -incoming in the configuration");
        Self::boot(kit, cfg)
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for `/init`'s readiness marker, then for a first command to come back.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let outcome = self.console.wait(0, timeout, |text, closed| {
            if let Some(at) = text.find(MODULE_FAILED_MARKER) {
                let line = text[at..].lines().next().unwrap_or_default().to_owned();
                return Some(Err(format!("the guest could not load a module: {line}")));
            }
            if text.contains(READY_MARKER) {
                return Some(Ok(()));
            }
            closed.then(|| Err("QEMU exited during boot".to_owned()))
        });
        match outcome {
            Some(Ok(())) => {}
            Some(Err(why)) => return Err(self.failure(&why)),
            None => {
                return Err(self.failure(&format!("the guest was not ready within {timeout:?}")))
            }
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        self.run_ok("true", left).map(drop)
    }

    /// Runs `cmd` in the guest's shell (in a subshell, stdin from /dev/null) and returns its
    /// stdout, stderr and exit status. On timeout, sends ^C to interrupt it and fails.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        self.next_id += 1;
        let id = self.next_id;
        let offset = self.console.len();
        self.send(&conversation::wrap(id, cmd))?;
        let outcome =
            self.console.wait(offset, timeout, |text, closed| {
                match conversation::parse(text, id) {
                    Some(output) => Some(Ok(output)),
                    None => closed.then_some(Err(())),
                }
            });
        match outcome {
            Some(Ok(output)) => Ok(output),
            Some(Err(())) => Err(self.failure(&format!("QEMU exited while running {cmd:?}"))),
            None => {
                // Best effort: interrupt the command so the shell can take the next one.
                let interrupt = self.send("\x03");
                let mut why = format!("{cmd:?} did not finish within {timeout:?}");
                if let Err(e) = interrupt {
                    let _ = write!(why, " (and ^C could not be sent: {e:#})");
                }
                Err(self.failure(&why))
            }
        }
    }

    /// Like `run`, but a non-zero exit status is an error; returns stdout.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let output = self.run(cmd, timeout)?;
        if output.status != 0 {
            bail!(
                "guest command {cmd:?} exited with status {}\nstdout:\n{}\nstderr:\n{}",
                output.status,
                output.stdout,
                output.stderr
            );
        }
        Ok(output.stdout)
    }

    /// Everything the guest printed so far, carriage returns removed.
    pub fn console_log(&self) -> String {
        self.console.text()
    }

    /// What QEMU itself printed on stderr so far (warnings, vhost-user errors).
    pub fn qemu_stderr(&self) -> String {
        self.stderr.text()
    }

    pub fn qemu_pid(&self) -> u32 {
        self.pid
    }

    /// The QEMU command line, shell-quoted.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// From spawning QEMU to the shell's first answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Powers the guest off (`poweroff -f`) and waits for QEMU to exit successfully.
    pub fn poweroff(mut self, timeout: Duration) -> Result<()> {
        let offset = self.console.len();
        self.send("poweroff -f\n")?;
        // QEMU closes its stdout when it exits; that is the signal to reap it.
        if self
            .console
            .wait(offset, timeout, |_, closed| closed.then_some(()))
            .is_none()
        {
            return Err(self.failure(&format!("QEMU did not exit within {timeout:?} of poweroff")));
        }
        let status = match self.child.as_mut() {
            Some(child) => child.wait().context("cannot reap QEMU")?,
            // Someone else's QEMU (attach): its console closing is all we can see.
            None => return Ok(()),
        };
        self.child = None;
        if !status.success() {
            return Err(self.failure(&format!("QEMU exited with {status} after poweroff")));
        }
        Ok(())
    }

    fn send(&mut self, text: &str) -> Result<()> {
        let stdin = &mut self
            .stdin
            .as_mut()
            .context("the console input is closed")?
            .0;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .context("cannot write to the guest console (QEMU gone?)")
    }

    /// An error that carries what is needed to understand it: QEMU's command line and
    /// stderr, and the end of the console log.
    fn failure(&self, what: &str) -> anyhow::Error {
        let log = self.console_log();
        let tail_start = log.len().saturating_sub(LOG_TAIL);
        let tail = log.get(tail_start..).unwrap_or(&log);
        anyhow!(
            "{what}\nQEMU command line: {}\nQEMU stderr:\n{}\nconsole (last {LOG_TAIL} bytes):\n{tail}",
            self.command_line,
            self.qemu_stderr().trim_end()
        )
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stdin = None;
        if let Some(s) = self.socket.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(mut child) = self.child.take() {
            // Errors mean it is already gone; nothing else to do in a destructor.
            let _ = child.kill();
            let _ = child.wait();
        }
        // QEMU is gone, so its pipes are closed and the readers have hit end of file.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// In QEMU's child, before exec: SIGKILL when the spawning thread exits.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Quotes an argument for display when it holds characters a shell would interpret.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=,./:+@%".contains(&b))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}
