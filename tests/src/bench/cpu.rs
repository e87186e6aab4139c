//! CPU time accounting and CPU placement for the harness.

use std::time::Duration;

use anyhow::{Context, Result};

/// CPU time (user + system) of process `pid` so far.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    crate::daemon::cpu_time(pid)
}

/// CPU time of this process so far.
pub fn own_cpu() -> Result<Duration> {
    process_cpu(std::process::id())
}

/// Pins thread `tid` (or a whole single-threaded process) to `cpu`.
pub fn pin(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid set of the advertised size.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// Lets the calling thread run on every online CPU again (processes it starts inherit that).
pub fn unpin_self(cpus: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..cpus {
        // SAFETY: `set` is a valid cpu_set_t.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: a valid set of the advertised size; 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// Pins every thread of process `pid` whose name starts with `prefix` to `cpu`, waiting (up to
/// a second) for at least one: a new thread names itself only once it runs.
pub fn pin_threads(pid: u32, prefix: &str, cpu: usize) -> Result<usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let n = pin_threads_once(pid, prefix, cpu)?;
        if n > 0 || std::time::Instant::now() > deadline {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pin_threads_once(pid: u32, prefix: &str, cpu: usize) -> Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            let tid: i32 = entry.file_name().to_string_lossy().parse()?;
            pin(tid, cpu)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Pins all threads of process `pid`.
pub fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    pin_threads(pid, "", cpu).map(|_| ())
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no side effects.
    unsafe { libc::gettid() }
}

/// Where the driver and the device run. Results hold only for the placement measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cpus {
    /// Driver and device pinned to the same CPU.
    One,
    /// Driver on CPU 0, device on CPU 1 (a vCPU and a device thread on different CPUs).
    TwoPinned,
    /// Nobody pinned: where the scheduler puts them.
    Unpinned,
}

impl Cpus {
    pub const ALL: [Cpus; 3] = [Cpus::One, Cpus::TwoPinned, Cpus::Unpinned];

    pub fn driver(self) -> Option<usize> {
        match self {
            Cpus::One | Cpus::TwoPinned => Some(0),
            Cpus::Unpinned => None,
        }
    }

    pub fn device(self) -> Option<usize> {
        match self {
            Cpus::One => Some(0),
            Cpus::TwoPinned => Some(1),
            Cpus::Unpinned => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Cpus::One => "one CPU",
            Cpus::TwoPinned => "two CPUs, pinned",
            Cpus::Unpinned => "unpinned",
        }
    }

    /// Pins (or unpins) the calling thread as the driver of this placement.
    pub fn place_driver(self, machine_cpus: usize) -> Result<()> {
        match self.driver() {
            Some(cpu) => pin(gettid(), cpu),
            None => unpin_self(machine_cpus),
        }
    }

    /// Pins the device's process (every thread) if this placement pins it.
    pub fn place_device_process(self, pid: u32) -> Result<()> {
        match self.device() {
            Some(cpu) => pin_process(pid, cpu),
            None => Ok(()),
        }
    }
}

/// Thread ids of process `pid` whose name starts with `prefix`.
pub fn threads_named(pid: u32, prefix: &str) -> Result<Vec<i32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            tids.push(entry.file_name().to_string_lossy().parse()?);
        }
    }
    Ok(tids)
}

/// CPU time the threads `tids` of process `pid` have used so far, to the nanosecond (schedstat).
pub fn threads_cpu(pid: u32, tids: &[i32]) -> Result<Duration> {
    let mut ns = 0u64;
    for tid in tids {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
            .with_context(|| format!("schedstat of thread {tid}"))?;
        ns += s
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(Duration::from_nanos(ns))
}

/// Like [`threads_named`], waiting (up to a second) for at least one: a new thread names itself
/// only once it runs.
pub fn wait_threads_named(pid: u32, prefix: &str) -> Result<Vec<i32>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let tids = threads_named(pid, prefix)?;
        if !tids.is_empty() || std::time::Instant::now() > deadline {
            return Ok(tids);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
