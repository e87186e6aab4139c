//! Running the real daemon binaries: spawn, wait until ready (sd_notify READY=1, the same signal
//! systemd waits for), stop, kill, and inspect their descriptors and mappings.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace's target profile directory holding the daemon binaries.
pub fn bin_dir() -> Result<PathBuf> {
    // Integration tests run from target/<profile>/deps/<test>; binaries live in target/<profile>.
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("test binary has no parent")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary, checking it was built. `BULKHEAD_DAEMON_DIR` points the tests
/// and the harness at binaries built elsewhere (e.g. an older commit, for before/after runs).
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("BULKHEAD_DAEMON_DIR") {
        Some(d) => PathBuf::from(d),
        None => bin_dir()?,
    };
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} not found: build the workspace first (cargo build --workspace, same profile as the tests)", p.display());
    }
    Ok(p)
}

/// A unique scratch directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("bulkhead-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running daemon process. Dropping it kills it.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    notify: UnixDatagram,
    _notify_path: PathBuf,
    pub name: String,
}

impl Daemon {
    /// Starts `binary` with `args` and waits for READY=1.
    pub fn start(binary_name: &str, args: &[String], scratch: &Scratch) -> Result<Self> {
        let mut d = Self::spawn(binary_name, args, scratch, |_| {})?;
        d.wait_ready(Duration::from_secs(20))?;
        Ok(d)
    }

    /// Starts without waiting; `tweak` may adjust the command (environment, descriptors).
    pub fn spawn(
        binary_name: &str,
        args: &[String],
        scratch: &Scratch,
        tweak: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        Self::spawn_program(&binary(binary_name)?, args, binary_name, scratch, tweak)
    }

    /// Starts `program` (a wrapper that ends up exec'ing the daemon, for instance) without
    /// waiting.
    pub fn spawn_program(
        program: &Path,
        args: &[String],
        binary_name: &str,
        scratch: &Scratch,
        tweak: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify_path = scratch.join(&format!("notify-{n}.sock"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)?;
        // Daemons that drop privileges must still be able to say READY=1.
        std::fs::set_permissions(
            &notify_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .env(
                "RUST_LOG",
                std::env::var("BULKHEAD_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        tweak(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {binary_name}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let log = Arc::clone(&log);
            let tag = format!("[{binary_name} {}]", child.id());
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if std::env::var_os("BULKHEAD_SHOW_DAEMON_LOG").is_some() {
                        eprintln!("{tag} {line}");
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Ok(Self {
            child: Some(child),
            log,
            notify,
            _notify_path: notify_path,
            name: binary_name.to_owned(),
        })
    }

    /// Waits for the daemon's READY=1 notification.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{} not ready within {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited with {status} before becoming ready; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            self.notify
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
            if let Ok(n) = self.notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return Ok(());
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("daemon already reaped"),
        }
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let pid = i32::try_from(self.pid())?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?} after signal {signal}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) -> Result<()> {
        self.stop_with(libc::SIGKILL, Duration::from_secs(5))
            .map(|_| ())
    }

    /// Number of open descriptors of the daemon.
    pub fn fd_count(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// Number of memory mappings of the daemon.
    pub fn map_count(&self) -> Result<usize> {
        Ok(
            std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))?
                .lines()
                .count(),
        )
    }

    /// Threads of the daemon.
    pub fn thread_count(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/task", self.pid()))?.count())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `cond` holds, polling; for conditions with no event to wait on (e.g. /proc).
pub fn eventually(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects to a daemon's socket.
pub fn connect(path: &Path) -> Result<crate::frontend::Connection> {
    crate::frontend::Connection::connect(path)
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 overall: 12 and 13 after the state field at 0.
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields
            .get(12)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Puts descriptors at fixed numbers in a child, between fork and exec, without close-on-exec:
/// `pairs` are (descriptor in the parent, number below 512 in the child), at most eight.
/// Async-signal-safe (no allocation). Every source is first copied above all targets, because a
/// source that already sits at some target number would otherwise be closed by an earlier
/// `dup2`, or, when it sits at its own target, keep its close-on-exec flag (`dup2(fd, fd)`
/// changes nothing).
pub fn place_fds_in_child(pairs: &[(i32, i32)]) -> std::io::Result<()> {
    const ABOVE_TARGETS: i32 = 512;
    let mut temps = [-1i32; 8];
    if pairs.len() > temps.len() || pairs.iter().any(|&(_, to)| to >= ABOVE_TARGETS) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (temp, &(from, _)) in temps.iter_mut().zip(pairs) {
        // SAFETY: F_DUPFD only creates a descriptor in the calling (child) process.
        *temp = unsafe { libc::fcntl(from, libc::F_DUPFD, ABOVE_TARGETS) };
        if *temp < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (temp, &(_, to)) in temps.iter().zip(pairs) {
        // SAFETY: dup2 from a descriptor this function owns onto a number the caller chose.
        if unsafe { libc::dup2(*temp, to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for temp in temps.iter().take(pairs.len()) {
        // SAFETY: closes only the temporary copies made above.
        unsafe { libc::close(*temp) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    /// What the child sees at `fd`: the target of /proc/self/fd/`fd`, or empty.
    fn child_sees(pairs: Vec<(i32, i32)>, fds: &[i32]) -> Vec<String> {
        let script: String = fds
            .iter()
            .map(|fd| format!("readlink /proc/self/fd/{fd} || echo closed; "))
            .collect();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &script]);
        // SAFETY: the hook only calls place_fds_in_child (async-signal-safe).
        unsafe { cmd.pre_exec(move || super::place_fds_in_child(&pairs)) };
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A close-on-exec copy of `file` at exactly `at` (numbers far above what the other tests
    /// of this binary open).
    fn at(file: &std::fs::File, at: i32) -> i32 {
        // SAFETY: duplicates a descriptor we own onto a number this test reserves.
        let fd = unsafe { libc::dup3(file.as_raw_fd(), at, libc::O_CLOEXEC) };
        assert_eq!(fd, at);
        fd
    }

    #[test]
    fn a_descriptor_already_at_its_target_survives_exec() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = at(&null, 401);
        assert_eq!(child_sees(vec![(fd, fd)], &[fd]), vec!["/dev/null"]);
        // SAFETY: closes the copy made above.
        unsafe { libc::close(fd) };
    }

    #[test]
    fn swapped_descriptors_land_where_asked() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let (n, z) = (at(&null, 410), at(&zero, 411));
        assert_eq!(
            child_sees(vec![(n, z), (z, n)], &[n, z]),
            vec!["/dev/zero", "/dev/null"]
        );
        for fd in [n, z] {
            // SAFETY: closes the copies made above.
            unsafe { libc::close(fd) };
        }
    }
}
