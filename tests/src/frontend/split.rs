//! The driver side of a split virtqueue: a descriptor table, the available ring, the used ring,
//! and kick and interrupt suppression (EVENT_IDX or flags). [`DriverQueue`](super::DriverQueue)
//! dispatches here for split rings.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::queue::{need_event, Buf, RingLayout, Used, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

const USED_F_NO_NOTIFY: u16 = 1;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

#[derive(Debug)]
pub(super) struct SplitDriver {
    size: u16,
    layout: RingLayout,
    event_idx: bool,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head.
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl SplitDriver {
    pub(super) fn new(size: u16, layout: RingLayout, event_idx: bool) -> Self {
        Self {
            size,
            layout,
            event_idx,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub(super) fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.chains.len()
    }

    pub(super) fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    pub(super) fn last_used(&self) -> u16 {
        self.last_used
    }

    pub(super) fn add(&mut self, mem: &GuestMemoryMmap<()>, bufs: &[Buf]) -> Result<Option<u16>> {
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

    pub(super) fn add_indirect(
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

    pub(super) fn write_desc(
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

    pub(super) fn push_avail(&mut self, mem: &GuestMemoryMmap<()>, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(
            head.to_le(),
            GuestAddress(self.layout.avail.0 + 4 + 2 * slot),
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    pub(super) fn withhold(&mut self, ids: &[u16]) {
        self.free.retain(|f| !ids.contains(f));
    }

    pub(super) fn reserve(&mut self, head: u16, ids: Vec<u16>) {
        self.free.retain(|f| !ids.contains(f));
        self.chains.insert(head, ids);
    }

    pub(super) fn publish(&mut self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        self.publish_idx(mem, self.avail_idx)
    }

    pub(super) fn publish_idx(&mut self, mem: &GuestMemoryMmap<()>, idx: u16) -> Result<()> {
        fence(Ordering::SeqCst);
        mem.store(
            idx.to_le(),
            GuestAddress(self.layout.avail.0 + 2),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Whether the device wants a kick for the chains made available since `old_avail` (read
    /// after they were published).
    pub(super) fn kick_needed(&self, mem: &GuestMemoryMmap<()>, old_avail: u16) -> Result<bool> {
        self.kick_decision(mem, self.avail_idx, old_avail)
    }

    /// Whether the device wants a kick once `more` chains are made available.
    pub(super) fn would_kick(&self, mem: &GuestMemoryMmap<()>, more: u16) -> Result<bool> {
        self.kick_decision(mem, self.avail_idx.wrapping_add(more), self.avail_idx)
    }

    /// A kick for an available index moving from `old` to `new`?
    fn kick_decision(&self, mem: &GuestMemoryMmap<()>, new: u16, old: u16) -> Result<bool> {
        if self.event_idx {
            let at = GuestAddress(self.layout.used.0 + 4 + 8 * u64::from(self.size));
            let avail_event = u16::from_le(mem.load(at, Ordering::Relaxed)?);
            Ok(need_event(avail_event, new, old))
        } else {
            let flags = u16::from_le(mem.load(self.layout.used, Ordering::Relaxed)?);
            Ok(flags & USED_F_NO_NOTIFY == 0)
        }
    }

    pub(super) fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> Result<u16> {
        Ok(u16::from_le(mem.load(
            GuestAddress(self.layout.used.0 + 2),
            Ordering::Acquire,
        )?))
    }

    pub(super) fn poll(&mut self, mem: &GuestMemoryMmap<()>) -> Result<Option<Used>> {
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

    fn used_event_at(&self) -> GuestAddress {
        GuestAddress(self.layout.avail.0 + 4 + 2 * u64::from(self.size))
    }

    pub(super) fn arm_interrupt(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        if self.event_idx {
            mem.store(
                self.last_used.to_le(),
                self.used_event_at(),
                Ordering::Release,
            )?;
        } else {
            mem.store(0u16, self.layout.avail, Ordering::Release)?;
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    pub(super) fn set_used_event(&self, mem: &GuestMemoryMmap<()>, used_event: u16) -> Result<()> {
        mem.store(used_event.to_le(), self.used_event_at(), Ordering::Release)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    pub(super) fn suppress_interrupts(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        if self.event_idx {
            // An event index just behind the driver: passed only after a full wrap.
            let behind = self.last_used.wrapping_sub(1);
            mem.store(behind.to_le(), self.used_event_at(), Ordering::Release)?;
        } else {
            mem.store(
                AVAIL_F_NO_INTERRUPT.to_le(),
                self.layout.avail,
                Ordering::Release,
            )?;
        }
        Ok(())
    }
}

/// Writes one split descriptor (16 bytes: addr, len, flags, next) at `index` of `table`.
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
