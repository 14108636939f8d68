//! `tce-sidecar libvirt-xml` and what the libvirt hook reads of a domain, on the README's example
//! domain (examples/libvirt/pseries-vfio.xml).

use std::path::Path;

use tce_sidecar::kernel::OwnershipMode;
use tce_sidecar::libvirt::domain::{use_sidecar, Domain, METADATA_NS, QEMU_NS};

const EXAMPLE: &str = include_str!("../examples/libvirt/pseries-vfio.xml");
const UUID: &str = "3c8f6d2a-1b47-4e0e-9a55-7d2f0e6b91c4";

fn with_sidecar(xml: &str, mode: OwnershipMode) -> String {
    use_sidecar(xml, mode, Path::new("/run/tce-sidecar")).expect("a domain with a uuid")
}

#[test]
fn the_example_domain_gets_its_sidecar_object_metadata_and_device_property() {
    let out = with_sidecar(EXAMPLE, OwnershipMode::Isolated);
    assert!(out.contains(&format!("xmlns:qemu=\"{QEMU_NS}\"")), "{out}");
    assert!(out.contains(&format!(
        "<tce:sidecar xmlns:tce=\"{METADATA_NS}\" mode=\"isolated\"/>"
    )));
    assert!(out.contains(&format!(
        "<qemu:arg value=\"spapr-tce-sidecar,id=tce-sidecar,path=/run/tce-sidecar/{UUID}.sock,mode=isolated\"/>"
    )));
    assert!(out.contains("<alias name=\"ua-tce-hostdev0\"/>"));
    assert!(out.contains("<qemu:device alias=\"ua-tce-hostdev0\">"));
    assert!(out.contains(
        "<qemu:property name=\"spapr-tce-sidecar\" type=\"string\" value=\"tce-sidecar\"/>"
    ));
    // What it does not touch stays: comments and every other element.
    assert!(out.contains("<!-- shared memfd RAM"));
    assert!(out.contains("<source file=\"/var/lib/libvirt/images/pseries-vfio.qcow2\"/>"));
    let domain = Domain::parse(&out).unwrap();
    assert_eq!(domain.sidecar, Some(OwnershipMode::Isolated));
    assert_eq!((domain.max_memory, domain.hostdevs), (4 << 30, 1));
    assert_eq!(domain.uuid, UUID);
}

#[test]
fn applying_it_again_changes_nothing_and_a_new_mode_replaces_the_old() {
    let once = with_sidecar(EXAMPLE, OwnershipMode::Isolated);
    assert_eq!(with_sidecar(&once, OwnershipMode::Isolated), once);
    let switched = with_sidecar(&once, OwnershipMode::Accelerated);
    assert_eq!(
        switched.matches("spapr-tce-sidecar,id=tce-sidecar").count(),
        1
    );
    assert_eq!(switched.matches("<tce:sidecar ").count(), 1);
    assert_eq!(switched.matches("<qemu:property ").count(), 1);
    assert!(switched.contains("mode=accelerated\"/>"));
    assert_eq!(with_sidecar(&switched, OwnershipMode::Isolated), once);
}

#[test]
fn other_command_line_arguments_and_user_aliases_are_kept() {
    let xml = format!(
        "<domain xmlns:qemu='{QEMU_NS}'><name>d</name><uuid>{UUID}</uuid><devices>\
         <hostdev mode='subsystem' type='pci'><alias name='ua-nic'/></hostdev>\
         <hostdev mode='subsystem' type='pci'><alias name='hostdev1'/></hostdev></devices>\
         <qemu:commandline><qemu:arg value='-trace'/><qemu:arg value='vfio*'/></qemu:commandline>\
         </domain>"
    );
    let out = with_sidecar(&xml, OwnershipMode::Accelerated);
    assert!(
        out.contains("<qemu:arg value=\"-trace\"/><qemu:arg value=\"vfio*\"/>"),
        "{out}"
    );
    assert!(out.contains("<qemu:device alias=\"ua-nic\">"));
    // libvirt's own aliases are replaced at start: a user alias is given instead.
    assert!(!out.contains("name=\"hostdev1\""));
    assert!(out.contains("<qemu:device alias=\"ua-tce-hostdev1\">"));
    assert_eq!(Domain::parse(&out).unwrap().hostdevs, 2);
}

#[test]
fn a_domain_without_a_uuid_or_with_another_qemu_prefix_is_refused() {
    let err = use_sidecar(
        "<domain><name>d</name></domain>",
        OwnershipMode::Isolated,
        Path::new("/run"),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "the domain has no <uuid>");
    let other = format!("<domain xmlns:q='{QEMU_NS}'><name>d</name><uuid>{UUID}</uuid></domain>");
    let err = use_sidecar(&other, OwnershipMode::Isolated, Path::new("/run")).unwrap_err();
    assert!(err.to_string().contains("use the prefix qemu"), "{err}");
    let err = use_sidecar("<network/>", OwnershipMode::Isolated, Path::new("/run")).unwrap_err();
    assert!(err.to_string().contains("is not a <domain>"), "{err}");
    assert!(use_sidecar("<domain><name>", OwnershipMode::Isolated, Path::new("/run")).is_err());
}

#[test]
fn the_hook_reads_max_memory_units_and_the_qemu_dac_label() {
    let xml = format!(
        "<domain><name>d</name><uuid>{UUID}</uuid>\
         <maxMemory slots='4' unit='GiB'>8</maxMemory><memory unit='MiB'>2048</memory>\
         <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+994</label></seclabel>\
         <metadata><t:sidecar xmlns:t='{METADATA_NS}' mode='isolated'/></metadata></domain>"
    );
    let domain = Domain::parse(&xml).unwrap();
    assert_eq!(domain.max_memory, 8 << 30, "maxMemory, not memory");
    assert_eq!(domain.qemu_ids, Some((64055, 994)));
    assert_eq!(domain.sidecar, Some(OwnershipMode::Isolated), "any prefix");
    let plain = format!("<domain><name>d</name><uuid>{UUID}</uuid><memory>1024</memory></domain>");
    let domain = Domain::parse(&plain).unwrap();
    assert_eq!((domain.sidecar, domain.max_memory), (None, 1 << 20));
}
