//! VMDK disks end to end: a raw image converted by qemu-img to the layouts
//! exports and datastores use, protected by a real agent through its `.vmdk`
//! path, fully synced over TLS, exported, and compared bit for bit with the
//! raw image.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use tideline_tests::*;

const BS: u32 = 64 * 1024;
const MIB: u64 = 1024 * 1024;

fn convert(raw: &Path, vmdk: &Path, subformat: &str) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
        .arg(format!("subformat={subformat}"))
        .arg(raw)
        .arg(vmdk))?;
    Ok(())
}

/// Converts a 24 MiB image (plus 3 sectors, so the last grain is partial)
/// to `subformat`, syncs it through the agent and compares the export.
fn full_sync_of(subformat: &str, seed: u64) -> Result<()> {
    let agent = "agent-vmdk";
    let mut w = World::new(&[agent])?;
    w.start_controller()?;
    let raw = w.path("disk.raw");
    make_image(&raw, 24 * MIB + 1536, seed)?;
    let vmdk = w.path(&format!("disk-{subformat}.vmdk"));
    convert(&raw, &vmdk, subformat)?;
    let spec = DiskSpec {
        id: "data".into(),
        path: vmdk,
        block_size: BS,
    };
    w.start_agent(agent, &[spec], "")?;
    w.wait_connected(agent)?;

    let s = w.sync(agent)?;
    assert_eq!(s["state"], "done", "{subformat}: {s}");
    let nonzero = nonzero_blocks(&raw, BS as usize)?;
    assert_eq!(
        s["disks"][0]["blocks_received"].as_u64(),
        Some(nonzero.len() as u64),
        "{subformat}: {s}"
    );
    let out = w.export(agent, "data", "latest")?;
    assert_same(&out, &raw);
    let v = w.verify(agent, "data", "latest")?;
    assert_eq!(v["ok"], true, "{subformat}: {v}");
    Ok(())
}

#[test]
fn stream_optimized_vmdk_syncs_bit_identical() -> Result<()> {
    full_sync_of("streamOptimized", 41)
}

#[test]
fn monolithic_sparse_vmdk_syncs_bit_identical() -> Result<()> {
    full_sync_of("monolithicSparse", 42)
}

#[test]
fn two_gb_max_extent_flat_vmdk_syncs_bit_identical() -> Result<()> {
    full_sync_of("twoGbMaxExtentFlat", 43)
}
