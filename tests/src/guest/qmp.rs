//! A QMP client (QEMU's JSON monitor on a unix socket), for what the serial console cannot do:
//! migrating a VM, pausing, quitting.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// What `query-migrate` said when a migration ended.
#[derive(Debug, Clone)]
pub struct MigrationStats {
    pub status: String,
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub transferred_bytes: u64,
    /// The highest rate of guest pages dirtied (by every writer: vCPUs and, through the dirty
    /// log, devices) that QEMU reported while the migration ran, pages/s.
    pub peak_dirty_pages_rate: u64,
    /// Dirty-bitmap syncs (passes over RAM).
    pub dirty_syncs: u64,
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path` (waiting up to `timeout` for it to appear) and
    /// leaves capability negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP at {}", path.display()))
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        let mut q = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message: {line}"))
    }

    /// Runs `command` with `arguments` and returns its `return` value (events are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                bail!("QMP {command} failed: {e}");
            }
            bail!("unexpected QMP reply to {command}: {reply}");
        }
    }

    /// Migrates to `uri` (`unix:PATH`, `exec:CMD`), at most `max_bandwidth` bytes/s (0: QEMU's
    /// default), and waits until the migration completed.
    pub fn migrate(
        &mut self,
        uri: &str,
        max_bandwidth: u64,
        timeout: Duration,
    ) -> Result<MigrationStats> {
        self.start_migration(uri, max_bandwidth, 2000)?;
        self.wait_migration(timeout)
    }

    /// Starts a migration and returns at once. `downtime_ms`: the pause QEMU may take for the
    /// last pass; the migration goes on while more is dirty than that lets it send.
    pub fn start_migration(
        &mut self,
        uri: &str,
        max_bandwidth: u64,
        downtime_ms: u64,
    ) -> Result<()> {
        let mut params = json!({ "downtime-limit": downtime_ms });
        if max_bandwidth > 0 {
            params["max-bandwidth"] = json!(max_bandwidth);
        }
        self.execute("migrate-set-parameters", params)?;
        self.execute("migrate", json!({ "uri": uri }))?;
        Ok(())
    }

    /// Waits until the migration started with [`start_migration`](Self::start_migration)
    /// completed.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationStats> {
        let deadline = Instant::now() + timeout;
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let mut peak_rate = 0;
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            let status = info["status"].as_str().unwrap_or("").to_owned();
            peak_rate = peak_rate.max(n(&info["ram"]["dirty-pages-rate"]));
            match status.as_str() {
                "completed" => {
                    return Ok(MigrationStats {
                        status,
                        total_ms: n(&info["total-time"]),
                        downtime_ms: n(&info["downtime"]),
                        transferred_bytes: n(&info["ram"]["transferred"]),
                        peak_dirty_pages_rate: peak_rate,
                        dirty_syncs: n(&info["ram"]["dirty-sync-count"]),
                    });
                }
                "failed" | "cancelled" => bail!("migration {status}: {info}"),
                _ if Instant::now() > deadline => {
                    bail!("migration still {status} after {timeout:?}: {info}")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Cancels the migration under way and waits until the source says it is cancelled (the
    /// VM keeps running on the source; the destination QEMU gives up and exits).
    pub fn cancel_migration(&mut self, timeout: Duration) -> Result<()> {
        self.execute("migrate_cancel", json!({}))?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            match info["status"].as_str().unwrap_or("") {
                "cancelled" => return Ok(()),
                s if Instant::now() > deadline => bail!("migration still {s} after cancelling"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// How many times the migration synced the dirty bitmap (1 during the first pass over RAM).
    pub fn dirty_sync_count(&mut self) -> Result<u64> {
        let info = self.execute("query-migrate", json!({}))?;
        Ok(info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0))
    }

    /// The VM's run state (`running`, `paused`, `postmigrate`, `inmigrate`, …).
    pub fn status(&mut self) -> Result<String> {
        let s = self.execute("query-status", json!({}))?;
        Ok(s["status"].as_str().unwrap_or("").to_owned())
    }
}
