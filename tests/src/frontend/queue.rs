//! A virtqueue as a guest's virtio driver runs it, split or packed: chains in, completions out,
//! kicks and interrupt suppression (EVENT_IDX or flags). The ring layouts live in `split.rs` and
//! `packed.rs`; this is what device drivers and tests call, whichever layout the queue has.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packed::{PackedDriver, RawDesc};
use super::split::SplitDriver;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

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

/// Guest addresses of the three ring parts. Split: descriptor table, available ring, used ring.
/// Packed: descriptor ring, driver event suppression area (in `avail`: vhost-user sends it as
/// the available ring's address) and device event suppression area (in `used`).
#[derive(Debug, Clone, Copy)]
pub struct RingLayout {
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

impl RingLayout {
    /// Bytes a ring of `size` needs from `base` (4 KiB aligned parts), either layout: the split
    /// one's, which is never smaller than the packed one's, so queues sit at the same addresses
    /// whatever their layout.
    pub fn bytes(size: u16) -> u64 {
        let n = u64::from(size);
        align(16 * n) + align(6 + 2 * n) + align(6 + 8 * n)
    }

    /// Bytes of a packed ring of `size`: the descriptor ring and the two 4-byte areas.
    pub fn packed_bytes(size: u16) -> u64 {
        align(16 * u64::from(size)) + 2 * align(4)
    }

    /// A split ring at `base`.
    pub fn at(base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = GuestAddress(desc.0 + align(16 * n));
        let used = GuestAddress(avail.0 + align(6 + 2 * n));
        Self { desc, avail, used }
    }

    /// A packed ring at `base`.
    pub fn packed_at(base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + align(16 * u64::from(size)));
        let used = GuestAddress(avail.0 + align(4));
        Self { desc, avail, used }
    }
}

fn align(v: u64) -> u64 {
    v.div_ceil(4096) * 4096
}

/// A completed chain: its head descriptor (split) or buffer id (packed), and the bytes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// The virtio event index test (`vring_need_event`): has the index moved from `old` to `new`
/// past `event`? Both layouts decide kicks and interrupts with it.
pub(super) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[derive(Debug)]
enum Ring {
    Split(SplitDriver),
    Packed(PackedDriver),
}

/// One virtqueue's driver side. Indices (`avail_idx`, `used_idx`, `set_used_event`) count
/// chains on a split ring and ring slots on a packed one (where a chain takes one slot per
/// descriptor, an indirect chain one): both free-running u16, so differences work the same.
#[derive(Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub layout: RingLayout,
    pub event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
    ring: Ring,
    /// Kicks actually sent (the rest were suppressed by the device).
    pub kicks: u64,
}

impl DriverQueue {
    /// Zeroes a split ring in `mem` and sets up a queue of `size` at `layout`.
    pub fn new(
        mem: &GuestMemoryMmap<()>,
        size: u16,
        layout: RingLayout,
        event_idx: bool,
    ) -> Result<Self> {
        zero(mem, layout.desc, RingLayout::bytes(size))?;
        let ring = Ring::Split(SplitDriver::new(size, layout, event_idx));
        Self::with_ring(size, layout, event_idx, ring)
    }

    /// Zeroes a packed ring in `mem` (which leaves both event suppression areas at ENABLE) and
    /// sets up a queue of `size` at `layout` ([`RingLayout::packed_at`]).
    pub fn new_packed(
        mem: &GuestMemoryMmap<()>,
        size: u16,
        layout: RingLayout,
        event_idx: bool,
    ) -> Result<Self> {
        let ring = Ring::Packed(PackedDriver::new(size, layout, event_idx)?);
        zero(mem, layout.desc, RingLayout::packed_bytes(size))?;
        Self::with_ring(size, layout, event_idx, ring)
    }

    fn with_ring(size: u16, layout: RingLayout, event_idx: bool, ring: Ring) -> Result<Self> {
        Ok(Self {
            size,
            layout,
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            ring,
            kicks: 0,
        })
    }

    pub fn is_packed(&self) -> bool {
        matches!(self.ring, Ring::Packed(_))
    }

    /// Descriptors (split) or ring slots (packed) free for new chains.
    pub fn free_descriptors(&self) -> usize {
        match &self.ring {
            Ring::Split(r) => r.free_descriptors(),
            Ring::Packed(r) => r.free_descriptors(),
        }
    }

    /// Chains made available and not completed yet.
    pub fn in_flight(&self) -> usize {
        match &self.ring {
            Ring::Split(r) => r.in_flight(),
            Ring::Packed(r) => r.in_flight(),
        }
    }

    /// The available index (split) or the slots made available so far (packed), free-running:
    /// capture it before adding chains and hand it to [`notify`](Self::notify).
    pub fn avail_idx(&self) -> u16 {
        match &self.ring {
            Ring::Split(r) => r.avail_idx(),
            Ring::Packed(r) => r.avail_idx(),
        }
    }

    /// The used index (split) or used slots (packed) the driver has consumed.
    fn seen_used(&self) -> u16 {
        match &self.ring {
            Ring::Split(r) => r.last_used(),
            Ring::Packed(r) => r.last_used(),
        }
    }

    /// Writes a chain's descriptors and makes it available, though not yet visible to the
    /// device (see [`publish`](Self::publish)). Returns its head (split) or buffer id (packed),
    /// `None` if descriptors ran out.
    pub fn add(&mut self, mem: &GuestMemoryMmap<()>, bufs: &[Buf]) -> Result<Option<u16>> {
        match &mut self.ring {
            Ring::Split(r) => r.add(mem, bufs),
            Ring::Packed(r) => r.add(mem, bufs),
        }
    }

    /// Adds a chain made of one indirect descriptor pointing at a table at `table` (in guest RAM
    /// owned by the caller, at least 16 bytes per buffer).
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        table: GuestAddress,
        bufs: &[Buf],
    ) -> Result<Option<u16>> {
        match &mut self.ring {
            Ring::Split(r) => r.add_indirect(mem, table, bufs),
            Ring::Packed(r) => r.add_indirect(mem, table, bufs),
        }
    }

    fn split_only(&mut self, what: &str) -> Result<&mut SplitDriver> {
        match &mut self.ring {
            Ring::Split(r) => Ok(r),
            Ring::Packed(_) => bail!("{what} exists on split rings only"),
        }
    }

    /// Split only: writes descriptor `index` verbatim (for malformed chains).
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap<()>,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        match &self.ring {
            Ring::Split(r) => r.write_desc(mem, index, addr, len, flags, next),
            Ring::Packed(_) => bail!("write_desc exists on split rings only"),
        }
    }

    /// Packed only: adds a chain of descriptors with the flags given, however wrong (hostile
    /// tests), not yet published. Returns its buffer id, `None` if the ring is full.
    pub fn add_packed_raw(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        descs: &[RawDesc],
    ) -> Result<Option<u16>> {
        match &mut self.ring {
            Ring::Packed(r) => r.add_raw(mem, descs),
            Ring::Split(_) => bail!("add_packed_raw exists on packed rings only"),
        }
    }

    /// Split only: appends `head` to the available ring without publishing.
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap<()>, head: u16) -> Result<()> {
        self.split_only("push_avail")?.push_avail(mem, head)
    }

    /// Takes descriptors (split) or buffer ids (packed) out of the free list for good, without a
    /// chain in flight: a later completion naming them is an error (a test that must see a
    /// chain coming back twice keeps them from being reused for another chain).
    pub fn withhold(&mut self, ids: &[u16]) {
        match &mut self.ring {
            Ring::Split(r) => r.withhold(ids),
            Ring::Packed(r) => r.withhold(ids),
        }
    }

    /// Split only: takes descriptors out of the free list for a hand-made chain.
    pub fn reserve(&mut self, head: u16, ids: Vec<u16>) -> Result<()> {
        self.split_only("reserve")?.reserve(head, ids);
        Ok(())
    }

    /// Makes added chains visible to the device.
    pub fn publish(&mut self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        match &mut self.ring {
            Ring::Split(r) => r.publish(mem),
            Ring::Packed(r) => r.publish(mem),
        }
    }

    /// Split only: stores an arbitrary available index (hostile tests).
    pub fn publish_idx(&mut self, mem: &GuestMemoryMmap<()>, idx: u16) -> Result<()> {
        self.split_only("publish_idx")?.publish_idx(mem, idx)
    }

    /// Publishes and kicks the device unless it suppressed kicks. Returns whether it kicked.
    pub fn notify(&mut self, mem: &GuestMemoryMmap<()>, old_avail: u16) -> Result<bool> {
        self.publish(mem)?;
        fence(Ordering::SeqCst);
        let kick = match &self.ring {
            Ring::Split(r) => r.kick_needed(mem, old_avail)?,
            Ring::Packed(r) => r.kick_needed(mem, old_avail)?,
        };
        if kick {
            self.kick.write(1)?;
            self.kicks += 1;
        }
        Ok(kick)
    }

    /// Whether the device, as its kick suppression stands now, wants a kick once the driver
    /// makes `more` chains (split) or ring slots (packed) available.
    pub fn would_kick(&self, mem: &GuestMemoryMmap<()>, more: u16) -> Result<bool> {
        match &self.ring {
            Ring::Split(r) => r.would_kick(mem, more),
            Ring::Packed(r) => r.would_kick(mem, more),
        }
    }

    /// Publishes and always kicks.
    pub fn kick_now(&mut self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        self.publish(mem)?;
        self.kick.write(1)?;
        self.kicks += 1;
        Ok(())
    }

    /// The device's used index (split, read from the ring), or the used slots the driver has
    /// consumed (packed: the ring holds no index; positions are in [`base`](Self::base)).
    pub fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> Result<u16> {
        match &self.ring {
            Ring::Split(r) => r.used_idx(mem),
            Ring::Packed(r) => Ok(r.last_used()),
        }
    }

    /// The ring base (GET/SET_VRING_BASE encoding) a device stands at once it has taken every
    /// published chain and completed every one the driver has seen: the available index
    /// (split), or next avail and used positions with their wrap counters (packed).
    pub fn base(&self) -> u32 {
        match &self.ring {
            Ring::Split(r) => u32::from(r.avail_idx()),
            Ring::Packed(r) => r.base(),
        }
    }

    /// Takes one completion if there is one, returning its descriptors to the free list. An
    /// error if the device names a chain that is not in flight.
    pub fn poll(&mut self, mem: &GuestMemoryMmap<()>) -> Result<Option<Used>> {
        match &mut self.ring {
            Ring::Split(r) => r.poll(mem),
            Ring::Packed(r) => r.poll(mem),
        }
    }

    /// Asks for an interrupt after the next completion (EVENT_IDX) or at every completion.
    pub fn arm_interrupt(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        match &self.ring {
            Ring::Split(r) => r.arm_interrupt(mem),
            Ring::Packed(r) => r.arm_interrupt(mem),
        }
    }

    /// EVENT_IDX: asks for an interrupt once the used index (split) or used slot count (packed)
    /// passes `used_event`, i.e. with the completion that covers it.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap<()>, used_event: u16) -> Result<()> {
        match &self.ring {
            Ring::Split(r) => r.set_used_event(mem, used_event),
            Ring::Packed(r) => r.set_used_event(mem, used_event),
        }
    }

    /// Tells the device not to interrupt (polling driver).
    pub fn suppress_interrupts(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        match &self.ring {
            Ring::Split(r) => r.suppress_interrupts(mem),
            Ring::Packed(r) => r.suppress_interrupts(mem),
        }
    }

    /// Waits for the next completion: polls, then sleeps on the call eventfd.
    pub fn wait(&mut self, mem: &GuestMemoryMmap<()>, timeout: Duration) -> Result<Used> {
        self.wait_after(mem, timeout, 0)
    }

    /// Like [`wait`](Self::wait), but with EVENT_IDX asks for the interrupt only after `later`
    /// more completions (split) or slots (packed; Linux's `virtqueue_enable_cb_delayed` for
    /// transmit queues), so that a busy device interrupts once per batch rather than per chain.
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
                self.set_used_event(mem, self.seen_used().wrapping_add(later))?;
            } else {
                self.arm_interrupt(mem)?;
            }
            if let Some(u) = self.poll(mem)? {
                return Ok(u);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no completion within {timeout:?} (used idx {}, last seen {}, {} in flight)",
                    self.used_idx(mem)?,
                    self.seen_used(),
                    self.in_flight()
                );
            }
            wait_readable(self.call.as_raw_fd(), left)?;
            let _ = self.call.read();
        }
    }
}

fn zero(mem: &GuestMemoryMmap<()>, at: GuestAddress, bytes: u64) -> Result<()> {
    let zero = vec![0u8; usize::try_from(bytes)?];
    mem.write_slice(&zero, at).context("zeroing the ring")
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
