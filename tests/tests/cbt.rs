//! VMware CBT changed-areas lists alongside a VMDK export: trusted only
//! when they follow the last committed point; then only their areas are
//! read, otherwise the agent falls back to a hash scan and says so.

use anyhow::Result;
use rand::SeedableRng;
use std::path::Path;
use tideline_tests::*;

const BS: u64 = 64 * 1024;

fn write_cbt(
    path: &Path,
    change_id: &str,
    previous: Option<&str>,
    areas: &[(u64, u64)],
) -> Result<()> {
    let areas: Vec<_> = areas
        .iter()
        .map(|(s, l)| serde_json::json!({"start": s, "length": l}))
        .collect();
    let doc = serde_json::json!({
        "changeId": change_id,
        "previousChangeId": previous,
        "startOffset": 0,
        "changedArea": areas,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

#[test]
fn cbt_list_limits_the_read_and_a_broken_chain_falls_back_to_a_scan() -> Result<()> {
    let mut w = World::new(&["vm"])?;
    w.start_controller()?;
    // An ESXi-style export: a monolithicFlat descriptor and its flat extent.
    let img = w.path("disk-flat.vmdk");
    make_image(&img, 32 << 20, 71)?;
    let vmdk = w.path("disk.vmdk");
    std::fs::write(
        &vmdk,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\nRW {} FLAT \"disk-flat.vmdk\" 0\n\n\
             ddb.adapterType = \"lsilogic\"\n",
            (32u64 << 20) / 512
        ),
    )?;
    let cbt = w.path("changes.json");
    write_cbt(&cbt, "52 aa/1", Some("*"), &[(0, 32 << 20)])?;
    let disks = [DiskSpec {
        id: "sda".into(),
        path: vmdk.clone(),
        block_size: BS as u32,
    }];
    w.start_agent("vm", &disks, "")?;
    // The harness writes [[disk]] without cbt_file: add it to the agent's
    // configuration and restart.
    w.kill_agent("vm");
    let cfg = w.path("agent-vm.toml");
    let text = std::fs::read_to_string(&cfg)? + &format!("cbt_file = \"{}\"\n", cbt.display());
    std::fs::write(&cfg, text)?;
    w.spawn_agent("vm", &cfg)?;
    w.wait_connected("vm")?;
    w.sync("vm")?;

    // Three changed blocks, listed by a CBT query against change id 52 aa/1.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let changed = [(5 * BS, 4096u64), (77 * BS + 8192, 100), (300 * BS, BS)];
    for &(off, len) in &changed {
        write_random(&img, off, len as usize, &mut rng)?;
    }
    write_cbt(&cbt, "52 aa/2", Some("52 aa/1"), &changed)?;
    let s = w.sync("vm")?;
    assert_eq!(s["disks"][0]["blocks_received"].as_u64(), Some(3), "{s}");
    let log = w.log("agent-vm.log");
    assert!(log.contains("using the CBT list"), "{log}");
    assert_eq!(
        last_scan_bytes_read(&log),
        3 * BS,
        "only the three listed blocks are read"
    );
    assert_same(&w.export("vm", "sda", "latest")?, &img);

    // A list queried against some other change id cannot vouch for the last
    // point: the agent scans everything (and still sends only what changed).
    write_random(&img, 400 * BS, 10, &mut rng)?;
    write_cbt(&cbt, "52 aa/9", Some("52 aa/7"), &[])?;
    let s = w.sync("vm")?;
    assert_eq!(s["disks"][0]["blocks_received"].as_u64(), Some(1), "{s}");
    let log = w.log("agent-vm.log");
    assert!(log.contains("falling back to a hash scan"), "{log}");
    assert!(last_scan_bytes_read(&log) > 3 * BS);
    assert_same(&w.export("vm", "sda", "latest")?, &img);
    Ok(())
}
