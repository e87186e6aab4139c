//! The harness's block driver: a virtio-blk driver as lean as Linux's, so that what the harness
//! measures is the backend and not itself.
//!
//! Like Linux's virtio_blk + virtio_ring with EVENT_IDX: every request slot owns three fixed
//! descriptors (header, data, status) written once at start, so submitting a request writes the
//! sector, the status byte and one available-ring entry; the available index is published once per
//! batch and the device is kicked only when its `avail_event` asks; completions are reaped from the
//! used ring after an interrupt (the call eventfd, waited on with edge-triggered epoll: one system
//! call per interrupt), re-arming `used_event` and re-checking before sleeping. Nothing is
//! allocated per request; latency goes into a histogram; the clock is read once per batch.
//!
//! It validates what the device does (every used id names a request in flight, the status is OK)
//! so a backend that completes a request twice or loses one fails the run.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};

use super::histogram::Histogram;
use crate::frontend::device::data_base;
use crate::frontend::queue::{DESC_F_NEXT, DESC_F_WRITE};
use crate::frontend::Rings;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const STATUS_UNTOUCHED: u8 = 0xff;
const DESCS_PER_REQUEST: u16 = 3;
/// Bytes of guest RAM before a slot's data buffer: header at 0, status at 16.
const SLOT_HEADER: u64 = 4096;

/// How the driver learns about completions.
pub enum Completions<'a> {
    /// Sleep on the call eventfd when nothing is ready (a guest's interrupt).
    Interrupt,
    /// Nothing notifies: call this to let the device run (in-process direct placement).
    Inline(&'a mut dyn FnMut() -> Result<()>),
}

impl std::fmt::Debug for Completions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completions::Interrupt => f.write_str("Interrupt"),
            Completions::Inline(_) => f.write_str("Inline"),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ops: u64,
    pub elapsed: Duration,
    pub latency: Histogram,
    /// CPU time of the driver's own thread.
    pub driver_cpu: Duration,
    /// Kicks sent and interrupts waited for.
    pub kicks: u64,
    pub interrupts: u64,
}

/// Host pointers to one split ring's parts.
#[derive(Debug, Clone, Copy)]
pub struct RawRing {
    pub size: u16,
    pub desc: *mut u8,
    pub avail: *mut u8,
    pub used: *mut u8,
}

// SAFETY: the pointers point into guest RAM that outlives every user (the driver owns the
// mapping; the instant backend's thread is joined before the driver is dropped).
unsafe impl Send for RawRing {}

/// Reads a `T` at byte `off` of guest RAM mapped at `base`.
fn read_at<T: Copy>(base: *mut u8, off: usize) -> T {
    let p = base.wrapping_add(off).cast::<T>();
    // SAFETY: callers pass offsets of naturally aligned ring fields inside guest RAM, which
    // outlives the driver (see `RawRing`).
    unsafe { std::ptr::read_volatile(p) }
}

/// Writes a `T` at byte `off` of guest RAM mapped at `base`.
fn write_at<T: Copy>(base: *mut u8, off: usize, v: T) {
    let p = base.wrapping_add(off).cast::<T>();
    // SAFETY: as in `read_at`.
    unsafe { std::ptr::write_volatile(p, v) }
}

/// A shared 16-bit ring field at byte `off` of `base`.
fn u16_at(base: *mut u8, off: usize) -> &'static AtomicU16 {
    let p = base.wrapping_add(off).cast::<AtomicU16>();
    // SAFETY: ring fields are 2-byte aligned (the layout aligns every part to 4 KiB and fields
    // to their size) and lie inside guest RAM, which outlives the driver.
    unsafe { &*p }
}

impl RawRing {
    /// `avail->idx`
    pub fn avail_idx(&self) -> &AtomicU16 {
        u16_at(self.avail, 2)
    }
    /// `avail->ring[i]`
    pub fn avail_slot(&self, i: u16) -> &AtomicU16 {
        u16_at(self.avail, 4 + 2 * usize::from(i % self.size))
    }
    /// `used_event` (after the available ring's entries).
    pub fn used_event(&self) -> &AtomicU16 {
        u16_at(self.avail, 4 + 2 * usize::from(self.size))
    }
    /// `used->idx`
    pub fn used_idx(&self) -> &AtomicU16 {
        u16_at(self.used, 2)
    }
    /// `avail_event` (after the used ring's entries).
    pub fn avail_event(&self) -> &AtomicU16 {
        u16_at(self.used, 4 + 8 * usize::from(self.size))
    }
    /// Reads used element `i`: (id, len). The device wrote it before the release store of
    /// used->idx that the caller acquired.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let v = u64::from_le(read_at(self.used, 4 + 8 * usize::from(i % self.size)));
        (v as u32, (v >> 32) as u32)
    }
    /// Writes used element `i`.
    pub fn set_used_elem(&self, i: u16, id: u32, len: u32) {
        let v = (u64::from(len) << 32 | u64::from(id)).to_le();
        write_at(self.used, 4 + 8 * usize::from(i % self.size), v);
    }
    /// Reads descriptor `i`: (addr, len, flags, next).
    pub fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
        let at = 16 * usize::from(i % self.size);
        (
            u64::from_le(read_at(self.desc, at)),
            u32::from_le(read_at(self.desc, at + 8)),
            u16::from_le(read_at(self.desc, at + 12)),
            u16::from_le(read_at(self.desc, at + 14)),
        )
    }
    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = 16 * usize::from(i % self.size);
        write_at(self.desc, at, addr.to_le());
        write_at(self.desc, at + 8, len.to_le());
        write_at(self.desc, at + 12, flags.to_le());
        write_at(self.desc, at + 14, next.to_le());
    }
}

/// `vring_need_event`: whether moving an index from `old` to `new` passes `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One request slot's guest buffers, as host pointers.
#[derive(Debug, Clone, Copy)]
struct Slot {
    header: *mut u8,
    status: *mut u8,
}

#[derive(Debug)]
pub struct LeanBlk<R: Rings> {
    pub rings: R,
    ring: RawRing,
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: Vec<bool>,
    submitted_at: Vec<u64>,
    avail_idx: u16,
    last_used: u16,
    kick: RawFd,
    epoll: vmm_sys_util::epoll::Epoll,
    depth: u16,
    block: u32,
    write: bool,
    sectors: u64,
    rng: u64,
    clock: Instant,
}

fn host(mem: &GuestMemoryMmap<()>, addr: GuestAddress, len: usize) -> Result<*mut u8> {
    let slice = mem
        .get_slice(addr, len)
        .with_context(|| format!("guest address {:#x} (+{len}) is not in RAM", addr.0))?;
    Ok(slice.ptr_guard_mut().as_ptr())
}

impl<R: Rings> LeanBlk<R> {
    /// Sets up `depth` requests of `block` bytes on queue 0 of `rings`, spread over `capacity`
    /// bytes of disk. The ring must be fresh (nothing in flight).
    pub fn new(rings: R, depth: u16, block: u32, capacity: u64, write: bool) -> Result<Self> {
        let size = rings.setup().queue_size;
        ensure!(
            depth >= 1 && u32::from(depth) * u32::from(DESCS_PER_REQUEST) <= u32::from(size),
            "queue of {size} cannot hold {depth} requests of three descriptors"
        );
        let mut rings = rings;
        let base = data_base(rings.setup());
        let stride = SLOT_HEADER + u64::from(block).div_ceil(4096) * 4096;
        let (mem, q) = rings.mem_and_queue(0);
        let layout = q.layout;
        let bytes = crate::frontend::RingLayout::bytes(size) as usize;
        let ring = RawRing {
            size,
            desc: host(mem, layout.desc, bytes)?,
            avail: host(mem, layout.avail, 6 + 2 * usize::from(size))?,
            used: host(mem, layout.used, 6 + 8 * usize::from(size))?,
        };
        let mut slots = Vec::new();
        for i in 0..depth {
            let at = GuestAddress(base.0 + u64::from(i) * stride);
            let data = GuestAddress(at.0 + SLOT_HEADER);
            let d = i * DESCS_PER_REQUEST;
            let data_flags = if write { 0 } else { DESC_F_WRITE };
            ring.write_desc(d, at.0, 16, DESC_F_NEXT, d + 1);
            ring.write_desc(d + 1, data.0, block, data_flags | DESC_F_NEXT, d + 2);
            ring.write_desc(d + 2, at.0 + 16, 1, DESC_F_WRITE, 0);
            let header = host(mem, at, 17)?;
            host(mem, data, block as usize)?;
            let kind = if write { T_OUT } else { T_IN };
            // The header lies in guest RAM (checked above): 16 bytes, 4-byte aligned.
            write_at(header, 0, kind.to_le());
            write_at(header, 4, 0u32);
            slots.push(Slot {
                header,
                status: header.wrapping_add(16),
            });
        }
        let kick = q.kick.as_raw_fd();
        let epoll = vmm_sys_util::epoll::Epoll::new()?;
        epoll.ctl(
            vmm_sys_util::epoll::ControlOperation::Add,
            q.call.as_raw_fd(),
            vmm_sys_util::epoll::EpollEvent::new(
                vmm_sys_util::epoll::EventSet::IN | vmm_sys_util::epoll::EventSet::EDGE_TRIGGERED,
                0,
            ),
        )?;
        let avail_idx = ring.avail_idx().load(Ordering::Acquire);
        let last_used = ring.used_idx().load(Ordering::Acquire);
        ensure!(avail_idx == last_used, "ring has requests in flight");
        Ok(Self {
            rings,
            ring,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: vec![false; usize::from(depth)],
            submitted_at: vec![0; usize::from(depth)],
            avail_idx,
            last_used,
            kick,
            epoll,
            depth,
            block,
            write,
            sectors: (capacity / u64::from(block)).max(1),
            rng: 0x2545_f491_4f6c_dd1d,
            clock: Instant::now(),
        })
    }

    pub fn ring(&self) -> RawRing {
        self.ring
    }

    fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    fn next_sector(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % self.sectors) * u64::from(self.block) / 512
    }

    /// Puts every free slot on the available ring, publishes and kicks if the device asks.
    fn submit_all(&mut self, kicks: &mut u64) -> Result<()> {
        if self.free.is_empty() {
            return Ok(());
        }
        let now = self.now_ns();
        let old = self.avail_idx;
        while let Some(slot) = self.free.pop() {
            let sector = self.next_sector();
            let s = self.slots[usize::from(slot)];
            // The slot's header and status lie in guest RAM (checked in `new`); the device does
            // not touch them while the slot is free.
            write_at(s.header, 8, sector.to_le());
            write_at(s.status, 0, STATUS_UNTOUCHED);
            self.in_flight[usize::from(slot)] = true;
            self.submitted_at[usize::from(slot)] = now;
            self.ring
                .avail_slot(self.avail_idx)
                .store((slot * DESCS_PER_REQUEST).to_le(), Ordering::Relaxed);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.ring
            .avail_idx()
            .store(self.avail_idx.to_le(), Ordering::Release);
        // Order the index store before reading the device's suppression state (virtio_mb).
        fence(Ordering::SeqCst);
        let event = u16::from_le(self.ring.avail_event().load(Ordering::Relaxed));
        if need_event(event, self.avail_idx, old) {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a valid u64 to the kick eventfd.
            let n = unsafe { libc::write(self.kick, (&one as *const u64).cast(), 8) };
            ensure!(n == 8, "kick: {}", std::io::Error::last_os_error());
            *kicks += 1;
        }
        Ok(())
    }

    /// Reaps every published completion; returns how many.
    fn reap(&mut self, lat: &mut Histogram) -> Result<u64> {
        let used = u16::from_le(self.ring.used_idx().load(Ordering::Acquire));
        if used == self.last_used {
            return Ok(0);
        }
        let now = self.now_ns();
        let mut n = 0;
        while self.last_used != used {
            let (id, len) = self.ring.used_elem(self.last_used);
            self.last_used = self.last_used.wrapping_add(1);
            let slot = id / u32::from(DESCS_PER_REQUEST);
            ensure!(
                id % u32::from(DESCS_PER_REQUEST) == 0
                    && slot < u32::from(self.depth)
                    && self.in_flight[slot as usize],
                "device completed id {id}, which is not in flight"
            );
            let slot = slot as u16;
            let s = self.slots[usize::from(slot)];
            // The status byte lies in guest RAM; the device wrote it before publishing.
            let status: u8 = read_at(s.status, 0);
            ensure!(status == 0, "request failed with status {status}");
            let expect = if self.write { 1 } else { self.block + 1 };
            ensure!(
                len == expect || len == 0 || len == 1,
                "used length {len} (expected {expect})"
            );
            self.in_flight[usize::from(slot)] = false;
            self.free.push(slot);
            lat.record_n(now.saturating_sub(self.submitted_at[usize::from(slot)]), 1);
            n += 1;
        }
        Ok(n)
    }

    /// Keeps `depth` requests in flight for `duration`, then lets every request finish.
    pub fn run(&mut self, duration: Duration, mut how: Completions<'_>) -> Result<Sample> {
        let mut lat = Histogram::new();
        let (mut ops, mut kicks, mut interrupts) = (0u64, 0u64, 0u64);
        let cpu0 = thread_cpu();
        let begin = Instant::now();
        let end = begin + duration;
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 1];
        let mut submitting = true;
        loop {
            if submitting {
                self.submit_all(&mut kicks)?;
            }
            loop {
                let n = self.reap(&mut lat)?;
                if n > 0 {
                    ops += n;
                    break;
                }
                if self.free.len() == usize::from(self.depth) {
                    break;
                }
                match &mut how {
                    Completions::Inline(device) => device()?,
                    Completions::Interrupt => {
                        // Re-arm, then look once more before sleeping (virtqueue_enable_cb).
                        self.ring
                            .used_event()
                            .store(self.last_used.to_le(), Ordering::Relaxed);
                        fence(Ordering::SeqCst);
                        if u16::from_le(self.ring.used_idx().load(Ordering::Acquire))
                            != self.last_used
                        {
                            continue;
                        }
                        let n = match self.epoll.wait(10_000, &mut events) {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e.into()),
                        };
                        if n == 0 {
                            bail!(
                                "no interrupt within 10 s ({} in flight, used {}, avail {})",
                                usize::from(self.depth) - self.free.len(),
                                self.last_used,
                                self.avail_idx
                            );
                        }
                        interrupts += 1;
                    }
                }
            }
            if submitting && Instant::now() >= end {
                submitting = false;
            }
            if !submitting && self.free.len() == usize::from(self.depth) {
                break;
            }
        }
        let elapsed = begin.elapsed();
        Ok(Sample {
            ops,
            elapsed,
            latency: lat,
            driver_cpu: thread_cpu().saturating_sub(cpu0),
            kicks,
            interrupts,
        })
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the calling thread's CPU clock.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
