//! The control protocol fed arbitrary lines, as a hostile local client would send them: parsing,
//! version and argument checks, and every command of a real block device (a null disk, so that
//! resizes of any size are possible) through the engine's handler.
#![no_main]

use std::sync::{Arc, OnceLock};

use bulkhead_common::control::protocol;
use bulkhead_common::control::state::EngineState;
use bulkhead_common::control::{Engine, Handler};
use libfuzzer_sys::fuzz_target;
use vhost_user_blk::disk::Disk;
use vhost_user_blk::io::IoEngine;
use vhost_user_blk::{BlkDevice, BlkOptions};

fn engine() -> &'static Engine<BlkDevice> {
    static E: OnceLock<Engine<BlkDevice>> = OnceLock::new();
    E.get_or_init(|| {
        let disk = Disk::null(1 << 30, false).expect("null disk");
        let dev = BlkDevice::new(
            disk,
            BlkOptions {
                num_queues: 2,
                queue_size: 256,
                engine: IoEngine::Sync,
                serial: [0; 20],
                stats: true,
            },
        );
        Engine::new(Arc::new(dev), Arc::new(EngineState::new(2)))
    })
}

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        let reply = match protocol::parse(line) {
            Ok(req) => engine().handle(&req),
            Err(reply) => reply,
        };
        let out = reply.to_line();
        assert_eq!(
            out.iter().filter(|b| **b == b'\n').count(),
            1,
            "one reply, one line"
        );
    }
});
