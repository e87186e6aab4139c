//! The harness's network driver: transmit and receive as lean as Linux's virtio_net, so that the
//! harness measures the device and not itself.
//!
//! Transmit: every slot is one descriptor holding a prepared frame (virtio-net header + data,
//! written once), so sending is one available-ring entry; the device is kicked only when its
//! `avail_event` asks, and interrupts are asked for after three quarters of what is in flight
//! (Linux's `virtqueue_enable_cb_delayed` on transmit queues). Receive: buffers are posted
//! once and reposted as soon as they come back; frames are counted from the used lengths and
//! `num_buffers`, never copied. Nothing is allocated per frame.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use vm_memory::GuestAddress;

use super::lean_blk::Completions;
use super::raw_ring::{
    arm_interrupt, host, kick, kick_needed, raw_ring, read_at, thread_cpu, Interrupts, RawRing,
};
use crate::frontend::device::data_base;
use crate::frontend::queue::DESC_F_WRITE;
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

/// One direction's ring as the driver keeps it.
#[derive(Debug)]
struct DriverRing {
    ring: RawRing,
    event_idx: bool,
    avail_idx: u16,
    last_used: u16,
    kick: RawFd,
    interrupts: Interrupts,
}

impl DriverRing {
    fn new<R: Rings>(rings: &mut R, q: u16) -> Result<Self> {
        let ring = raw_ring(rings, q)?;
        let event_idx = rings.has(29);
        let dq = rings.queue(q);
        let avail_idx = u16::from_le(ring.avail_idx().load(Ordering::Acquire));
        let last_used = u16::from_le(ring.used_idx().load(Ordering::Acquire));
        ensure!(avail_idx == last_used, "queue {q} has buffers in flight");
        Ok(Self {
            ring,
            event_idx,
            avail_idx,
            last_used,
            kick: dq.kick.as_raw_fd(),
            interrupts: Interrupts::new(dq.call.as_raw_fd())?,
        })
    }

    /// Adds a buffer and publishes it at once, as Linux's virtqueue_add does.
    fn push(&mut self, desc: u16) {
        self.ring
            .avail_slot(self.avail_idx)
            .store(desc.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ring
            .avail_idx()
            .store(self.avail_idx.to_le(), Ordering::Release);
    }

    /// Ends a batch pushed since `old`: kicks if the device asks.
    fn publish(&mut self, old: u16, kicks: &mut u64) -> Result<()> {
        if old == self.avail_idx {
            return Ok(());
        }
        fence(Ordering::SeqCst);
        if kick_needed(&self.ring, self.event_idx, self.avail_idx, old) {
            kick(self.kick)?;
            *kicks += 1;
        }
        Ok(())
    }

    /// Both sides' indexes, for a failure message.
    fn state(&self) -> String {
        let r = &self.ring;
        format!(
            "driver avail {} last used {}; ring avail {} used {} used_event {} avail_event {} used flags {}",
            self.avail_idx,
            self.last_used,
            u16::from_le(r.avail_idx().load(Ordering::Relaxed)),
            u16::from_le(r.used_idx().load(Ordering::Relaxed)),
            u16::from_le(r.used_event().load(Ordering::Relaxed)),
            u16::from_le(r.avail_event().load(Ordering::Relaxed)),
            u16::from_le(r.used_flags().load(Ordering::Relaxed)),
        )
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.ring.used_idx().load(Ordering::Acquire))
    }

    /// Asks for an interrupt once `later + 1` more buffers are used (the used index passes
    /// `last_used + later`), then looks once more. Returns true if something was used meanwhile
    /// (do not sleep).
    fn arm(&self, later: u16) -> bool {
        arm_interrupt(
            &self.ring,
            self.event_idx,
            self.last_used.wrapping_add(later),
        );
        fence(Ordering::SeqCst);
        self.used_idx() != self.last_used
    }
}

/// Transmit with `slots` frames in flight at most.
#[derive(Debug)]
pub struct LeanTx<R: Rings> {
    pub rings: R,
    ring: DriverRing,
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
        let ring = DriverRing::new(&mut rings, TX_QUEUE)?;
        let base = data_base(rings.setup());
        let stride = (wire.len() as u64).div_ceil(4096) * 4096;
        let mem = rings.ram().mem();
        for i in 0..slots {
            let at = GuestAddress(base.0 + u64::from(i) * stride);
            let p = host(mem, at, wire.len())?;
            // SAFETY: `p` points at `wire.len()` bytes of guest RAM (checked by `host`), which
            // nothing else touches while the driver is being set up.
            unsafe { std::ptr::copy_nonoverlapping(wire.as_ptr(), p, wire.len()) };
            let len = u32::try_from(wire.len())?;
            ring.ring.write_desc(i, at.0, len, 0, 0);
        }
        Ok(Self {
            rings,
            ring,
            slots,
            free: (0..slots).rev().collect(),
            frame_bytes: (wire.len() - HDR_LEN) as u64,
        })
    }

    fn reap(&mut self) -> Result<u64> {
        let used = self.ring.used_idx();
        let mut n = 0;
        while self.ring.last_used != used {
            let (id, _) = self.ring.ring.used_elem(self.ring.last_used);
            self.ring.last_used = self.ring.last_used.wrapping_add(1);
            ensure!(
                id < u32::from(self.slots) && !self.free.contains(&(id as u16)),
                "device completed transmit slot {id}, which is not in flight"
            );
            self.free.push(id as u16);
            n += 1;
        }
        Ok(n)
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
                let old = self.ring.avail_idx;
                while let Some(slot) = self.free.pop() {
                    self.ring.push(slot);
                }
                self.ring.publish(old, &mut s.kicks)?;
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
                        continue;
                    }
                    ensure!(
                        self.ring.interrupts.wait(10_000)?,
                        "no transmit completion within 10 s: {}",
                        self.ring.state()
                    );
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
    ring: DriverRing,
    buffers: u16,
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
        let mut ring = DriverRing::new(&mut rings, RX_QUEUE)?;
        // Receive buffers go above the transmit slots' area.
        let base = data_base(rings.setup()).0 + (64 << 20);
        let mem = rings.ram().mem();
        let mut num_buffers_at = Vec::new();
        for i in 0..buffers {
            let at = GuestAddress(base + u64::from(i) * u64::from(buf_len));
            let p = host(mem, at, buf_len as usize)?;
            num_buffers_at.push(p.wrapping_add(10));
            ring.ring.write_desc(i, at.0, buf_len, DESC_F_WRITE, 0);
        }
        let old = ring.avail_idx;
        for i in 0..buffers {
            ring.push(i);
        }
        let mut kicks = 0;
        ring.publish(old, &mut kicks)?;
        Ok(Self {
            rings,
            ring,
            buffers,
            mergeable,
            num_buffers_at,
            continuing: 0,
        })
    }

    /// Takes every used buffer, counts frames, and reposts the buffers.
    fn reap(&mut self, s: &mut NetSample) -> Result<u64> {
        let used = self.ring.used_idx();
        if used == self.ring.last_used {
            return Ok(0);
        }
        let old = self.ring.avail_idx;
        let mut n = 0;
        while self.ring.last_used != used {
            let (id, len) = self.ring.ring.used_elem(self.ring.last_used);
            self.ring.last_used = self.ring.last_used.wrapping_add(1);
            ensure!(
                id < u32::from(self.buffers),
                "device used receive buffer {id}, which it was never given"
            );
            let id = id as u16;
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
            self.ring.push(id);
        }
        self.ring.publish(old, &mut s.kicks)?;
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
                continue;
            }
            if self.ring.interrupts.wait(20)? {
                s.interrupts += 1;
            }
        }
        s.elapsed = begin.elapsed();
        s.driver_cpu = thread_cpu().saturating_sub(cpu0);
        Ok(s)
    }
}
