//! Switching to an unprivileged user and group (`--user`, `--group`).

use std::ffi::CString;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no user {0:?}")]
    NoUser(String),
    #[error("no group {0:?}")]
    NoGroup(String),
    #[error("cannot switch to uid {uid} gid {gid}")]
    Switch {
        uid: u32,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("still able to regain root after switching users")]
    NotDropped,
}

fn lookup_user(name: &str) -> Result<(u32, u32), PrivilegeError> {
    let c = CString::new(name).map_err(|_| PrivilegeError::NoUser(name.to_owned()))?;
    // SAFETY: passwd is plain data; getpwnam_r fills it and `buf`, both ours, within their sizes.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf.len()` is its true size.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(PrivilegeError::NoUser(name.to_owned()));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

/// The id of group `name`.
pub fn lookup_group(name: &str) -> Result<u32, PrivilegeError> {
    let c = CString::new(name).map_err(|_| PrivilegeError::NoGroup(name.to_owned()))?;
    // SAFETY: as for getpwnam_r above.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf.len()` is its true size.
    let r = unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(PrivilegeError::NoGroup(name.to_owned()));
    }
    Ok(gr.gr_gid)
}

/// Becomes `user` (with its primary group) and/or `group`, dropping supplementary groups.
pub fn drop_to(user: Option<&str>, group: Option<&str>) -> Result<(), PrivilegeError> {
    // SAFETY: getuid/getgid have no side effects.
    let (mut uid, mut gid) = (unsafe { libc::getuid() }, unsafe { libc::getgid() });
    if let Some(u) = user {
        (uid, gid) = lookup_user(u)?;
    }
    if let Some(g) = group {
        gid = lookup_group(g)?;
    }
    let fail = |uid, gid| PrivilegeError::Switch {
        uid,
        gid,
        source: io::Error::last_os_error(),
    };
    // Order matters: groups and gid while still privileged, uid last.
    // SAFETY: setgroups with one valid gid.
    if unsafe { libc::setgroups(1, &gid) } != 0 {
        return Err(fail(uid, gid));
    }
    // SAFETY: plain id switches.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(fail(uid, gid));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(fail(uid, gid));
    }
    // SAFETY: setuid(0) only tests whether root can be regained; it must fail for a non-root uid.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(PrivilegeError::NotDropped);
    }
    let user = user.map_or_else(String::new, str::to_owned);
    tracing::info!(uid, gid, user = %user, "dropped privileges");
    Ok(())
}
