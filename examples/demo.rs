//! The demo: this program plays QEMU on the model kernel and runs the real `tce-sidecar` binary
//! as a separate process, once per ownership mode, and shows the seed's effect: in accelerated
//! mode the guest's TCE hypercalls complete in the kernel; in isolated mode every one exits to
//! the front-end and is forwarded to the sidecar, which maps it.
//!
//! `cargo run --release --example demo`. No setup beyond the Rust toolchain: the model kernel is
//! a simulation served by the sidecar itself (`--kernel model`); no device is programmed.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tce_sidecar::client::model_vm::{GuestTable, ModelVm};
use tce_sidecar::client::Client;
use tce_sidecar::kernel::model::server::ModelClient;
use tce_sidecar::kernel::model::{HcallOutcome, H_PUT_TCE, H_PUT_TCE_INDIRECT, H_STUFF_TCE};
use tce_sidecar::kernel::OwnershipMode;
use tce_sidecar::protocol::{GroupDesc, TableDesc, TceEntries, TceUpdate, FEATURE_FDS_BY_MODE};

type Error = Box<dyn std::error::Error>;

/// A small guest: in isolated mode the sidecar's worker pins its RAM and TCE tables, and a user
/// may lock 8 MiB by default (the sidecar keeps no capability that would lift the limit).
const RAM_REGIONS: u64 = 2;
const REGION_SIZE: u64 = 2 << 20;
/// The default 32-bit window: 256 MiB of 4 KiB pages at bus address 0 (QEMU's PHB property
/// `dma_win_size`; its default of 1 GiB would need 4 MiB of locked TCE tables alone).
const DEFAULT_WINDOW: (u64, u32, u64) = (0, 12, (256 << 20) >> 12);
/// The guest's 64-bit DDW: 512 MiB of 64 KiB pages at `1 << 59`.
const DDW: (u64, u32, u64) = (1 << 59, 16, (512 << 20) >> 16);
const BATCHES: u64 = 64;
const BATCH: u64 = 512;

/// The sidecar binary next to this example (`target/<profile>/tce-sidecar`), built if missing.
fn sidecar_binary() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let binary = profile_dir.join("tce-sidecar");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        println!("building the tce-sidecar binary ...");
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--bin", "tce-sidecar"]);
        if release {
            build.arg("--release");
        }
        if !build.status()?.success() {
            return Err("cargo build --bin tce-sidecar failed".into());
        }
    }
    Ok(binary)
}

/// The sidecar process; stopped with SIGTERM when dropped.
struct Sidecar {
    child: Child,
    socket: PathBuf,
    model_socket: PathBuf,
}

impl Sidecar {
    fn start(binary: &Path, dir: &Path) -> Result<Self, Error> {
        let socket = dir.join("sidecar.sock");
        let child = Command::new(binary)
            .args(["--kernel", "model", "--log-level", "warn", "--socket-path"])
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()?;
        let mut model_socket = socket.clone().into_os_string();
        model_socket.push(".model");
        let sidecar = Self {
            child,
            socket,
            model_socket: model_socket.into(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(sidecar.socket.exists() && sidecar.model_socket.exists()) {
            if Instant::now() > deadline {
                return Err("the sidecar did not create its sockets".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(sidecar)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
    }
}

struct Row {
    hypercalls: u64,
    in_kernel: u64,
    exits: u64,
    forwarded: u64,
    entries_forwarded: u64,
    maps: u64,
    unmaps: u64,
    pinned_sidecar: u64,
    pinned_front_end: u64,
    entries: u64,
    elapsed: Duration,
}

/// One guest, one session: set up as QEMU does, then the guest's DMA workload.
fn run_mode(sidecar: &Sidecar, mode: OwnershipMode, first_group: u32) -> Result<Row, Error> {
    let mut vm = ModelVm::create(&sidecar.model_socket)?;
    for i in 0..RAM_REGIONS {
        vm.add_ram(i as u32, i * REGION_SIZE, REGION_SIZE)?;
    }
    let kernel = Box::new(vm.kernel()?);
    let mut client = Client::connect(
        &sidecar.socket,
        mode,
        FEATURE_FDS_BY_MODE,
        kernel,
        Some(vm.kvm_vfio_device()?),
    )?;
    for ram in vm.ram() {
        client.add_region(ram.region, ram.memfd.as_fd())?;
    }
    for (i, iommu_group) in [first_group, first_group + 1].into_iter().enumerate() {
        let desc = GroupDesc {
            group_id: i as u32,
            container_id: 0,
            iommu_group,
        };
        client.add_group(desc, vm.open_group(iommu_group)?)?;
    }
    let mut tables: Vec<GuestTable> = Vec::new();
    for (i, (bus, shift, entries)) in [DEFAULT_WINDOW, DDW].into_iter().enumerate() {
        let liobn = 0x8000_0000 + i as u64;
        let table = match mode {
            OwnershipMode::Accelerated => vm.kvm_table(liobn, shift, bus, entries)?,
            OwnershipMode::Isolated => vm.userspace_table(liobn, shift, bus, entries)?,
        };
        let desc = TableDesc {
            table_id: i as u32,
            container_id: 0,
            liobn: liobn as u32,
            page_shift: shift,
            bus_offset: bus,
            entries,
        };
        client.add_table(desc, table.fd.try_clone()?)?;
        client.create_window(i as u32)?;
        tables.push(table);
    }

    // The guest's DMA workload on the DDW: batches of H_PUT_TCE_INDIRECT (a 512-entry list in
    // guest RAM, big-endian as the guest writes it) mapping 64 KiB pages of the second region,
    // each followed by an H_STUFF_TCE that clears them; plus single H_PUT_TCEs.
    let table_id = 1u32;
    let ddw = &tables[table_id as usize];
    let list_gpa = 0x10_0000; // a page of the first region
    let list = &vm.ram()[0].mapping;
    let (mut hypercalls, mut entries) = (0u64, 0u64);
    let start = Instant::now();
    for batch in 0..BATCHES {
        let first = (batch * BATCH) % ddw.entries;
        for i in 0..BATCH {
            let gpa = REGION_SIZE + ((first + i) << ddw.page_shift) % REGION_SIZE;
            list.write_u64((list_gpa / 8 + i) as usize, (gpa | 3).to_be());
        }
        let ioba = ddw.bus_offset + (first << ddw.page_shift);
        let put = vm.hcall(H_PUT_TCE_INDIRECT, [ddw.liobn, ioba, list_gpa, BATCH])?;
        hypercalls += 1;
        if let HcallOutcome::Exit = put {
            // QEMU's h_put_tce_indirect: store the entries in its table, then forward them.
            for i in 0..BATCH {
                let tce = u64::from_be(
                    list.read_u64((list_gpa / 8 + i) as usize)
                        .unwrap_or_default(),
                );
                ddw.mapping.write_u64((first + i) as usize, tce);
            }
            let update = TceUpdate {
                table_id,
                first_index: first,
                count: BATCH as u32,
                entries: TceEntries::Shared,
            };
            client.tce_update(update)?;
        }
        let stuff = vm.hcall(H_STUFF_TCE, [ddw.liobn, ioba, 0, BATCH])?;
        hypercalls += 1;
        if let HcallOutcome::Exit = stuff {
            for i in 0..BATCH {
                ddw.mapping.write_u64((first + i) as usize, 0);
            }
            let update = TceUpdate {
                table_id,
                first_index: first,
                count: BATCH as u32,
                entries: TceEntries::Stuff(0),
            };
            client.tce_update(update)?;
        }
        entries += 2 * BATCH;
        // One single-entry H_PUT_TCE per batch, left mapped.
        let gpa = REGION_SIZE + (batch << ddw.page_shift) % REGION_SIZE;
        let single_ioba = ddw.bus_offset + ((ddw.entries - 1 - batch) << ddw.page_shift);
        if let HcallOutcome::Exit = vm.hcall(H_PUT_TCE, [ddw.liobn, single_ioba, gpa | 3, 0])? {
            let index = ddw.entries - 1 - batch;
            ddw.mapping.write_u64(index as usize, gpa | 3);
            let update = TceUpdate {
                table_id,
                first_index: index,
                count: 1,
                entries: TceEntries::Shared,
            };
            client.tce_update(update)?;
        }
        hypercalls += 1;
        entries += 1;
    }
    let elapsed = start.elapsed();

    let stats = vm.hcall_stats()?;
    let model = ModelClient::connect(&sidecar.model_socket)?;
    let pinned = |pid: u32| model.mm_stats(Some(pid)).map(|s| s.pinned_pages * 4096);
    let status: serde_json::Value = serde_json::from_slice(&client.status()?)?;
    let me = status["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == status["session"]))
        .cloned()
        .unwrap_or_default();
    let counter = |name: &str| me["counters"][name].as_u64().unwrap_or_default();
    let row = Row {
        hypercalls,
        in_kernel: stats.in_kernel,
        exits: stats.exits,
        forwarded: counter("updates_forwarded"),
        entries_forwarded: counter("entries_forwarded"),
        maps: counter("maps"),
        unmaps: counter("unmaps"),
        // The worker process serving this session pins what the sidecar pins.
        pinned_sidecar: pinned(me["worker_pid"].as_u64().unwrap_or_default() as u32)?,
        pinned_front_end: pinned(std::process::id())?,
        entries,
        elapsed,
    };
    println!("\nsidecar status for this session (GET_STATUS):");
    println!("{}", serde_json::to_string_pretty(&me)?);
    drop(client);
    let fds: Vec<&std::os::fd::OwnedFd> = tables.iter().map(|t| &t.fd).collect();
    if mode == OwnershipMode::Accelerated {
        vm.close(&fds)?;
    } else {
        vm.close(&[])?;
    }
    Ok(row)
}

fn print_table(mode: &str, row: &Row) {
    let mib = |b: u64| format!("{} MiB", b >> 20);
    println!("\n== {mode} mode ==");
    println!("  {:<44} {:>14}", "guest TCE hypercalls", row.hypercalls);
    println!(
        "  {:<44} {:>14}",
        "  completed in the kernel", row.in_kernel
    );
    println!(
        "  {:<44} {:>14}",
        "  exits to userspace (front-end)", row.exits
    );
    println!(
        "  {:<44} {:>14}",
        "updates forwarded to the sidecar", row.forwarded
    );
    println!(
        "  {:<44} {:>14}",
        "  TCE entries they carried", row.entries_forwarded
    );
    println!(
        "  {:<44} {:>14}",
        "MAP_DMA / UNMAP_DMA calls (slow path)",
        format!("{} / {}", row.maps, row.unmaps)
    );
    println!(
        "  {:<44} {:>14}",
        "pinned guest RAM: sidecar",
        mib(row.pinned_sidecar)
    );
    println!(
        "  {:<44} {:>14}",
        "pinned guest RAM: front-end (QEMU)",
        mib(row.pinned_front_end)
    );
    let per_update = row.elapsed.as_nanos() as f64 / row.entries as f64;
    println!(
        "  {:<44} {:>11.0} ns",
        "time per TCE entry (model kernel)", per_update
    );
}

fn main() -> Result<(), Error> {
    println!(
        "tce-sidecar demo: QEMU's part is played by this process, the sidecar runs as its own"
    );
    println!("process, and both use the MODEL kernel (a simulation of KVM and VFIO's rules).");
    let binary = sidecar_binary()?;
    let dir = std::env::temp_dir().join(format!("tce-sidecar-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sidecar = Sidecar::start(&binary, &dir)?;
    println!(
        "sidecar pid {} listening on {}",
        sidecar.pid(),
        sidecar.socket.display()
    );

    let accelerated = run_mode(&sidecar, OwnershipMode::Accelerated, 1)?;
    print_table("accelerated", &accelerated);
    let isolated = run_mode(&sidecar, OwnershipMode::Isolated, 3)?;
    print_table("isolated", &isolated);

    let share = |r: &Row| 100.0 * r.in_kernel as f64 / r.hypercalls.max(1) as f64;
    println!(
        "\nhypercalls completed in the kernel: accelerated {:.1}%, isolated {:.1}%",
        share(&accelerated),
        share(&isolated)
    );
    println!("Times are the model's: it maps a 512-entry run in one simulated call, so they say");
    println!(
        "nothing about real hardware, where each exit to userspace costs two context switches"
    );
    println!("and each forwarded update a socket round trip that the in-kernel path avoids.");
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
