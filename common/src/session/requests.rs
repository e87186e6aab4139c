//! Handling one front-end request: validate, change state, build the reply.

use super::*;

impl<D: Device> Session<D> {
    pub(super) fn handle(
        &mut self,
        req: FrontendReq,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, RequestError> {
        use FrontendReq as R;
        let expect_fds = |want: usize, fds: &Vec<OwnedFd>| {
            if fds.len() == want {
                Ok(())
            } else {
                Err(RequestError::BadFds {
                    req,
                    want,
                    got: fds.len(),
                })
            }
        };
        let bad = || RequestError::BadPayload {
            req,
            got: payload.len(),
        };
        match req {
            R::GET_FEATURES => Ok(u64_reply(self.offered_features())),
            R::SET_FEATURES => {
                expect_fds(0, &fds)?;
                let f: u64 = decode_exact(payload).ok_or_else(bad)?;
                let extra = f & !self.offered_features();
                if extra != 0 {
                    return Err(RequestError::UnofferedFeatures(extra));
                }
                self.device.set_features(f)?;
                // Migration starts and ends with this bit, while the queues run.
                let logging = f & VHOST_F_LOG_ALL != 0;
                if logging != (self.acked_features & VHOST_F_LOG_ALL != 0) {
                    tracing::info!(on = logging, "dirty logging (migration)");
                }
                self.log.set_enabled(logging);
                self.acked_features = f;
                self.features_set = true;
                self.update_all_queues();
                Ok(Reply::Ack)
            }
            R::GET_PROTOCOL_FEATURES => Ok(u64_reply(self.offered_protocol().bits())),
            R::SET_PROTOCOL_FEATURES => {
                expect_fds(0, &fds)?;
                let f: u64 = decode_exact(payload).ok_or_else(bad)?;
                let extra = f & !self.offered_protocol().bits();
                if extra != 0 {
                    return Err(RequestError::UnofferedProtocolFeatures(extra));
                }
                self.acked_protocol = Some(VhostUserProtocolFeatures::from_bits_truncate(f));
                Ok(Reply::Ack)
            }
            R::SET_OWNER => {
                expect_fds(0, &fds)?;
                Ok(Reply::Ack)
            }
            R::RESET_OWNER | R::RESET_DEVICE => {
                expect_fds(0, &fds)?;
                self.reset_queues();
                Ok(Reply::Ack)
            }
            R::GET_QUEUE_NUM => Ok(u64_reply(self.device.queue_num())),
            R::GET_MAX_MEM_SLOTS => Ok(u64_reply(MAX_MEM_SLOTS as u64)),
            R::SET_MEM_TABLE => {
                let (head, rest): (VhostUserMemory, _) = decode_prefix(payload).ok_or_else(bad)?;
                let n = head.num_regions as usize;
                let region_size = std::mem::size_of::<VhostUserMemoryRegion>();
                if n > MAX_FDS || rest.len() != n.saturating_mul(region_size) {
                    return Err(bad());
                }
                expect_fds(n, &fds)?;
                let regions: Vec<VhostUserMemoryRegion> = rest
                    .chunks_exact(region_size)
                    .filter_map(|c| VhostUserMemoryRegion::from_slice(c).copied())
                    .collect();
                let snapshot = self.memory.replace_all(&regions, fds)?;
                self.install_memory(snapshot);
                Ok(Reply::Ack)
            }
            R::ADD_MEM_REG => {
                let r: VhostUserSingleMemoryRegion = decode_exact(payload).ok_or_else(bad)?;
                expect_fds(1, &fds)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let snapshot = self.memory.add(&r, fd)?;
                self.install_memory(snapshot);
                Ok(Reply::Ack)
            }
            R::REM_MEM_REG => {
                // QEMU attaches the region's fd here too; it is simply closed.
                let r: VhostUserSingleMemoryRegion = decode_exact(payload).ok_or_else(bad)?;
                let snapshot = self.memory.remove(&r)?;
                self.install_memory(snapshot);
                Ok(Reply::Ack)
            }
            R::SET_VRING_NUM => {
                expect_fds(0, &fds)?;
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let max = self.device.max_queue_size().min(MAX_QUEUE_SIZE);
                let i = self.stopped_queue(u64::from(s.index))?;
                let size = u16::try_from(s.num)
                    .ok()
                    .filter(|n| *n > 0 && n.is_power_of_two() && *n <= max)
                    .ok_or(RequestError::BadQueueSize(s.num))?;
                self.slot(i)?.size = size;
                Ok(Reply::Ack)
            }
            R::SET_VRING_ADDR => {
                expect_fds(0, &fds)?;
                let a: VhostUserVringAddr = decode_exact(payload).ok_or_else(bad)?;
                let i = self.queue_index(u64::from(a.index))?;
                let addrs = VmmRingAddrs {
                    desc: a.descriptor,
                    avail: a.available,
                    used: a.used,
                };
                let used_log = if a.flags & VRING_F_LOG != 0 {
                    a.log
                } else {
                    crate::log_cursor::NO_USED_LOG
                };
                let slot = self.slot(i)?;
                if slot.worker.is_some() {
                    // A running ring may only change whether its used ring is logged (QEMU
                    // turns that on and off around a migration without stopping the ring).
                    if slot.vmm_addrs != Some(addrs) {
                        return Err(RequestError::QueueRunning(i));
                    }
                    slot.used_log
                        .store(used_log, std::sync::atomic::Ordering::Release);
                    // The worker takes it up at its next completion.
                    self.log.changed();
                    return Ok(Reply::Ack);
                }
                // Memory comes first (QEMU's order): rings outside it are refused outright.
                let outside = [a.descriptor, a.available, a.used]
                    .into_iter()
                    .find(|va| self.memory.vmm_to_guest(*va).is_none());
                if let (false, Some(va)) = (self.memory.is_empty(), outside) {
                    return Err(RequestError::RingOutsideMemory(va));
                }
                let slot = self.slot(i)?;
                slot.vmm_addrs = Some(addrs);
                slot.used_log
                    .store(used_log, std::sync::atomic::Ordering::Relaxed);
                self.update_queue(i);
                Ok(Reply::Ack)
            }
            R::SET_VRING_BASE => {
                expect_fds(0, &fds)?;
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let i = self.stopped_queue(u64::from(s.index))?;
                // Split rings: the next available index (16 bits); packed rings: both
                // positions with their wrap counters. Checked when the ring starts.
                if Layout::of_features(self.acked_features) == Layout::Split
                    && u16::try_from(s.num).is_err()
                {
                    return Err(bad());
                }
                self.slot(i)?.base = s.num;
                Ok(Reply::Ack)
            }
            R::GET_VRING_BASE => {
                expect_fds(0, &fds)?;
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let i = self.queue_index(u64::from(s.index))?;
                self.stop_queue(i);
                let slot = self.slot(i)?;
                // The ring is now stopped: a new SET_VRING_KICK starts it again.
                slot.kick = None;
                let state = VhostUserVringState::new(s.index, slot.base);
                Ok(Reply::Payload(state.as_slice().to_vec()))
            }
            R::SET_VRING_KICK => {
                let (i, fd) = self.vring_fd(req, payload, fds)?;
                self.stop_queue(i);
                let kick = match fd {
                    Some(fd) => Some(eventfd_from(fd)?),
                    None => None,
                };
                self.slot(i)?.kick = kick;
                self.update_queue(i);
                Ok(Reply::Ack)
            }
            R::SET_VRING_CALL => {
                let (i, fd) = self.vring_fd(req, payload, fds)?;
                let call = fd.map(eventfd_from).transpose()?;
                let slot = self.slot(i)?;
                slot.call.set(call);
                // A frontend that reconnects may have missed our last interrupt: one spurious
                // interrupt is harmless, a lost one hangs the guest driver.
                if slot.worker.is_some() {
                    slot.call.signal();
                }
                Ok(Reply::Ack)
            }
            R::SET_VRING_ERR => {
                let (i, fd) = self.vring_fd(req, payload, fds)?;
                let err = fd.map(eventfd_from).transpose()?;
                self.slot(i)?.err.set(err);
                Ok(Reply::Ack)
            }
            R::SET_VRING_ENABLE => {
                expect_fds(0, &fds)?;
                // QEMU's net frontend sends this before SET_FEATURES: protocol features having
                // been set is what counts.
                if self.acked_protocol.is_none() {
                    return Err(RequestError::ProtocolFeaturesNotNegotiated);
                }
                let s: VhostUserVringState = decode_exact(payload).ok_or_else(bad)?;
                let i = self.queue_index(u64::from(s.index))?;
                let enable = match s.num {
                    0 => false,
                    1 => true,
                    _ => return Err(bad()),
                };
                self.slot(i)?.enabled = enable;
                self.update_queue(i);
                Ok(Reply::Ack)
            }
            R::GET_CONFIG => {
                let (cfg, data): (VhostUserConfig, _) = decode_prefix(payload).ok_or_else(bad)?;
                let (offset, size) = (cfg.offset, cfg.size);
                if size == 0 || size > MAX_CONFIG_SIZE || data.len() != size as usize {
                    return Err(bad());
                }
                let mut out = vec![0u8; size as usize];
                self.device
                    .read_config(offset, &mut out)
                    .map_err(RequestError::Config)?;
                let mut reply = cfg.as_slice().to_vec();
                reply.extend_from_slice(&out);
                Ok(Reply::Payload(reply))
            }
            R::SET_CONFIG => {
                let (cfg, data): (VhostUserConfig, _) = decode_prefix(payload).ok_or_else(bad)?;
                let (offset, size) = (cfg.offset, cfg.size);
                if size == 0 || size > MAX_CONFIG_SIZE || data.len() != size as usize {
                    return Err(bad());
                }
                self.device
                    .write_config(offset, data)
                    .map_err(RequestError::Config)?;
                self.save_device_state()?;
                Ok(Reply::Ack)
            }
            R::NET_SET_MTU => {
                expect_fds(0, &fds)?;
                let mtu: u64 = decode_exact(payload).ok_or_else(bad)?;
                self.device
                    .set_mtu(u16::try_from(mtu).map_err(|_| bad())?)?;
                Ok(Reply::Ack)
            }
            R::GET_INFLIGHT_FD => {
                expect_fds(0, &fds)?;
                let q: VhostUserInflight = decode_exact(payload).ok_or_else(bad)?;
                // QEMU sets the features first, so the layout is known.
                let layout = Layout::of_features(self.acked_features);
                let region = InflightRegion::create_in(layout, q.num_queues, q.queue_size)?;
                let reply = VhostUserInflight::new(
                    region.mmap_size(),
                    region.mmap_offset(),
                    region.num_queues(),
                    region.queue_size(),
                );
                let fd = region
                    .fd()
                    .try_clone_to_owned()
                    .map_err(RequestError::EventFd)?;
                self.inflight = Some(Arc::new(region));
                self.save_device_state()?;
                Ok(Reply::PayloadWithFd(reply.as_slice().to_vec(), fd))
            }
            R::SET_INFLIGHT_FD => {
                expect_fds(1, &fds)?;
                let q: VhostUserInflight = decode_exact(payload).ok_or_else(bad)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let region = InflightRegion::adopt_in(
                    Layout::of_features(self.acked_features),
                    fd,
                    q.mmap_size,
                    q.mmap_offset,
                    q.num_queues,
                    q.queue_size,
                )?;
                match region.device_state() {
                    // A restart: the guest's earlier choices (QEMU does not send them again).
                    Some(state) => {
                        self.device.restore_state(&state);
                        self.state.resumed();
                        tracing::info!("device state restored from the inflight region");
                    }
                    None => {
                        region.set_device_state(&self.device.persistent_state())?;
                    }
                }
                self.inflight = Some(Arc::new(region));
                Ok(Reply::Ack)
            }
            R::SET_LOG_BASE => {
                expect_fds(1, &fds)?;
                let l: VhostUserLog = decode_exact(payload).ok_or_else(bad)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let log = DirtyLog::map(fd, l.mmap_size, l.mmap_offset)?
                    .counting_into(self.state.dirty_page_counter());
                tracing::info!(bytes = log.len(), "dirty log installed");
                // The old log (if any) is unmapped once no worker holds it any more.
                self.log.replace(Some(log));
                // The spec's answer to SET_LOG_BASE with LOG_SHMFD: a u64 payload, 0.
                Ok(u64_reply(0))
            }
            R::SEND_RARP => {
                expect_fds(0, &fds)?;
                let mac: u64 = decode_exact(payload).ok_or_else(bad)?;
                let b = mac.to_le_bytes();
                self.device
                    .send_rarp([b[0], b[1], b[2], b[3], b[4], b[5]])?;
                Ok(Reply::Ack)
            }
            R::SET_BACKEND_REQ_FD => {
                expect_fds(1, &fds)?;
                let fd = fds.into_iter().next().ok_or_else(bad)?;
                let reply_ack = self.negotiated(Some(VhostUserProtocolFeatures::REPLY_ACK));
                self.state
                    .set_backend(Some(BackendChannel::new(UnixStream::from(fd), reply_ack)));
                Ok(Reply::Ack)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Writes the device's persistent state into the inflight region, if there is one.
    pub(super) fn save_device_state(&self) -> Result<(), RequestError> {
        if let Some(region) = &self.inflight {
            region.set_device_state(&self.device.persistent_state())?;
        }
        Ok(())
    }

    pub(super) fn slot(&mut self, i: u16) -> Result<&mut QueueSlot, RequestError> {
        self.queues
            .get_mut(usize::from(i))
            .ok_or(RequestError::BadQueue(u64::from(i)))
    }

    pub(super) fn queue_index(&self, raw: u64) -> Result<u16, RequestError> {
        u16::try_from(raw)
            .ok()
            .filter(|i| usize::from(*i) < self.queues.len())
            .ok_or(RequestError::BadQueue(raw))
    }

    /// A queue index whose ring is not running (its layout may change).
    pub(super) fn stopped_queue(&self, raw: u64) -> Result<u16, RequestError> {
        let i = self.queue_index(raw)?;
        if self
            .queues
            .get(usize::from(i))
            .is_some_and(|q| q.worker.is_some())
        {
            return Err(RequestError::QueueRunning(i));
        }
        Ok(i)
    }

    /// Decodes the u64 payload of SET_VRING_KICK/CALL/ERR and checks the descriptor count.
    pub(super) fn vring_fd(
        &self,
        req: FrontendReq,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(u16, Option<OwnedFd>), RequestError> {
        let v: u64 = decode_exact(payload).ok_or(RequestError::BadPayload {
            req,
            got: payload.len(),
        })?;
        if v & !(VRING_INDEX_MASK | VRING_FD_INVALID) != 0 {
            return Err(RequestError::BadPayload {
                req,
                got: payload.len(),
            });
        }
        let i = self.queue_index(v & VRING_INDEX_MASK)?;
        let want = if v & VRING_FD_INVALID != 0 { 0 } else { 1 };
        if fds.len() != want {
            return Err(RequestError::BadFds {
                req,
                want,
                got: fds.len(),
            });
        }
        Ok((i, fds.into_iter().next()))
    }

    pub(super) fn install_memory(&mut self, snapshot: GuestMemory) {
        if let Ok(guard) = self.mem.lock() {
            guard.replace(snapshot);
        }
        // Queues waiting for their rings to become addressable may start now.
        self.update_all_queues();
    }
}

fn eventfd_from(fd: OwnedFd) -> Result<EventFd, RequestError> {
    crate::fd::set_nonblocking(fd.as_fd()).map_err(RequestError::EventFd)?;
    // SAFETY: we own `fd`; EventFd takes over ownership and closes it on drop.
    Ok(unsafe {
        <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
    })
}
