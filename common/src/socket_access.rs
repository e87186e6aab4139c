//! Who may connect to the sockets a daemon creates (`--socket-group`, `--socket-mode`).
//!
//! QEMU under libvirt runs as an unprivileged user (Debian: `libvirt-qemu`, group `kvm`), so a
//! socket created by root with the default mode is closed to it. The socket is bound with a
//! umask that leaves it readable and writable by its owner only, then given its group and mode,
//! all before the daemon accepts anyone: no connection can slip in with looser permissions.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Mode given to a socket when only a group is named: owner and group may connect.
pub const DEFAULT_GROUP_MODE: u32 = 0o660;
/// Umask while binding: the socket file starts as 0600 (no window with looser permissions).
const BIND_UMASK: libc::mode_t = 0o177;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("no group {0:?}")]
    NoGroup(String),
    #[error("socket mode {0:#o} has bits beyond 0777")]
    Mode(u32),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot give {path} to group {gid}")]
    Chown {
        path: PathBuf,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the mode of {path} to {mode:#o}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
}

/// Ownership and mode for the sockets a daemon creates. The default changes nothing: the
/// socket gets the process's umask, as before these options existed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    gid: Option<u32>,
    mode: Option<u32>,
}

impl SocketAccess {
    /// `group` is a group name or a numeric id; `mode` defaults to 0660 when a group is given.
    pub fn new(group: Option<&str>, mode: Option<u32>) -> Result<Self, AccessError> {
        if let Some(m) = mode.filter(|m| *m & !0o777 != 0) {
            return Err(AccessError::Mode(m));
        }
        let gid = group.map(resolve_group).transpose()?;
        let mode = mode.or(gid.map(|_| DEFAULT_GROUP_MODE));
        Ok(Self { gid, mode })
    }

    /// Whether any option was given (they apply only to sockets the daemon creates).
    pub fn is_set(&self) -> bool {
        self.gid.is_some() || self.mode.is_some()
    }

    /// Binds a listening socket at `path` with this access. A stale socket file (nobody
    /// listening) from an earlier instance is replaced; a live one is an error.
    pub fn listen(&self, path: &Path) -> Result<UnixListener, AccessError> {
        let listener = self.bind_replacing_stale(path)?;
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| {
                AccessError::Chown {
                    path: path.to_owned(),
                    gid,
                    source,
                }
            })?;
        }
        if let Some(mode) = self.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
                |source| AccessError::Chmod {
                    path: path.to_owned(),
                    mode,
                    source,
                },
            )?;
        }
        Ok(listener)
    }

    fn bind_replacing_stale(&self, path: &Path) -> Result<UnixListener, AccessError> {
        let err = |source| AccessError::Listen {
            path: path.to_owned(),
            source,
        };
        match self.bind(path) {
            Ok(l) => Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(err(e));
                }
                std::fs::remove_file(path).map_err(err)?;
                self.bind(path).map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }

    fn bind(&self, path: &Path) -> io::Result<UnixListener> {
        if !self.is_set() {
            return UnixListener::bind(path);
        }
        // The umask is process-wide: this runs during start-up, before any other thread that
        // creates files exists.
        // SAFETY: umask only swaps the process's file-creation mask.
        let old = unsafe { libc::umask(BIND_UMASK) };
        let r = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        r
    }
}

/// Parses an octal mode such as `0660` or `660` (clap value parser).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode between 0 and 0777"))
}

fn resolve_group(name: &str) -> Result<u32, AccessError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    crate::sandbox::lookup_group(name).map_err(|_| AccessError::NoGroup(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A socket path in a directory of its own, removed when the guard goes.
    struct TempSock {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Drop for TempSock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn temp_sock(name: &str) -> TempSock {
        let dir =
            std::env::temp_dir().join(format!("bulkhead-access-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s.sock");
        TempSock { dir, path }
    }

    #[test]
    fn group_without_mode_gives_owner_and_group_access() {
        let sock = temp_sock("group");
        let path = &sock.path;
        // SAFETY: getgid has no side effects.
        let gid = unsafe { libc::getgid() };
        let access = SocketAccess::new(Some(&gid.to_string()), None).unwrap();
        let _l = access.listen(path).unwrap();
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
    }

    #[test]
    fn explicit_mode_is_applied() {
        let sock = temp_sock("mode");
        let path = &sock.path;
        let access = SocketAccess::new(None, Some(0o600)).unwrap();
        let _l = access.listen(path).unwrap();
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn unknown_group_name_is_refused() {
        assert!(matches!(
            SocketAccess::new(Some("no-such-group-bulkhead"), None),
            Err(AccessError::NoGroup(_))
        ));
    }

    #[test]
    fn modes_parse_as_octal_and_refuse_extra_bits() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("4777").is_err());
        assert!(parse_mode("99").is_err());
    }

    #[test]
    fn a_live_socket_is_not_replaced() {
        let sock = temp_sock("live");
        let path = &sock.path;
        let access = SocketAccess::default();
        let _first = access.listen(path).unwrap();
        assert!(matches!(
            access.listen(path),
            Err(AccessError::Listen { .. })
        ));
    }
}
