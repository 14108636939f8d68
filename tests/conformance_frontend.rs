//! `tce-sidecar conformance frontend` against two front-ends: the crate's own client library,
//! which must pass every case, and a naive one written here, which trusts everything and must
//! fail the cases it mishandles (so those checks can fail). Every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{kit_names, TestDir, BIN};
use tce_sidecar::client::Client;
use tce_sidecar::conformance::wire::{self, ops_result, request, result_record};
use tce_sidecar::kernel::{Errno, Kernel, KernelOp, Objects, Output, OwnershipMode};
use tce_sidecar::protocol::FEATURE_FDS_BY_MODE;

/// The tool's patience in these tests: short, so that a front-end that hangs costs little.
const PATIENCE_MS: u64 = 3000;
/// The client's deadline on every wait, well within the patience.
const CLIENT_DEADLINE: Duration = Duration::from_millis(1000);
/// The longest any step of the test waits: the tool's run, a front-end's read.
const BOUND: Duration = Duration::from_secs(60);

/// `tce-sidecar conformance frontend` listening in a directory of its own; killed and removed
/// when dropped.
struct Tool {
    child: Child,
    dir: TestDir,
    stdout: mpsc::Receiver<String>,
}

impl Tool {
    fn start(test: &str, options: &[&str]) -> Self {
        let dir = TestDir::new(test);
        let mut child = Command::new(BIN)
            .args(["conformance", "frontend", "--listen"])
            .arg(dir.path().join("sock"))
            .arg("--junit")
            .arg(dir.path().join("out.xml"))
            .args(options)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the tool");
        // Read in a thread, so that the tool never blocks on a full pipe and the wait for its
        // output is bounded.
        let mut out = child.stdout.take().expect("its standard output");
        let (send, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            let _ = send.send(text);
        });
        let tool = Self { child, dir, stdout };
        let until = Instant::now() + BOUND;
        while !tool.socket().exists() {
            assert!(Instant::now() < until, "the tool did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        tool
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Its exit status and standard output, once it exits by itself.
    fn finish(&mut self) -> (ExitStatus, String) {
        let out = self
            .stdout
            .recv_timeout(BOUND)
            .expect("the tool exits in time");
        let until = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the tool") {
                println!("{out}");
                return (status, out);
            }
            assert!(Instant::now() < until, "the tool did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every case the tool plays, as `--list` names them.
fn cases() -> Vec<String> {
    let names = kit_names("frontend");
    assert!(names.len() >= 21, "{names:?}");
    names
}

/// The line the tool printed for a case.
fn line<'a>(out: &'a str, case: &str) -> &'a str {
    let name = format!("frontend.{case} (");
    out.lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(&name)))
        .unwrap_or_else(|| panic!("no line for {case} in:\n{out}"))
}

/// The kernel behind the client: no operation of these cases may reach it.
struct NoKernel(Arc<AtomicUsize>);

impl Kernel for NoKernel {
    fn execute(&mut self, _op: &KernelOp, _objects: &dyn Objects) -> Result<Output, Errno> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(Errno::NOSYS)
    }

    fn is_tce_table(&mut self, _fd: BorrowedFd<'_>) -> Result<bool, Errno> {
        Ok(false)
    }
}

/// The crate's front-end, as a VMM uses it: connect and negotiate accelerated mode with
/// FDS_BY_MODE, then go on with the session (a GET_FEATURES) where that worked.
fn client_front_end(socket: &Path, calls: &Arc<AtomicUsize>) {
    let kernel = Box::new(NoKernel(calls.clone()));
    let mode = OwnershipMode::Accelerated;
    if let Ok(mut client) = Client::connect_within(
        socket,
        mode,
        FEATURE_FDS_BY_MODE,
        kernel,
        None,
        CLIENT_DEADLINE,
    ) {
        let _ = client.get_features();
    }
}

#[test]
fn the_client_library_passes_every_case() {
    let cases = cases();
    let patience = PATIENCE_MS.to_string();
    let mut tool = Tool::start("client", &["--patience-ms", &patience]);
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in &cases {
        client_front_end(&tool.socket(), &calls);
    }
    let (status, out) = tool.finish();
    for case in &cases {
        assert!(line(&out, case).starts_with("ok    "), "{case}:\n{out}");
    }
    let summary = format!(
        "frontend: {n} checks, {n} passed, 0 failed, 0 skipped",
        n = cases.len()
    );
    assert!(out.contains(&summary), "{out}");
    assert!(status.success(), "{status}");
    assert!(
        out.contains("the front-end closed the connection 1"),
        "silence:\n{out}"
    );
    assert!(
        out.contains("the front-end answered 16 replies with operations"),
        "{out}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the client executed an operation"
    );
    let xml = std::fs::read_to_string(tool.dir.path().join("out.xml")).expect("the JUnit file");
    assert!(
        xml.contains(&format!("tests=\"{}\" failures=\"0\"", cases.len())),
        "{xml}"
    );
    assert!(!tool.socket().exists(), "the tool left its socket behind");
}

/// An OPS_RESULT that reports every operation of `reply` (a payload) done, status 0.
fn all_done(reply: &[u8]) -> Vec<u8> {
    let transaction = wire::u32_at(reply, 8).unwrap_or(0);
    let count = usize::from(wire::u16_at(reply, 12).unwrap_or(0));
    let records: Vec<Vec<u8>> = reply[wire::REPLY_FIXED..]
        .chunks(wire::OP_SIZE)
        .take(count)
        .map(|op| result_record(wire::u16_at(op, 0).unwrap_or(0), 0, [0; 4]))
        .collect();
    request(wire::OPS_RESULT, &ops_result(transaction, &records))
}

/// A front-end that checks nothing: it reads each reply's header and payload, answers every
/// operation with status 0, and goes on (GET_FEATURES, SET_FEATURES accelerated, then
/// GET_STATUS forever) until the connection ends or a read times out.
fn naive_front_end(socket: &Path) {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(BOUND / 6));
    let _ = stream.set_write_timeout(Some(BOUND / 6));
    let accelerated = (wire::MODE_ACCELERATED | wire::FEATURE_FDS_BY_MODE).to_le_bytes();
    let mut script = [
        request(wire::GET_FEATURES, &[]),
        request(wire::SET_FEATURES, &accelerated),
    ]
    .into_iter()
    .chain(std::iter::repeat_with(|| {
        request(wire::GET_STATUS, &[0; 8])
    }));
    let mut next = script.next();
    for _ in 0..100_000 {
        if let Some(frame) = next.take() {
            if stream.write_all(&frame).is_err() {
                return;
            }
        }
        let mut header = [0u8; 12];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let mut payload = vec![0; size as usize];
        if stream.read_exact(&mut payload).is_err() {
            return;
        }
        let with_ops = payload.len() >= 24 && payload[12..14] != [0, 0];
        next = match with_ops {
            true => Some(all_done(&payload)),
            false => script.next(),
        };
    }
}

#[test]
fn a_naive_front_end_fails_what_it_mishandles() {
    let cases = cases();
    let mut tool = Tool::start("naive", &["--patience-ms", "1500", "--max-rounds", "100"]);
    for _ in &cases {
        naive_front_end(&tool.socket());
    }
    let (status, out) = tool.finish();
    assert!(!status.success(), "{status}");
    // It sees the end of stream as anything would; every other case catches it.
    assert!(
        line(&out, "broken-end-of-stream").starts_with("ok    "),
        "{out}"
    );
    for case in cases.iter().filter(|c| *c != "broken-end-of-stream") {
        assert!(line(&out, case).starts_with("FAIL  "), "{case}:\n{out}");
    }
    let failures = format!(
        "frontend: {} checks, 1 passed, {} failed",
        cases.len(),
        cases.len() - 1
    );
    assert!(out.contains(&failures), "{out}");
    for (case, why) in [
        ("silence", "still connected after 1500 ms"),
        (
            "broken-version",
            "the front-end went on: it sent SET_FEATURES (features 0x11)",
        ),
        ("malformed-code", "the front-end went on"),
        ("op-not-allowed", "with status 0: it executed an operation"),
        (
            "endless-transaction",
            "answered 100 replies with operations of one transaction",
        ),
        (
            "transaction-id-changed",
            "it sent OPS_RESULT (transaction 8, 1 results)",
        ),
        (
            "unsolicited",
            "it sent GET_STATUS, GET_STATUS after the unsolicited reply",
        ),
        ("no-fds-by-mode", "it negotiates accelerated mode"),
    ] {
        assert!(line(&out, case).contains(why), "{case}: {why}:\n{out}");
    }
}

#[test]
fn without_a_front_end_every_case_fails() {
    let mut tool = Tool::start(
        "nobody",
        &[
            "--case",
            "silence",
            "--case",
            "unsolicited",
            "--accept-timeout-ms",
            "200",
        ],
    );
    let (status, out) = tool.finish();
    assert!(!status.success(), "{status}");
    assert!(
        line(&out, "silence").contains("no front-end connected within 200 ms"),
        "{out}"
    );
    assert!(
        line(&out, "unsolicited").contains("no front-end connected"),
        "{out}"
    );
    assert!(!tool.socket().exists(), "the tool left its socket behind");
}

#[test]
fn an_unknown_case_is_refused() {
    let out = Command::new(BIN)
        .args([
            "conformance",
            "frontend",
            "--listen",
            "/nonexistent/sock",
            "--case",
            "nonsense",
        ])
        .output()
        .expect("run the tool");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no case is called \"nonsense\""));
}
