//! `tce-sidecar`: parse the command line, run, and report an error once, with its causes.

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tce_sidecar::daemon::cli::{Cli, Command, KernelChoice};
use tce_sidecar::daemon::{self, Backend, Config, Daemon, LinuxBackend, Listen};
use tce_sidecar::engine::Limits;

fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    if let Some(Command::Status { socket_path }) = cli.command {
        let status = daemon::query_status(&socket_path)?;
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let args = cli.serve;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(args.log_level)
        .init();
    let backend: Box<dyn Backend> = match args.kernel {
        KernelChoice::Linux => Box::new(LinuxBackend::new()),
        KernelChoice::Model => {
            return Err("the model kernel backend is not available in this build".into())
        }
    };
    if args.print_capabilities {
        println!(
            "{}",
            serde_json::to_string(&daemon::capabilities(backend.as_ref()))?
        );
        return Ok(());
    }
    let listen = match (args.socket_path, args.fd, daemon::socket_activation()?) {
        (Some(path), None, None) => Listen::Path(path),
        (None, Some(fd), None) => Listen::Inherited(daemon::inherited(fd)?),
        (None, None, Some(fd)) => Listen::Inherited(fd),
        _ => return Err(daemon::DaemonError::NoListener.into()),
    };
    let allowed_uids = if args.allow_uids.is_empty() {
        vec![rustix::process::getuid().as_raw()]
    } else {
        args.allow_uids
    };
    let daemon = Arc::new(Daemon::new(backend, args.max_sessions, Limits::default()));
    let config = Config {
        listen,
        allowed_uids,
    };
    daemon::serve(daemon, config)?;
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut message = format!("tce-sidecar: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
