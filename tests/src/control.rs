//! Asking a daemon over its control socket, as an operator would: through the `bulkhead-ctl`
//! binary, or with the protocol library for raw requests.

use std::path::Path;
use std::process::Output;

use anyhow::{bail, ensure, Context, Result};
use bulkhead_common::control::client;
use serde_json::{Map, Value};

/// Runs `bulkhead-ctl --socket SOCKET ARGS...`.
pub fn ctl(socket: &Path, args: &[&str]) -> Result<Output> {
    let out = std::process::Command::new(crate::daemon::binary("bulkhead-ctl")?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .context("running bulkhead-ctl")?;
    Ok(out)
}

/// Runs `bulkhead-ctl` and parses its JSON output; fails if it failed.
pub fn ctl_json(socket: &Path, args: &[&str]) -> Result<Value> {
    let out = ctl(socket, args)?;
    ensure!(
        out.status.success(),
        "bulkhead-ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("bulkhead-ctl printed no JSON")
}

/// Pages the daemon behind `control` has marked in migration dirty logs so far (`status`'s
/// `dirty_pages_logged`); `None` without a control socket (a peer backend).
pub fn dirty_pages_logged(control: Option<&Path>) -> Result<Option<u64>> {
    let Some(control) = control else {
        return Ok(None);
    };
    let status = ctl_json(control, &["status"])?;
    let pages = status["dirty_pages_logged"]
        .as_u64()
        .with_context(|| format!("no dirty_pages_logged in {status}"))?;
    Ok(Some(pages))
}

/// One raw request through the protocol library; returns the whole reply.
pub fn call(socket: &Path, command: &str, args: Value) -> Result<client::Reply> {
    let args = match args {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => bail!("arguments must be an object, not {other}"),
    };
    Ok(client::call(socket, &client::request(command, args))?)
}

/// The value of the sample of family `name` whose labels include all of `labels`, from a
/// `stats` JSON result.
pub fn sample(stats: &Value, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let family = stats["families"]
        .as_array()
        .context("no families")?
        .iter()
        .find(|f| f["name"] == name)
        .with_context(|| format!("no family {name}"))?;
    let s = family["samples"]
        .as_array()
        .context("no samples")?
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .with_context(|| format!("no sample of {name} with {labels:?}"))?;
    s["value"]
        .as_f64()
        .or_else(|| s["count"].as_f64())
        .with_context(|| format!("sample of {name} has no value"))
}
