//! Pins every ioctl number, struct size, field offset and constant of `kernel::abi` to the
//! values the kernel's own uapi headers give, for the native architecture and for powerpc64le.
//!
//! `tests/abi/kernel_abi.c` lists the values. Natively it is compiled and run; for powerpc64le
//! it is cross-compiled to assembly (`-S`), where each value is an asm comment, because its
//! programs cannot run here. `tests/setup/kernel-abi.sh` installs the compilers and headers;
//! when a compiler or the headers are missing the test prints a `SKIP:` line and passes, and
//! when they are present any difference fails it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tce_sidecar::kernel::abi::{IocArch, Ioctl, FACTS};

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/abi/kernel_abi.c");
const PPC64LE_CC: &str = "powerpc64le-linux-gnu-gcc";

type Values = BTreeMap<String, u64>;

/// Prints past the test harness's output capture, so a skip is visible in a normal run.
fn skip(what: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {what} ({why})");
}

/// Why the values could not be read, when it is for lack of tools rather than a broken check.
struct Missing(String);

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `compiler` on the C source with `args`. A compiler that is not installed, or headers
/// that are not found, are `Missing`; any other failure panics.
fn compile(compiler: &str, args: &[&str]) -> Result<(), Missing> {
    let output = match Command::new(compiler).args(args).arg(SOURCE).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Missing(format!("{compiler} not installed")))
        }
        Err(e) => panic!("running {compiler}: {e}"),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if let Some(line) = stderr
            .lines()
            .find(|l| l.contains("No such file or directory"))
        {
            return Err(Missing(format!("{compiler}: {}", line.trim())));
        }
        panic!("{compiler} {args:?} failed:\n{stderr}");
    }
    Ok(())
}

fn stdout_of(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The values the program prints when run: lines `ABI <name> <value>`.
fn values_from_run(text: &str) -> Values {
    let values: Values = text
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["ABI", name, value] => (name.to_string(), value.parse().unwrap()),
                _ => panic!("unexpected output line {line:?}"),
            }
        })
        .collect();
    assert!(!values.is_empty(), "the program printed no values");
    values
}

/// The values in the assembly: comment lines `ABI <name> <high> <low>`, the 32-bit halves
/// printed as signed numbers.
fn values_from_assembly(text: &str) -> Values {
    let values: Values = text
        .lines()
        .filter_map(|line| line.split_once("# ABI "))
        .map(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let [name, high, low] = fields.as_slice() else {
                panic!("unexpected assembly line {rest:?}");
            };
            let half = |s: &str| u64::from(s.parse::<i32>().unwrap() as u32);
            (name.to_string(), half(high) << 32 | half(low))
        })
        .collect();
    assert!(!values.is_empty(), "no ABI lines in the assembly");
    values
}

/// The values the crate uses for `arch`.
fn crate_values(arch: IocArch) -> Values {
    let powerpc = arch == IocArch::Powerpc;
    let ioctls = Ioctl::ALL
        .iter()
        .filter(|i| powerpc || !i.powerpc_only())
        .map(|i| (i.name().to_string(), u64::from(i.number(arch))));
    let facts = FACTS
        .iter()
        .filter(|f| powerpc || !f.powerpc_only)
        .map(|f| (f.name.to_string(), f.value));
    ioctls.chain(facts).collect()
}

/// Every name whose value differs, is missing from the headers' list, or is extra in it.
fn differences(headers: &Values, ours: &Values) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in ours {
        match headers.get(name) {
            Some(h) if h == value => {}
            Some(h) => out.push(format!("{name}: headers {h:#x}, crate {value:#x}")),
            None => out.push(format!("{name}: not in the C program")),
        }
    }
    for name in headers.keys().filter(|n| !ours.contains_key(*n)) {
        out.push(format!("{name}: in the C program, not in the crate"));
    }
    out
}

fn native_values() -> Result<(Values, Values), Missing> {
    let dir = work_dir("kernel-abi-native");
    let exe = dir.join("kernel_abi");
    let asm = dir.join("kernel_abi.s");
    compile(
        "cc",
        &[
            "-Wall",
            "-Werror",
            "-DABI_MAIN",
            "-o",
            exe.to_str().unwrap(),
        ],
    )?;
    compile(
        "cc",
        &["-Wall", "-Werror", "-S", "-o", asm.to_str().unwrap()],
    )?;
    let run = stdout_of(Command::new(&exe).output().unwrap(), "the ABI program");
    let asm = std::fs::read_to_string(asm).unwrap();
    Ok((values_from_run(&run), values_from_assembly(&asm)))
}

#[test]
fn abi_native_headers_match_crate_values() {
    let (run, asm) = match native_values() {
        Ok(values) => values,
        Err(Missing(why)) => return skip("kernel ABI check, native", &why),
    };
    // The powerpc check below reads the assembly form only; here both forms are available,
    // so they must agree.
    assert_eq!(run, asm, "run output and assembly comments disagree");
    let diff = differences(&run, &crate_values(IocArch::NATIVE));
    assert!(
        diff.is_empty(),
        "native ABI differs from the kernel headers:\n{}",
        diff.join("\n")
    );
}

#[test]
fn abi_powerpc64le_headers_match_crate_values() {
    let asm = work_dir("kernel-abi-ppc64le").join("kernel_abi.s");
    if let Err(Missing(why)) = compile(
        PPC64LE_CC,
        &["-Wall", "-Werror", "-S", "-o", asm.to_str().unwrap()],
    ) {
        return skip("kernel ABI check, powerpc64le", &why);
    }
    let headers = values_from_assembly(&std::fs::read_to_string(asm).unwrap());
    // The figure the design documents quote, read from the headers themselves.
    assert_eq!(headers["VFIO_GET_API_VERSION"], 0x2000_3b64);
    let diff = differences(&headers, &crate_values(IocArch::Powerpc));
    assert!(
        diff.is_empty(),
        "powerpc64le ABI differs from the kernel headers:\n{}",
        diff.join("\n")
    );
}
