//! Split virtqueues, device side.

pub mod access;
pub mod chain;
pub mod split;
mod written;

pub use chain::{ChainError, Desc};
pub use split::{AvailChain, RingAddrs, RingError, SplitRing, MAX_QUEUE_SIZE};

#[cfg(test)]
mod tests;
