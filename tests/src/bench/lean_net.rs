//! The harness's network driver: transmit and receive as lean as Linux's virtio_net, so that the
//! harness measures the device and not itself.
//!
//! Transmit: every slot is one descriptor holding a prepared frame (virtio-net header + data,
//! written once), so sending is one available-ring entry; the device is kicked only when its
//! `avail_event` asks, and interrupts are asked for after three quarters of what is in flight
//! (Linux's `virtqueue_enable_cb_delayed` on transmit queues). Receive: buffers are posted
//! once and reposted as soon as they come back; frames are counted from the used lengths and
//! `num_buffers`, never copied. Nothing is allocated per frame. Split or packed rings, whichever
//! the queues have (`lean_ring.rs`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use vm_memory::GuestAddress;

use super::lean_blk::Completions;
use super::lean_ring::{LeanRing, RingPtrs, Seg};
use super::raw_ring::{host, read_at, thread_cpu};
use crate::frontend::device::data_base;
use crate::frontend::Rings;

/// Bytes of the virtio-net header with VERSION_1 / MRG_RXBUF.
const HDR_LEN: usize = 12;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

/// What one run moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetSample {
    pub frames: u64,
    /// Frame bytes (without the virtio-net header).
    pub bytes: u64,
    pub elapsed: Duration,
    pub driver_cpu: Duration,
    pub kicks: u64,
    pub interrupts: u64,
}

/// Transmit with `slots` frames in flight at most.
#[derive(Debug)]
pub struct LeanTx<R: Rings> {
    pub rings: R,
    ring: LeanRing,
    slots: u16,
    free: Vec<u16>,
    frame_bytes: u64,
}

impl<R: Rings> LeanTx<R> {
    /// `wire` is the header and frame every slot sends.
    pub fn new(mut rings: R, slots: u16, wire: &[u8]) -> Result<Self> {
        ensure!(wire.len() > HDR_LEN, "a frame needs its header");
        let size = rings.setup().queue_size;
        ensure!(
            slots >= 1 && slots <= size,
            "{slots} slots on a queue of {size}"
        );
        let base = data_base(rings.setup());
        let stride = (wire.len() as u64).div_ceil(4096) * 4096;
        let mem = rings.ram().mem();
        let mut chains = Vec::new();
        for i in 0..slots {
            let at = GuestAddress(base.0 + u64::from(i) * stride);
            let p = host(mem, at, wire.len())?;
            // SAFETY: `p` points at `wire.len()` bytes of guest RAM (checked by `host`), which
            // nothing else touches while the driver is being set up.
            unsafe { std::ptr::copy_nonoverlapping(wire.as_ptr(), p, wire.len()) };
            chains.push(vec![Seg {
                addr: at.0,
                len: u32::try_from(wire.len())?,
                write: false,
            }]);
        }
        let ring = LeanRing::new(&mut rings, TX_QUEUE, &chains)?;
        Ok(Self {
            rings,
            ring,
            slots,
            free: (0..slots).rev().collect(),
            frame_bytes: (wire.len() - HDR_LEN) as u64,
        })
    }

    /// The ring, for a device in this process (taken before the first run).
    pub fn ring_ptrs(&self) -> RingPtrs {
        self.ring.ptrs()
    }

    fn reap(&mut self) -> Result<u64> {
        let done = self.ring.reap()?;
        for &(id, _) in done {
            ensure!(
                !self.free.contains(&id),
                "device completed transmit slot {id}, which is not in flight"
            );
            self.free.push(id);
        }
        Ok(done.len() as u64)
    }

    pub fn run(&mut self, duration: Duration, mut how: Completions<'_>) -> Result<NetSample> {
        let mut s = NetSample::default();
        let cpu0 = thread_cpu();
        let begin = Instant::now();
        let end = begin + duration;
        let mut sending = true;
        loop {
            s.frames += self.reap()?;
            if sending {
                let mark = self.ring.mark();
                while let Some(slot) = self.free.pop() {
                    self.ring.push(slot);
                }
                self.ring.publish(mark, &mut s.kicks)?;
                if Instant::now() >= end {
                    sending = false;
                }
            } else if self.free.len() == usize::from(self.slots) {
                break;
            }
            if !self.free.is_empty() && sending {
                continue;
            }
            match &mut how {
                Completions::Inline(device) => device()?,
                Completions::Interrupt => {
                    // virtqueue_enable_cb_delayed: interrupt once three quarters of what is in
                    // flight are back (used_event = last_used + 3/4·in-flight, as Linux sets it;
                    // the interrupt comes with the completion after that index).
                    let in_flight = self.slots - self.free.len() as u16;
                    if self.ring.arm(in_flight * 3 / 4) {
                        self.ring.disable();
                        continue;
                    }
                    ensure!(
                        self.ring.wait(10_000)?,
                        "no transmit completion within 10 s: {}",
                        self.ring.state()
                    );
                    self.ring.disable();
                    s.interrupts += 1;
                }
            }
        }
        s.elapsed = begin.elapsed();
        s.bytes = s.frames * self.frame_bytes;
        s.driver_cpu = thread_cpu().saturating_sub(cpu0);
        Ok(s)
    }
}

/// Receive into `buffers` posted buffers of `buf_len` bytes each.
#[derive(Debug)]
pub struct LeanRx<R: Rings> {
    pub rings: R,
    ring: LeanRing,
    mergeable: bool,
    /// Host address of each buffer's `num_buffers` field.
    num_buffers_at: Vec<*mut u8>,
    /// Buffers of the current frame still to come (MRG_RXBUF).
    continuing: u16,
}

impl<R: Rings> LeanRx<R> {
    pub fn new(mut rings: R, buffers: u16, buf_len: u32) -> Result<Self> {
        let size = rings.setup().queue_size;
        ensure!(
            buffers >= 1 && buffers <= size,
            "{buffers} buffers on a queue of {size}"
        );
        let mergeable = rings.has(crate::frontend::net::F_MRG_RXBUF);
        // Receive buffers go above the transmit slots' area.
        let base = data_base(rings.setup()).0 + (64 << 20);
        let mem = rings.ram().mem();
        let mut num_buffers_at = Vec::new();
        let mut chains = Vec::new();
        for i in 0..buffers {
            let at = GuestAddress(base + u64::from(i) * u64::from(buf_len));
            let p = host(mem, at, buf_len as usize)?;
            num_buffers_at.push(p.wrapping_add(10));
            chains.push(vec![Seg {
                addr: at.0,
                len: buf_len,
                write: true,
            }]);
        }
        let mut ring = LeanRing::new(&mut rings, RX_QUEUE, &chains)?;
        let mark = ring.mark();
        for i in 0..buffers {
            ring.push(i);
        }
        let mut kicks = 0;
        ring.publish(mark, &mut kicks)?;
        Ok(Self {
            rings,
            ring,
            mergeable,
            num_buffers_at,
            continuing: 0,
        })
    }

    /// Takes every used buffer, counts frames, and reposts the buffers (once their headers are
    /// read: a reposted buffer may be filled again at once).
    fn reap(&mut self, s: &mut NetSample) -> Result<u64> {
        let mark = self.ring.mark();
        let mut n = 0;
        // The ring refuses ids it never gave out: every id here is one of the buffers.
        for &(id, len) in self.ring.reap()? {
            if self.continuing > 0 {
                self.continuing -= 1;
                s.bytes += u64::from(len);
            } else {
                let count: u16 = if self.mergeable {
                    u16::from_le(read_at(self.num_buffers_at[usize::from(id)], 0))
                } else {
                    1
                };
                self.continuing = count.saturating_sub(1);
                s.frames += 1;
                n += 1;
                s.bytes += u64::from(len).saturating_sub(HDR_LEN as u64);
            }
        }
        self.ring.repost_reaped();
        self.ring.publish(mark, &mut s.kicks)?;
        Ok(n)
    }

    /// Receives for `duration` whatever arrives.
    pub fn run(&mut self, duration: Duration) -> Result<NetSample> {
        let mut s = NetSample::default();
        let cpu0 = thread_cpu();
        let begin = Instant::now();
        let end = begin + duration;
        while Instant::now() < end {
            if self.reap(&mut s)? > 0 {
                continue;
            }
            if self.ring.arm(0) {
                self.ring.disable();
                continue;
            }
            if self.ring.wait(20)? {
                self.ring.disable();
                s.interrupts += 1;
            }
        }
        s.elapsed = begin.elapsed();
        s.driver_cpu = thread_cpu().saturating_sub(cpu0);
        Ok(s)
    }
}
