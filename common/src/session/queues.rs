//! Queue lifecycle: the per-queue state the frontend sets up, and starting and stopping each
//! queue's worker to match it (with inflight recovery after a restart).

use super::*;

/// Ring addresses in the frontend's address space, translated when the ring starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct VmmRingAddrs {
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
}

/// Per-queue state kept by the session.
#[derive(Debug)]
pub(super) struct QueueSlot {
    pub(super) size: u16,
    pub(super) vmm_addrs: Option<VmmRingAddrs>,
    /// `SET_VRING_BASE`'s word, checked against the layout when the ring starts.
    pub(super) base: u32,
    pub(super) kick: Option<EventFd>,
    pub(super) call: Arc<Signal>,
    pub(super) err: Arc<Signal>,
    pub(super) enabled: bool,
    pub(super) worker: Option<Worker>,
    /// Where writes to the used ring are logged while migrating (shared with the worker).
    pub(super) used_log: Arc<std::sync::atomic::AtomicU64>,
}

impl QueueSlot {
    pub(super) fn new(size: u16) -> Self {
        Self {
            size,
            vmm_addrs: None,
            base: 0,
            kick: None,
            call: Arc::new(Signal::new()),
            err: Arc::new(Signal::new()),
            enabled: false,
            worker: None,
            used_log: Arc::new(std::sync::atomic::AtomicU64::new(
                crate::log_cursor::NO_USED_LOG,
            )),
        }
    }
}

impl<D: Device> Session<D> {
    pub(super) fn update_all_queues(&mut self) {
        for i in 0..self.queues.len() {
            if let Ok(i) = u16::try_from(i) {
                self.update_queue(i);
            }
        }
    }

    /// Starts or stops queue `i` to match its configuration.
    pub(super) fn update_queue(&mut self, i: u16) {
        let protocol_acked =
            self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let Some(slot) = self.queues.get(usize::from(i)) else {
            return;
        };
        // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts.
        // A running worker holds the kick eventfd.
        let has_kick = slot.kick.is_some() || slot.worker.is_some();
        let want = self.features_set
            && has_kick
            && slot.vmm_addrs.is_some()
            && (slot.enabled || !protocol_acked);
        match (want, slot.worker.is_some()) {
            (true, false) => self.start_queue(i),
            (false, true) => self.stop_queue(i),
            _ => {}
        }
    }

    pub(super) fn start_queue(&mut self, i: u16) {
        let features = self.acked_features;
        let mem = self.mem.memory();
        let Some(slot) = self.queues.get_mut(usize::from(i)) else {
            return;
        };
        let Some(addrs) = slot.vmm_addrs else { return };
        let translate = |a: u64| self.memory.vmm_to_guest(a);
        let (Some(desc), Some(avail), Some(used)) = (
            translate(addrs.desc),
            translate(addrs.avail),
            translate(addrs.used),
        ) else {
            // Not an error yet: memory may arrive later (ADD_MEM_REG), which retries.
            return;
        };
        let layout = Layout::of_features(features);
        let mut base = slot.base;
        if layout == Layout::Packed && self.inflight.is_none() && self.device.completes_in_order() {
            base = resume_point(&mem, desc, slot.size, base, i);
        }
        let ring = Ring::new(
            layout,
            &mem,
            slot.size,
            RingAddrs { desc, avail, used },
            base,
            features & VIRTIO_F_RING_EVENT_IDX != 0,
            features & VIRTIO_F_RING_INDIRECT_DESC != 0,
        );
        let mut ring = match ring {
            Ok(r) => r,
            Err(e) => {
                guest_warn!(queue = i, "cannot start ring: {e}");
                slot.err.signal();
                return;
            }
        };
        let tracking = match self
            .inflight
            .as_ref()
            .map(|r| recover(r, i, &mut ring, &mem, &self.state))
            .transpose()
        {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => {
                guest_warn!(queue = i, "cannot start ring: inflight region: {e}");
                slot.err.signal();
                return;
            }
        };
        let handler = match self.device.queue_handler(i, features) {
            Ok(h) => h,
            Err(e) => {
                guest_warn!(
                    queue = i,
                    "cannot start queue: {}",
                    crate::logging::chain(&e)
                );
                slot.err.signal();
                return;
            }
        };
        let Some(kick) = slot.kick.take() else { return };
        let (next_avail, used_idx) = (ring.next_avail(), ring.next_used());
        let spec = WorkerSpec {
            index: i,
            handler,
            ring,
            kick,
            call: Arc::clone(&slot.call),
            err: Arc::clone(&slot.err),
            mem: self.mem.clone(),
            tracking,
            idle: crate::idle_poll::IdlePoll::new(self.opts.poll),
            pipeline: crate::pipeline::Pipeline::new(self.opts.completions),
            view: None,
            log: crate::log_cursor::LogCursor::new(
                Arc::clone(&self.log),
                Arc::clone(&slot.used_log),
            ),
            progress: self.state.queue(i),
        };
        match Worker::spawn(spec) {
            Ok(w) => {
                tracing::debug!(
                    queue = i,
                    size = slot.size,
                    base = slot.base,
                    next_avail,
                    used_idx,
                    "queue started"
                );
                slot.worker = Some(w);
            }
            Err(e) => guest_warn!(queue = i, "cannot spawn worker: {e}"),
        }
    }

    /// Stops queue `i` (if running) once its in-flight requests completed; keeps its kick fd so
    /// re-enabling restarts it, and records where it stopped.
    pub(super) fn stop_queue(&mut self, i: u16) {
        let Some(slot) = self.queues.get_mut(usize::from(i)) else {
            return;
        };
        let Some(worker) = slot.worker.take() else {
            return;
        };
        match worker.stop() {
            Some((ring, kick)) => {
                slot.base = ring.base();
                slot.kick = Some(kick);
                tracing::debug!(queue = i, base = slot.base, "queue stopped");
            }
            None => guest_warn!(queue = i, "queue worker panicked"),
        }
        self.device.queue_stopped(i);
    }

    pub(super) fn reset_queues(&mut self) {
        let max = self.device.max_queue_size();
        for i in 0..self.queues.len() {
            if let Ok(i) = u16::try_from(i) {
                self.stop_queue(i);
            }
        }
        for q in &mut self.queues {
            *q = QueueSlot::new(max);
        }
        self.acked_features = 0;
        self.features_set = false;
    }
}

/// Where an in-order device's packed ring resumes, read off the ring (the frontend's word may be
/// stale after a crash; see `vring::packed_scan`). A scan that finds a driver mid-write is
/// repeated a few times; an unreadable ring keeps the frontend's word.
fn resume_point(
    mem: &GuestMemory,
    desc: GuestAddress,
    size: u16,
    frontend: u32,
    queue: u16,
) -> u32 {
    let access = GuestAccess::new(Arc::new(mem.clone()));
    let flags = |slot| crate::vring::packed_chain::load_flags(&access, desc, slot);
    let mut scan = None;
    for _ in 0..8 {
        scan = crate::vring::packed_scan::device_position(size, flags);
        if scan.is_none_or(|s| s.clean) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    let Some(scan) = scan else {
        return frontend;
    };
    let base = PackedBase {
        avail: scan.used,
        used: scan.used,
    }
    .encode();
    if base != frontend {
        tracing::info!(
            queue,
            frontend = format_args!("{frontend:#x}"),
            ring = format_args!("{base:#x}"),
            "packed ring resumes where its descriptors say, not where the frontend said"
        );
    }
    base
}

/// Sets up inflight tracking for queue `index` and works out what a crash left owed: those
/// chains are resubmitted first, and new ones are taken after them.
pub(super) fn recover(
    region: &Arc<InflightRegion>,
    index: u16,
    ring: &mut Ring,
    mem: &GuestMemory,
    state: &EngineState,
) -> Result<Tracking, InflightError> {
    let (inflight, resubmit) = match ring {
        Ring::Split(ring) => {
            let mut q = region.queue(index, ring.size())?;
            let r = q.recover(ring.next_used())?;
            ring.set_next_avail(r.next_avail);
            (Inflight::Split(q), r.resubmit)
        }
        Ring::Packed(packed) => {
            let mut q = PackedInflightQueue::new(region, index, packed.size())?;
            let desc = packed.desc_table();
            let access = GuestAccess::new(Arc::new(mem.clone()));
            let r = q.recover(packed.base(), |slot| {
                crate::vring::packed_chain::load_flags(&access, desc, slot)
            })?;
            let mut fresh = PackedRing::new(
                mem,
                packed.size(),
                packed.addrs(),
                r.base,
                packed.event_idx(),
                packed.indirect(),
            )
            .map_err(|e| InflightError::Ring(e.to_string()))?;
            let mut ids = Vec::with_capacity(r.owed.len());
            for (id, raw) in &r.owed {
                fresh
                    .restore_in_hands(*id, raw)
                    .map_err(|e| InflightError::Ring(e.to_string()))?;
                ids.push(*id);
            }
            *packed = fresh;
            (Inflight::Packed(q), ids)
        }
    };
    if !resubmit.is_empty() {
        state.add_resubmitted(resubmit.len() as u64);
        tracing::info!(
            queue = index,
            owed = resubmit.len(),
            "resubmitting requests in flight before the restart"
        );
    }
    Ok(Tracking {
        inflight: Some(inflight),
        resubmit: resubmit.into(),
        batch: Vec::new(),
    })
}
