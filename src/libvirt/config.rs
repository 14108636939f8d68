//! `/etc/tce-sidecar/libvirt.conf`, and the users it names.

use std::path::{Path, PathBuf};

/// The hook's configuration file.
pub const CONFIG_PATH: &str = "/etc/tce-sidecar/libvirt.conf";
/// libvirt's QEMU driver configuration, for the user QEMU runs as.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// The settings of the hook, each with its default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookConfig {
    /// `linux` (the host's kernel) or `model` (the simulated kernel: tests and demos only).
    pub kernel: String,
    /// Where each domain's socket (`UUID.sock`) and pid file (`UUID.pid`) go.
    pub socket_dir: PathBuf,
    /// Where each domain's sidecar writes its log (`NAME.log`).
    pub log_dir: PathBuf,
    /// The unprivileged user every sidecar runs as.
    pub user: String,
    /// The user QEMU runs as: libvirt's `user` in qemu.conf, else Debian's `libvirt-qemu`.
    pub qemu_user: String,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            kernel: "linux".into(),
            socket_dir: "/run/tce-sidecar".into(),
            log_dir: "/var/log/tce-sidecar".into(),
            user: "tce-sidecar".into(),
            qemu_user: qemu_conf_user(Path::new(QEMU_CONF))
                .unwrap_or_else(|| "libvirt-qemu".into()),
        }
    }
}

/// `key = value` lines; `#` starts a comment; values may be quoted.
fn settings(text: &str) -> impl Iterator<Item = (usize, Result<(&str, &str), String>)> {
    text.lines().enumerate().filter_map(|(n, line)| {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return None;
        }
        Some((
            n + 1,
            line.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
                .ok_or_else(|| format!("\"{line}\" is not key = value")),
        ))
    })
}

fn qemu_conf_user(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let user = settings(&text).find_map(|(_, kv)| match kv {
        Ok(("user", user)) if !user.is_empty() => Some(user.trim_start_matches('+').to_owned()),
        _ => None,
    });
    user
}

impl HookConfig {
    /// Reads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, String> {
        let mut config = Self::default();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(config),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        for (line, setting) in settings(&text) {
            let at = |why: String| format!("{}:{line}: {why}", path.display());
            let (key, value) = setting.map_err(at)?;
            match key {
                "kernel" if value == "linux" || value == "model" => config.kernel = value.into(),
                "kernel" => return Err(at(format!("kernel is \"{value}\": linux or model"))),
                "socket_dir" => config.socket_dir = value.into(),
                "log_dir" => config.log_dir = value.into(),
                "user" => config.user = value.into(),
                "qemu_user" => config.qemu_user = value.into(),
                other => return Err(at(format!("unknown setting \"{other}\""))),
            }
        }
        Ok(config)
    }
}

/// The uid and primary gid of `user`, from `/etc/passwd` (a name or a number). System users
/// live there; users only a directory service knows are not looked up.
pub fn user_ids(user: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let (uid, gid) = (fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?);
            (fields[0] == user || fields[2] == user).then_some((uid, gid))
        })
        .next()
        .ok_or_else(|| format!("there is no user \"{user}\" in /etc/passwd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_with_comments_quotes_and_errors() {
        let dir = std::env::temp_dir().join(format!("tce-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("libvirt.conf");
        std::fs::write(
            &path,
            "# test\nkernel = model\nsocket_dir = \"/tmp/s\" # here\n",
        )
        .unwrap();
        let config = HookConfig::load(&path).unwrap();
        assert_eq!(config.kernel, "model");
        assert_eq!(config.socket_dir, PathBuf::from("/tmp/s"));
        assert_eq!(config.user, "tce-sidecar");
        std::fs::write(&path, "kernel = other\n").unwrap();
        let err = HookConfig::load(&path).unwrap_err();
        assert!(
            err.ends_with(":1: kernel is \"other\": linux or model"),
            "{err}"
        );
        std::fs::write(&path, "colour = blue\n").unwrap();
        assert!(HookConfig::load(&path)
            .unwrap_err()
            .contains("unknown setting \"colour\""));
        assert_eq!(
            HookConfig::load(&dir.join("none")).unwrap(),
            HookConfig::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn users_found_by_name_or_number() {
        assert_eq!(user_ids("root").unwrap(), (0, 0));
        assert_eq!(user_ids("0").unwrap(), (0, 0));
        assert!(user_ids("no-such-user-here")
            .unwrap_err()
            .contains("no user"));
    }
}
