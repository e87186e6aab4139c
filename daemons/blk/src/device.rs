//! The virtio-blk device: what it offers the frontend and the state its queues share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bulkhead_common::device::{feature_bit as bit, RING_FEATURES};
use bulkhead_common::{Device, DeviceError};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};

use crate::config_space::{self, Geometry, CONFIG_LEN, WCE_OFFSET};
use crate::disk::Disk;
use crate::io::sync::ID_BYTES;
use crate::io::IoEngine;
use crate::queue::BlkQueue;
pub use crate::shared::{Shared, SEG_MAX};
use crate::stats::BlkQueueStats;
use bulkhead_common::control::metrics::{Family, Kind};
use bulkhead_common::device::{CommandDone, CommandError, Metrics};
use serde_json::{json, Map, Value};

/// Construction parameters.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub engine: IoEngine,
    pub serial: [u8; ID_BYTES],
    /// Count requests per queue (`--no-stats` turns it off).
    pub stats: bool,
}

#[derive(Debug)]
pub struct BlkDevice {
    shared: Arc<Shared>,
    opts: BlkOptions,
    /// Per queue, for the process's lifetime (counters survive frontends).
    stats: Vec<Arc<BlkQueueStats>>,
}

impl BlkDevice {
    pub fn new(disk: Disk, opts: BlkOptions) -> Self {
        let shared = Shared {
            disk,
            serial: opts.serial,
            writeback: AtomicBool::new(true),
            flush_negotiated: AtomicBool::new(false),
        };
        let stats = (0..opts.num_queues)
            .map(|_| Arc::new(BlkQueueStats::default()))
            .collect();
        Self {
            shared: Arc::new(shared),
            opts,
            stats,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            capacity_bytes: self.shared.disk.capacity(),
            seg_max: SEG_MAX,
            logical_block: self.shared.disk.logical_block(),
            physical_block: self.shared.disk.physical_block(),
            num_queues: self.opts.num_queues,
        }
    }
}

impl Device for BlkDevice {
    type Handler = BlkQueue;

    fn features(&self) -> u64 {
        let mut f = RING_FEATURES
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ);
        if self.shared.disk.read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the channel a resize is announced on (CONFIG_CHANGE_MSG).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn num_queues(&self) -> u16 {
        self.opts.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn read_config(&self, offset: u32, out: &mut [u8]) -> Result<(), DeviceError> {
        let cfg = config_space::build(
            &self.geometry(),
            self.shared.writeback.load(Ordering::Relaxed),
        );
        let start = offset as usize;
        let range_err = DeviceError::ConfigRange {
            offset,
            len: out.len(),
        };
        let end = start.checked_add(out.len()).ok_or(range_err)?;
        // Beyond the fields we define the space reads as zero (newer frontends ask for more).
        out.fill(0);
        if start < CONFIG_LEN {
            let avail = cfg.get(start..end.min(CONFIG_LEN)).unwrap_or_default();
            if let Some(dst) = out.get_mut(..avail.len()) {
                dst.copy_from_slice(avail);
            }
        }
        Ok(())
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        match (offset as usize, data) {
            (WCE_OFFSET, [wce]) => {
                self.shared.writeback.store(*wce != 0, Ordering::Relaxed);
                bulkhead_common::guest_info!(
                    writeback = *wce != 0,
                    "guest changed the write cache mode"
                );
                Ok(())
            }
            _ => Err(DeviceError::ConfigReadOnly(offset)),
        }
    }

    fn set_features(&self, features: u64) -> Result<(), DeviceError> {
        self.shared
            .flush_negotiated
            .store(features & bit(VIRTIO_BLK_F_FLUSH) != 0, Ordering::Relaxed);
        Ok(())
    }

    fn queue_handler(&self, index: u16, _features: u64) -> Result<BlkQueue, DeviceError> {
        let stats = self
            .stats
            .get(usize::from(index))
            .filter(|_| self.opts.stats)
            .cloned();
        BlkQueue::new(
            Arc::clone(&self.shared),
            stats,
            self.opts.engine,
            self.opts.queue_size,
        )
        .map_err(|e| DeviceError::Queue {
            index,
            source: Box::new(e),
        })
    }

    fn persistent_state(&self) -> Vec<u8> {
        vec![u8::from(self.shared.writeback.load(Ordering::Relaxed))]
    }

    fn restore_state(&self, state: &[u8]) {
        // One byte: the write-back flag. Anything else is not ours (or corrupt): keep the default.
        if let [flag @ (0 | 1)] = state {
            self.shared.writeback.store(*flag == 1, Ordering::Relaxed);
        }
    }

    fn disconnected(&self) {
        // A new frontend is a new guest driver: the cache mode starts over at its default.
        self.shared.writeback.store(true, Ordering::Relaxed);
    }

    fn kind(&self) -> &'static str {
        "block"
    }

    fn metrics(&self, out: &mut Metrics) {
        let mut f = Family::new(
            "bulkhead_blk_capacity_bytes",
            "Capacity the guest is offered.",
            Kind::Gauge,
        );
        f.number(Vec::new(), self.shared.disk.capacity());
        out.push(f);
        crate::stats::metrics(&self.stats, out);
    }

    fn commands(&self) -> &'static [&'static str] {
        &["resize"]
    }

    fn command(&self, name: &str, args: &Map<String, Value>) -> Result<CommandDone, CommandError> {
        if name != "resize" {
            return Err(CommandError::Unknown);
        }
        if let Some(other) = args.keys().find(|k| *k != "size") {
            return Err(CommandError::BadArguments(format!(
                "resize takes only \"size\", not {other:?}"
            )));
        }
        let size = match args.get("size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                CommandError::BadArguments("size must be a number of bytes".into())
            })?),
        };
        let r = crate::resize::resize(&self.shared.disk, size).map_err(|e| match e {
            crate::resize::ResizeError::Grow(_) | crate::resize::ResizeError::Measure(_) => {
                CommandError::Failed(bulkhead_common::logging::chain(&e))
            }
            other => CommandError::Refused(other.to_string()),
        })?;
        Ok(CommandDone {
            result: json!({ "old_bytes": r.old, "new_bytes": r.new }),
            config_changed: r.old != r.new,
        })
    }
}
