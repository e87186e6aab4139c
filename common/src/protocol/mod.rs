//! vhost-user wire format and message framing.

pub mod backend;
pub mod channel;
pub mod wire;
