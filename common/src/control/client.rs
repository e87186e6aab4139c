//! The client side of the control protocol (`bulkhead-ctl`, and the tests).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use super::protocol::{Reply, Request, VERSION};

/// How long a reply may take (a resize waits for the frontend's acknowledgement, up to 5 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot send the request")]
    Send(#[source] io::Error),
    #[error("no reply")]
    Receive(#[source] io::Error),
    #[error("the daemon closed the connection without replying")]
    Closed,
    #[error("the reply is not valid")]
    BadReply(#[source] serde_json::Error),
}

/// A request for `command` with `args`.
pub fn request(command: &str, args: serde_json::Map<String, serde_json::Value>) -> Request {
    Request {
        version: VERSION,
        command: command.to_owned(),
        args,
    }
}

/// Sends one request and waits for its reply.
pub fn call(path: &Path, req: &Request) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(ClientError::Receive)?;
    let mut line = serde_json::to_vec(req).map_err(ClientError::BadReply)?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(ClientError::Send)?;
    let mut reader = BufReader::new(&stream);
    let mut reply = String::new();
    if reader.read_line(&mut reply).map_err(ClientError::Receive)? == 0 {
        return Err(ClientError::Closed);
    }
    serde_json::from_str(&reply).map_err(ClientError::BadReply)
}
