//! The conformance kit: `protocol/PROTOCOL.md`'s rules as checks that run against any
//! implementation over its socket.
//!
//! - `tce-sidecar conformance backend --socket PATH` plays a front-end against the back-end
//!   listening at PATH: every message, every error class in its order, the state machine,
//!   transactions and their rollback, both modes on the model kernel, and the trust rules.
//! - `tce-sidecar conformance frontend --listen PATH` plays a back-end for the front-end that
//!   connects to PATH, sends it one kind of bad reply per connection, and reports what it did.
//!
//! Each check prints one line as it ends, then a summary; `--format tap` prints TAP instead and
//! `--junit FILE` also writes JUnit XML. The exit status is 0 only if no check failed.

pub mod backend;
pub mod frontend;
pub mod report;
pub mod wire;

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use report::{CheckResult, Format, Outcome, Report};

/// `tce-sidecar conformance ...`
#[derive(Debug, clap::Subcommand)]
pub enum Target {
    /// Run the conformance suite against the back-end listening on a socket.
    Backend(backend::Args),
    /// Play a back-end for a front-end under test: one bad reply per connection.
    Frontend(frontend::Args),
}

/// Options both targets share.
#[derive(Debug, clap::Args)]
pub struct OutputArgs {
    /// The format of the lines on standard output.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Also write the results as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Run only the checks whose name contains one of these strings (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub only: Vec<String>,
}

/// Why a check did not pass.
#[derive(Debug)]
pub enum Failure {
    /// A rule was broken: what was seen.
    Fail(String),
    /// The check cannot run against this peer or on this host: why.
    Skip(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Self {
        Self::Fail(why)
    }
}

impl From<&str> for Failure {
    fn from(why: &str) -> Self {
        Self::Fail(why.to_owned())
    }
}

/// A check's outcome: `Ok(())` passes; `?` on a `Result<_, String>` fails it with the text.
pub type Checked = Result<(), Failure>;

/// Fails the check with a message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err($crate::conformance::Failure::Fail(format!($($why)+)));
        }
    };
}

/// One rule of the spec, checked by `run` against a peer described by `C`.
pub struct Check<C> {
    pub name: &'static str,
    /// Where the rule is written.
    pub spec: &'static str,
    pub run: fn(&C) -> Checked,
}

/// Runs the selected checks in order, each one to its end, and reports each as it ends. A
/// check that panics (a bug of the kit, never of the peer) is reported as failed.
pub fn run_checks<C>(report: &mut Report, checks: &[Check<C>], context: &C, only: &[String]) {
    for check in checks {
        if !only.is_empty() && !only.iter().any(|o| check.name.contains(o.as_str())) {
            continue;
        }
        let start = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (check.run)(context)));
        let outcome = match outcome {
            Ok(Ok(())) => Outcome::Pass,
            Ok(Err(Failure::Fail(why))) => Outcome::Fail(why),
            Ok(Err(Failure::Skip(why))) => Outcome::Skip(why),
            Err(panic) => Outcome::Fail(format!(
                "the kit panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            )),
        };
        report.push(CheckResult {
            name: check.name.to_owned(),
            spec: check.spec,
            outcome,
            took: start.elapsed(),
            note: None,
        });
    }
}

/// Prints the summary, writes the XML, and says whether every check passed.
pub fn finish(mut report: Report, output: &OutputArgs) -> Result<bool, Box<dyn Error>> {
    report.finish();
    if let Some(path) = &output.junit {
        std::fs::write(path, report.junit()?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(report.passed())
}

/// Runs `tce-sidecar conformance TARGET`; `Ok(false)` when a check failed.
pub fn run(target: Target) -> Result<bool, Box<dyn Error>> {
    match target {
        Target::Backend(args) => backend::run(args),
        Target::Frontend(args) => frontend::run(args),
    }
}
