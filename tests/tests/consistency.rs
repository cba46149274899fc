//! Points of live disks are the disk at one instant: a database that
//! commits durably while the controller takes points comes back whole from
//! every point (fsck clean, the database's own integrity check, a prefix of
//! the transactions between those committed before and after the sync).
//! Real kernel: loop devices, ext4 and XFS, the eBPF write tracker, FIFREEZE
//! through the thaw guard.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use tideline_tests::fs::{check_db, root_or_skip, DbWriter, Fs, LoopDisk, MountedCopy};
use tideline_tests::*;

const POINTS: usize = 5;
const DISK_SIZE: u64 = 512 << 20;

/// The points of `disk` as the controller lists them.
fn points(w: &World, agent: &str, disk: &str) -> Result<Vec<serde_json::Value>> {
    let v = w.admin(&["points", "--agent", agent, "--disk", disk])?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Exports the latest point of `disk`, mounts it and checks the database
/// at `db` inside it; returns its row count.
fn check_point(w: &World, agent: &str, disk: &str, fs: Fs, db: &str, n: usize) -> Result<u64> {
    let image = w.export(agent, disk, "latest")?;
    let copy = MountedCopy::mount(&image, fs, false, &w.path(&format!("check-{disk}-{n}")))?;
    let state = check_db(&copy.mount.join(db)).with_context(|| format!("point {n} of {disk}"))?;
    copy.unmount_and_fsck()?;
    std::fs::remove_file(&image)?;
    Ok(state.rows)
}

/// A world with a controller and one loop disk with `fs` mounted on it,
/// protected by `agent` as disk `data` (the agent is not started).
fn world_with_disk(agent: &str, size: u64, fs: Fs) -> Result<(World, LoopDisk, [DiskSpec; 1])> {
    let mut w = World::new(&[agent])?;
    w.start_controller()?;
    let disk = LoopDisk::create(w.dir.path(), "data", size, fs, false)?;
    let spec = [DiskSpec {
        id: "data".into(),
        path: disk.fs_device.clone(),
        block_size: 65536,
    }];
    Ok((w, disk, spec))
}

/// A file of the latest point of disk `data`: exported, mounted, read, and
/// the filesystem checked.
fn file_in_latest(w: &World, agent: &str, fs: Fs, file: &str) -> Result<Vec<u8>> {
    let image = w.export(agent, "data", "latest")?;
    let copy = MountedCopy::mount(&image, fs, false, &w.path("check"))?;
    let bytes = std::fs::read(copy.mount.join(file))?;
    copy.unmount_and_fsck()?;
    std::fs::remove_file(&image)?;
    Ok(bytes)
}

fn database_points_are_consistent(fs: Fs, partitioned: bool) -> Result<()> {
    let mut w = World::new(&["db-host"])?;
    w.start_controller()?;
    let disk = LoopDisk::create(w.dir.path(), "data", DISK_SIZE, fs, partitioned)?;
    let progress = w.path("progress");
    let mut writer = DbWriter::start(&disk.mount_point().join("app.db"), None, &progress)?;
    let disks = [DiskSpec {
        id: "data".into(),
        path: disk.fs_device.clone(),
        block_size: 65536,
    }];
    w.start_agent("db-host", &disks, "")?;
    w.wait_connected("db-host")?;
    for n in 1..=POINTS {
        let before = writer.committed();
        w.sync("db-host")?;
        let after = writer.committed();
        writer.check_alive()?;
        let pts = points(&w, "db-host", "data")?;
        let latest = pts.last().context("no point")?;
        let level = latest["consistency"]["level"].as_str().unwrap_or_default();
        ensure!(level == "crash-frozen", "point {n} is {level}: {latest}");
        let rows = check_point(&w, "db-host", "data", fs, "app.db", n)?;
        note(
            &w.path("points.txt"),
            &format!("point {n}: {rows} rows (committed {before} before, {after} after); {latest}"),
        );
        ensure!(
            before <= rows && rows <= after,
            "point {n} holds {rows} transactions; {before} were committed before the sync and {after} after"
        );
    }
    writer.stop();
    Ok(())
}

#[test]
fn points_of_a_live_ext4_database_are_consistent() -> Result<()> {
    if !root_or_skip("points_of_a_live_ext4_database_are_consistent") {
        return Ok(());
    }
    database_points_are_consistent(Fs::Ext4, false)
}

#[test]
fn points_of_a_live_xfs_database_on_a_partition_are_consistent() -> Result<()> {
    if !root_or_skip("points_of_a_live_xfs_database_on_a_partition_are_consistent") {
        return Ok(());
    }
    database_points_are_consistent(Fs::Xfs, true)
}

/// A database on one disk and its second (attached) database on another,
/// committed together through SQLite's super-journal: with both disks in one
/// group, every point of each is from the same instant, so both hold the
/// same transactions.
#[test]
fn a_consistency_group_freezes_both_disks_at_one_instant() -> Result<()> {
    if !root_or_skip("a_consistency_group_freezes_both_disks_at_one_instant") {
        return Ok(());
    }
    let mut w = World::new(&["db-host"])?;
    w.start_controller()?;
    let data = LoopDisk::create(w.dir.path(), "data", 256 << 20, Fs::Ext4, false)?;
    let logs = LoopDisk::create(w.dir.path(), "logs", 256 << 20, Fs::Xfs, false)?;
    let progress = w.path("progress");
    let mut writer = DbWriter::start(
        &data.mount_point().join("app.db"),
        Some(&logs.mount_point().join("journal.db")),
        &progress,
    )?;
    let disks = [
        DiskSpec {
            id: "data".into(),
            path: data.device.clone(),
            block_size: 65536,
        },
        DiskSpec {
            id: "logs".into(),
            path: logs.device.clone(),
            block_size: 65536,
        },
    ];
    w.start_agent("db-host", &disks, "")?;
    w.wait_connected("db-host")?;
    for n in 1..=POINTS {
        let before = writer.committed();
        w.sync("db-host")?;
        let after = writer.committed();
        writer.check_alive()?;
        let mut rows = Vec::new();
        for (disk, fs, db) in [
            ("data", Fs::Ext4, "app.db"),
            ("logs", Fs::Xfs, "journal.db"),
        ] {
            let pts = points(&w, "db-host", disk)?;
            let latest = pts.last().context("no point")?;
            ensure!(
                latest["consistency"]["level"] == "crash-frozen",
                "point {n} of {disk}: {latest}"
            );
            rows.push(check_point(&w, "db-host", disk, fs, db, n)?);
        }
        note(
            &w.path("points.txt"),
            &format!("point {n}: rows {rows:?}, committed {before}..{after}"),
        );
        ensure!(
            rows[0] == rows[1],
            "point {n}: the two databases of one transaction hold {} and {} rows",
            rows[0],
            rows[1]
        );
        ensure!(
            before <= rows[0] && rows[0] <= after,
            "point {n}: {rows:?} outside {before}..={after}"
        );
    }
    writer.stop();
    Ok(())
}

/// Pre-freeze and post-thaw hooks: a hook that succeeds makes the point
/// application-consistent and is told the point, group and disks; a hook
/// that hangs is killed at its timeout, the filesystems are still frozen
/// and thawed, and the point says `crash (frozen)` and why.
#[test]
fn hooks_lift_points_to_application_and_a_hung_hook_is_killed() -> Result<()> {
    if !root_or_skip("hooks_lift_points_to_application_and_a_hung_hook_is_killed") {
        return Ok(());
    }
    let (mut w, disk, disks) = world_with_disk("app", 128 << 20, Fs::Ext4)?;
    let marker = w.path("hook-env.txt");
    let good = w.path("pre-good.sh");
    std::fs::write(
        &good,
        format!(
            "#!/bin/sh\necho \"$TIDELINE_PHASE $TIDELINE_POINT $TIDELINE_GROUP $TIDELINE_DISKS\" >> {}\n",
            marker.display()
        ),
    )?;
    let hung = w.path("pre-hung.sh");
    std::fs::write(&hung, "#!/bin/sh\nsleep 600\n")?;
    let post = w.path("post.sh");
    std::fs::write(
        &post,
        format!(
            "#!/bin/sh\necho \"$TIDELINE_PHASE $TIDELINE_FREEZE\" >> {}\n",
            marker.display()
        ),
    )?;
    for f in [&good, &hung, &post] {
        run(std::process::Command::new("chmod").arg("755").arg(f))?;
    }
    let group = |pre: &Path| {
        format!(
            "[[group]]\nid = \"db\"\npre_freeze = \"{}\"\npost_thaw = \"{}\"\nhook_timeout_secs = 2\n",
            pre.display(),
            post.display()
        )
    };
    let cfg = w.agent_config("app", &disks, "app", "pki/ca.crt", w.port, &group(&good))?;
    let text = std::fs::read_to_string(&cfg)?.replace(
        "block_size = 65536\n",
        "block_size = 65536\ngroup = \"db\"\n",
    );
    std::fs::write(&cfg, text)?;
    w.spawn_agent("app", &cfg)?;
    w.wait_connected("app")?;
    std::fs::write(disk.mount_point().join("file"), vec![7u8; 1 << 20])?;
    w.sync("app")?;
    let latest = points(&w, "app", "data")?.pop().context("no point")?;
    ensure!(latest["consistency"]["level"] == "application", "{latest}");
    let env = std::fs::read_to_string(&marker)?;
    ensure!(
        env.contains("pre-freeze 1 db data"),
        "the pre-freeze hook was told: {env}"
    );
    ensure!(
        env.contains("post-thaw ok"),
        "the post-thaw hook was told: {env}"
    );

    // The hook that hangs.
    w.kill_agent("app");
    let text = std::fs::read_to_string(&cfg)?
        .replace(&good.display().to_string(), &hung.display().to_string());
    std::fs::write(&cfg, text)?;
    w.spawn_agent("app", &cfg)?;
    w.wait_connected("app")?;
    std::fs::write(disk.mount_point().join("file2"), vec![8u8; 1 << 20])?;
    let started = std::time::Instant::now();
    w.sync("app")?;
    let latest = points(&w, "app", "data")?.pop().context("no point")?;
    ensure!(latest["consistency"]["level"] == "crash-frozen", "{latest}");
    let note = latest["consistency"]["note"].as_str().unwrap_or_default();
    ensure!(
        note.contains("timed out") && note.contains("pre-hung.sh"),
        "note: {note}"
    );
    ensure!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "the hung hook held the sync for {:?}",
        started.elapsed()
    );
    // Nothing is left of the hook, and the filesystem takes writes.
    let left =
        run(std::process::Command::new("pgrep").args(["-f", "pre-hung.sh"])).unwrap_or_default();
    ensure!(left.trim().is_empty(), "hook processes left: {left}");
    std::fs::write(disk.mount_point().join("after"), b"writable")?;
    disk.sync_fs()?;
    ensure!(file_in_latest(&w, "app", Fs::Ext4, "file2")? == vec![8u8; 1 << 20]);
    Ok(())
}

/// The agent dies (SIGKILL) while the filesystems are frozen: the thaw
/// guard thaws them at once, well within the bound.
#[test]
fn sigkill_of_the_agent_while_frozen_leaves_the_filesystem_writable() -> Result<()> {
    if !root_or_skip("sigkill_of_the_agent_while_frozen_leaves_the_filesystem_writable") {
        return Ok(());
    }
    let (mut w, disk, disks) = world_with_disk("victim", 128 << 20, Fs::Xfs)?;
    let cfg = w.agent_config(
        "victim",
        &disks,
        "victim",
        "pki/ca.crt",
        w.port,
        "[consistency]\nmax_frozen_ms = 20000\n",
    )?;
    // Hold the freeze far longer than the test waits for it.
    w.spawn_agent_env(
        "victim",
        &cfg,
        &[("TIDELINE_FAULT_HOLD_FROZEN_MS", "30000")],
    )?;
    w.wait_connected("victim")?;
    w.admin(&["sync", "--agent", "victim", "--no-wait"])?;
    let log = w.path("agent-victim.log");
    tideline_tests::fs::wait_for(
        std::time::Duration::from_secs(60),
        "the agent to hold the freeze",
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("frozen for")),
    )?;
    // A writer now blocks on the frozen filesystem.
    let probe = disk.mount_point().join("probe");
    let mut writer = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4096", "count=1", "conv=fsync"])
        .arg(format!("of={}", probe.display()))
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    ensure!(
        writer.try_wait()?.is_none(),
        "the filesystem was not frozen"
    );
    let killed = std::time::Instant::now();
    w.kill_agent("victim");
    let bound = std::time::Duration::from_secs(2);
    let mut done = None;
    while killed.elapsed() < bound * 5 {
        if let Some(status) = writer.try_wait()? {
            done = Some((status, killed.elapsed()));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, took) = done.context("the filesystem stayed frozen after the agent was killed")?;
    ensure!(status.success(), "the write failed: {status}");
    ensure!(
        took < bound,
        "the filesystem was thawed {took:?} after the kill, more than the {bound:?} bound"
    );
    note(
        &w.path("thaw.txt"),
        &format!("thawed {took:?} after SIGKILL"),
    );
    Ok(())
}

/// When no attempt captures a consistent instant (here: the guard's bound
/// runs out before the agent thaws), the point fails with a clear error,
/// unless the admin allows committing it marked `none`.
#[test]
fn a_freeze_that_overruns_is_retried_then_fails_or_is_committed_as_none() -> Result<()> {
    if !root_or_skip("a_freeze_that_overruns_is_retried_then_fails_or_is_committed_as_none") {
        return Ok(());
    }
    let (mut w, disk, disks) = world_with_disk("slow", 128 << 20, Fs::Ext4)?;
    let hold = [("TIDELINE_FAULT_HOLD_FROZEN_MS", "400")];
    let cfg = w.agent_config(
        "slow",
        &disks,
        "slow",
        "pki/ca.crt",
        w.port,
        "[consistency]\nmax_frozen_ms = 200\nfreeze_attempts = 2\n",
    )?;
    w.spawn_agent_env("slow", &cfg, &hold)?;
    w.wait_connected("slow")?;
    let err = w
        .sync("slow")
        .expect_err("a point without an instant must fail");
    let text = format!("{err:#}");
    ensure!(
        text.contains("no consistent instant after 2 attempts") && text.contains("disk data"),
        "{text}"
    );
    ensure!(points(&w, "slow", "data")?.is_empty());
    // The filesystem is not left frozen.
    std::fs::write(disk.mount_point().join("after"), b"x")?;
    disk.sync_fs()?;

    w.kill_agent("slow");
    let cfg = w.agent_config(
        "slow",
        &disks,
        "slow",
        "pki/ca.crt",
        w.port,
        "[consistency]\nmax_frozen_ms = 200\nfreeze_attempts = 2\non_freeze_failure = \"commit\"\n",
    )?;
    w.spawn_agent_env("slow", &cfg, &hold)?;
    w.wait_connected("slow")?;
    w.sync("slow")?;
    let latest = points(&w, "slow", "data")?.pop().context("no point")?;
    ensure!(latest["consistency"]["level"] == "none", "{latest}");
    ensure!(
        latest["consistency"]["note"]
            .as_str()
            .unwrap_or_default()
            .contains("no consistent instant"),
        "{latest}"
    );
    // Not consistent, but whole: the file written before the sync is in it.
    ensure!(file_in_latest(&w, "slow", Fs::Ext4, "after")? == b"x");
    Ok(())
}

/// Without write tracking there is no instant: the point says `none`, and a
/// disk that requires `crash` refuses to sync, saying why.
#[test]
fn without_tracking_points_say_none_and_a_crash_requirement_refuses() -> Result<()> {
    if !root_or_skip("without_tracking_points_say_none_and_a_crash_requirement_refuses") {
        return Ok(());
    }
    let (mut w, _disk, disks) = world_with_disk("plain", 64 << 20, Fs::Ext4)?;
    let cfg = w.agent_config(
        "plain",
        &disks,
        "plain",
        "pki/ca.crt",
        w.port,
        "[tracking]\nebpf = false\n",
    )?;
    w.spawn_agent("plain", &cfg)?;
    w.wait_connected("plain")?;
    w.sync("plain")?;
    let latest = points(&w, "plain", "data")?.pop().context("no point")?;
    ensure!(latest["consistency"]["level"] == "none", "{latest}");
    ensure!(
        latest["consistency"]["note"]
            .as_str()
            .unwrap_or_default()
            .contains("ebpf = false"),
        "{latest}"
    );

    w.kill_agent("plain");
    let text = std::fs::read_to_string(&cfg)?.replace(
        "block_size = 65536\n",
        "block_size = 65536\nmin_consistency = \"crash\"\n",
    );
    std::fs::write(&cfg, text)?;
    w.spawn_agent("plain", &cfg)?;
    w.wait_connected("plain")?;
    let err = format!("{:#}", w.sync("plain").expect_err("must refuse"));
    ensure!(
        err.contains("disk data") && err.contains("at least crash-consistent"),
        "{err}"
    );
    Ok(())
}

/// An image file on XFS, used by a running machine (here: an ext4 inside
/// it, loop-mounted, with the database on it): each point is read from a
/// reflink clone taken at one instant, so the ext4 and the database in it
/// come back whole, as after a power cut.
#[test]
fn image_files_on_xfs_are_read_from_reflink_clones() -> Result<()> {
    if !root_or_skip("image_files_on_xfs_are_read_from_reflink_clones") {
        return Ok(());
    }
    let mut w = World::new(&["vmhost"])?;
    w.start_controller()?;
    let host = LoopDisk::create(w.dir.path(), "host", 512 << 20, Fs::Xfs, false)?;
    let inner = LoopDisk::create(host.mount_point(), "vm", 192 << 20, Fs::Ext4, false)?;
    let progress = w.path("progress");
    let mut writer = DbWriter::start(&inner.mount_point().join("app.db"), None, &progress)?;
    let disks = [DiskSpec {
        id: "vm".into(),
        path: inner.image.clone(),
        block_size: 65536,
    }];
    w.start_agent("vmhost", &disks, "")?;
    w.wait_connected("vmhost")?;
    for n in 1..=POINTS {
        let before = writer.committed();
        w.sync("vmhost")?;
        let after = writer.committed();
        writer.check_alive()?;
        let latest = points(&w, "vmhost", "vm")?.pop().context("no point")?;
        ensure!(
            latest["consistency"]["level"] == "crash-snapshot",
            "point {n}: {latest}"
        );
        let rows = check_point(&w, "vmhost", "vm", Fs::Ext4, "app.db", n)?;
        note(
            &w.path("points.txt"),
            &format!("point {n}: {rows} rows, committed {before}..{after}"),
        );
        ensure!(
            before <= rows && rows <= after,
            "point {n}: {rows} outside {before}..={after}"
        );
    }
    writer.stop();
    // No clone is left beside the image.
    let left: Vec<_> = std::fs::read_dir(host.mount_point())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tideline-snap"))
        .collect();
    ensure!(left.is_empty(), "clones left behind: {left:?}");
    drop(inner);
    Ok(())
}
