//! The cost of one notification round trip: two threads bouncing an eventfd signal, pinned to
//! the same CPU or to different ones. The yardstick for what isolation may cost at QD 1.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::Result;
use vmm_sys_util::eventfd::EventFd;

use super::cpu::{gettid, pin};
use crate::frontend::queue::wait_readable;

/// Median round trip in microseconds over `duration`.
pub fn round_trip_us(cpu_a: usize, cpu_b: usize, duration: Duration) -> Result<f64> {
    let ping = EventFd::new(0)?;
    let pong = EventFd::new(0)?;
    let (ping2, pong2) = (ping.try_clone()?, pong.try_clone()?);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = std::thread::spawn(move || -> Result<()> {
        pin(gettid(), cpu_b)?;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if wait_readable(ping2.as_raw_fd(), Duration::from_millis(50))? {
                ping2.read()?;
                pong2.write(1)?;
            }
        }
        Ok(())
    });
    pin(gettid(), cpu_a)?;
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        ping.write(1)?;
        pong.read()?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ping.write(1)?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(super::stats::median(&samples))
}
