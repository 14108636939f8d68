//! Prints one example frame of every request and of the reply shapes, in hex, as a front-end
//! implementer's reference for the byte layouts of `protocol/PROTOCOL.md`.
//!
//! `cargo run --example wire_dump` prints; `cargo run --example wire_dump -- --seeds DIR` also
//! writes each frame to DIR in the fuzz targets' input format (a selector byte, then the frame).

use std::path::PathBuf;

use tce_sidecar::protocol::*;

fn requests() -> Vec<Request> {
    let region = MemRegion {
        region_id: 1,
        guest_addr: 0,
        size: 1 << 30,
        user_addr: 0x7fff_0000_0000,
        mmap_offset: 0,
        page_shift: 0,
    };
    vec![
        Request::GetFeatures,
        Request::SetFeatures {
            features: FEATURE_MODE_ACCELERATED | FEATURE_EEH,
        },
        Request::GetStatus { first_session: 0 },
        Request::MemAdd(region),
        Request::MemRemove(region),
        Request::GroupAdd(GroupDesc {
            group_id: 1,
            container_id: 0,
            iommu_group: 7,
        }),
        Request::GroupAdopt(GroupDesc {
            group_id: 1,
            container_id: 0,
            iommu_group: 7,
        }),
        Request::WindowAdopt { table_id: 2 },
        Request::GroupRemove { group_id: 1 },
        Request::TableAdd(TableDesc {
            table_id: 2,
            container_id: 0,
            liobn: 0x8000_0001,
            page_shift: 16,
            bus_offset: 1 << 59,
            entries: 1 << 14,
        }),
        Request::TableRemove { table_id: 2 },
        Request::WindowQuery { container_id: 0 },
        Request::WindowCreate { table_id: 2 },
        Request::WindowRemove { table_id: 2 },
        Request::WindowReset {
            container_id: 0,
            default_table: Some(1),
        },
        Request::TceUpdate(TceUpdate {
            table_id: 2,
            first_index: 16,
            count: 2,
            entries: TceEntries::Inline(vec![0x1_0000 | 3, 0x2_0000 | 1]),
        }),
        Request::TceUpdate(TceUpdate {
            table_id: 2,
            first_index: 0,
            count: 64,
            entries: TceEntries::Stuff(0),
        }),
        Request::TceUpdate(TceUpdate {
            table_id: 2,
            first_index: 0,
            count: 8,
            entries: TceEntries::Shared,
        }),
        Request::EehOp(EehRequest {
            container_id: 0,
            op: 4,
            err_type: 0,
            err_func: 0,
            err_addr: 0,
            err_mask: 0,
        }),
        Request::OpsResult {
            transaction: 1,
            results: vec![
                OpResult {
                    kind: OpKind::TceCreate,
                    status: 0,
                    out: [1 << 59, 0, 0, 0],
                },
                OpResult {
                    kind: OpKind::KvmSetSpaprTce,
                    status: -22,
                    out: [0; 4],
                },
            ],
        },
    ]
}

fn replies() -> Vec<(RequestCode, Reply)> {
    vec![
        (
            RequestCode::GetFeatures,
            Reply::ok(
                FeaturesBody {
                    features: FEATURES_KNOWN,
                }
                .encode(),
            ),
        ),
        (
            RequestCode::WindowCreate,
            Reply::ops(
                1,
                vec![
                    OwnerOp::TceCreate {
                        container: 0,
                        page_shift: 16,
                        window_size: 1 << 30,
                        levels: 1,
                    },
                    OwnerOp::KvmSetSpaprTce { group: 1, table: 2 },
                ],
                false,
            ),
        ),
        (
            RequestCode::OpsResult,
            Reply::ops(
                1,
                vec![OwnerOp::TceRemove {
                    container: 0,
                    start_addr: 1 << 59,
                }],
                true,
            ),
        ),
        (
            RequestCode::OpsResult,
            Reply::ok(
                WindowCreateBody {
                    start_addr: 1 << 59,
                    hw_page_shift: 16,
                    levels: 1,
                }
                .encode(),
            ),
        ),
        (
            RequestCode::GroupAdd,
            Reply::error(17, "GROUP_ADD: group id 1 is already registered"),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let seeds = match (args.next().as_deref(), args.next()) {
        (Some("--seeds"), Some(dir)) => Some(PathBuf::from(dir)),
        (None, _) => None,
        _ => {
            eprintln!("usage: wire_dump [--seeds DIR]");
            std::process::exit(2);
        }
    };
    let mut frames = Vec::new();
    for request in requests() {
        let payload = encode_request(&request);
        let header = Header::new(request.code() as u32, false, payload.len());
        let label = format!(
            "request {} ({} fd)",
            request.code(),
            request.code().fd_count(FdRule::Every)
        );
        // Selector bit 0 clear: a request; bits 1.. give the fuzz target the fd count it carries.
        let selector = (request.code().fd_count(FdRule::Every) as u8) << 1;
        frames.push((
            label,
            selector,
            [header.to_bytes().to_vec(), payload].concat(),
        ));
    }
    for (code, reply) in replies() {
        let payload = encode_reply(&reply).expect("example replies are valid");
        let header = Header::new(code as u32, true, payload.len());
        frames.push((
            format!("reply to {code}"),
            1,
            [header.to_bytes().to_vec(), payload].concat(),
        ));
    }
    for (label, _, frame) in &frames {
        println!("{label}:\n  {}", hex(frame));
    }
    if let Some(dir) = seeds {
        // decode/: a selector byte, then one frame. stream/: a reader byte (0 exact, 1
        // buffered), then request frames as sent on the wire, one per file and all of them
        // back to back.
        let (decode, stream) = (dir.join("decode"), dir.join("stream"));
        std::fs::create_dir_all(&decode)?;
        std::fs::create_dir_all(&stream)?;
        let mut all = Vec::new();
        for (i, (_, selector, frame)) in frames.iter().enumerate() {
            std::fs::write(
                decode.join(format!("seed-{i:02}")),
                [&[*selector][..], frame].concat(),
            )?;
            if selector & 1 == 0 {
                std::fs::write(
                    stream.join(format!("seed-{i:02}")),
                    [&[(i % 2) as u8][..], frame].concat(),
                )?;
                all.extend_from_slice(frame);
            }
        }
        for reader in [0u8, 1] {
            std::fs::write(
                stream.join(format!("all-requests-{reader}")),
                [&[reader][..], &all].concat(),
            )?;
        }
    }
    Ok(())
}
