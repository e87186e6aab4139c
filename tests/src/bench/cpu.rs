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
