//! Net load generation through the synthetic frontend, beside the raw cost of the kernel crossing
//! (one process writing the same frames to a TAP), for `net-load` and the harness.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::fixture::NetFixture;
use crate::frontend::net::{F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4};
use crate::frontend::{NetDriver, Rings, VnetHdr};
use crate::netns::NetNs;

/// Frames moved in a timed run.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub frames: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Rate {
    pub fn frames_per_sec(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64()
    }
    pub fn gbit_per_sec(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// A frame of `size` bytes (Ethernet included) and its virtio-net header. Frames above 1514
/// bytes are TCP segments offloaded as GSO (TSO), like a guest sending 64 KiB writes.
pub fn frame(size: usize) -> (VnetHdr, Vec<u8>) {
    let size = size.max(60);
    let mut f = vec![0u8; size];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x99, 0, 2]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x99, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = ((size - 14).min(65535) as u16).to_be_bytes();
    let ip = [
        0x45, 0, ip_len[0], ip_len[1], 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 9, 0, 1, 10, 9, 0, 2,
    ];
    f[14..34].copy_from_slice(&ip);
    let tcp = [
        0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ];
    let end = size.min(54);
    f[34..end].copy_from_slice(&tcp[..end - 34]);
    let hdr = if size > 1514 {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    } else {
        VnetHdr {
            gso_type: GSO_NONE,
            ..VnetHdr::default()
        }
    };
    (hdr, f)
}

/// TX through the daemon: keep up to `batch` frames queued, kick, reap, for `duration`.
pub fn tx<R: Rings>(
    d: &mut NetDriver<R>,
    size: usize,
    batch: usize,
    duration: Duration,
) -> Result<Rate> {
    let (hdr, f) = frame(size);
    let start = Instant::now();
    let mut frames = 0u64;
    while start.elapsed() < duration {
        let old = d.fe.queue(1).avail_idx();
        while d.tx_in_flight(0) < batch && d.submit_tx(0, &hdr, &f, 0)?.is_some() {}
        d.kick_tx(0, old)?;
        let mut done = d.reap_tx(0)?;
        if done == 0 {
            d.wait_tx(0)?;
            done = 1 + d.reap_tx(0)?;
        }
        frames += done as u64;
    }
    let elapsed = start.elapsed();
    while d.tx_in_flight(0) > 0 {
        d.wait_tx(0)?;
    }
    Ok(Rate {
        frames,
        bytes: frames * size as u64,
        elapsed,
    })
}

/// RX through the daemon: a thread in the namespace injects frames into the TAP as fast as it
/// can; the frontend receives and reposts buffers. Returns (received, injected) rates.
pub fn rx(
    fx: &NetFixture,
    d: &mut NetDriver,
    size: usize,
    duration: Duration,
) -> Result<(Rate, Rate)> {
    let (hdr, f) = frame(size);
    let gso = size > 1514;
    let sock = fx.packet_socket(gso)?;
    let mut wire = if gso {
        hdr.to_bytes()[..10].to_vec()
    } else {
        Vec::new()
    };
    wire.extend_from_slice(&f);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let injector = std::thread::spawn(move || -> Result<Rate> {
        let start = Instant::now();
        let mut frames = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if sock.send(&wire).is_ok() {
                frames += 1;
            }
        }
        Ok(Rate {
            frames,
            bytes: frames * wire.len() as u64,
            elapsed: start.elapsed(),
        })
    });
    let start = Instant::now();
    let mut frames = 0u64;
    let mut bytes = 0u64;
    d.post_rx(0, u32::MAX)?;
    while start.elapsed() < duration {
        if let Some(fr) = d.recv(0, Duration::from_millis(100))? {
            frames += 1;
            bytes += fr.data.len() as u64;
            if d.rx_posted(0) < 64 {
                d.post_rx(0, u32::MAX)?;
            }
        }
    }
    let elapsed = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let injected = injector
        .join()
        .map_err(|_| anyhow::anyhow!("injector panicked"))??;
    Ok((
        Rate {
            frames,
            bytes,
            elapsed,
        },
        injected,
    ))
}

/// The raw kernel crossing: one thread writes the same frames (with a virtio-net header) to a
/// TAP of its own in `ns`, as fast as it can.
pub fn raw_tap_write(ns: &NetNs, size: usize, duration: Duration) -> Result<Rate> {
    let (hdr, f) = frame(size);
    ns.run_in(move || {
        let tap = vhost_user_net::tap::TapQueue::open_all("rawtap0", 1)
            .context("raw TAP")?
            .pop()
            .context("no queue")?;
        tap.set_vnet_hdr_size(12)?;
        tap.set_up()?;
        let mut buf = hdr.to_bytes().to_vec();
        buf.extend_from_slice(&f);
        let start = Instant::now();
        let mut frames = 0u64;
        while start.elapsed() < duration {
            for _ in 0..64 {
                // The raw system call, as the daemon makes it: the kernel crossing alone,
                // without libc's cancellation-point wrapper.
                // SAFETY: writes `buf`, valid for its length, to the TAP descriptor.
                let n =
                    unsafe { libc::syscall(libc::SYS_write, tap.fd(), buf.as_ptr(), buf.len()) };
                if n > 0 {
                    frames += 1;
                }
            }
        }
        Ok(Rate {
            frames,
            bytes: frames * size as u64,
            elapsed: start.elapsed(),
        })
    })
}
