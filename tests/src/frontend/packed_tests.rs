//! The packed driver against a minimal device written from the spec (2.8.21), in one process:
//! chains across many wraps, out-of-order completions, indirect tables, kick decisions and the
//! ring base.

use std::sync::atomic::Ordering;

use anyhow::Result;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::packed::{DESC_F_AVAIL, DESC_F_USED, EVENT_F_DESC, EVENT_F_DISABLE, EVENT_F_ENABLE};
use super::queue::{Buf, DriverQueue, RingLayout, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

const SIZE: u16 = 8;

/// The device side, as little as the tests need: takes chains at its avail position, writes
/// used descriptors at its used position.
struct Device {
    desc: GuestAddress,
    avail: (u16, bool),
    used: (u16, bool),
}

/// A descriptor as read from the ring: addr, len, id, flags.
type Desc = (u64, u32, u16, u16);

fn step((at, wrap): &mut (u16, bool), n: u16) {
    for _ in 0..n {
        *at += 1;
        if *at == SIZE {
            *at = 0;
            *wrap = !*wrap;
        }
    }
}

impl Device {
    fn read(&self, mem: &GuestMemoryMmap<()>, slot: u16) -> Desc {
        let at = self.desc.0 + 16 * u64::from(slot);
        let flags: u16 = mem.load(GuestAddress(at + 14), Ordering::Acquire).unwrap();
        let addr: u64 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
        let id: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
        (addr, len, id, flags)
    }

    /// The next available chain's descriptors, if the driver published one.
    fn take(&mut self, mem: &GuestMemoryMmap<()>) -> Option<Vec<Desc>> {
        let mut chain = Vec::new();
        loop {
            let d = self.read(mem, self.avail.0);
            let avail = d.3 & DESC_F_AVAIL != 0;
            let used = d.3 & DESC_F_USED != 0;
            if avail != self.avail.1 || used == self.avail.1 {
                assert!(
                    chain.is_empty(),
                    "a chain ends in a descriptor not available"
                );
                return None;
            }
            chain.push(d);
            step(&mut self.avail, 1);
            if d.3 & DESC_F_NEXT == 0 {
                return Some(chain);
            }
        }
    }

    fn complete(&mut self, mem: &GuestMemoryMmap<()>, id: u16, slots: u16, len: u32) {
        let at = self.desc.0 + 16 * u64::from(self.used.0);
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(id, GuestAddress(at + 12)).unwrap();
        let flags = if self.used.1 {
            DESC_F_AVAIL | DESC_F_USED
        } else {
            0
        };
        mem.store(flags, GuestAddress(at + 14), Ordering::Release)
            .unwrap();
        step(&mut self.used, slots);
    }
}

fn setup(event_idx: bool) -> (GuestMemoryMmap<()>, DriverQueue, Device) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let layout = RingLayout::packed_at(GuestAddress(0), SIZE);
    let q = DriverQueue::new_packed(&mem, SIZE, layout, event_idx).unwrap();
    let dev = Device {
        desc: layout.desc,
        avail: (0, true),
        used: (0, true),
    };
    (mem, q, dev)
}

fn bufs(n: usize, tag: u64) -> Vec<Buf> {
    (0..n)
        .map(|i| Buf {
            addr: GuestAddress(0x8000 + tag * 0x100 + i as u64),
            len: 16 + i as u32,
            writable: i + 1 == n,
        })
        .collect()
}

#[test]
fn chains_cross_many_wraps_and_complete_out_of_order() -> Result<()> {
    let (mem, mut q, mut dev) = setup(true);
    for round in 0..40u64 {
        // Chains of 1 to 3 descriptors, as many as fit.
        let mut added = Vec::new();
        for k in 0..3u64 {
            let n = ((round + k) % 3 + 1) as usize;
            if let Some(id) = q.add(&mem, &bufs(n, round * 3 + k))? {
                added.push((id, n, round * 3 + k));
            }
        }
        assert!(dev.take(&mem).is_none(), "visible before publish");
        q.publish(&mem)?;
        let mut taken = Vec::new();
        for (id, n, tag) in &added {
            let chain = dev.take(&mem).expect("published chain");
            assert_eq!(chain.len(), *n);
            for (i, (d, b)) in chain.iter().zip(bufs(*n, *tag)).enumerate() {
                assert_eq!((d.0, d.1, d.2), (b.addr.0, b.len, *id), "descriptor {i}");
                assert_eq!(d.3 & DESC_F_WRITE != 0, b.writable);
            }
            taken.push((*id, *n as u16));
        }
        // Completed last to first.
        for (id, slots) in taken.iter().rev() {
            dev.complete(&mem, *id, *slots, u32::from(*id) + 100);
        }
        for (id, _) in taken.iter().rev() {
            let u = q.poll(&mem)?.expect("completion");
            assert_eq!((u.head, u.len), (*id, u32::from(*id) + 100));
        }
        assert!(q.poll(&mem)?.is_none());
        assert_eq!(
            (q.in_flight(), q.free_descriptors()),
            (0, usize::from(SIZE))
        );
    }
    Ok(())
}

#[test]
fn an_indirect_chain_takes_one_slot_and_its_table_holds_the_buffers() -> Result<()> {
    let (mem, mut q, mut dev) = setup(true);
    let table = GuestAddress(0x4_0000);
    let id = q.add_indirect(&mem, table, &bufs(3, 1))?.expect("slot");
    q.publish(&mem)?;
    let chain = dev.take(&mem).expect("chain");
    assert_eq!(chain.len(), 1);
    assert_eq!((chain[0].0, chain[0].1, chain[0].2), (table.0, 48, id));
    assert!(chain[0].3 & DESC_F_INDIRECT != 0);
    for (i, b) in bufs(3, 1).iter().enumerate() {
        let at = table.0 + 16 * i as u64;
        let addr: u64 = mem.read_obj(GuestAddress(at))?;
        let flags: u16 = mem.read_obj(GuestAddress(at + 14))?;
        assert_eq!(
            (addr, flags),
            (b.addr.0, if b.writable { DESC_F_WRITE } else { 0 })
        );
    }
    assert_eq!(q.free_descriptors(), usize::from(SIZE) - 1);
    Ok(())
}

/// Sets the device event suppression area.
fn device_event(mem: &GuestMemoryMmap<()>, q: &DriverQueue, off: u16, wrap: bool, flags: u16) {
    let off_wrap = off | (u16::from(wrap) << 15);
    mem.write_obj(off_wrap, q.layout.used).unwrap();
    mem.write_obj(flags, GuestAddress(q.layout.used.0 + 2))
        .unwrap();
}

#[test]
fn kicks_follow_the_device_event_suppression_across_a_wrap() -> Result<()> {
    let (mem, mut q, mut dev) = setup(true);
    let mut add = |q: &mut DriverQueue, n: usize| -> Result<bool> {
        let old = q.avail_idx();
        q.add(&mem, &bufs(n, 0))?.expect("room");
        let kicked = q.notify(&mem, old)?;
        while let Some(c) = dev.take(&mem) {
            dev.complete(&mem, c[0].2, c.len() as u16, 0);
        }
        while q.poll(&mem)?.is_some() {}
        Ok(kicked)
    };
    assert!(add(&mut q, 3)?, "ENABLE: kick");
    device_event(&mem, &q, 0, true, EVENT_F_DISABLE);
    assert!(!add(&mut q, 3)?, "DISABLE: no kick");
    // Driver at slot 6, wrap 1. An event at slot 7: the next 3 slots (6, 7, 0) pass it.
    device_event(&mem, &q, 7, true, EVENT_F_DESC);
    assert!(add(&mut q, 3)?, "event offset inside the slots added");
    // Driver at slot 1, wrap 0. An event at slot 6 of the old lap is behind: no kick.
    device_event(&mem, &q, 6, true, EVENT_F_DESC);
    assert!(!add(&mut q, 2)?, "event offset already passed");
    // Driver at slot 3, wrap 0: an event at its next slot asks for the next kick.
    device_event(&mem, &q, 3, false, EVENT_F_DESC);
    assert!(q.would_kick(&mem, 1)?);
    assert!(add(&mut q, 1)?, "event offset at the first slot added");
    device_event(&mem, &q, 0, false, EVENT_F_ENABLE);
    assert!(add(&mut q, 1)?);
    assert_eq!(q.kicks, 4);
    // Driver and device both at slot 5, wrap 0.
    assert_eq!(q.base(), 0x0005_0005);
    Ok(())
}

#[test]
fn used_event_offsets_and_a_completion_not_in_flight() -> Result<()> {
    let (mem, mut q, mut dev) = setup(true);
    for _ in 0..2 {
        q.add(&mem, &bufs(3, 0))?.expect("room");
    }
    q.publish(&mem)?;
    q.set_used_event(&mem, q.used_idx(&mem)?.wrapping_add(10))?;
    // 10 slots past slot 0 of lap 1: slot 2 of lap 0.
    let area: u32 = mem.read_obj(q.layout.avail)?;
    assert_eq!(area, 2 | u32::from(EVENT_F_DESC) << 16);
    q.arm_interrupt(&mem)?;
    assert_eq!(
        mem.read_obj::<u32>(q.layout.avail)?,
        0x8000 | u32::from(EVENT_F_DESC) << 16
    );
    q.suppress_interrupts(&mem)?;
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(q.layout.avail.0 + 2))?,
        EVENT_F_DISABLE
    );
    let first = dev.take(&mem).expect("chain");
    dev.complete(&mem, first[0].2 + 5, 3, 0);
    assert!(q.poll(&mem).is_err(), "an id the driver did not hand out");
    Ok(())
}
