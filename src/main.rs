//! `tce-sidecar`: parse the command line, run, and report an error once, with its causes.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tce_sidecar::daemon::cli::{Cli, Command, KernelChoice, ModeChoice, ModelPlatform, ServeArgs};
use tce_sidecar::daemon::{
    self, worker, Backend, Config, Daemon, LinuxBackend, Listen, ModelBackend, WorkerCommand,
};
use tce_sidecar::kernel::model::Platform;
use tce_sidecar::kernel::OwnershipMode;
use tce_sidecar::libvirt;

/// Where front-ends reach the model kernel: `--model-socket`, else `<socket-path>.model`.
fn model_socket(args: &ServeArgs) -> Result<PathBuf, Box<dyn Error>> {
    match (&args.model_socket, &args.socket_path) {
        (Some(path), _) => Ok(path.clone()),
        (None, Some(path)) => {
            let mut socket = path.clone().into_os_string();
            socket.push(".model");
            Ok(socket.into())
        }
        (None, None) => Err("--kernel model needs --model-socket or --socket-path".into()),
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    match cli.command {
        Some(Command::Status { socket_path }) => {
            let status = daemon::query_status(&socket_path)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            return Ok(());
        }
        Some(Command::LibvirtXml {
            mode,
            socket_dir,
            file,
        }) => {
            let xml = match file {
                Some(path) => std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin())?,
            };
            let mode = match mode {
                ModeChoice::Accelerated => OwnershipMode::Accelerated,
                ModeChoice::Isolated => OwnershipMode::Isolated,
            };
            print!("{}", libvirt::domain::use_sidecar(&xml, mode, &socket_dir)?);
            return Ok(());
        }
        Some(Command::LibvirtHook { args }) => {
            let xml = std::io::read_to_string(std::io::stdin())?;
            let config = std::path::Path::new(libvirt::config::CONFIG_PATH);
            libvirt::hook::run(&args, &xml, config)?;
            return Ok(());
        }
        Some(Command::LibvirtInstall { bin }) => return Ok(libvirt::install::install(bin)?),
        Some(Command::LibvirtUninstall) => return Ok(libvirt::install::uninstall()?),
        Some(Command::Conformance(target)) => {
            return match tce_sidecar::conformance::run(target)? {
                true => Ok(()),
                false => Err("some conformance checks failed".into()),
            };
        }
        Some(Command::Worker(args)) => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_max_level(args.log_level)
                .init();
            worker::run(args)?;
            return Ok(());
        }
        None => {}
    }
    let args = cli.serve;
    let platform = match args.model_platform {
        ModelPlatform::Powernv => Platform::powernv(),
        ModelPlatform::Pseries => Platform::pseries(),
    };
    if args.print_capabilities {
        let capabilities = match args.kernel {
            KernelChoice::Linux => daemon::capabilities(&LinuxBackend::new()),
            KernelChoice::Model => daemon::model_capabilities(&platform),
        };
        println!("{}", serde_json::to_string(&capabilities)?);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(args.log_level)
        .init();
    let listen = match (&args.socket_path, args.fd, daemon::socket_activation()?) {
        (Some(path), None, None) => Listen::Path(path.clone()),
        (None, Some(fd), None) => Listen::Inherited(daemon::inherited(fd)?),
        (None, None, Some(fd)) => Listen::Inherited(fd),
        _ => return Err(daemon::DaemonError::NoListener.into()),
    };
    let backend: Box<dyn Backend> = match args.kernel {
        KernelChoice::Linux => Box::new(LinuxBackend::new()),
        KernelChoice::Model => {
            let groups: Vec<u32> = (1..=args.model_iommu_groups).collect();
            Box::new(ModelBackend::start(
                platform,
                &groups,
                &model_socket(&args)?,
            )?)
        }
    };
    let allowed_uids = if args.allow_uids.is_empty() {
        vec![rustix::process::getuid().as_raw()]
    } else {
        args.allow_uids.clone()
    };
    let model_socket = match args.kernel {
        KernelChoice::Linux => None,
        KernelChoice::Model => Some(model_socket(&args)?),
    };
    let command = WorkerCommand {
        // The binary this process runs, even if its path was replaced since.
        exe: PathBuf::from("/proc/self/exe"),
        kernel: args.kernel,
        model_socket,
        log_level: args.log_level,
    };
    let backend: Arc<dyn Backend> = Arc::from(backend);
    let daemon = Arc::new(Daemon::new(
        Arc::clone(&backend),
        args.max_sessions,
        command,
    ));
    let served = daemon::serve(
        daemon,
        Config {
            listen,
            allowed_uids,
        },
    );
    backend.shutdown();
    served?;
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
