//! The engine's commands (`status`, `stats`) and the hand-off of the rest to the device.

use std::sync::Arc;

use serde_json::{json, Value};

use super::metrics::{Family, Kind, Metrics};
use super::protocol::{ErrorKind, Reply, Request};
use super::server::Handler;
use super::state::EngineState;
use crate::device::Device;

/// Answers control requests for one daemon.
#[derive(Debug)]
pub struct Engine<D> {
    device: Arc<D>,
    state: Arc<EngineState>,
}

impl<D: Device> Engine<D> {
    pub fn new(device: Arc<D>, state: Arc<EngineState>) -> Self {
        Self { device, state }
    }

    /// The daemon's statistics: the engine's own, then the device's.
    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::default();
        let status = self.state.status();
        let mut uptime = Family::new(
            "bulkhead_uptime_seconds",
            "Seconds since the daemon started.",
            Kind::Gauge,
        );
        uptime.float(Vec::new(), status.uptime_s);
        m.push(uptime);
        let unlabelled: [(&'static str, &'static str, Kind, u64); 5] = [
            (
                "bulkhead_frontend_connected",
                "1 while a frontend (VMM) is connected.",
                Kind::Gauge,
                u64::from(status.frontend.connected),
            ),
            (
                "bulkhead_sessions_total",
                "Frontend connections served.",
                Kind::Counter,
                status.sessions,
            ),
            (
                "bulkhead_resumed_sessions_total",
                "Sessions that resumed a frontend's earlier state (a daemon restart or a reconnection under a running VM).",
                Kind::Counter,
                status.resumed_sessions,
            ),
            (
                "bulkhead_requests_resubmitted_total",
                "Requests found in flight after a restart and executed again.",
                Kind::Counter,
                status.requests_resubmitted,
            ),
            (
                "bulkhead_dirty_pages_logged_total",
                "Guest pages marked in a migration's dirty log, each time the page's bit went from clear to set (the frontend clears bits as it copies pages).",
                Kind::Counter,
                status.dirty_pages_logged,
            ),
        ];
        for (name, help, kind, value) in unlabelled {
            let mut f = Family::new(name, help, kind);
            f.number(Vec::new(), value);
            m.push(f);
        }
        self.device.metrics(&mut m);
        m
    }

    fn stats(&self, req: &Request) -> Reply {
        let format = match req.args.get("format") {
            None => "json",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Reply::error(ErrorKind::BadArguments, "format must be a string"),
        };
        if let Some(other) = req.args.keys().find(|k| *k != "format") {
            return Reply::error(
                ErrorKind::BadArguments,
                format!("stats takes no argument {other:?}"),
            );
        }
        let m = self.metrics();
        match format {
            "json" => Reply::ok(serde_json::to_value(&m).unwrap_or(Value::Null)),
            "prometheus" => Reply::ok(Value::String(m.to_prometheus())),
            other => Reply::error(
                ErrorKind::BadArguments,
                format!("format {other:?}: json or prometheus"),
            ),
        }
    }

    fn device_command(&self, req: &Request) -> Reply {
        let done = match self.device.command(&req.command, &req.args) {
            Ok(d) => d,
            Err(e) => {
                let message = match &e {
                    crate::control::protocol::CommandError::Unknown => format!(
                        "unknown command {:?} (commands: status, stats{})",
                        req.command,
                        self.device
                            .commands()
                            .iter()
                            .map(|c| format!(", {c}"))
                            .collect::<String>()
                    ),
                    other => other.to_string(),
                };
                return Reply::error(e.kind(), message);
            }
        };
        let mut result = done.result;
        if done.config_changed {
            let (notified, error) = match self.state.notify_config_change() {
                Ok(n) => (n, None),
                Err(e) => (false, Some(crate::logging::chain(&e))),
            };
            if let Some(obj) = result.as_object_mut() {
                obj.insert("guest_notified".into(), json!(notified));
                if let Some(e) = error {
                    obj.insert("notify_error".into(), json!(e));
                }
            }
        }
        Reply::ok(result)
    }
}

impl<D: Device> Handler for Engine<D> {
    fn handle(&self, req: &Request) -> Reply {
        match req.command.as_str() {
            "status" => {
                if !req.args.is_empty() {
                    return Reply::error(ErrorKind::BadArguments, "status takes no arguments");
                }
                let mut v = serde_json::to_value(self.state.status()).unwrap_or(Value::Null);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("device".into(), json!(self.device.kind()));
                }
                Reply::ok(v)
            }
            "stats" => self.stats(req),
            _ => self.device_command(req),
        }
    }
}
