//! The ring engine under arbitrary sequences of take / complete / put back, over an arbitrary
//! available ring and descriptor table, with passes ending anywhere and the queue finally
//! stopped. The model it is held to: a chain put back is the next one handed out (same ring
//! position, before any new chain); a completed position is never handed out again; new
//! positions come in ring order; and the device never returns more chains than were made
//! available.
#![no_main]

use std::collections::{HashSet, VecDeque};

use arbitrary::Arbitrary;
use bulkhead_common::local::{DirectQueue, LocalRing};
use bulkhead_common::vring::{AvailChain, Desc, RingAddrs, RingError};
use bulkhead_common::{GuestMemory, Progress, QueueCtx, QueueHandler};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 64 * 1024;
const SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Op {
    Take,
    /// Complete the i-th chain in hand with this length.
    Complete(u8, u16),
    /// Put the i-th chain in hand back.
    PutBack(u8),
    /// End the pass.
    EndPass,
}

#[derive(Debug, Arbitrary)]
struct Input {
    memory: Vec<u8>,
    made_available: u8,
    ops: Vec<Op>,
}

/// Plays the ops and checks every chain handed out against the model.
struct Script {
    ops: VecDeque<Op>,
    descs: Vec<Desc>,
    in_hand: Vec<AvailChain>,
    put_back: VecDeque<u16>,
    completed: HashSet<u16>,
    next_fresh: u16,
}

impl Script {
    fn take(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        let Some(c) = ctx.pop(&mut self.descs)? else {
            assert!(self.put_back.is_empty(), "a chain put back was not handed out again");
            return Ok(());
        };
        if let Some(pos) = self.put_back.pop_front() {
            assert_eq!(c.pos, pos, "not the chain put back first");
        } else {
            assert_eq!(c.pos, self.next_fresh, "new chains out of ring order");
            self.next_fresh = self.next_fresh.wrapping_add(1);
        }
        assert!(!self.completed.contains(&c.pos), "a completed chain came out again");
        self.in_hand.push(c);
        Ok(())
    }
}

impl QueueHandler for Script {
    fn process(&mut self, ctx: &mut QueueCtx<'_>) -> Result<Progress, RingError> {
        while let Some(op) = self.ops.pop_front() {
            match op {
                Op::Take => self.take(ctx)?,
                Op::Complete(i, len) => {
                    if self.in_hand.is_empty() {
                        continue;
                    }
                    let c = self.in_hand.remove(usize::from(i) % self.in_hand.len());
                    self.completed.insert(c.pos);
                    ctx.complete(c.head, u32::from(len))?;
                }
                Op::PutBack(i) => {
                    if self.in_hand.is_empty() {
                        continue;
                    }
                    let c = self.in_hand.remove(usize::from(i) % self.in_hand.len());
                    ctx.put_back(&c)?;
                    self.put_back.push_back(c.pos);
                }
                Op::EndPass => return Ok(Progress::Waiting),
            }
        }
        Ok(Progress::Idle)
    }

    fn drain(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), RingError> {
        // Whatever is still in hand is completed; what was put back the engine deals with.
        for c in self.in_hand.drain(..) {
            self.completed.insert(c.pos);
            ctx.complete(c.head, 0)?;
        }
        Ok(())
    }
}

fuzz_target!(|input: Input| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory");
    let bytes: Vec<u8> = input.memory.iter().copied().take(0x100).collect();
    let _ = mem.write_slice(&bytes, GuestAddress(DESC));
    let avail = u16::from(input.made_available) % (SIZE + 1);
    for k in 0..avail {
        let _ = mem.write_obj(k % SIZE, GuestAddress(AVAIL + 4 + 2 * u64::from(k)));
    }
    let _ = mem.write_obj(avail, GuestAddress(AVAIL + 2));
    let script = Script {
        ops: input.ops.iter().copied().take(256).collect(),
        descs: Vec::new(),
        in_hand: Vec::new(),
        put_back: VecDeque::new(),
        completed: HashSet::new(),
        next_fresh: 0,
    };
    let ring = LocalRing {
        size: SIZE,
        addrs: RingAddrs {
            desc: GuestAddress(DESC),
            avail: GuestAddress(AVAIL),
            used: GuestAddress(USED),
        },
        event_idx: true,
        indirect: true,
        layout: bulkhead_common::vring::Layout::Split,
    };
    let Ok(mut q) = DirectQueue::new(script, mem.clone(), ring) else { return };
    for _ in 0..32 {
        if q.run().is_err() {
            break;
        }
    }
    let _ = q.drain();
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
    assert!(used <= avail, "{used} chains returned of {avail} made available");
});
