//! `tce-sidecar conformance backend`, run as a user runs it: against the daemon every check
//! passes, and against a back-end that breaks one rule at a time (`broken_backend`) the check
//! of that rule fails, so no check can pass whatever the back-end does.

mod broken_backend;
mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use broken_backend::Break;
use common::{run_bounded, Sidecar, BIN};
use tce_sidecar::conformance::wire::*;

const KIT_TIMEOUT: Duration = Duration::from_secs(50);

/// Runs the kit against `socket`; returns its exit status and standard output.
fn kit(socket: &std::path::Path, model: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let mut command = Command::new(BIN);
    command
        .args(["conformance", "backend", "--socket"])
        .arg(socket)
        .arg("--model-socket")
        .arg(model)
        .args(extra);
    let out = run_bounded(&mut command, KIT_TIMEOUT);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_daemon_passes_every_check() {
    let sidecar = Sidecar::start("kit-daemon", &[]);
    let junit = sidecar.dir().join("backend.xml");
    let (passed, out) = kit(
        &sidecar.socket,
        &sidecar.model_socket,
        &["--junit", junit.to_str().unwrap()],
    );
    println!("{out}");
    let all = common::kit_names("backend");
    let summary = format!(
        "backend: {0} checks, {0} passed, 0 failed, 0 skipped",
        all.len()
    );
    assert!(passed && out.contains(&summary), "{out}\n{}", sidecar.log());
    for check in &all {
        assert!(
            out.contains(&format!("ok    {check} ")),
            "{check} did not pass:\n{out}"
        );
    }
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(&format!(
            r#"tests="{}" failures="0" skipped="0""#,
            all.len()
        )),
        "{xml}"
    );

    // TAP for CI systems: a plan and one line per check.
    let (passed, tap) = kit(
        &sidecar.socket,
        &sidecar.model_socket,
        &["--format", "tap", "--only", "frame."],
    );
    assert!(passed && tap.starts_with("TAP version 13\n"), "{tap}");
    assert!(
        tap.contains("ok 1 - frame.version") && tap.contains("\n1..4\n"),
        "{tap}"
    );
}

/// Each way to break the back-end, and the checks that must then fail.
fn breaks() -> Vec<(Break, &'static [&'static str])> {
    let errno = |request, from, to| Break::Errno { request, from, to };
    vec![
        (
            Break::AnswerBrokenFrames,
            &[
                "frame.version",
                "frame.reserved-flags",
                "frame.size-limit",
                "frame.end-of-stream",
            ],
        ),
        (Break::CloseAtMaxPayload, &["frame.size-limit"]),
        (Break::ReservedFeatureBit, &["handshake.get-features"]),
        (
            errno(SET_FEATURES, ENOTSUP, EINVAL),
            &["handshake.set-features-refused"],
        ),
        (
            errno(SET_FEATURES, EALREADY, EBUSY),
            &["handshake.set-features-once"],
        ),
        (Break::PhaseLies, &["handshake.status-in-every-state"]),
        (errno(0, ENOSYS, EINVAL), &["errors.unknown-code"]),
        (
            errno(GET_FEATURES, EINVAL, ENOSYS),
            &["errors.payload-size"],
        ),
        (
            errno(0, EBADF, EINVAL),
            &[
                "errors.fd-count",
                "errors.fds-with-the-header",
                "accelerated.fds-by-mode",
                "trust.accelerated-table-fd",
            ],
        ),
        (
            errno(TCE_UPDATE, EINVAL, ENOENT),
            &["errors.field-values", "isolated.tce-update-refusals"],
        ),
        (Break::IgnoresReservedField, &["errors.reserved-fields"]),
        (Break::StateFirst, &["errors.order"]),
        (Break::CloseAfterError, &["errors.session-goes-on"]),
        (
            errno(MEM_ADD, EPROTO, EINVAL),
            &["state.before-set-features"],
        ),
        (
            errno(OPS_RESULT, EPROTO, EINVAL),
            &["state.ops-result-without-transaction"],
        ),
        (
            errno(WINDOW_QUERY, EBUSY, EPROTO),
            &["state.transaction-busy", "state.ops-result-shape"],
        ),
        (errno(OPS_RESULT, EPERM, EIO), &["state.refused-operation"]),
        (
            Break::OpOutOfScope,
            &[
                "accelerated.group-add",
                "accelerated.window-create",
                "accelerated.tce-update",
                "accelerated.eeh",
                "accelerated.take-down",
                "accelerated.rebuild",
            ],
        ),
        (
            Break::SkipRollback,
            &[
                "accelerated.rollback-group-add",
                "accelerated.rollback-window-create",
                "accelerated.rollback-window-remove",
                "accelerated.rollback-mem-add",
                "accelerated.tce-update-failure",
            ],
        ),
        (Break::IsolatedOps, &["isolated.every-request"]),
        (
            Break::KeepClosedSessions,
            &["isolated.teardown", "trust.disconnect-in-a-transaction"],
        ),
        (
            errno(MEM_ADD, EPERM, EINVAL),
            &["trust.isolated-memfd-seals"],
        ),
        (Break::LeakFds, &["trust.refused-fds-closed"]),
        (errno(MEM_ADD, ENOSPC, EIO), &["trust.limits"]),
        (Break::BrokenFrameClosesAll, &["trust.sessions-independent"]),
    ]
}

#[test]
fn each_check_fails_against_a_back_end_that_breaks_its_rule() {
    let mut failed_somewhere = BTreeSet::new();
    for (broken, checks) in breaks() {
        let sidecar = Sidecar::start("kit-broken", &[]);
        let socket = sidecar.dir().join("broken.sock");
        broken_backend::start(&socket, &sidecar.socket, broken);
        let only: Vec<&str> = checks.iter().flat_map(|c| ["--only", *c]).collect();
        let (passed, out) = kit(&socket, &sidecar.model_socket, &only);
        assert!(!passed, "{broken:?}: every check passed:\n{out}");
        for check in checks {
            assert!(
                out.contains(&format!("FAIL  {check} ")),
                "{broken:?} breaks {check}'s rule, and it did not fail:\n{out}"
            );
            failed_somewhere.insert(check.to_string());
        }
    }
    let never: Vec<_> = common::kit_names("backend")
        .into_iter()
        .filter(|check| !failed_somewhere.contains(check))
        .collect();
    assert!(
        never.is_empty(),
        "checks no broken back-end makes fail: {never:?}"
    );
}

#[test]
fn a_faithful_proxy_passes_every_check() {
    // The double itself breaks nothing: every failure above is its one break.
    let sidecar = Sidecar::start("kit-proxy", &[]);
    let socket = sidecar.dir().join("proxy.sock");
    broken_backend::start(&socket, &sidecar.socket, Break::None);
    let (passed, out) = kit(&socket, &sidecar.model_socket, &[]);
    assert!(passed, "{out}\n{}", sidecar.log());
}

/// A daemon on the real kernel: the kit fails nothing, and skips, each with its reason, what needs
/// the model kernel or a mode the host does not offer (on x86_64 none: no sPAPR VFIO).
#[test]
fn against_the_real_kernel_the_kit_skips_what_it_cannot_check() {
    let dir = common::TestDir::new("kit-linux");
    let socket = dir.path().join("sidecar.sock");
    let mut command = Command::new(BIN);
    let extra = common::unprivileged(&mut command, &[]);
    let mut daemon = command
        .args([
            "--socket-path",
            socket.to_str().unwrap(),
            "--log-level",
            "error",
        ])
        .args(&extra)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start the daemon");
    common::wait_until("the daemon listens", common::READY, || socket.exists());
    let mut kit_command = Command::new(BIN);
    kit_command.args([
        "conformance",
        "backend",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    let out = run_bounded(&mut kit_command, KIT_TIMEOUT);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" 0 failed, "), "{text}");
    assert!(
        text.contains("skip  accelerated.group-add (§6.3, §7.4, §7.5): "),
        "{text}"
    );
}
