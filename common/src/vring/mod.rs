//! Virtqueues, device side: split rings and packed rings behind one [`Ring`].

pub mod access;
pub mod chain;
pub mod packed;
pub mod packed_chain;
pub mod packed_scan;
mod ring;
pub mod split;
mod written;

pub use chain::{ChainError, Desc};
pub use packed::{PackedBase, PackedRing};
pub use ring::{Layout, Ring};
pub use split::{AvailChain, RingAddrs, RingError, SplitRing, MAX_QUEUE_SIZE};

#[cfg(test)]
mod packed_tests;
#[cfg(test)]
mod tests;
