//! Telling systemd (`Type=notify`) about the daemon's state.

use std::path::Path;

/// Tells systemd (`Type=notify`) about our state; a no-op without `NOTIFY_SOCKET`.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = result {
        // Not guest-triggerable: start-up and shutdown only
        // Not guest-triggerable: start-up and shutdown only.
        tracing::event!(tracing::Level::WARN, "sd_notify failed: {e}");
    }
}
