//! A front-end written in Python from `protocol/PROTOCOL.md` and `protocol/MODEL.md` alone
//! (`tests/python/front_end.py`) drives the real daemon on the model kernel as QEMU would: in
//! accelerated mode it executes the owner operations the sidecar returns on the model and
//! completes each transaction with `OPS_RESULT`; in isolated mode the sidecar makes the calls
//! and the front-end sees the entry it mapped in the model's IOMMU. Both modes must print their
//! `PYTHON mode=… result=PASS` line.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Sidecar};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/front_end.py");

#[test]
fn python_front_end_written_from_the_spec_completes_a_transaction_in_each_mode() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIP: the Python front-end (no python3 on this machine)");
        return;
    }
    assert!(Path::new(SCRIPT).exists(), "{SCRIPT} is missing");
    let sidecar = Sidecar::start("python", &[]);
    for mode in ["accelerated", "isolated"] {
        let output = run_bounded(
            Command::new("python3")
                .arg(SCRIPT)
                .arg("--socket")
                .arg(&sidecar.socket)
                .arg("--model")
                .arg(&sidecar.model_socket)
                .args(["--mode", mode]),
            Duration::from_secs(60),
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success()
                && stdout
                    .lines()
                    .any(|l| l.starts_with(&format!("PYTHON mode={mode} result=PASS "))),
            "{mode}: {}\n{stdout}\n{stderr}",
            output.status
        );
        println!("{}", stdout.trim_end());
    }
}
