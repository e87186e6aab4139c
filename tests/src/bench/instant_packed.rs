//! The instant backend (`instant.rs`) on a packed ring: the yardstick for the lean drivers'
//! packed path. It takes every chain made available in the descriptor ring (walking it, as a
//! device reads it), writes the status byte and a used descriptor per chain at once, and
//! interrupts exactly when the driver event suppression area asks. Kicks are never needed: it
//! tells the driver so once, with DISABLE in the device area.

use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};

use anyhow::{ensure, Result};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};

use super::raw_packed::{event, wants_event, Pos, RawPacked};
use crate::frontend::packed::EVENT_F_DISABLE;
use crate::frontend::queue::{DESC_F_NEXT, DESC_F_WRITE};

#[derive(Debug)]
pub struct InstantPacked {
    ring: RawPacked,
    mem: GuestMemoryMmap<()>,
    call: RawFd,
    next_avail: Pos,
    next_used: Pos,
    pub(super) write_status: bool,
    event_idx: bool,
}

// SAFETY: `ring` points into `mem`, which the device holds (a clone keeps the mappings alive).
unsafe impl Send for InstantPacked {}

impl InstantPacked {
    /// Starts at `at`, where the driver stands with nothing in flight.
    pub fn new(
        ring: RawPacked,
        at: Pos,
        mem: GuestMemoryMmap<()>,
        call: RawFd,
        event_idx: bool,
    ) -> Self {
        ring.device_event()
            .store(event(0, EVENT_F_DISABLE), Ordering::Relaxed);
        Self {
            ring,
            mem,
            call,
            next_avail: at,
            next_used: at,
            write_status: true,
            event_idx,
        }
    }

    /// Completes everything available; returns how many chains.
    pub fn step(&mut self) -> Result<u16> {
        let size = self.ring.size;
        let (mut chains, mut slots) = (0u16, 0u32);
        loop {
            let head = self.next_avail;
            let mut flags = u16::from_le(self.ring.flags(head.slot).load(Ordering::Acquire));
            if !head.is_avail(flags) {
                break;
            }
            let (mut pos, mut taken, mut written) = (head, 0u16, 0u32);
            // The last descriptor's address (the status byte) and buffer id.
            let (mut last, mut id): (u64, u16);
            loop {
                // Written before the head's flags, which the acquire load above saw.
                let (addr, len, desc_id) = self.ring.desc(pos.slot);
                if flags & DESC_F_WRITE != 0 {
                    written = written.saturating_add(len);
                }
                (last, id) = (addr, desc_id);
                taken += 1;
                pos = pos.advance(1, size);
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                ensure!(
                    taken < size,
                    "a chain longer than the ring at slot {}",
                    head.slot
                );
                flags = u16::from_le(self.ring.flags(pos.slot).load(Ordering::Relaxed));
            }
            self.next_avail = pos;
            if self.write_status {
                // As the split instant device does it, so the two cost the same here.
                let status = self.mem.get_host_address(GuestAddress(last));
                ensure!(status.is_ok(), "status byte at {last:#x} is outside RAM");
                if let Ok(p) = status {
                    // SAFETY: a byte of guest RAM, which `self.mem` keeps mapped.
                    unsafe { std::ptr::write_volatile(p, 0) };
                }
            }
            // In order, so the used descriptor goes where the chain began; published at once
            // (its flags stored last, with release ordering).
            let at = self.next_used;
            self.ring.write_used(at.slot, id, written);
            let used = at.used_flags() | if written > 0 { DESC_F_WRITE } else { 0 };
            self.ring
                .flags(at.slot)
                .store(used.to_le(), Ordering::Release);
            self.next_used = at.advance(taken, size);
            chains = chains.wrapping_add(1);
            slots = slots.saturating_add(u32::from(taken));
        }
        if chains == 0 {
            return Ok(0);
        }
        // Order the flag stores before reading the driver's suppression state.
        fence(Ordering::SeqCst);
        let word = self.ring.driver_event().load(Ordering::Relaxed);
        let added = slots.min(u32::from(size)) as u16;
        if wants_event(word, self.event_idx, size, self.next_used, added) {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a valid u64 to the call eventfd.
            unsafe { libc::write(self.call, (&one as *const u64).cast(), 8) };
        }
        Ok(chains)
    }
}
