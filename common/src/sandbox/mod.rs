//! Containment after set-up: a daemon opens what needs privilege first (its image, its TAP, its
//! socket), then drops to an unprivileged user and confines itself to the system calls its data
//! path needs. A guest or frontend that subverts the daemon then holds little.

mod privileges;
mod seccomp;

pub use privileges::{drop_to, lookup_group, PrivilegeError};
pub use seccomp::{install, Allow, SeccompError};

/// What to do once set-up is over.
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    /// Switch to this user (and its primary group unless `group` is given).
    pub user: Option<String>,
    pub group: Option<String>,
    /// Confine to the allow-list (off only for debugging).
    pub seccomp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Drops privileges, then installs the filter (whose allow-list is the engine's plus `extra`).
/// Call once, before any worker thread exists, so every thread inherits both.
pub fn enter(opts: &SandboxOptions, extra: &[Allow]) -> Result<(), SandboxError> {
    if opts.user.is_some() || opts.group.is_some() {
        drop_to(opts.user.as_deref(), opts.group.as_deref())?;
    }
    if opts.seccomp {
        install(extra)?;
    } else {
        // Not guest-triggerable: once, at start-up
        tracing::event!(
            tracing::Level::WARN,
            "seccomp filter disabled (--no-seccomp)"
        );
    }
    Ok(())
}
