//! What each request may carry and needs: descriptor counts, the protocol feature it belongs to,
//! whether it has its own reply.

use super::*;

/// How many descriptors a request may carry; any others are refused (and closed).
pub(super) fn allowed_fds(req: FrontendReq) -> std::ops::RangeInclusive<usize> {
    use FrontendReq as R;
    match req {
        R::SET_MEM_TABLE => 0..=MAX_FDS,
        R::ADD_MEM_REG | R::SET_BACKEND_REQ_FD | R::SET_INFLIGHT_FD | R::SET_LOG_BASE => 1..=1,
        // QEMU 7.2 sends none with REM_MEM_REG, later versions may send the region's.
        R::REM_MEM_REG | R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => 0..=1,
        _ => 0..=0,
    }
}

/// The protocol feature a request belongs to (vhost-user.rst, "Front-end message types"): it
/// is refused unless that feature was negotiated, so a frontend cannot reach code paths (and
/// resources: inflight regions, a backend channel) the device never offered.
///
/// | request | needs |
/// | --- | --- |
/// | GET_QUEUE_NUM | MQ |
/// | GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG | CONFIGURE_MEM_SLOTS |
/// | GET_CONFIG, SET_CONFIG | CONFIG |
/// | GET_INFLIGHT_FD, SET_INFLIGHT_FD | INFLIGHT_SHMFD |
/// | SET_BACKEND_REQ_FD | BACKEND_REQ |
/// | NET_SET_MTU | MTU |
/// | SET_LOG_BASE | LOG_SHMFD |
/// | SEND_RARP | RARP |
/// | GET_STATUS, SET_STATUS | STATUS |
pub(super) fn needed_protocol_feature(req: FrontendReq) -> Option<VhostUserProtocolFeatures> {
    use FrontendReq as R;
    use VhostUserProtocolFeatures as P;
    match req {
        R::GET_QUEUE_NUM => Some(P::MQ),
        R::GET_MAX_MEM_SLOTS | R::ADD_MEM_REG | R::REM_MEM_REG => Some(P::CONFIGURE_MEM_SLOTS),
        R::GET_CONFIG | R::SET_CONFIG => Some(P::CONFIG),
        R::GET_INFLIGHT_FD | R::SET_INFLIGHT_FD => Some(P::INFLIGHT_SHMFD),
        R::SET_BACKEND_REQ_FD => Some(P::BACKEND_REQ),
        R::NET_SET_MTU => Some(P::MTU),
        R::SET_LOG_BASE => Some(P::LOG_SHMFD),
        R::SEND_RARP => Some(P::RARP),
        R::GET_STATUS | R::SET_STATUS => Some(P::STATUS),
        _ => None,
    }
}

pub(super) fn has_reply(req: FrontendReq) -> bool {
    use FrontendReq as R;
    matches!(
        req,
        R::GET_FEATURES
            | R::GET_PROTOCOL_FEATURES
            | R::GET_QUEUE_NUM
            | R::GET_VRING_BASE
            | R::GET_CONFIG
            | R::GET_INFLIGHT_FD
            | R::GET_MAX_MEM_SLOTS
            | R::GET_STATUS
            | R::GET_SHARED_OBJECT
            | R::GET_SHMEM_CONFIG
            | R::SET_LOG_BASE
            | R::POSTCOPY_ADVISE
            | R::SET_DEVICE_STATE_FD
            | R::CHECK_DEVICE_STATE
    )
}
