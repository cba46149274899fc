//! Full and incremental syncs over real TLS, exported and compared bit for
//! bit.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use tideline_tests::*;

const BS: u32 = 64 * 1024;
const MIB: u64 = 1024 * 1024;

fn disk(w: &World, name: &str) -> DiskSpec {
    DiskSpec {
        id: "data".into(),
        path: w.path(name),
        block_size: BS,
    }
}

#[test]
fn full_sync_of_a_256_mib_image_exports_bit_identical() -> Result<()> {
    let mut w = World::new(&["agent-a"])?;
    w.start_controller()?;
    let img = w.path("disk.raw");
    make_image(&img, 256 * MIB, 1)?;
    w.start_agent("agent-a", &[disk(&w, "disk.raw")], "")?;
    w.wait_connected("agent-a")?;

    let s = w.sync("agent-a")?;
    assert_eq!(s["state"], "done", "{s}");
    let d = &s["disks"][0];
    assert_eq!(d["committed"]["point"], 1);
    // A full sync sends exactly the blocks that are not all zeros: holes
    // and zero runs start out equal to the empty base.
    let nonzero = nonzero_blocks(&img, BS as usize)?;
    assert_eq!(
        d["blocks_received"].as_u64(),
        Some(nonzero.len() as u64),
        "{s}"
    );

    let out = w.export("agent-a", "data", "latest")?;
    assert_same(&out, &img);
    // The export is sparse: zero blocks are holes.
    let meta = std::fs::metadata(&out)?;
    assert!(meta.blocks() * 512 < meta.len(), "export is not sparse");
    let v = w.verify("agent-a", "data", "latest")?;
    assert_eq!(v["ok"], true, "{v}");
    Ok(())
}

#[test]
fn incremental_sync_sends_exactly_the_changed_blocks() -> Result<()> {
    let mut w = World::new(&["agent-b"])?;
    w.start_controller()?;
    let img = w.path("disk.raw");
    make_image(&img, 64 * MIB, 2)?;
    w.start_agent("agent-b", &[disk(&w, "disk.raw")], "")?;
    w.wait_connected("agent-b")?;
    w.sync("agent-b")?;

    // 20 scattered 4 KiB writes and 10 aligned 64 KiB writes, each in its
    // own block.
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let blocks = (64 * MIB) / u64::from(BS);
    let mut changed = BTreeSet::new();
    while changed.len() < 30 {
        changed.insert(rng.gen_range(0..blocks));
    }
    for (i, &b) in changed.iter().enumerate() {
        if i < 20 {
            let off = b * u64::from(BS) + rng.gen_range(0..16u64) * 4096;
            write_random(&img, off, 4096, &mut rng)?;
        } else {
            write_random(&img, b * u64::from(BS), BS as usize, &mut rng)?;
        }
    }

    let s = w.sync("agent-b")?;
    let d = &s["disks"][0];
    assert_eq!(d["committed"]["point"], 2);
    assert_eq!(
        d["blocks_received"].as_u64(),
        Some(30),
        "exactly the changed blocks: {s}"
    );
    // Wire bytes: the compressed blocks plus at most 64 bytes of framing
    // per block and 4 KiB per session (handshake-free: SyncReady,
    // checkpoints, DiskEnd, heartbeats).
    let list: Vec<u64> = changed.iter().copied().collect();
    let payload = compressed_sizes(&img, BS as usize, &list)?;
    let wire = s["wire_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(wire >= payload, "wire {wire} below payload {payload}");
    assert!(
        wire <= payload + 30 * 64 + 4096,
        "wire {wire} exceeds payload {payload} + overhead"
    );

    let out = w.export("agent-b", "data", "latest")?;
    assert_same(&out, &img);
    Ok(())
}

#[test]
fn three_successive_points_all_export_correctly() -> Result<()> {
    let mut w = World::new(&["agent-c"])?;
    w.start_controller()?;
    let img = w.path("disk.raw");
    make_image(&img, 32 * MIB + 12345, 3)?; // a short tail block too
    w.start_agent("agent-c", &[disk(&w, "disk.raw")], "")?;
    w.wait_connected("agent-c")?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(33);
    for p in 1..=3u64 {
        if p > 1 {
            for _ in 0..25 {
                let off = rng.gen_range(0..32 * MIB);
                write_random(&img, off, rng.gen_range(1..100_000), &mut rng)?;
            }
            // Zero a block that held data: it travels as a zero block.
            let f = std::fs::OpenOptions::new().write(true).open(&img)?;
            std::os::unix::fs::FileExt::write_all_at(
                &f,
                &vec![0u8; BS as usize],
                u64::from(BS) * (p * 7),
            )?;
        }
        let s = w.sync("agent-c")?;
        assert_eq!(s["disks"][0]["committed"]["point"].as_u64(), Some(p), "{s}");
        snapshot(&img, &w.path(&format!("expected-{p}.raw")))?;
    }
    // Every point, including the older ones, still exports exactly.
    for p in 1..=3u64 {
        let out = w.export("agent-c", "data", &p.to_string())?;
        assert_same(&out, &w.path(&format!("expected-{p}.raw")));
        let v = w.verify("agent-c", "data", &p.to_string())?;
        assert_eq!(v["ok"], true, "point {p}: {v}");
    }
    let points = w.admin(&["points", "--agent", "agent-c", "--disk", "data"])?;
    assert_eq!(points.as_array().map(Vec::len), Some(3));
    Ok(())
}

#[test]
fn several_disks_sync_in_one_session() -> Result<()> {
    let mut w = World::new(&["agent-m"])?;
    w.start_controller()?;
    make_image(&w.path("a.raw"), 16 * MIB, 4)?;
    make_image(&w.path("b.raw"), 8 * MIB + 4096, 5)?;
    let disks = [
        DiskSpec {
            id: "sda".into(),
            path: w.path("a.raw"),
            block_size: BS,
        },
        DiskSpec {
            id: "sdb".into(),
            path: w.path("b.raw"),
            block_size: 16 * 1024,
        },
    ];
    w.start_agent("agent-m", &disks, "")?;
    w.wait_connected("agent-m")?;
    let s = w.sync("agent-m")?;
    assert_eq!(s["disks"].as_array().map(Vec::len), Some(2), "{s}");
    assert_same(&w.export("agent-m", "sda", "latest")?, &w.path("a.raw"));
    assert_same(&w.export("agent-m", "sdb", "latest")?, &w.path("b.raw"));
    Ok(())
}
