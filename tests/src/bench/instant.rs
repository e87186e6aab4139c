//! A block backend that completes every request the moment it sees it: the yardstick for the
//! harness's own driver. Measured against it, the driver's rate is its ceiling — if that is not
//! well above every real backend's rate at a point, the point measures the driver.
//!
//! It walks each chain (so it reads what a device reads), writes the status byte and the used
//! element, publishes and interrupts exactly when `used_event` asks. On its own thread it
//! busy-polls (kicks never needed, so it tells the driver not to send any); inline it is called by
//! the driver instead of sleeping. This file is the split ring's; `instant_packed.rs` is the
//! packed ring's, and [`InstantBackend`] is whichever the driver's ring is.

use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{ensure, Result};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};

use super::instant_packed::InstantPacked;
use super::lean_ring::RingPtrs;
use super::raw_ring::{need_event, RawRing, USED_F_NO_NOTIFY};

const AVAIL_F_NO_INTERRUPT: u16 = 1;
use crate::frontend::queue::{DESC_F_NEXT, DESC_F_WRITE};

/// The instant device on the driver's ring, split or packed.
#[derive(Debug)]
pub enum InstantBackend {
    Split(InstantDevice),
    Packed(InstantPacked),
}

impl InstantBackend {
    /// On the ring `ptrs` names (taken with nothing in flight).
    pub fn new(ptrs: RingPtrs, mem: GuestMemoryMmap<()>, call: RawFd, event_idx: bool) -> Self {
        match ptrs {
            RingPtrs::Split(ring) => {
                InstantBackend::Split(InstantDevice::new(ring, mem, call, event_idx))
            }
            RingPtrs::Packed(ring, at) => {
                InstantBackend::Packed(InstantPacked::new(ring, at, mem, call, event_idx))
            }
        }
    }

    /// For chains without a status byte (network transmit).
    pub fn without_status(self) -> Self {
        match self {
            InstantBackend::Split(d) => InstantBackend::Split(d.without_status()),
            InstantBackend::Packed(mut d) => {
                d.write_status = false;
                InstantBackend::Packed(d)
            }
        }
    }

    /// Completes everything available; returns how many chains.
    pub fn step(&mut self) -> Result<u16> {
        match self {
            InstantBackend::Split(d) => d.step(),
            InstantBackend::Packed(d) => d.step(),
        }
    }
}

#[derive(Debug)]
pub struct InstantDevice {
    ring: RawRing,
    mem: GuestMemoryMmap<()>,
    call: RawFd,
    next_avail: u16,
    next_used: u16,
    /// Write a zero status byte into the last descriptor (block); a transmit queue has none.
    write_status: bool,
    event_idx: bool,
}

// SAFETY: `ring` points into `mem`, which the device holds (a clone keeps the mappings alive).
unsafe impl Send for InstantDevice {}

impl InstantDevice {
    /// With `event_idx`, interrupts follow `used_event`; without, the driver's NO_INTERRUPT flag.
    pub fn new(ring: RawRing, mem: GuestMemoryMmap<()>, call: RawFd, event_idx: bool) -> Self {
        // Kicks are never needed (without EVENT_IDX: say so once with the flag).
        ring.used_flags()
            .store(USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        let next_avail = u16::from_le(ring.avail_idx().load(Ordering::Acquire));
        Self {
            ring,
            mem,
            call,
            next_avail,
            next_used: next_avail,
            write_status: true,
            event_idx,
        }
    }

    /// For chains without a status byte (network transmit).
    pub fn without_status(mut self) -> Self {
        self.write_status = false;
        self
    }

    /// Completes everything available; returns how many.
    pub fn step(&mut self) -> Result<u16> {
        let avail = u16::from_le(self.ring.avail_idx().load(Ordering::Acquire));
        if avail == self.next_avail {
            return Ok(0);
        }
        let old_used = self.next_used;
        let mut n = 0u16;
        while self.next_avail != avail {
            let head = u16::from_le(
                self.ring
                    .avail_slot(self.next_avail)
                    .load(Ordering::Relaxed),
            );
            self.next_avail = self.next_avail.wrapping_add(1);
            let (mut i, mut written, mut last) = (head, 0u32, 0u64);
            for _ in 0..self.ring.size {
                let (addr, len, flags, next) = self.ring.desc(i);
                if flags & DESC_F_WRITE != 0 {
                    written = written.saturating_add(len);
                }
                last = addr;
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                i = next;
            }
            if self.write_status {
                let status = self.mem.get_host_address(GuestAddress(last));
                ensure!(status.is_ok(), "status byte at {last:#x} is outside RAM");
                if let Ok(p) = status {
                    // SAFETY: a byte of guest RAM, which `self.mem` keeps mapped.
                    unsafe { std::ptr::write_volatile(p, 0) };
                }
            }
            self.ring
                .set_used_elem(self.next_used, u32::from(head), written);
            self.next_used = self.next_used.wrapping_add(1);
            n += 1;
        }
        self.ring
            .used_idx()
            .store(self.next_used.to_le(), Ordering::Release);
        // Kicks are never needed: keep avail_event just behind what was taken.
        self.ring
            .avail_event()
            .store(self.next_avail.wrapping_sub(1).to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let wanted = if self.event_idx {
            let event = u16::from_le(self.ring.used_event().load(Ordering::Relaxed));
            need_event(event, self.next_used, old_used)
        } else {
            u16::from_le(self.ring.avail_flags().load(Ordering::Relaxed)) & AVAIL_F_NO_INTERRUPT
                == 0
        };
        if wanted {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a valid u64 to the call eventfd.
            unsafe { libc::write(self.call, (&one as *const u64).cast(), 8) };
        }
        Ok(n)
    }
}

/// The instant device busy-polling on a thread of its own.
#[derive(Debug)]
pub struct InstantThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl InstantThread {
    /// Starts polling, pinned to `cpu` if given.
    pub fn spawn(mut dev: InstantBackend, cpu: Option<usize>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("instant-device".into())
            .spawn(move || -> Result<()> {
                if let Some(cpu) = cpu {
                    super::cpu::pin(super::cpu::gettid(), cpu)?;
                }
                while !stop2.load(Ordering::Relaxed) {
                    if dev.step()? == 0 {
                        std::hint::spin_loop();
                    }
                }
                Ok(())
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("instant device thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for InstantThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
