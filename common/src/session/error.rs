//! Why the session refused a request.

use super::*;

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    #[error("request {0:?} is not supported")]
    Unsupported(FrontendReq),
    #[error("payload of {got} bytes for {req:?} is malformed")]
    BadPayload { req: FrontendReq, got: usize },
    #[error("{req:?} needs {want} file descriptors, got {got}")]
    BadFds {
        req: FrontendReq,
        want: usize,
        got: usize,
    },
    #[error("more file descriptors than a message may carry")]
    TooManyFds,
    #[error("queue index {0} out of range")]
    BadQueue(u64),
    #[error("queue size {0} is not a power of two up to the maximum")]
    BadQueueSize(u32),
    #[error("queue {0} is running; stop it first")]
    QueueRunning(u16),
    #[error("features {0:#x} were not offered")]
    UnofferedFeatures(u64),
    #[error("protocol features {0:#x} were not offered")]
    UnofferedProtocolFeatures(u64),
    #[error("{0:?} belongs to a protocol feature that was not negotiated")]
    ProtocolFeatureNotNegotiated(FrontendReq),
    #[error("SET_VRING_ENABLE before protocol features were negotiated")]
    ProtocolFeaturesNotNegotiated,
    #[error("invalid config access")]
    Config(#[source] DeviceError),
    #[error("memory table update refused")]
    Memory(#[from] MemoryError),
    #[error("device refused")]
    Device(#[from] DeviceError),
    #[error("ring address {0:#x} is outside guest memory")]
    RingOutsideMemory(u64),
    #[error("inflight region refused")]
    Inflight(#[from] InflightError),
    #[error("dirty log refused")]
    Log(#[from] crate::dirty_log::LogError),
    #[error("cannot set up the eventfd")]
    EventFd(#[source] std::io::Error),
}
