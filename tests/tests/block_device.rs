//! A block device as the source: a loop device over an image file (needs
//! root and losetup; skipped with a message otherwise).

use anyhow::{Context, Result};
use rand::SeedableRng;
use std::path::PathBuf;
use std::process::Command;
use tideline_tests::*;

struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn loop_device_is_replicated_bit_for_bit() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 || Command::new("losetup").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and losetup");
        return Ok(());
    }
    let mut w = World::new(&["blk"])?;
    w.start_controller()?;
    let img = w.path("backing.raw");
    make_image(&img, 48 << 20, 9)?;
    let dev =
        run(Command::new("losetup").args(["--find", "--show"]).arg(&img)).context("losetup")?;
    let dev = Loop(PathBuf::from(dev.trim()));
    let disks = [DiskSpec {
        id: "loop".into(),
        path: dev.0.clone(),
        block_size: 65536,
    }];
    w.start_agent("blk", &disks, "")?;
    w.wait_connected("blk")?;
    w.sync("blk")?;
    assert_same(&w.export("blk", "loop", "latest")?, &img);

    // Change the device itself, then sync the difference.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    write_random(&dev.0, 5 << 20, 200_000, &mut rng)?;
    let s = w.sync("blk")?;
    assert_eq!(s["disks"][0]["blocks_received"].as_u64(), Some(4), "{s}");
    assert_same(&w.export("blk", "loop", "latest")?, &img);
    Ok(())
}
