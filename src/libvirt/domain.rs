//! What the hook reads of a libvirt domain, and `tce-sidecar libvirt-xml`: a domain changed so
//! that its QEMU uses a sidecar.

use std::path::Path;

use super::tree::{Document, Element, XmlError};
use crate::kernel::OwnershipMode;

/// The namespace of the project's element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "urn:x-tce-sidecar:libvirt:1";
/// libvirt's namespace for QEMU command-line passthrough and device property overrides.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The id of the `spapr-tce-sidecar` object in QEMU.
pub const OBJECT_ID: &str = "tce-sidecar";

/// What the hook needs to know of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: String,
    /// The mode its metadata asks for; `None`: the domain does not use a sidecar.
    pub sidecar: Option<OwnershipMode>,
    /// The most guest RAM it can have: `<maxMemory>` (hot-plug) or `<memory>`, in bytes.
    pub max_memory: u64,
    /// Its `<hostdev>` devices (each may be a container of its own).
    pub hostdevs: usize,
    /// The uid and gid of its QEMU process, if its DAC label names them (`+UID:+GID`).
    pub qemu_ids: Option<(u32, u32)>,
}

fn mode_name(mode: OwnershipMode) -> &'static str {
    match mode {
        OwnershipMode::Accelerated => "accelerated",
        OwnershipMode::Isolated => "isolated",
    }
}

fn parse_mode(mode: &str) -> Result<OwnershipMode, XmlError> {
    match mode {
        "accelerated" => Ok(OwnershipMode::Accelerated),
        "isolated" => Ok(OwnershipMode::Isolated),
        other => Err(XmlError(format!(
            "the sidecar's mode is \"{other}\": accelerated or isolated"
        ))),
    }
}

/// A memory size with libvirt's `unit` attribute (default KiB), in bytes.
fn bytes(element: &Element) -> Result<u64, XmlError> {
    let value: u64 = element
        .text()
        .parse()
        .map_err(|_| XmlError(format!("<{}> is not a number", element.name)))?;
    let unit = element.attr("unit").unwrap_or("KiB");
    let scale: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "T" | "TiB" => 1 << 40,
        other => return Err(XmlError(format!("<{}> has unit \"{other}\"", element.name))),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| XmlError(format!("<{}> overflows", element.name)))
}

/// Whether `element` is the project's metadata element (any prefix).
fn is_sidecar_metadata(element: &Element) -> bool {
    element.name.rsplit(':').next() == Some("sidecar")
        && element
            .attrs
            .iter()
            .any(|(k, v)| (k == "xmlns" || k.starts_with("xmlns:")) && v == METADATA_NS)
}

fn uuid_of(root: &Element) -> Result<String, XmlError> {
    let uuid = root
        .child("uuid")
        .map(Element::text)
        .ok_or_else(|| XmlError("the domain has no <uuid>".into()))?;
    let well_formed = uuid.len() == 36
        && uuid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !well_formed {
        return Err(XmlError(format!(
            "the domain's <uuid> \"{uuid}\" is not a UUID"
        )));
    }
    Ok(uuid.to_ascii_lowercase())
}

impl Domain {
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let doc = Document::parse(xml)?;
        let root = &doc.root;
        if root.name != "domain" {
            return Err(XmlError(format!("<{}> is not a <domain>", root.name)));
        }
        let name = root
            .child("name")
            .map(Element::text)
            .ok_or_else(|| XmlError("the domain has no <name>".into()))?;
        let sidecar = root
            .child("metadata")
            .and_then(|m| m.elements().find(|e| is_sidecar_metadata(e)))
            .map(|e| parse_mode(e.attr("mode").unwrap_or("accelerated")))
            .transpose()?;
        let memory = root
            .child("maxMemory")
            .or_else(|| root.child("memory"))
            .map(bytes)
            .transpose()?
            .unwrap_or(0);
        let hostdevs = root
            .child("devices")
            .map_or(0, |d| d.elements().filter(|e| e.name == "hostdev").count());
        let qemu_ids = root
            .elements()
            .filter(|e| e.name == "seclabel" && e.attr("model") == Some("dac"))
            .find_map(|e| e.child("label").map(Element::text))
            .and_then(|label| {
                let (uid, gid) = label.split_once(':')?;
                Some((
                    uid.strip_prefix('+')?.parse().ok()?,
                    gid.strip_prefix('+')?.parse().ok()?,
                ))
            });
        Ok(Self {
            uuid: uuid_of(root)?,
            name,
            sidecar,
            max_memory: memory,
            hostdevs,
            qemu_ids,
        })
    }
}

/// `tce-sidecar libvirt-xml`: the domain with its sidecar in `mode` at `socket_dir/UUID.sock`:
///
/// - the project's element in `<metadata>`, which the hook acts on;
/// - `-object spapr-tce-sidecar` through `<qemu:commandline>`;
/// - each `<hostdev>` with a user alias (`ua-…`) and its `spapr-tce-sidecar` property set
///   through `<qemu:override>` (libvirt 8.2 and later).
///
/// Applying it again changes nothing: what it added is found and updated in place.
pub fn use_sidecar(xml: &str, mode: OwnershipMode, socket_dir: &Path) -> Result<String, XmlError> {
    let mut doc = Document::parse(xml)?;
    let root = &mut doc.root;
    if root.name != "domain" {
        return Err(XmlError(format!("<{}> is not a <domain>", root.name)));
    }
    let uuid = uuid_of(root)?;
    match root.attr("xmlns:qemu") {
        None => root.set_attr("xmlns:qemu", QEMU_NS),
        Some(QEMU_NS) => {}
        Some(other) => {
            return Err(XmlError(format!(
                "the domain binds the prefix qemu to {other}, not to {QEMU_NS}"
            )))
        }
    }
    if let Some((prefix, _)) = root
        .attrs
        .iter()
        .find(|(k, v)| v == QEMU_NS && k != "xmlns:qemu")
    {
        return Err(XmlError(format!(
            "the domain binds libvirt's QEMU namespace to {prefix}; use the prefix qemu"
        )));
    }
    set_metadata(root, mode);
    let aliases = alias_hostdevs(root);
    let socket = socket_dir.join(format!("{uuid}.sock"));
    let object = format!(
        "spapr-tce-sidecar,id={OBJECT_ID},path={},mode={}",
        socket.display(),
        mode_name(mode)
    );
    set_object(root, &object);
    set_overrides(root, &aliases);
    Ok(doc.to_xml())
}

fn set_metadata(root: &mut Element, mode: OwnershipMode) {
    let ours = Element::new(
        "tce:sidecar",
        &[("xmlns:tce", METADATA_NS), ("mode", mode_name(mode))],
    );
    let metadata = match root.child_mut("metadata") {
        Some(m) => m,
        None => root.append(Element::new("metadata", &[]), 1),
    };
    metadata.remove_elements(is_sidecar_metadata);
    metadata.append(ours, 2);
}

/// Gives each `<hostdev>` a user alias if it has none; returns every hostdev's alias.
fn alias_hostdevs(root: &mut Element) -> Vec<String> {
    let Some(devices) = root.child_mut("devices") else {
        return Vec::new();
    };
    let mut aliases = Vec::new();
    for (n, hostdev) in devices
        .elements_mut()
        .filter(|e| e.name == "hostdev")
        .enumerate()
    {
        let existing = hostdev
            .child("alias")
            .and_then(|a| a.attr("name"))
            .filter(|name| name.starts_with("ua-"))
            .map(str::to_owned);
        let alias = existing.unwrap_or_else(|| {
            let alias = format!("ua-tce-hostdev{n}");
            // An alias libvirt made (without ua-) would be replaced at start anyway.
            hostdev.remove_elements(|e| e.name == "alias");
            hostdev.append(Element::new("alias", &[("name", &alias)]), 3);
            alias
        });
        aliases.push(alias);
    }
    aliases
}

fn is_our_object(value: &str) -> bool {
    value.starts_with("spapr-tce-sidecar,") && value.contains(&format!("id={OBJECT_ID},"))
}

fn set_object(root: &mut Element, object: &str) {
    let commandline = match root.child_mut("qemu:commandline") {
        Some(c) => c,
        None => root.append(Element::new("qemu:commandline", &[]), 1),
    };
    // Drop our object and the -object before it; other arguments stay.
    let values: Vec<Option<String>> = commandline
        .elements()
        .map(|a| a.attr("value").map(str::to_owned))
        .collect();
    let mut drop = vec![false; values.len()];
    for (i, value) in values.iter().enumerate() {
        if value.as_deref().is_some_and(is_our_object) {
            drop[i] = true;
            if i > 0 && values[i - 1].as_deref() == Some("-object") {
                drop[i - 1] = true;
            }
        }
    }
    let mut at = 0;
    commandline.remove_elements(|_| {
        at += 1;
        drop[at - 1]
    });
    for value in ["-object", object] {
        commandline.append(Element::new("qemu:arg", &[("value", value)]), 2);
    }
}

fn set_overrides(root: &mut Element, aliases: &[String]) {
    if aliases.is_empty() {
        return;
    }
    let overrides = match root.child_mut("qemu:override") {
        Some(o) => o,
        None => root.append(Element::new("qemu:override", &[]), 1),
    };
    for alias in aliases {
        let exists = overrides
            .elements()
            .any(|d| d.name == "qemu:device" && d.attr("alias") == Some(alias));
        if !exists {
            overrides.append(Element::new("qemu:device", &[("alias", alias)]), 2);
        }
        let device = overrides
            .elements_mut()
            .find(|d| d.name == "qemu:device" && d.attr("alias") == Some(alias))
            .expect("present");
        let frontend = match device.child_mut("qemu:frontend") {
            Some(f) => f,
            None => device.append(Element::new("qemu:frontend", &[]), 3),
        };
        frontend.remove_elements(|p| {
            p.name == "qemu:property" && p.attr("name") == Some("spapr-tce-sidecar")
        });
        frontend.append(
            Element::new(
                "qemu:property",
                &[
                    ("name", "spapr-tce-sidecar"),
                    ("type", "string"),
                    ("value", OBJECT_ID),
                ],
            ),
            4,
        );
    }
}
