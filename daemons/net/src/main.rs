use std::process::ExitCode;

use clap::Parser;
use vhost_user_net::{Args, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    if args.serve.print_capabilities {
        println!("{}", vhost_user_net::capabilities());
        return ExitCode::SUCCESS;
    }
    bulkhead_common::logging::init(args.serve.log_level.as_deref());
    let result = Config::try_from(args)
        .map_err(anyhow::Error::from)
        .and_then(|c| vhost_user_net::run(c).map_err(anyhow::Error::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not guest-triggerable: the one fatal error, at exit
            tracing::event!(tracing::Level::ERROR, "{e:#}");
            ExitCode::FAILURE
        }
    }
}
