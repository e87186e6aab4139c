//! One ring interface over both layouts: the engine and the devices take chains, complete them,
//! publish and suppress notifications without knowing whether the guest chose split or packed
//! rings (`VIRTIO_F_RING_PACKED`).

use std::sync::Arc;

use super::packed::{PackedBase, PackedRing};
use super::split::{AvailChain, RingAddrs, RingError, SplitRing};
use super::Desc;
use crate::dirty_log::DirtyLog;
use crate::guest_access::GuestAccess;
use crate::memory::GuestMemory;

/// Which layout the guest negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Split,
    Packed,
}

impl Layout {
    /// The layout `features` (the acked virtio features) select.
    pub fn of_features(features: u64) -> Self {
        if features & crate::vring::packed::VIRTIO_F_RING_PACKED != 0 {
            Layout::Packed
        } else {
            Layout::Split
        }
    }

    /// The ring base of a fresh ring, as `SET_VRING_BASE` sends it.
    pub fn fresh_base(self) -> u32 {
        match self {
            Layout::Split => 0,
            Layout::Packed => PackedBase::FRESH.encode(),
        }
    }
}

#[derive(Debug)]
pub enum Ring {
    Split(SplitRing),
    Packed(PackedRing),
}

/// Forwards a method to whichever ring this is.
macro_rules! both {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            Ring::Split($r) => $e,
            Ring::Packed($r) => $e,
        }
    };
}

impl Ring {
    /// Validates the layout against guest memory. `base` is `SET_VRING_BASE`'s payload: the
    /// next available index for split rings (the used index is read from the guest), both
    /// positions with their wrap counters for packed ones.
    pub fn new(
        layout: Layout,
        mem: &GuestMemory,
        size: u16,
        addrs: RingAddrs,
        base: u32,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self, RingError> {
        Ok(match layout {
            Layout::Split => {
                let next_avail = u16::try_from(base).map_err(|_| RingError::BadBase)?;
                Ring::Split(SplitRing::new(
                    mem, size, addrs, next_avail, event_idx, indirect,
                )?)
            }
            Layout::Packed => {
                let base = PackedBase::decode(base, size).ok_or(RingError::BadBase)?;
                Ring::Packed(PackedRing::new(
                    mem, size, addrs, base, event_idx, indirect,
                )?)
            }
        })
    }

    pub fn layout(&self) -> Layout {
        match self {
            Ring::Split(_) => Layout::Split,
            Ring::Packed(_) => Layout::Packed,
        }
    }

    /// `GET_VRING_BASE`'s answer once the ring has stopped.
    pub fn base(&self) -> u32 {
        match self {
            Ring::Split(r) => u32::from(r.next_avail()),
            Ring::Packed(r) => r.base().encode(),
        }
    }

    pub fn size(&self) -> u16 {
        both!(self, r => r.size())
    }

    /// Chains taken so far: the split ring's next available index, a count for packed rings.
    pub fn next_avail(&self) -> u16 {
        match self {
            Ring::Split(r) => r.next_avail(),
            Ring::Packed(r) => r.taken_count(),
        }
    }

    /// Chains completed so far: the split ring's used index, a count for packed rings.
    pub fn next_used(&self) -> u16 {
        match self {
            Ring::Split(r) => r.next_used(),
            Ring::Packed(r) => r.used_count(),
        }
    }

    pub fn event_idx(&self) -> bool {
        both!(self, r => r.event_idx())
    }

    pub fn chain_at(&mut self, mem: &GuestAccess, head: u16, descs: &mut Vec<Desc>) -> AvailChain {
        both!(self, r => r.chain_at(mem, head, descs))
    }

    pub fn hold(&mut self, chain: &AvailChain) {
        both!(self, r => r.hold(chain))
    }

    pub fn take_held(&mut self, mem: &GuestAccess, descs: &mut Vec<Desc>) -> Option<AvailChain> {
        both!(self, r => r.take_held(mem, descs))
    }

    pub fn release_held(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        both!(self, r => r.release_held(mem))
    }

    pub fn held(&self) -> usize {
        both!(self, r => r.held())
    }

    pub fn pending(&mut self, mem: &GuestAccess) -> Result<u16, RingError> {
        both!(self, r => r.pending(mem))
    }

    pub fn pop(
        &mut self,
        mem: &GuestAccess,
        descs: &mut Vec<Desc>,
    ) -> Result<Option<AvailChain>, RingError> {
        both!(self, r => r.pop(mem, descs))
    }

    pub fn push_used(&mut self, mem: &GuestAccess, head: u16, len: u32) -> Result<bool, RingError> {
        both!(self, r => r.push_used(mem, head, len))
    }

    pub fn set_log(&mut self, log: Option<Arc<DirtyLog>>, used_log: Option<u64>, buffers: bool) {
        both!(self, r => r.set_log(log, used_log, buffers))
    }

    pub fn publish_used(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        both!(self, r => r.publish_used(mem))
    }

    pub fn needs_signal(&mut self, mem: &GuestAccess) -> Result<bool, RingError> {
        both!(self, r => r.needs_signal(mem))
    }

    pub fn interrupt_due(&self, mem: &GuestAccess) -> Result<Option<u16>, RingError> {
        both!(self, r => r.interrupt_due(mem))
    }

    pub fn interrupt_owed(&mut self, mem: &GuestAccess) -> Result<Option<u16>, RingError> {
        both!(self, r => r.interrupt_owed(mem))
    }

    pub fn signalled(&mut self) {
        both!(self, r => r.signalled())
    }

    pub fn outstanding(&self) -> u16 {
        both!(self, r => r.outstanding())
    }

    pub fn enable_notifications(&mut self, mem: &GuestAccess) -> Result<bool, RingError> {
        both!(self, r => r.enable_notifications(mem))
    }

    pub fn enable_notifications_beyond_avail(
        &mut self,
        mem: &GuestAccess,
    ) -> Result<bool, RingError> {
        both!(self, r => r.enable_notifications_beyond_avail(mem))
    }

    pub fn suppress_notifications(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        both!(self, r => r.suppress_notifications(mem))
    }

    pub fn disable_notifications(&mut self, mem: &GuestAccess) -> Result<(), RingError> {
        both!(self, r => r.disable_notifications(mem))
    }
}
