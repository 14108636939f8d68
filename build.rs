//! Lets a native build link libseccomp with only its runtime library installed.
//!
//! `libseccomp-sys` links `-lseccomp`, which needs the development symlink `libseccomp.so`
//! (Debian's `libseccomp-dev`). The runtime library `libseccomp.so.2` is on every Debian and
//! Ubuntu system (systemd and apt depend on it), and the bindings need no header. So when the
//! symlink is missing, this points the linker at a symlink of its own, to the runtime library.
//! Cross builds set `LIBSECCOMP_LIB_PATH` (the lab links `libseccomp.a` statically) and are left
//! alone.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBSECCOMP_LIB_PATH");
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("LIBSECCOMP_LIB_PATH").is_some() || env::var("HOST") != env::var("TARGET") {
        return;
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let triple = match arch.as_str() {
        "powerpc64" => "powerpc64le-linux-gnu".to_string(),
        other => format!("{other}-linux-gnu"),
    };
    let dirs: Vec<PathBuf> = [
        format!("/usr/lib/{triple}"),
        format!("/lib/{triple}"),
        "/usr/lib64".into(),
        "/usr/lib".into(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    if dirs.iter().any(|d| d.join("libseccomp.so").exists()) {
        return;
    }
    let Some(runtime) = dirs
        .iter()
        .map(|d| d.join("libseccomp.so.2"))
        .find(|p| p.exists())
    else {
        // The link then fails and names the library; nothing better can be done here.
        println!("cargo:warning=libseccomp not found: install libseccomp2 (or libseccomp-dev)");
        return;
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let link = out.join("libseccomp.so");
    let _ = std::fs::remove_file(&link);
    if std::os::unix::fs::symlink(&runtime, &link).is_ok() {
        println!("cargo:rustc-link-search=native={}", out.display());
    }
}
