//! Where a packed ring stands, read off the descriptor ring itself: for a restarted daemon
//! without an inflight region (vhost-user-net: QEMU tracks inflight I/O only for block
//! devices). QEMU cannot read a packed ring's positions from guest memory, so after a crash it
//! resends stale ones (`virtio_queue_packed_restore_last_avail_idx` rewinds to the last used
//! index it was told), and a split ring's trick — the used index is in memory — does not exist.
//!
//! Every slot holds the latest write to it, which is the driver's (available, in the lap of its
//! position) for positions from the device's used position up to the driver's, and the
//! device's (used, in the lap of its position) for the `size` positions before that. So in ring
//! order the slots form one run of used descriptors followed by one run of available ones
//! (either may be empty), and the device's next used position is where the used run ends; when
//! only one kind is present, the laps tell where the positions wrapped. A zeroed ring reads as
//! "all used in lap 0", which is right: the driver's first lap has wrap counter 1.
//!
//! This is only the device's position when the device completes chains in the order it took
//! them (then every chain it took and did not complete is still an available run from that
//! position: it is taken again). Devices that complete out of order need the inflight region.

#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use super::packed_chain::{Pos, F_AVAIL, F_USED};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Avail,
    Used,
}

/// A slot's kind and the lap bit its flags carry.
fn classify(flags: u16) -> (Kind, bool) {
    let avail = flags & F_AVAIL != 0;
    let used = flags & F_USED != 0;
    if avail == used {
        (Kind::Used, avail)
    } else {
        (Kind::Avail, avail)
    }
}

/// What a scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The device's next used position (and so, for an in-order device, its next available
    /// one).
    pub used: Pos,
    /// Whether the ring had exactly the one used→available boundary a quiescent driver leaves
    /// (false: a driver was writing a chain meanwhile, or the ring is not a driver's; the
    /// caller may look again).
    pub clean: bool,
}

/// Finds the device's used position in a ring of `size` slots whose flags `flags` reads
/// (`None`: unreadable).
pub fn device_position(size: u16, flags: impl Fn(u16) -> Option<u16>) -> Option<Scan> {
    if size == 0 {
        return None;
    }
    let mut slots = Vec::with_capacity(usize::from(size));
    for s in 0..size {
        slots.push(classify(flags(s)?));
    }
    let prev = |s: u16| {
        if s == 0 {
            size.saturating_sub(1)
        } else {
            s.saturating_sub(1)
        }
    };
    let get = |s: u16| slots.get(usize::from(s)).copied();
    // Used → available boundaries; with several (a chain being written, whose first slot is
    // still the old used one), the one after the longest used run.
    let mut best: Option<(u16, u16)> = None;
    let mut boundaries = 0u32;
    for s in 0..size {
        let (Some((k, _)), Some((pk, _))) = (get(s), get(prev(s))) else {
            return None;
        };
        if k == Kind::Avail && pk == Kind::Used {
            boundaries = boundaries.saturating_add(1);
            let mut run: u16 = 0;
            let mut t = prev(s);
            while run < size && get(t).is_some_and(|(k, _)| k == Kind::Used) {
                run = run.saturating_add(1);
                t = prev(t);
            }
            if best.is_none_or(|(r, _)| run > r) {
                best = Some((run, s));
            }
        }
    }
    if let Some((_, s)) = best {
        let (_, lap) = get(s)?;
        return Some(Scan {
            used: Pos { slot: s, wrap: lap },
            clean: boundaries == 1,
        });
    }
    // One kind only: positions wrapped where the lap bit changes from slot to slot (index
    // order). All available: the device's position is the first slot of the older lap. All
    // used: the first slot that the device has not yet written in its current lap.
    let (kind, first_lap) = get(0)?;
    let change = (1..size).find(|&s| get(s).is_some_and(|(_, lap)| lap != first_lap));
    let used = match (kind, change) {
        (Kind::Avail, Some(s)) => Pos {
            slot: s,
            wrap: !first_lap,
        },
        (Kind::Avail, None) => Pos {
            slot: 0,
            wrap: first_lap,
        },
        (Kind::Used, Some(s)) => Pos {
            slot: s,
            wrap: first_lap,
        },
        (Kind::Used, None) => Pos {
            slot: 0,
            wrap: !first_lap,
        },
    };
    Some(Scan { used, clean: true })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;

    /// A model of a ring driven in order: absolute positions, as in the module comment.
    fn ring(size: u16, used_abs: u32, driver_abs: u32) -> Vec<u16> {
        let mut flags = vec![0u16; usize::from(size)];
        let lap = |p: u32| (p / u32::from(size)).is_multiple_of(2);
        let start = driver_abs.saturating_sub(u32::from(size));
        for p in start..driver_abs {
            let s = (p % u32::from(size)) as usize;
            flags[s] = if p < used_abs {
                if lap(p) {
                    F_AVAIL | F_USED
                } else {
                    0
                }
            } else if lap(p) {
                F_AVAIL
            } else {
                F_USED
            };
        }
        flags
    }

    #[test]
    fn the_used_position_is_found_in_every_state_of_an_in_order_ring() {
        for size in [1u16, 2, 3, 5, 8, 13] {
            let n = u32::from(size);
            for used in 0..(4 * n) {
                for ahead in 0..=n {
                    let driver = used + ahead;
                    let flags = ring(size, used, driver);
                    let got =
                        device_position(size, |s| flags.get(usize::from(s)).copied()).unwrap();
                    let want = Pos {
                        slot: (used % n) as u16,
                        wrap: (used / n).is_multiple_of(2),
                    };
                    assert_eq!(got.used, want, "size {size} used {used} driver {driver}");
                    assert!(got.clean);
                }
            }
        }
    }

    #[test]
    fn a_chain_half_written_by_the_driver_does_not_move_the_position() {
        // Size 8, device at 2 (lap 1), driver at 5: slots 5 and 6 hold a two-slot chain whose
        // first flags (slot 5) are not written yet.
        let mut flags = ring(8, 2, 5);
        flags[6] = F_AVAIL;
        let got = device_position(8, |s| flags.get(usize::from(s)).copied()).unwrap();
        assert_eq!(
            got.used,
            Pos {
                slot: 2,
                wrap: true
            }
        );
        assert!(!got.clean);
    }

    #[test]
    fn an_unreadable_ring_gives_nothing() {
        assert_eq!(device_position(4, |_| None), None);
        assert_eq!(device_position(0, |_| Some(0)), None);
    }
}
