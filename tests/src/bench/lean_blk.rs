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
//! On a packed ring (VIRTIO_F_RING_PACKED) the same three descriptors are written into the
//! descriptor ring for each request, as a packed ring needs (`lean_packed.rs`); everything else
//! is the same driver.
//!
//! It validates what the device does (every used id names a request in flight, the status is OK)
//! so a backend that completes a request twice or loses one fails the run.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use vm_memory::GuestAddress;

use super::histogram::Histogram;
use super::lean_ring::{LeanRing, RingPtrs, Seg};
pub use super::raw_ring::thread_cpu;
use super::raw_ring::{host, read_at, write_at};
use crate::frontend::device::data_base;
use crate::frontend::Rings;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const STATUS_UNTOUCHED: u8 = 0xff;
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

/// One request slot's guest buffers, as host pointers.
#[derive(Debug, Clone, Copy)]
struct Slot {
    header: *mut u8,
    status: *mut u8,
}

#[derive(Debug)]
pub struct LeanBlk<R: Rings> {
    pub rings: R,
    ring: LeanRing,
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: Vec<bool>,
    submitted_at: Vec<u64>,
    depth: u16,
    block: u32,
    write: bool,
    sectors: u64,
    rng: u64,
    clock: Instant,
}

impl<R: Rings> LeanBlk<R> {
    /// Sets up `depth` requests of `block` bytes on queue 0 of `rings` (split or packed), spread
    /// over `capacity` bytes of disk. The ring must be fresh (nothing in flight).
    pub fn new(rings: R, depth: u16, block: u32, capacity: u64, write: bool) -> Result<Self> {
        let size = rings.setup().queue_size;
        ensure!(
            depth >= 1 && u32::from(depth) * 3 <= u32::from(size),
            "queue of {size} cannot hold {depth} requests of three descriptors"
        );
        let mut rings = rings;
        let base = data_base(rings.setup());
        let stride = SLOT_HEADER + u64::from(block).div_ceil(4096) * 4096;
        let mut slots = Vec::new();
        let mut chains = Vec::new();
        for i in 0..depth {
            let at = GuestAddress(base.0 + u64::from(i) * stride);
            let data = GuestAddress(at.0 + SLOT_HEADER);
            // Header, data, status: what each request's chain is, on either layout.
            chains.push(vec![
                Seg {
                    addr: at.0,
                    len: 16,
                    write: false,
                },
                Seg {
                    addr: data.0,
                    len: block,
                    write: !write,
                },
                Seg {
                    addr: at.0 + 16,
                    len: 1,
                    write: true,
                },
            ]);
            let mem = rings.ram().mem();
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
        let ring = LeanRing::new(&mut rings, 0, &chains)?;
        Ok(Self {
            rings,
            ring,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: vec![false; usize::from(depth)],
            submitted_at: vec![0; usize::from(depth)],
            depth,
            block,
            write,
            sectors: (capacity / u64::from(block)).max(1),
            rng: 0x2545_f491_4f6c_dd1d,
            clock: Instant::now(),
        })
    }

    /// The ring, for a device in this process (taken before the first run).
    pub fn ring_ptrs(&self) -> RingPtrs {
        self.ring.ptrs()
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

    /// Makes every free slot available, publishes and kicks if the device asks.
    fn submit_all(&mut self, kicks: &mut u64) -> Result<()> {
        if self.free.is_empty() {
            return Ok(());
        }
        let now = self.now_ns();
        let mark = self.ring.mark();
        // As Linux's virtqueue_add: each request is published as it is added (the device may
        // start on it at once); the kick decision waits for the end of the batch.
        while let Some(slot) = self.free.pop() {
            let sector = self.next_sector();
            let s = self.slots[usize::from(slot)];
            // The slot's header and status lie in guest RAM (checked in `new`); the device does
            // not touch them while the slot is free.
            write_at(s.header, 8, sector.to_le());
            write_at(s.status, 0, STATUS_UNTOUCHED);
            self.in_flight[usize::from(slot)] = true;
            self.submitted_at[usize::from(slot)] = now;
            self.ring.push(slot);
        }
        self.ring.publish(mark, kicks)
    }

    /// Reaps every published completion; returns how many.
    fn reap(&mut self, lat: &mut Histogram) -> Result<u64> {
        let Self {
            ring,
            slots,
            free,
            in_flight,
            submitted_at,
            depth,
            block,
            write,
            clock,
            ..
        } = self;
        let done = ring.reap()?;
        if done.is_empty() {
            return Ok(0);
        }
        // The clock is read once per batch.
        let now = clock.elapsed().as_nanos() as u64;
        let expect = if *write { 1 } else { *block + 1 };
        for &(slot, len) in done {
            ensure!(
                slot < *depth && in_flight[usize::from(slot)],
                "device completed request {slot}, which is not in flight"
            );
            // The status byte lies in guest RAM; the device wrote it before publishing.
            let status: u8 = read_at(slots[usize::from(slot)].status, 0);
            ensure!(status == 0, "request failed with status {status}");
            ensure!(
                len == expect || len == 0 || len == 1,
                "used length {len} (expected {expect})"
            );
            in_flight[usize::from(slot)] = false;
            free.push(slot);
            lat.record_n(now.saturating_sub(submitted_at[usize::from(slot)]), 1);
        }
        Ok(done.len() as u64)
    }

    /// Keeps `depth` requests in flight for `duration`, then lets every request finish.
    pub fn run(&mut self, duration: Duration, mut how: Completions<'_>) -> Result<Sample> {
        let mut lat = Histogram::new();
        let (mut ops, mut kicks, mut interrupts) = (0u64, 0u64, 0u64);
        let cpu0 = thread_cpu();
        let begin = Instant::now();
        let end = begin + duration;
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
                        // Re-arm, then look once more before sleeping (virtqueue_enable_cb);
                        // awake, no more interrupts until the next re-arm (virtblk_done).
                        if self.ring.arm(0) {
                            self.ring.disable();
                            continue;
                        }
                        if !self.ring.wait(10_000)? {
                            bail!(
                                "no interrupt within 10 s ({} in flight; {})",
                                usize::from(self.depth) - self.free.len(),
                                self.ring.state()
                            );
                        }
                        self.ring.disable();
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
