//! When the agent's block map cannot vouch for the controller's last point
//! (lost state, a changed disk size), the agent reconciles by digests and
//! sends only what the controller lacks.

use anyhow::Result;
use rand::SeedableRng;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use tideline_tests::*;

const BS: u32 = 64 * 1024;

#[test]
fn lost_agent_state_is_rebuilt_from_the_controllers_index() -> Result<()> {
    let mut w = World::new(&["s"])?;
    w.start_controller()?;
    let img = w.path("disk.raw");
    make_image(&img, 24 << 20, 41)?;
    let disks = [DiskSpec {
        id: "data".into(),
        path: img.clone(),
        block_size: BS,
    }];
    w.start_agent("s", &disks, "")?;
    w.wait_connected("s")?;
    w.sync("s")?;

    w.kill_agent("s");
    std::fs::remove_dir_all(w.path("state-s"))?;
    w.start_agent("s", &disks, "")?;
    w.wait_connected("s")?;
    let s = w.sync("s")?;
    assert_eq!(
        s["disks"][0]["blocks_received"].as_u64(),
        Some(0),
        "unchanged disk, nothing to send: {s}"
    );
    assert!(w
        .log("agent-s.log")
        .contains("rebuilt from the controller's index"));

    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for i in 0..5u64 {
        write_random(&img, (i * 37 + 3) * u64::from(BS), 100, &mut rng)?;
    }
    let s = w.sync("s")?;
    assert_eq!(s["disks"][0]["blocks_received"].as_u64(), Some(5), "{s}");
    assert_same(&w.export("s", "data", "latest")?, &img);
    Ok(())
}

#[test]
fn a_disk_that_grows_and_shrinks_is_replicated_exactly() -> Result<()> {
    let mut w = World::new(&["g"])?;
    w.start_controller()?;
    let img = w.path("disk.raw");
    make_image(&img, (16 << 20) + 1000, 42)?;
    let disks = [DiskSpec {
        id: "data".into(),
        path: img.clone(),
        block_size: BS,
    }];
    w.start_agent("g", &disks, "")?;
    w.wait_connected("g")?;
    w.sync("g")?;

    // Grow by a little over 1 MiB with data in the new tail.
    let f = OpenOptions::new().write(true).open(&img)?;
    f.set_len((17 << 20) + 4321)?;
    f.write_all_at(b"new tail data", (17 << 20) + 100)?;
    drop(f);
    w.sync("g")?;
    assert_same(&w.export("g", "data", "latest")?, &img);

    // Shrink below the original size.
    let f = OpenOptions::new().write(true).open(&img)?;
    f.set_len((13 << 20) + 77)?;
    drop(f);
    w.sync("g")?;
    assert_same(&w.export("g", "data", "latest")?, &img);
    for p in 1..=3 {
        assert_eq!(w.verify("g", "data", &p.to_string())?["ok"], true);
    }
    Ok(())
}
