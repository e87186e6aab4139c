//! The control protocol, version 1: newline-delimited JSON over a unix stream socket. Each line
//! a client sends is one request and gets exactly one reply line, in order.
//!
//! ```text
//! → {"version":1,"command":"status"}
//! ← {"version":1,"ok":true,"result":{...}}
//! → {"version":1,"command":"resize","args":{"size":2147483648}}
//! ← {"version":1,"ok":false,"error":{"kind":"refused","message":"..."}}
//! ```
//!
//! Commands: `status`, `stats` (args `{"format":"json"|"prometheus"}`), and the device's own
//! (blk: `resize`, args `{"size":BYTES}` optional). A request of another version, malformed JSON,
//! an unknown command or bad arguments get an error reply; the connection stays usable.

use serde::{Deserialize, Serialize};

/// The protocol version this daemon speaks.
pub const VERSION: u32 = 1;
/// Longest request line accepted (a request is a few dozen bytes); a longer one is answered with
/// an error and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: String,
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not JSON, not a request, or too long.
    BadRequest,
    /// A version this daemon does not speak.
    Version,
    UnknownCommand,
    /// Arguments missing or of the wrong type.
    BadArguments,
    /// Understood, but not done (e.g. shrinking a disk).
    Refused,
    /// Tried and failed (e.g. the image could not be grown).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReply>,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            version: VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            version: VERSION,
            ok: false,
            result: None,
            error: Some(ErrorReply {
                kind,
                message: message.into(),
            }),
        }
    }

    /// The reply as one line (with its newline).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"version":1,"ok":false,"error":{"kind":"failed","message":"reply not serialisable"}}"#.to_vec()
        });
        line.push(b'\n');
        line
    }
}

/// A device command's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandDone {
    pub result: serde_json::Value,
    /// The config space changed: the engine tells the frontend (CONFIG_CHANGE_MSG).
    pub config_changed: bool,
}

/// Why a device command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command")]
    Unknown,
    #[error("{0}")]
    BadArguments(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CommandError::Unknown => ErrorKind::UnknownCommand,
            CommandError::BadArguments(_) => ErrorKind::BadArguments,
            CommandError::Refused(_) => ErrorKind::Refused,
            CommandError::Failed(_) => ErrorKind::Failed,
        }
    }
}

/// Parses one request line.
pub fn parse(line: &[u8]) -> Result<Request, Reply> {
    let req: Request = serde_json::from_slice(line)
        .map_err(|e| Reply::error(ErrorKind::BadRequest, format!("not a request: {e}")))?;
    if req.version != VERSION {
        return Err(Reply::error(
            ErrorKind::Version,
            format!(
                "version {} is not spoken here (this daemon speaks {VERSION})",
                req.version
            ),
        ));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_with_args_parses() {
        let r = parse(br#"{"version":1,"command":"resize","args":{"size":4096}}"#).unwrap();
        assert_eq!(r.command, "resize");
        assert_eq!(r.args["size"], 4096);
    }

    #[test]
    fn unknown_fields_and_other_versions_are_refused() {
        let e = parse(br#"{"version":1,"command":"status","extra":1}"#).unwrap_err();
        assert_eq!(e.error.unwrap().kind, ErrorKind::BadRequest);
        let e = parse(br#"{"version":2,"command":"status"}"#).unwrap_err();
        assert_eq!(e.error.unwrap().kind, ErrorKind::Version);
        let e = parse(b"{not json").unwrap_err();
        assert_eq!(e.error.unwrap().kind, ErrorKind::BadRequest);
    }

    #[test]
    fn reply_is_one_line() {
        let line = Reply::ok(serde_json::json!({"a": "b\nc"})).to_line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
