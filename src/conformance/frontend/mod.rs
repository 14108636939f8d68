//! `tce-sidecar conformance frontend`: plays a back-end for a front-end under test. It listens
//! on a socket; each connection gets the next case (`cases::CASES`), a back-end that breaks
//! one rule, and the case's line says what the front-end did about it.

pub mod cases;
pub mod peer;

use std::error::Error;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::report::{CheckResult, Outcome, Report};
use super::{finish, Failure, OutputArgs};
use cases::{Case, CASES};
use peer::Peer;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to listen for the front-end under test (a stale socket file there is replaced).
    #[arg(long, value_name = "PATH", required_unless_present = "list")]
    pub listen: Option<PathBuf>,
    /// Play only this case (repeatable); by default every case, in order.
    #[arg(long = "case", value_name = "NAME")]
    pub cases: Vec<String>,
    /// Print the cases, one line each, and exit.
    #[arg(long)]
    pub list: bool,
    /// How long to wait for the front-end at every step: one that neither sends nor closes
    /// within it fails the case.
    #[arg(long, value_name = "MS", default_value_t = 30000, value_parser = ms_up_to_a_day())]
    pub patience_ms: u64,
    /// How long to wait for each case's connection; without one, the remaining cases fail.
    #[arg(long, value_name = "MS", default_value_t = 60000, value_parser = ms_up_to_a_day())]
    pub accept_timeout_ms: u64,
    /// How many replies with operations a front-end may answer in endless-transaction.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_rounds: u32,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A wait in milliseconds: at most a day, so that no deadline overflows.
fn ms_up_to_a_day() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=86_400_000)
}

pub fn run(args: Args) -> Result<bool, Box<dyn Error>> {
    if args.list {
        for case in CASES {
            println!("{:<34} {:<5} {}", case.name, case.spec, case.about);
        }
        return Ok(true);
    }
    let selected = select(&args)?;
    let path = args.listen.as_deref().ok_or("--listen PATH is required")?;
    let listener = Listener::bind(path)?;
    let mut report = Report::new("frontend", args.output.format, Box::new(std::io::stdout()));
    // Once a case got no connection, nobody is coming: the rest fail without waiting.
    let mut gone = false;
    for case in selected {
        let start = Instant::now();
        let played = match gone {
            true => Err("no front-end connected (none came for an earlier case)".to_owned()),
            false => play(&listener, case, &args),
        };
        let (outcome, note) = played.unwrap_or_else(|why| {
            gone = true;
            (Outcome::Fail(why), None)
        });
        report.push(CheckResult {
            name: format!("frontend.{}", case.name),
            spec: case.spec,
            outcome,
            took: start.elapsed(),
            note,
        });
    }
    drop(listener);
    finish(report, &args.output)
}

/// The cases `--case` names (all by default) that `--only` lets through, in table order.
fn select(args: &Args) -> Result<Vec<&'static Case>, String> {
    if let Some(unknown) = args
        .cases
        .iter()
        .find(|n| !CASES.iter().any(|c| c.name == *n))
    {
        return Err(format!("no case is called {unknown:?}; --list shows them"));
    }
    let only = &args.output.only;
    let selected: Vec<_> = CASES
        .iter()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|n| n == c.name))
        .filter(|c| only.is_empty() || only.iter().any(|o| c.name.contains(o.as_str())))
        .collect();
    if selected.is_empty() {
        return Err("--case and --only leave no case to play".into());
    }
    Ok(selected)
}

/// Waits for the next connection and plays `case` on it: its outcome and, when it passes, what
/// the front-end did. `Err` when no front-end connected.
fn play(
    listener: &Listener,
    case: &Case,
    args: &Args,
) -> Result<(Outcome, Option<String>), String> {
    let stream = listener.accept_within(Duration::from_millis(args.accept_timeout_ms))?;
    let patience = Duration::from_millis(args.patience_ms);
    let peer = match Peer::new(stream, patience, args.max_rounds) {
        Ok(peer) => peer,
        Err(why) => return Ok((Outcome::Fail(why), None)),
    };
    let outcome = match (case.run)(&peer) {
        Ok(()) => Outcome::Pass,
        Err(Failure::Fail(why)) => Outcome::Fail(why),
        Err(Failure::Skip(why)) => Outcome::Skip(why),
    };
    // The peer goes out of scope here, and the kit's end of the connection closes.
    Ok((outcome, peer.take_note()))
}

/// The socket the front-end connects to; the file is removed when this is dropped.
struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    fn bind(path: &Path) -> Result<Self, String> {
        remove_stale(path)?;
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        let listener = Self {
            listener,
            path: path.to_owned(),
        };
        // Accepts only after poll() says a connection is there, so that the wait is bounded.
        listener
            .listener
            .set_nonblocking(true)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(listener)
    }

    fn accept_within(&self, within: Duration) -> Result<UnixStream, String> {
        let until = Instant::now() + within;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                    return Ok(stream);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(format!("accept on {}: {e}", self.path.display())),
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no front-end connected within {} ms",
                    within.as_millis()
                ));
            }
            let timeout = Timespec::try_from(left).map_err(|e| e.to_string())?;
            let mut fds = [PollFd::new(&self.listener, PollFlags::IN)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(format!("poll on {}: {e}", self.path.display())),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes a socket file nobody listens on; refuses to touch anything else.
fn remove_stale(path: &Path) -> Result<(), String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{shown}: {e}")),
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(format!("{shown} exists and is not a socket"))
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            Err(format!("{shown} is in use: something listens on it"))
        }
        Ok(_) => std::fs::remove_file(path).map_err(|e| format!("cannot remove {shown}: {e}")),
    }
}
