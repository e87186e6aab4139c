//! bulkhead-ctl: asks a running Bulkhead daemon over its control socket (`--control-socket`).

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_common::control::client;
use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The frontend connection, negotiated features and each queue's state.
    Status,
    /// Counters and latency histograms (JSON, or the Prometheus text format).
    Stats {
        #[arg(long)]
        prometheus: bool,
    },
    /// Block devices: take up a new size of the backing file or device and tell the guest.
    Resize {
        /// Grow the image file to this many bytes first (a multiple of 512). Without it the
        /// daemon re-reads the size of the file or device, grown by someone else.
        #[arg(long, value_name = "BYTES")]
        size: Option<u64>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (name, params, raw_text) = match &args.command {
        Command::Status => ("status", Map::new(), false),
        Command::Stats { prometheus } => {
            let mut m = Map::new();
            if *prometheus {
                m.insert("format".into(), json!("prometheus"));
            }
            ("stats", m, *prometheus)
        }
        Command::Resize { size } => {
            let mut m = Map::new();
            if let Some(s) = size {
                m.insert("size".into(), json!(s));
            }
            ("resize", m, false)
        }
    };
    let reply = match client::call(&args.socket, &client::request(name, params)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bulkhead-ctl: {}", bulkhead_common::logging::chain(&e));
            return ExitCode::from(2);
        }
    };
    match (reply.ok, reply.result, reply.error) {
        (true, Some(Value::String(text)), _) if raw_text => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        (true, Some(result), _) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&result).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        (_, _, Some(e)) => {
            let kind = serde_json::to_value(e.kind).unwrap_or(Value::Null);
            eprintln!(
                "bulkhead-ctl: {name}: {} ({})",
                e.message,
                kind.as_str().unwrap_or("error")
            );
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("bulkhead-ctl: {name}: malformed reply");
            ExitCode::FAILURE
        }
    }
}
