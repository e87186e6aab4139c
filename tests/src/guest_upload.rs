//! A TCP upload from a guest to a listener on the host side (inside the test's namespace),
//! in the background, for tests that do something to the device while the bytes flow: the
//! guest sends random data with `nc` and keeps its SHA-256; the host counts and hashes what
//! arrives; at the end both must agree and `nc` must have succeeded.

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use sha2::{Digest, Sha256};

use crate::guest::Guest;

/// Starts sending `mib` MiB of random data from the guest to `host`:`port`, in the background.
pub fn start(g: &mut Guest, mib: usize, host: &str, port: u16, timeout: Duration) -> Result<()> {
    g.run_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/up bs=1048576 count={mib} 2>/dev/null && \
             sha256sum /tmp/up > /tmp/up.sum && \
             (nc {host} {port} < /tmp/up; echo $? > /tmp/nc.rc) > /dev/null 2>&1 & echo started"
        ),
        timeout,
    )
    .map(drop)
}

/// Accepts one connection on `listener` and reads it to the end, adding what arrives to
/// `received`; at most `pace` bytes per second if given (TCP's flow control then slows the
/// sender), giving up after `read_timeout` without data if given. Returns the SHA-256 (hex).
pub fn receive(
    listener: TcpListener,
    received: Arc<AtomicUsize>,
    pace: Option<usize>,
    read_timeout: Option<Duration>,
) -> JoinHandle<Result<String>> {
    std::thread::spawn(move || -> Result<String> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(read_timeout)?;
        let start = Instant::now();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect());
            }
            h.update(buf.get(..n).unwrap_or_default());
            let total = received.fetch_add(n, Ordering::Relaxed) + n;
            if let Some(rate) = pace {
                let due = Duration::from_secs_f64(total as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    })
}

/// Waits for the guest's `nc` to end and checks that it succeeded and that what the host
/// received (`received_sha`) is what the guest sent.
pub fn check(g: &mut Guest, received_sha: &str, timeout: Duration) -> Result<()> {
    let sent = g.run_ok(
        "while [ ! -e /tmp/nc.rc ]; do sleep 0.2; done; cat /tmp/nc.rc /tmp/up.sum",
        timeout,
    )?;
    let mut lines = sent.lines();
    ensure!(lines.next() == Some("0"), "nc failed: {sent}");
    ensure!(
        lines.next().unwrap_or_default().starts_with(received_sha),
        "the transfer arrived corrupted"
    );
    Ok(())
}
