//! The vhost-user request state machine fed an arbitrary byte stream, as a hostile frontend would
//! send it: framing, headers, payload decoding, every request handler. No descriptors (a byte
//! stream cannot carry them), so requests that need them take their refusal paths.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use bulkhead_common::serve::EngineOptions;
use bulkhead_common::session::Session;
use bulkhead_common::signals::Signals;
use bulkhead_common::vring::RingError;
use bulkhead_common::{Device, DeviceError, Progress, QueueCtx, QueueHandler};
use libfuzzer_sys::fuzz_target;

/// A device that completes every chain it is given.
struct Echo;
struct EchoQueue;

impl QueueHandler for EchoQueue {
    fn process(&mut self, q: &mut QueueCtx<'_>) -> Result<Progress, RingError> {
        let mut d = Vec::new();
        while let Some(c) = q.pop(&mut d)? {
            q.complete(c.head, 0)?;
        }
        Ok(Progress::Idle)
    }
    fn drain(&mut self, _q: &mut QueueCtx<'_>) -> Result<(), RingError> {
        Ok(())
    }
}

impl Device for Echo {
    type Handler = EchoQueue;
    fn features(&self) -> u64 {
        1 << 32 | 1 << 29 | 1 << 28
    }
    fn protocol_features(&self) -> vhost::vhost_user::message::VhostUserProtocolFeatures {
        vhost::vhost_user::message::VhostUserProtocolFeatures::CONFIG
            | vhost::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn read_config(&self, offset: u32, out: &mut [u8]) -> Result<(), DeviceError> {
        if offset as usize + out.len() > 64 {
            return Err(DeviceError::ConfigRange {
                offset,
                len: out.len(),
            });
        }
        out.fill(7);
        Ok(())
    }
    fn queue_handler(&self, _index: u16, _features: u64) -> Result<EchoQueue, DeviceError> {
        Ok(EchoQueue)
    }
    fn kind(&self) -> &'static str {
        "echo"
    }
}

fn signals() -> &'static Signals {
    static S: OnceLock<Signals> = OnceLock::new();
    S.get_or_init(|| Signals::install().expect("signalfd"))
}

fuzz_target!(|data: &[u8]| {
    let signals = signals();
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    // The whole input, then end of stream: the session must return, whatever it was sent.
    let _ = ours.write_all(data);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let state = Arc::new(bulkhead_common::control::state::EngineState::new(2));
    Session::new(Arc::new(Echo), theirs, EngineOptions::default(), state).run(signals);
});
