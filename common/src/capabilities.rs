//! `--print-capabilities` output and the backend description file, per QEMU's
//! `docs/interop/vhost-user.json` schema.

use serde::Serialize;

/// `VHostUserBackendCapabilities`: the backend type and the optional features it supports.
#[derive(Debug, Serialize)]
pub struct Capabilities<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub features: &'a [&'a str],
}

impl Capabilities<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}
