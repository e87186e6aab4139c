//! vhost-user wire format and message framing.

pub mod channel;
pub mod wire;
