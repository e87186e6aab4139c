//! The system-call allow-list (seccomp-bpf, through `seccompiler`).
//!
//! The list is what the engine's data and control paths use once set-up is over (sockets,
//! epoll, eventfds, memory mappings for guest RAM and inflight regions, threads for queues),
//! plus what each daemon adds ([`Allow`]). Anything else is trapped: a SIGSYS handler names the
//! system call on stderr and ends the process, which its supervisor restarts.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter")]
    Compile(#[from] seccompiler::Error),
    #[error(
        "no seccomp allow-list for {0} (written for x86_64 and aarch64): run with --no-seccomp"
    )]
    UnsupportedArch(&'static str),
    #[error("cannot install the SIGSYS reporter")]
    Handler(#[source] std::io::Error),
}

/// A system call a daemon needs beyond the engine's own, optionally only with certain values
/// of its second argument (ioctl request numbers).
#[derive(Debug, Clone, Copy)]
pub struct Allow {
    pub syscall: i64,
    pub arg1_in: &'static [u64],
}

impl Allow {
    pub const fn any(syscall: i64) -> Self {
        Self {
            syscall,
            arg1_in: &[],
        }
    }
    pub const fn with_arg1(syscall: i64, values: &'static [u64]) -> Self {
        Self {
            syscall,
            arg1_in: values,
        }
    }
}

/// What every daemon needs after set-up.
const ENGINE: &[i64] = &[
    // I/O on sockets, eventfds, signalfd, files
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_ftruncate,
    libc::SYS_memfd_create,
    libc::SYS_dup,
    // vhost-user connections (accept, reconnect as a client, sd_notify)
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    // waiting
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_restart_syscall,
    // memory: guest RAM and inflight regions come and go
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // threads: one per started queue
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    // The completion policy reads its own involuntary context switches (pipeline.rs).
    libc::SYS_getrusage,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Calls of the above kind that only some architectures have under these names (aarch64 has
/// only the `*at`/`p*` forms; libc then uses those).
#[cfg(target_arch = "x86_64")]
const ARCH_SPECIFIC: &[i64] = &[libc::SYS_unlink, libc::SYS_epoll_wait, libc::SYS_poll];
#[cfg(target_arch = "aarch64")]
const ARCH_SPECIFIC: &[i64] = &[libc::SYS_unlinkat];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH_SPECIFIC: &[i64] = &[];

/// The architecture the filter is compiled for. The allow-list names system calls through
/// `libc`'s per-target numbers, so it holds for both architectures it has been written for.
fn target_arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
    }
}

/// Only `socket(AF_UNIX, …)`: reconnecting to a VMM and sd_notify.
fn socket_rule() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )?;
    Ok(vec![SeccompRule::new(vec![unix])?])
}

fn rules(extra: &[Allow]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = ENGINE
        .iter()
        .chain(ARCH_SPECIFIC)
        .map(|s| (*s, Vec::new()))
        .collect();
    map.insert(libc::SYS_socket, socket_rule()?);
    for a in extra {
        if a.arg1_in.is_empty() {
            map.insert(a.syscall, Vec::new());
            continue;
        }
        let entry = map.entry(a.syscall).or_default();
        for v in a.arg1_in {
            entry.push(SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                *v,
            )?])?);
        }
    }
    Ok(map)
}

/// Builds the filter program (separately testable from installing it).
pub fn program(extra: &[Allow]) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(extra)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Installs the SIGSYS reporter and the filter for this thread and those it will create.
pub fn install(extra: &[Allow]) -> Result<(), SeccompError> {
    let prog = program(extra)?;
    install_reporter().map_err(SeccompError::Handler)?;
    seccompiler::apply_filter(&prog)?;
    tracing::info!(
        allowed = ENGINE.len() + ARCH_SPECIFIC.len() + 1 + extra.len(),
        "seccomp filter installed"
    );
    Ok(())
}

fn install_reporter() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid empty action before we fill it in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler for SIGSYS with a valid action; the old action is not wanted.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Offset of `si_syscall` in the SIGSYS `siginfo_t` on 64-bit Linux, x86_64 and aarch64 alike
/// (after signo, errno, code, padding and the 8-byte call address).
const SI_SYSCALL_OFFSET: usize = 24;

/// Names the trapped system call and exits. Only async-signal-safe calls (write, _exit).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr: i32 = if info.is_null() {
        -1
    } else {
        // SAFETY: the offset stays inside the live siginfo_t the kernel passed.
        let field = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET) };
        // SAFETY: for SIGSYS the kernel fills si_syscall there; read without alignment demands.
        unsafe { field.cast::<i32>().read_unaligned() }
    };
    let mut msg = [0u8; 128];
    let mut len = 0;
    for part in [
        &b"bulkhead: seccomp: system call "[..],
        &digits(nr),
        &b" is not allowed; exiting (run with --no-seccomp to debug)\n"[..],
    ] {
        for b in part {
            if *b == 0 {
                continue;
            }
            if let Some(slot) = msg.get_mut(len) {
                *slot = *b;
                len += 1;
            }
        }
    }
    // SAFETY: write is async-signal-safe; msg is valid for len bytes.
    unsafe { libc::write(2, msg.as_ptr().cast(), len) };
    // SAFETY: _exit is async-signal-safe and ends the process without unwinding.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// Decimal digits of `n` (zero-padded buffer; zeros are skipped by the writer).
fn digits(n: i32) -> [u8; 12] {
    let mut out = [0u8; 12];
    let mut v = i64::from(n).unsigned_abs();
    let mut i = out.len();
    loop {
        i -= 1;
        if let Some(slot) = out.get_mut(i) {
            *slot = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 1 {
            break;
        }
    }
    if n < 0 {
        if let Some(slot) = out.get_mut(i.saturating_sub(1)) {
            *slot = b'-';
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "BULKHEAD_SECCOMP_CHILD";

    #[test]
    fn digits_print_numbers() {
        let s: Vec<u8> = digits(63).into_iter().filter(|b| *b != 0).collect();
        assert_eq!(s, b"63");
        let s: Vec<u8> = digits(-1).into_iter().filter(|b| *b != 0).collect();
        assert_eq!(s, b"-1");
    }

    /// In a child process (this test binary run again), install the filter and make a system
    /// call that is not on the list: the child must die naming it.
    #[test]
    fn a_forbidden_system_call_is_named_and_ends_the_process() {
        if std::env::var_os(CHILD).is_some() {
            install(&[]).unwrap();
            // SAFETY: uname into a valid buffer; it is not allowed, so the filter traps it.
            let mut u: libc::utsname = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::uname(&mut u) };
            unreachable!("uname was allowed");
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "sandbox::seccomp::tests::a_forbidden_system_call_is_named_and_ends_the_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(128 + libc::SIGSYS),
            "stderr: {stderr}"
        );
        assert!(
            stderr.contains(&format!("system call {} is not allowed", libc::SYS_uname)),
            "stderr: {stderr}"
        );
    }

    #[test]
    fn ioctl_requests_are_restricted_to_the_listed_ones() {
        let r = rules(&[Allow::with_arg1(libc::SYS_ioctl, &[0x1277, 0x127f])]).unwrap();
        assert_eq!(r[&libc::SYS_ioctl].len(), 2);
        assert!(r[&libc::SYS_read].is_empty());
        assert!(!r.contains_key(&libc::SYS_execve));
        assert!(!r.contains_key(&libc::SYS_openat));
        program(&[]).unwrap();
    }
}
