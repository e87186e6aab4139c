//! The virtio-net device: features, config space, and a receive or transmit handler per queue
//! (queue 2n receives and 2n+1 transmits for queue pair n, both on TAP queue n).

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use bulkhead_common::device::{feature_bit as bit, RING_FEATURES};
use bulkhead_common::vring::RingError;
use bulkhead_common::{guest_warn, Device, DeviceError, Progress, QueueCtx, QueueHandler};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_net::*;

use crate::config_space::{self, NetConfig, CONFIG_LEN};
use crate::rx::RxQueue;
use crate::stats::QueueStats;
use crate::tap::TapQueue;
use crate::tx::TxQueue;
use crate::vnet;

/// Construction parameters.
#[derive(Debug, Clone)]
pub struct NetOptions {
    pub queue_size: u16,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
}

#[derive(Debug)]
pub struct NetDevice {
    taps: Vec<Arc<TapQueue>>,
    stats: Vec<Arc<QueueStats>>,
    opts: NetOptions,
    /// Features the frontend acked last (they configure the TAP).
    acked: AtomicU64,
    /// MTU from NET_SET_MTU, else --mtu, else 1500.
    mtu: AtomicU16,
}

const DEFAULT_MTU: u16 = 1500;

impl NetDevice {
    /// One TAP queue per queue pair.
    pub fn new(taps: Vec<TapQueue>, opts: NetOptions) -> Self {
        let stats = (0..taps.len() * 2)
            .map(|_| Arc::new(QueueStats::default()))
            .collect();
        let mtu = opts.mtu.unwrap_or(DEFAULT_MTU);
        let device = Self {
            taps: taps.into_iter().map(Arc::new).collect(),
            stats,
            opts,
            acked: AtomicU64::new(0),
            mtu: AtomicU16::new(mtu),
        };
        // No guest yet: frames for this TAP go to queues that are read (another daemon's),
        // or are dropped, rather than piling up for whoever connects first.
        device.detach_all();
        device
    }

    /// Steers the kernel away from (or back to) the TAP queue of `pair`.
    fn steer(&self, pair: usize, attach: bool) {
        if let Some(tap) = self.taps.get(pair) {
            if let Err(e) = tap.set_attached(attach) {
                // A frontend starts and stops queues: rate-limited.
                guest_warn!(pair, "{}", bulkhead_common::logging::chain(&e));
            }
        }
    }

    fn detach_all(&self) {
        for pair in 0..self.taps.len() {
            self.steer(pair, false);
        }
    }

    pub fn queue_pairs(&self) -> u16 {
        u16::try_from(self.taps.len()).unwrap_or(u16::MAX)
    }

    pub fn stats(&self, queue: usize) -> Option<&Arc<QueueStats>> {
        self.stats.get(queue)
    }
}

/// A queue's handler: receive or transmit.
#[derive(Debug)]
pub enum NetQueue {
    Rx(RxQueue),
    Tx(TxQueue),
}

impl QueueHandler for NetQueue {
    fn event_sources(&self) -> Vec<std::os::fd::RawFd> {
        match self {
            NetQueue::Rx(q) => q.event_sources(),
            NetQueue::Tx(q) => q.event_sources(),
        }
    }
    fn process(&mut self, ctx: &mut QueueCtx<'_>) -> Result<Progress, RingError> {
        match self {
            NetQueue::Rx(q) => q.process(ctx),
            NetQueue::Tx(q) => q.process(ctx),
        }
    }
    fn drain(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        match self {
            NetQueue::Rx(q) => q.drain(ctx),
            NetQueue::Tx(q) => q.drain(ctx),
        }
    }
}

impl Device for NetDevice {
    type Handler = NetQueue;

    fn features(&self) -> u64 {
        let mut f = RING_FEATURES
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_HOST_UFO)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_GUEST_UFO)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MQ);
        if self.opts.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        if self.opts.mac.is_some() {
            f |= bit(VIRTIO_NET_F_MAC);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // QEMU builds the virtio-net config space itself (and warns about a backend offering
        // CONFIG), so the config space is offered only when there is something of ours in it.
        let base = VhostUserProtocolFeatures::MTU | VhostUserProtocolFeatures::RARP;
        if self.opts.mac.is_some() || self.opts.mtu.is_some() {
            base | VhostUserProtocolFeatures::CONFIG
        } else {
            base
        }
    }

    fn num_queues(&self) -> u16 {
        self.queue_pairs().saturating_mul(2)
    }

    fn queue_num(&self) -> u64 {
        u64::from(self.queue_pairs())
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    // Transmit completes each chain once written to the TAP, receive fills buffers in order.
    fn completes_in_order(&self) -> bool {
        true
    }

    fn read_config(&self, offset: u32, out: &mut [u8]) -> Result<(), DeviceError> {
        let cfg = config_space::build(&NetConfig {
            mac: self.opts.mac.unwrap_or_default(),
            queue_pairs: self.queue_pairs(),
            mtu: self.mtu.load(Ordering::Relaxed),
        });
        let start = offset as usize;
        let end = start
            .checked_add(out.len())
            .ok_or(DeviceError::ConfigRange {
                offset,
                len: out.len(),
            })?;
        out.fill(0);
        if start < CONFIG_LEN {
            let avail = cfg.get(start..end.min(CONFIG_LEN)).unwrap_or_default();
            if let Some(dst) = out.get_mut(..avail.len()) {
                dst.copy_from_slice(avail);
            }
        }
        Ok(())
    }

    fn send_rarp(&self, mac: [u8; 6]) -> Result<(), DeviceError> {
        // After a migration the switch in front of the TAP must learn where the guest's MAC
        // went; a guest that did not negotiate GUEST_ANNOUNCE will not say so itself.
        let hdr = vnet::header_len(self.acked.load(Ordering::Relaxed));
        let mut frame = vec![0u8; hdr];
        frame.extend_from_slice(&crate::rarp::frame(mac));
        let tap = self
            .taps
            .first()
            .ok_or(DeviceError::Unsupported("SEND_RARP without a TAP"))?;
        tap.write_frame(&frame).map_err(|e| DeviceError::Queue {
            index: 1,
            source: Box::new(e),
        })?;
        tracing::info!(
            mac = format_args!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
            ),
            "announced the guest's MAC (RARP)"
        );
        Ok(())
    }

    fn set_features(&self, features: u64) -> Result<(), DeviceError> {
        let hdr = vnet::header_len(features);
        let offloads = vnet::tap_offloads(features);
        for (i, tap) in self.taps.iter().enumerate() {
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            let err = |e: crate::tap::TapError| DeviceError::Queue {
                index,
                source: Box::new(e),
            };
            tap.set_vnet_hdr_size(hdr).map_err(err)?;
            tap.set_offloads(offloads).map_err(err)?;
        }
        self.acked.store(features, Ordering::Relaxed);
        Ok(())
    }

    fn set_mtu(&self, mtu: u16) -> Result<(), DeviceError> {
        self.mtu.store(mtu, Ordering::Relaxed);
        Ok(())
    }

    fn queue_handler(&self, index: u16, features: u64) -> Result<NetQueue, DeviceError> {
        let pair = usize::from(index / 2);
        let tap = self.taps.get(pair).ok_or(DeviceError::Queue {
            index,
            source: "no TAP queue for this queue pair".into(),
        })?;
        self.steer(pair, true);
        let stats = self
            .stats
            .get(usize::from(index))
            .cloned()
            .unwrap_or_default();
        let hdr = vnet::header_len(features);
        if index.is_multiple_of(2) {
            let mergeable = features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
            let max = vnet::max_rx_frame(features, self.mtu.load(Ordering::Relaxed));
            Ok(NetQueue::Rx(RxQueue::new(
                Arc::clone(tap),
                stats,
                hdr,
                mergeable,
                max,
            )))
        } else {
            Ok(NetQueue::Tx(TxQueue::new(Arc::clone(tap), stats, hdr)))
        }
    }

    fn queue_stopped(&self, index: u16) {
        // Nobody reads the pair's TAP queue once its receive queue stopped (a detached queue
        // still takes writes, so transmit goes on until it stops too).
        if index.is_multiple_of(2) {
            self.steer(usize::from(index / 2), false);
        }
    }

    fn disconnected(&self) {
        self.detach_all();
    }

    fn kind(&self) -> &'static str {
        "net"
    }

    fn metrics(&self, out: &mut bulkhead_common::device::Metrics) {
        crate::stats::metrics(&self.stats, out);
    }

    fn report(&self) {
        for (i, s) in self.stats.iter().enumerate() {
            let (packets, bytes, drops, errors) = s.snapshot();
            let dir = if i.is_multiple_of(2) { "rx" } else { "tx" };
            tracing::info!(
                queue = i,
                pair = i / 2,
                dir,
                packets,
                bytes,
                drops,
                errors,
                "queue counters"
            );
        }
    }
}
