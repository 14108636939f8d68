//! Command line, following the vhost-user backend program conventions (`--socket-path`, `--fd`,
//! `--print-capabilities`; no self-daemonizing).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// tce-sidecar: an out-of-process sPAPR IOMMU backend for QEMU on POWER KVM hosts.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one session handed over by the listener (started by the listener only).
    #[command(hide = true)]
    Worker(super::worker::WorkerArgs),
    /// Print the status of every session of a running sidecar as JSON.
    Status {
        /// The sidecar's socket.
        #[arg(long)]
        socket_path: PathBuf,
    },
    /// Print a libvirt domain's XML (FILE, or standard input) changed to use a sidecar.
    LibvirtXml {
        /// The ownership mode the domain's sidecar negotiates.
        #[arg(long, value_enum, default_value_t = ModeChoice::Accelerated)]
        mode: ModeChoice,
        /// Where the hook puts the domain's socket (its `socket_dir`).
        #[arg(long, default_value = "/run/tce-sidecar")]
        socket_dir: PathBuf,
        file: Option<PathBuf>,
    },
    /// libvirt's qemu.d hook: NAME OP SUBOP EXTRA, the domain's XML on standard input.
    #[command(hide = true)]
    LibvirtHook {
        #[arg(num_args = 0.., allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install the libvirt hook, the systemd units, the sidecar's user and its configuration.
    LibvirtInstall {
        /// The tce-sidecar binary the hook runs (default: this one).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Remove what libvirt-install installed (not the user).
    LibvirtUninstall,
    /// Check a back-end or a front-end against protocol/PROTOCOL.md over its socket.
    #[command(subcommand)]
    Conformance(crate::conformance::Target),
}

/// A sidecar's ownership mode, on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeChoice {
    Accelerated,
    Isolated,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen on a new unix socket at PATH (created with mode 0600; an existing socket file
    /// is replaced).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Serve an inherited listening unix socket with this fd number.
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<i32>,

    /// Print the capabilities as JSON on stdout and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// The kernel to run sessions on. `model` is a simulation for demos and tests, never a
    /// fallback: it must be asked for.
    #[arg(long, value_enum, default_value_t = KernelChoice::Linux)]
    pub kernel: KernelChoice,

    /// A peer uid allowed to connect (repeatable). Default: the daemon's own uid.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,

    /// Sessions served at once; further connections are refused with an error reply.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,

    /// With `--kernel model`: where front-ends reach the model kernel (default:
    /// `<socket-path>.model`).
    #[arg(long, value_name = "PATH")]
    pub model_socket: Option<PathBuf>,

    /// With `--kernel model`: the simulated host platform.
    #[arg(long, value_enum, default_value_t = ModelPlatform::Powernv)]
    pub model_platform: ModelPlatform,

    /// With `--kernel model`: IOMMU groups 1..=N exist on the simulated host.
    #[arg(long, default_value_t = 256)]
    pub model_iommu_groups: u32,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    pub log_level: tracing::Level,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    /// The real kernel (VFIO and KVM ioctls).
    Linux,
    /// The model kernel: a simulation of the kernel's rules, served to front-ends through a
    /// second socket (`<socket-path>.model`).
    Model,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelPlatform {
    /// A POWER9 powernv host: 2 dynamic windows, 5 table levels.
    Powernv,
    /// A pseries (PowerVM or nested KVM) host: one table level.
    Pseries,
}

impl KernelChoice {
    /// The value `--kernel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linux => "linux",
            Self::Model => "model",
        }
    }
}
