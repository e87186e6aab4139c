//! The driver side of a split virtqueue, as a guest's virtio driver runs it: descriptors, the
//! available ring, the used ring, kick and interrupt suppression (EVENT_IDX or flags).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// Guest addresses of the three ring parts.
#[derive(Debug, Clone, Copy)]
pub struct RingLayout {
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl RingLayout {
    /// Bytes a ring of `size` needs from `base` (4 KiB aligned parts).
    pub fn bytes(size: u16) -> u64 {
        let n = u64::from(size);
        align(16 * n) + align(6 + 2 * n) + align(6 + 8 * n)
    }

    pub fn at(base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = GuestAddress(desc.0 + align(16 * n));
        let used = GuestAddress(avail.0 + align(6 + 2 * n));
        Self { desc, avail, used }
    }
}

fn align(v: u64) -> u64 {
    v.div_ceil(4096) * 4096
}

/// A completed chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

#[derive(Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub layout: RingLayout,
    pub event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    /// Kicks actually sent (the rest were suppressed by the device).
    pub kicks: u64,
}

impl DriverQueue {
    /// Zeroes the ring in `mem` and sets up a queue of `size` at `layout`.
    pub fn new(
        mem: &GuestMemoryMmap<()>,
        size: u16,
        layout: RingLayout,
        event_idx: bool,
    ) -> Result<Self> {
        let zero = vec![0u8; RingLayout::bytes(size) as usize];
        mem.write_slice(&zero, layout.desc)
            .context("zeroing the ring")?;
        Ok(Self {
            size,
            layout,
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            kicks: 0,
        })
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    pub fn in_flight(&self) -> usize {
        self.chains.len()
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes a chain's descriptors and puts its head on the available ring (not yet visible to
    /// the device: see [`publish`](Self::publish)). `None` if descriptors ran out.
    pub fn add(&mut self, mem: &GuestMemoryMmap<()>, bufs: &[Buf]) -> Result<Option<u16>> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Ok(None);
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (b, id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(i + 1).copied();
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(mem, *id, b.addr.0, b.len, flags, next.unwrap_or(0))?;
        }
        let head = ids[0];
        self.chains.insert(head, ids);
        self.push_avail(mem, head)?;
        Ok(Some(head))
    }

    /// Adds a chain made of one indirect descriptor pointing at a table at `table` (in guest RAM
    /// owned by the caller, at least 16 bytes per buffer).
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        table: GuestAddress,
        bufs: &[Buf],
    ) -> Result<Option<u16>> {
        let Some(id) = self.free.pop() else {
            return Ok(None);
        };
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let next = if i + 1 < bufs.len() {
                (i + 1) as u16
            } else {
                0
            };
            write_raw_desc(mem, table, i as u16, b.addr.0, b.len, flags, next)?;
        }
        self.write_desc(
            mem,
            id,
            table.0,
            u32::try_from(bufs.len() * 16)?,
            DESC_F_INDIRECT,
            0,
        )?;
        self.chains.insert(id, vec![id]);
        self.push_avail(mem, id)?;
        Ok(Some(id))
    }

    /// Writes descriptor `index` verbatim (for malformed chains).
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap<()>,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        write_raw_desc(mem, self.layout.desc, index, addr, len, flags, next)
    }

    /// Appends `head` to the available ring without publishing.
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap<()>, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(
            head.to_le(),
            GuestAddress(self.layout.avail.0 + 4 + 2 * slot),
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Takes descriptors out of the free list for good, without a chain in flight: a later
    /// completion naming them is an error (a test that must see a chain coming back twice keeps
    /// its descriptors from being reused for another chain).
    pub fn withhold(&mut self, ids: &[u16]) {
        self.free.retain(|f| !ids.contains(f));
    }

    /// Takes descriptors out of the free list for a hand-made chain.
    pub fn reserve(&mut self, head: u16, ids: Vec<u16>) {
        self.free.retain(|f| !ids.contains(f));
        self.chains.insert(head, ids);
    }

    /// Makes added chains visible to the device.
    pub fn publish(&mut self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        self.publish_idx(mem, self.avail_idx)
    }

    /// Stores an arbitrary available index (hostile tests).
    pub fn publish_idx(&mut self, mem: &GuestMemoryMmap<()>, idx: u16) -> Result<()> {
        fence(Ordering::SeqCst);
        mem.store(
            idx.to_le(),
            GuestAddress(self.layout.avail.0 + 2),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Publishes and kicks the device unless it suppressed kicks. Returns whether it kicked.
    pub fn notify(&mut self, mem: &GuestMemoryMmap<()>, old_avail: u16) -> Result<bool> {
        self.publish(mem)?;
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let at = GuestAddress(self.layout.used.0 + 4 + 8 * u64::from(self.size));
            let avail_event: u16 = mem.load(at, Ordering::Relaxed)?;
            let new = self.avail_idx;
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old_avail)
        } else {
            let flags: u16 = mem.load(self.layout.used, Ordering::Relaxed)?;
            flags & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kick.write(1)?;
            self.kicks += 1;
        }
        Ok(kick)
    }

    /// Publishes and always kicks.
    pub fn kick_now(&mut self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        self.publish(mem)?;
        self.kick.write(1)?;
        self.kicks += 1;
        Ok(())
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> Result<u16> {
        Ok(u16::from_le(mem.load(
            GuestAddress(self.layout.used.0 + 2),
            Ordering::Acquire,
        )?))
    }

    /// Takes one completion if there is one, returning its descriptors to the free list.
    pub fn poll(&mut self, mem: &GuestMemoryMmap<()>) -> Result<Option<Used>> {
        if self.used_idx(mem)? == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let at = GuestAddress(self.layout.used.0 + 4 + 8 * slot);
        let id: u32 = mem.read_obj(at)?;
        let len: u32 = mem.read_obj(GuestAddress(at.0 + 4))?;
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id).with_context(|| format!("used id {id} out of range"))?;
        match self.chains.remove(&head) {
            Some(ids) => self.free.extend(ids),
            None => bail!("device completed head {head}, which is not in flight"),
        }
        Ok(Some(Used { head, len }))
    }

    /// Asks for an interrupt after the next completion (EVENT_IDX) or at every completion.
    pub fn arm_interrupt(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        if self.event_idx {
            let at = GuestAddress(self.layout.avail.0 + 4 + 2 * u64::from(self.size));
            mem.store(self.last_used.to_le(), at, Ordering::Release)?;
        } else {
            mem.store(0u16, self.layout.avail, Ordering::Release)?;
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// EVENT_IDX: asks for an interrupt once the used index passes `used_event`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap<()>, used_event: u16) -> Result<()> {
        let at = GuestAddress(self.layout.avail.0 + 4 + 2 * u64::from(self.size));
        mem.store(used_event.to_le(), at, Ordering::Release)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Tells the device not to interrupt (polling driver).
    pub fn suppress_interrupts(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        if !self.event_idx {
            mem.store(
                AVAIL_F_NO_INTERRUPT.to_le(),
                self.layout.avail,
                Ordering::Release,
            )?;
        } else {
            let at = GuestAddress(self.layout.avail.0 + 4 + 2 * u64::from(self.size));
            mem.store(
                self.last_used.wrapping_sub(1).to_le(),
                at,
                Ordering::Release,
            )?;
        }
        Ok(())
    }

    /// Waits for the next completion: polls, then sleeps on the call eventfd.
    pub fn wait(&mut self, mem: &GuestMemoryMmap<()>, timeout: Duration) -> Result<Used> {
        self.wait_after(mem, timeout, 0)
    }

    /// Like [`wait`](Self::wait), but with EVENT_IDX asks for the interrupt only after `later`
    /// more completions (Linux's `virtqueue_enable_cb_delayed` for transmit queues), so that a
    /// busy device interrupts once per batch rather than per chain.
    pub fn wait_after(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        timeout: Duration,
        later: u16,
    ) -> Result<Used> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.poll(mem)? {
                return Ok(u);
            }
            if self.event_idx && later > 0 {
                self.set_used_event(mem, self.last_used.wrapping_add(later))?;
            } else {
                self.arm_interrupt(mem)?;
            }
            if let Some(u) = self.poll(mem)? {
                return Ok(u);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no completion within {timeout:?} (used idx {}, last seen {})",
                    self.used_idx(mem)?,
                    self.last_used
                );
            }
            wait_readable(self.call.as_raw_fd(), left)?;
            let _ = self.call.read();
        }
    }
}

fn write_raw_desc(
    mem: &GuestMemoryMmap<()>,
    table: GuestAddress,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<()> {
    let at = GuestAddress(table.0 + 16 * u64::from(index));
    mem.write_obj(addr.to_le(), at)?;
    mem.write_obj(len.to_le(), GuestAddress(at.0 + 8))?;
    mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))?;
    mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))?;
    Ok(())
}

/// Waits until `fd` is readable or `timeout` passes.
pub fn wait_readable(fd: i32, timeout: Duration) -> Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e.into());
    }
    Ok(n > 0)
}

/// Borrows an eventfd's descriptor for sending it to the backend.
pub fn borrow(e: &EventFd) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the descriptor stays open as long as `e`, which the borrow cannot outlive.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(e.as_raw_fd()) }
}
