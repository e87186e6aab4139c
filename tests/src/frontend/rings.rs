//! Guest RAM and driver-side rings, whoever serves them: a vhost-user backend ([`Frontend`]) or
//! device code in this very process ([`LocalRings`], for the harness's in-process placements).
//! Device drivers ([`BlkDriver`](super::BlkDriver), [`NetDriver`](super::NetDriver)) work on
//! either.

use anyhow::Result;
use vm_memory::GuestMemoryMmap;

use super::device::{driver_queues, Frontend, Setup};
use super::queue::DriverQueue;
use super::ram::GuestRam;

pub trait Rings {
    fn ram(&self) -> &GuestRam;
    fn setup(&self) -> &Setup;
    /// Negotiated virtio features.
    fn acked(&self) -> u64;
    fn queue(&mut self, q: u16) -> &mut DriverQueue;
    /// Splits borrows: the guest memory and one queue.
    fn mem_and_queue(&mut self, q: u16) -> (&GuestMemoryMmap<()>, &mut DriverQueue);
    fn has(&self, bit: u32) -> bool {
        self.acked() & (1 << bit) != 0
    }
}

impl Rings for Frontend {
    fn ram(&self) -> &GuestRam {
        &self.ram
    }
    fn setup(&self) -> &Setup {
        &self.setup
    }
    fn acked(&self) -> u64 {
        self.acked
    }
    fn queue(&mut self, q: u16) -> &mut DriverQueue {
        &mut self.queues[usize::from(q)]
    }
    fn mem_and_queue(&mut self, q: u16) -> (&GuestMemoryMmap<()>, &mut DriverQueue) {
        (self.ram.mem(), &mut self.queues[usize::from(q)])
    }
}

/// Rings laid out as [`Frontend`] lays them out, served by device code in this process.
#[derive(Debug)]
pub struct LocalRings {
    pub ram: GuestRam,
    pub queues: Vec<DriverQueue>,
    pub setup: Setup,
    /// The features the in-process device runs with.
    pub features: u64,
}

impl LocalRings {
    pub fn new(setup: Setup, features: u64) -> Result<Self> {
        let ram = GuestRam::with_layout(&setup.ram_layout)?;
        // Split or packed as `setup.packed` says: the in-process device must be told the same.
        let queues = driver_queues(ram.mem(), &setup)?;
        Ok(Self {
            ram,
            queues,
            setup,
            features,
        })
    }
}

impl Rings for LocalRings {
    fn ram(&self) -> &GuestRam {
        &self.ram
    }
    fn setup(&self) -> &Setup {
        &self.setup
    }
    fn acked(&self) -> u64 {
        self.features
    }
    fn queue(&mut self, q: u16) -> &mut DriverQueue {
        &mut self.queues[usize::from(q)]
    }
    fn mem_and_queue(&mut self, q: u16) -> (&GuestMemoryMmap<()>, &mut DriverQueue) {
        (self.ram.mem(), &mut self.queues[usize::from(q)])
    }
}
