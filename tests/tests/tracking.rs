//! Kernel write tracking end to end: an incremental of a tracked block
//! device reads exactly the blocks written since the last point (writes
//! through a partition, merged requests, discards, write-zeroes), tracking
//! survives an agent restart, and losing the tracker's pinned state falls
//! back to a hash scan, saying so. Every point equals the device bit for
//! bit. Needs root (loop devices, eBPF).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use rand::{RngCore, SeedableRng};
use tideline_tests::fs::{root_or_skip, LoopDisk};
use tideline_tests::*;

const BS: u64 = 65536;

/// Writes `len` random bytes at `offset` of `dev` with O_DIRECT (straight to
/// the block layer).
fn write_direct(dev: &Path, offset: u64, len: usize, rng: &mut impl RngCore) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    // O_DIRECT wants an aligned buffer: over-allocate and align by hand.
    let mut raw = vec![0u8; len + 4096];
    let at = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[at..at + len];
    rng.fill_bytes(buf);
    f.write_all_at(buf, offset)?;
    Ok(())
}

/// The blocks `[offset, offset + len)` touches.
fn blocks(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    (offset / BS)..(offset + len).div_ceil(BS)
}

fn agent_log(w: &World) -> String {
    w.log("agent-trk.log")
}

#[test]
fn tracked_incrementals_read_only_what_was_written() -> Result<()> {
    if !root_or_skip("tracked_incrementals_read_only_what_was_written") {
        return Ok(());
    }
    let mut w = World::new(&["trk"])?;
    w.start_controller()?;
    let disk = LoopDisk::raw(w.dir.path(), "disk", 256 << 20, true)?;
    let part = disk.fs_device.clone();
    let other = disk.partition(2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Content to change: the first 64 MiB of the partition.
    for i in 0..16u64 {
        write_direct(&part, i * (4 << 20), 4 << 20, &mut rng)?;
    }
    let disks = [DiskSpec {
        id: "p1".into(),
        path: part.clone(),
        block_size: BS as u32,
    }];
    w.start_agent("trk", &disks, "")?;
    w.wait_connected("trk")?;
    w.sync("trk")?;
    let size = std::fs::metadata(&disk.image)?.len();
    ensure!(
        last_point_bytes_read(&agent_log(&w), "p1") > (size / 2),
        "the first point must read the whole partition"
    );
    assert_same(&w.export("trk", "p1", "latest")?, &part);

    // Writes of every kind, at known places.
    let mut touched = BTreeSet::new();
    // Small direct writes in three blocks.
    for off in [5 * BS + 4096, 200 * BS, 333 * BS + 61440] {
        write_direct(&part, off, 4096, &mut rng)?;
        touched.extend(blocks(off, 4096));
    }
    // Many small adjacent buffered writes, merged by the block layer on
    // their way down (one fsync at the end).
    {
        let mut f = OpenOptions::new().write(true).open(&part)?;
        let off = 400 * BS;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off))?;
        let mut chunk = vec![0u8; 4096];
        for _ in 0..256 {
            rng.fill_bytes(&mut chunk);
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        touched.extend(blocks(off, 256 * 4096));
    }
    // A discard and a write-zeroes.
    run(Command::new("blkdiscard")
        .args(["-o", &(600 * BS).to_string(), "-l", &(16 * BS).to_string()])
        .arg(&part))?;
    touched.extend(blocks(600 * BS, 16 * BS));
    run(Command::new("blkdiscard")
        .args([
            "-z",
            "-o",
            &(700 * BS).to_string(),
            "-l",
            &(4 * BS).to_string(),
        ])
        .arg(&part))?;
    touched.extend(blocks(700 * BS, 4 * BS));
    // Writes to the other partition are not this disk's.
    write_direct(&other, 0, 65536, &mut rng)?;

    let s = w.sync("trk")?;
    let received = s["disks"][0]["blocks_received"].as_u64().unwrap_or(0);
    let read = last_point_bytes_read(&agent_log(&w), "p1");
    note(
        &w.path("figures.txt"),
        &format!(
            "touched {} blocks, received {received}, read {read} bytes",
            touched.len()
        ),
    );
    ensure!(
        read == touched.len() as u64 * BS,
        "read {read} bytes for {} touched blocks",
        touched.len()
    );
    ensure!(
        received == touched.len() as u64,
        "{received} blocks sent for {} touched",
        touched.len()
    );
    assert_same(&w.export("trk", "p1", "latest")?, &part);

    // The agent restarts; writes made while it is down are still tracked.
    w.kill_agent("trk");
    write_direct(&part, 900 * BS, 3 * BS as usize, &mut rng)?;
    w.start_agent("trk", &disks, "")?;
    w.wait_connected("trk")?;
    w.sync("trk")?;
    let log = agent_log(&w);
    ensure!(
        log.contains("write tracking vouches for the base point"),
        "no tracked incremental after the restart"
    );
    ensure!(
        last_point_bytes_read(&log, "p1") == 3 * BS,
        "read {} after the restart",
        last_point_bytes_read(&log, "p1")
    );
    assert_same(&w.export("trk", "p1", "latest")?, &part);

    // The pinned state is lost: the agent says why and hash-scans.
    w.kill_agent("trk");
    std::fs::remove_dir_all(w.pin_dir("trk")).context("removing the pinned tracker")?;
    write_direct(&part, 1000 * BS, 4096, &mut rng)?;
    w.start_agent("trk", &disks, "")?;
    w.wait_connected("trk")?;
    w.sync("trk")?;
    let log = agent_log(&w);
    let tail = &log[log
        .rfind("consistency method")
        .unwrap_or(0)
        .saturating_sub(2000)..];
    ensure!(
        tail.contains("write tracking cannot vouch for the base point; hash scan"),
        "no reason logged for the hash scan:\n{tail}"
    );
    ensure!(
        last_point_bytes_read(&log, "p1") > size / 2,
        "the agent did not hash-scan"
    );
    assert_same(&w.export("trk", "p1", "latest")?, &part);
    Ok(())
}
