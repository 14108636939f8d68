//! `tce-sidecar libvirt-install` and `libvirt-uninstall`: the libvirt hook, the systemd units,
//! the sidecar's user and the hook's configuration, put in place or taken away in one command.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::config::{user_ids, HookConfig, CONFIG_PATH};

/// Where libvirt (6.5 and later) runs every executable of: `qemu.d/NAME OP SUBOP EXTRA`.
pub const HOOK_PATH: &str = "/etc/libvirt/hooks/qemu.d/tce-sidecar";
const UNIT_DIR: &str = "/etc/systemd/system";

fn hook_script(binary: &Path) -> String {
    format!(
        "#!/bin/sh\n# tce-sidecar's libvirt hook, put here by `tce-sidecar libvirt-install`.\n\
         exec '{}' libvirt-hook \"$@\"\n",
        binary.display()
    )
}

/// One sidecar per instance name, for use without libvirt: systemd makes the socket for QEMU's
/// user, the sidecar runs unprivileged with the sandbox systemd adds around its own.
fn units(binary: &Path, qemu_user: &str, qemu_uid: u32, user: &str) -> [(&'static str, String); 2] {
    [
        (
            "tce-sidecar@.socket",
            format!(
                "[Unit]\nDescription=tce-sidecar socket for %i\n\n[Socket]\n\
                 ListenStream=/run/tce-sidecar/%i.sock\nSocketUser={qemu_user}\nSocketMode=0600\n\
                 DirectoryMode=0755\nRemoveOnStop=yes\n\n[Install]\nWantedBy=sockets.target\n"
            ),
        ),
        (
            "tce-sidecar@.service",
            format!(
                "[Unit]\nDescription=tce-sidecar for %i (out-of-process sPAPR IOMMU)\n\
                 Requires=tce-sidecar@%i.socket\n\n[Service]\nUser={user}\n\
                 ExecStart='{}' --allow-uid {qemu_uid}\n\
                 # isolated mode: the VM's RAM and its TCE tables (README); accelerated needs none\n\
                 LimitMEMLOCK=0\nNoNewPrivileges=yes\nCapabilityBoundingSet=\n\
                 PrivateTmp=yes\nProtectSystem=strict\nProtectHome=yes\nProtectKernelTunables=yes\n\
                 ProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictNamespaces=yes\n\
                 LockPersonality=yes\nMemoryDenyWriteExecute=yes\nRestrictRealtime=yes\n\
                 SystemCallArchitectures=native\nDevicePolicy=closed\n\
                 DeviceAllow=/dev/vfio/vfio rw\nDeviceAllow=/dev/kvm r\n",
                binary.display()
            ),
        ),
    ]
}

const CONFIG_TEMPLATE: &str = "\
# tce-sidecar's libvirt hook (tce-sidecar libvirt-install). Defaults shown.
# kernel = linux          # model: the simulated kernel, for tests and demos only
# socket_dir = /run/tce-sidecar
# log_dir = /var/log/tce-sidecar
# user = tce-sidecar      # every sidecar runs as this user
# qemu_user = libvirt-qemu  # default: user in /etc/libvirt/qemu.conf
";

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Installs everything for `binary`; what exists already is replaced, but the configuration
/// and the user are kept.
pub fn install(binary: Option<PathBuf>) -> Result<(), String> {
    let binary = match binary {
        Some(b) => b,
        None => std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?,
    };
    let binary = binary
        .canonicalize()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let config = HookConfig::load(Path::new(CONFIG_PATH))?;
    if user_ids(&config.user).is_err() {
        // Its primary group is kvm where there is one: accelerated mode asks /dev/kvm (root:kvm,
        // 0660) once at start whether KVM can take TCE updates over.
        let kvm = std::fs::read_to_string("/etc/group")
            .is_ok_and(|groups| groups.lines().any(|l| l.starts_with("kvm:")));
        let group: &[&str] = if kvm {
            &["--gid", "kvm"]
        } else {
            &["--user-group"]
        };
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(group)
            .args(["--shell", "/usr/sbin/nologin", &config.user])
            .status()
            .map_err(|e| format!("cannot run useradd: {e}"))?;
        if !status.success() {
            return Err(format!("useradd {} failed ({status})", config.user));
        }
        println!("created the system user {}", config.user);
    }
    let (qemu_uid, _) = user_ids(&config.qemu_user)
        .map_err(|e| format!("QEMU's user: {e} (install libvirt first, or set qemu_user)"))?;
    write(Path::new(HOOK_PATH), &hook_script(&binary), 0o755)?;
    for (name, text) in units(&binary, &config.qemu_user, qemu_uid, &config.user) {
        write(&Path::new(UNIT_DIR).join(name), &text, 0o644)?;
    }
    if !Path::new(CONFIG_PATH).exists() {
        write(Path::new(CONFIG_PATH), CONFIG_TEMPLATE, 0o644)?;
    }
    if Path::new(APPARMOR).exists() {
        allow_in_apparmor(&config.socket_dir)?;
    }
    println!(
        "restart libvirt's daemon (libvirtd or virtqemud) once, so that it finds {}",
        HOOK_PATH
    );
    Ok(())
}

/// Present where AppArmor confines processes (Debian confines QEMU under libvirt with it).
const APPARMOR: &str = "/sys/kernel/security/apparmor";
/// Included by the profile libvirt generates for each domain's QEMU.
const APPARMOR_LOCAL: &str = "/etc/apparmor.d/local/abstractions/libvirt-qemu";

fn apparmor_rule(socket_dir: &Path) -> String {
    format!("{}/*.sock rw, # tce-sidecar\n", socket_dir.display())
}

/// Lets a domain's QEMU connect to its sidecar's socket under AppArmor: libvirt's generated
/// profiles allow only the paths the domain XML names as devices.
fn allow_in_apparmor(socket_dir: &Path) -> Result<(), String> {
    let rule = apparmor_rule(socket_dir);
    let existing = std::fs::read_to_string(APPARMOR_LOCAL).unwrap_or_default();
    if !existing.contains(&rule) {
        write(Path::new(APPARMOR_LOCAL), &(existing + &rule), 0o644)?;
    }
    Ok(())
}

/// Removes what `install` put in place, but the user (`userdel tce-sidecar` removes it) and a
/// configuration changed since.
pub fn uninstall() -> Result<(), String> {
    let config = HookConfig::load(Path::new(CONFIG_PATH))?;
    if let Ok(text) = std::fs::read_to_string(APPARMOR_LOCAL) {
        let rule = apparmor_rule(&config.socket_dir);
        if text.contains(&rule) {
            write(Path::new(APPARMOR_LOCAL), &text.replace(&rule, ""), 0o644)?;
        }
    }
    let mut paths: Vec<PathBuf> = vec![HOOK_PATH.into()];
    // The configuration goes only as install wrote it: an administrator's settings stay.
    match std::fs::read_to_string(CONFIG_PATH) {
        Ok(text) if text == CONFIG_TEMPLATE => paths.push(CONFIG_PATH.into()),
        Ok(_) => println!("kept {CONFIG_PATH}, which was changed after install"),
        Err(_) => {}
    }
    paths.extend(
        ["tce-sidecar@.socket", "tce-sidecar@.service"].map(|n| Path::new(UNIT_DIR).join(n)),
    );
    for path in paths {
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_execs_the_binary_with_its_arguments() {
        let script = hook_script(Path::new("/usr/bin/tce-sidecar"));
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.ends_with("exec '/usr/bin/tce-sidecar' libvirt-hook \"$@\"\n"));
    }
}
