//! The consistency building blocks on real filesystems: loop-mounted ext4,
//! XFS and btrfs, real freezes, the real guard process, real hooks.
//!
//! Most tests need root, losetup and the mkfs tools; without them they FAIL
//! (naming what is missing) rather than pass silently. Every fixture thaws
//! and unmounts what it made when dropped, also when a test fails; a test
//! never writes to a frozen filesystem from its own thread (a writer is a
//! child process: a process writing to a frozen filesystem blocks
//! uninterruptibly).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tideline_agent::consistency::guard::{self, FreezeError, FreezeRequest, ThawCause};
use tideline_agent::consistency::hooks::{
    self, ExitKind, FreezeSummary, Hook, HookContext, HookDisk, HookOutcome, HookPhase,
};
use tideline_agent::consistency::mounts::{self, MountedFs};
use tideline_agent::consistency::snapshot::{self, ReflinkSnapshot, SnapshotError};

const AGENT: &str = env!("CARGO_BIN_EXE_tideline-agent");

/// Polls `f` every few milliseconds until it holds; panics naming `what`
/// once `within` has passed. Returns how long it took.
fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (loop devices, mount, FIFREEZE)"
    );
    for tool in ["losetup", "mount", "umount", "fsfreeze", "dd"] {
        assert!(
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "this test needs {tool}"
        );
    }
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A filesystem of type `fs` on a loop device over a sparse image in a
/// temporary directory, mounted at `<tmp>/<name>`. Dropping it thaws,
/// unmounts and detaches.
struct LoopFs {
    dev: PathBuf,
    mnt: PathBuf,
    extra_mounts: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(fs: &str, name: &str) -> LoopFs {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(320 << 20))
            .expect("image");
        let dev =
            PathBuf::from(sh(Command::new("losetup").args(["--find", "--show"]).arg(&img)).trim());
        let mut me = LoopFs {
            dev,
            mnt: dir.path().join(name),
            extra_mounts: Vec::new(),
            _dir: dir,
        };
        let mkfs = format!("mkfs.{fs}");
        let force = if fs == "ext4" { "-F" } else { "-f" };
        sh(Command::new(&mkfs).args(["-q", force]).arg(&me.dev));
        std::fs::create_dir(&me.mnt).expect("mount point");
        sh(Command::new("mount").arg(&me.dev).arg(&me.mnt));
        me.extra_mounts.push(me.mnt.clone());
        me
    }

    fn mounted(&self) -> MountedFs {
        mounts::mounted_at(&self.mnt).expect("mounted_at")
    }

    fn path(&self, p: &str) -> PathBuf {
        self.mnt.join(p)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for m in self.extra_mounts.iter().rev() {
            // Thaw from a separate process first: unmounting a frozen
            // filesystem would block. EINVAL (not frozen) is the usual case.
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(m)
                .stderr(Stdio::null())
                .status();
            let unmounted = (0..200).any(|_| {
                let ok = Command::new("umount")
                    .arg(m)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    std::thread::sleep(Duration::from_millis(10));
                }
                ok
            });
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A child process writing to a file with write+fsync (`dd conv=fsync`).
/// Dropping it kills it without waiting (it may be blocked uninterruptibly;
/// it dies once its filesystem is thawed).
struct Writer(Child);

impl Writer {
    fn start(file: &Path) -> Writer {
        Writer(
            Command::new("dd")
                .args([
                    "if=/dev/urandom",
                    "bs=4096",
                    "count=16",
                    "conv=fsync",
                    "status=none",
                ])
                .arg(format!("of={}", file.display()))
                .spawn()
                .expect("dd"),
        )
    }

    fn state(&self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).ok()?;
        stat.rsplit_once(") ")?.1.chars().next()
    }

    /// Blocked uninterruptibly and not finished.
    fn wait_blocked(&mut self) {
        wait_until(
            Duration::from_secs(5),
            "the writer to block in D state",
            || self.state() == Some('D'),
        );
        assert!(self.0.try_wait().expect("try_wait").is_none());
    }

    fn wait_done(&mut self, within: Duration) -> Duration {
        let took = wait_until(within, "the writer to complete", || {
            self.0.try_wait().expect("try_wait").is_some()
        });
        let status = self.0.wait().expect("wait");
        assert!(status.success(), "writer: {status}");
        took
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// Whether `mnt` is frozen now, asked without changing anything: a
/// FIFREEZE from a separate process fails with EBUSY if it is frozen; if it
/// was not, the probe froze it and thaws it again at once.
fn is_frozen(mnt: &Path) -> bool {
    let out = Command::new("fsfreeze")
        .arg("-f")
        .arg(mnt)
        .output()
        .expect("fsfreeze");
    if out.status.success() {
        sh(Command::new("fsfreeze").arg("-u").arg(mnt));
        return false;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("busy"), "fsfreeze -f {}: {err}", mnt.display());
    true
}

fn gone_or_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')),
    }
}

/// Whether a process here may set its oom_score_adj to -1000 (needs
/// CAP_SYS_RESOURCE, which some sandboxes drop).
fn may_lower_oom_score_adj() -> bool {
    Command::new("sh")
        .args(["-c", "echo -1000 > /proc/self/oom_score_adj"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn request(fss: Vec<MountedFs>, ms: u64) -> FreezeRequest {
    FreezeRequest {
        filesystems: fss,
        max_frozen: Duration::from_millis(ms),
    }
}

// ---------------------------------------------------------------------------
// mounts

#[test]
fn mounts_of_a_partitioned_disk_and_of_one_partition() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(700 << 20))
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--label", "gpt"])
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk");
    std::io::Write::write_all(sfdisk.stdin.as_mut().unwrap(), b",200MiB\n,400MiB\n").unwrap();
    drop(sfdisk.stdin.take());
    assert!(sfdisk.wait().unwrap().success());
    let disk = PathBuf::from(
        sh(Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .arg(&img))
        .trim(),
    );
    let p = |n: u32| PathBuf::from(format!("{}p{n}", disk.display()));
    // LoopFs-like clean-up for this hand-made layout.
    struct Layout {
        disk: PathBuf,
        mounts: Vec<PathBuf>,
    }
    impl Drop for Layout {
        fn drop(&mut self) {
            for m in self.mounts.iter().rev() {
                let _ = Command::new("umount").arg(m).status();
            }
            let _ = Command::new("losetup").arg("-d").arg(&self.disk).status();
        }
    }
    let mut layout = Layout {
        disk: disk.clone(),
        mounts: Vec::new(),
    };
    // Some kernels (this project's test VM) have no GPT parser built in:
    // partx reads the table and adds the partitions with BLKPG instead.
    if !p(1).exists() {
        sh(Command::new("partx").arg("-a").arg(&disk));
    }
    wait_until(Duration::from_secs(5), "partition devices", || {
        p(1).exists() && p(2).exists()
    });
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(p(1)));
    sh(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(p(2)));
    // A space in a mount point: mountinfo escapes it as \040.
    let a = dir.path().join("part one");
    let b = dir.path().join("b");
    let bind = dir.path().join("a bind of part one");
    for m in [&a, &b, &bind] {
        std::fs::create_dir(m).unwrap();
    }
    sh(Command::new("mount").arg(p(1)).arg(&a));
    layout.mounts.push(a.clone());
    sh(Command::new("mount").arg(p(2)).arg(&b));
    layout.mounts.push(b.clone());
    sh(Command::new("mount").arg("--bind").arg(&a).arg(&bind));
    layout.mounts.push(bind.clone());

    let all = mounts::filesystems_on(&[&disk]).unwrap();
    let summary: Vec<(PathBuf, PathBuf, &str, bool)> = all
        .iter()
        .map(|m| {
            (
                m.mount_point.clone(),
                m.device.clone(),
                m.fs_type.as_str(),
                m.is_root,
            )
        })
        .collect();
    // The bind mount shares part one's superblock: found once, through the
    // shorter mount point.
    assert_eq!(
        summary,
        [
            (b.clone(), p(2), "xfs", false),
            (a.clone(), p(1), "ext4", false)
        ],
        "{all:?}"
    );
    let one = mounts::filesystems_on(&[p(1)]).unwrap();
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0].mount_point, a);
    // The file's mount is the one it was reached through.
    std::fs::write(bind.join("disk.raw"), b"x").unwrap();
    let held = mounts::filesystem_holding(&bind.join("disk.raw")).unwrap();
    assert_eq!(
        (held.mount_point, held.fs_type.as_str()),
        (bind.clone(), "ext4")
    );
    // Nothing of the root disk.
    assert!(all.iter().all(|m| !m.is_root));
    // An unrelated loop device holds nothing mounted.
    let mut other = LoopFs::new("ext4", "other");
    sh(Command::new("umount").arg(&other.mnt));
    other.extra_mounts.clear();
    assert!(mounts::filesystems_on(&[&other.dev]).unwrap().is_empty());
}

#[test]
fn btrfs_subvolume_mounts_are_one_filesystem() {
    let fs = LoopFs::new("btrfs", "pool");
    sh(Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(fs.path("vms")));
    let sub = fs.mnt.with_file_name("vms mount");
    std::fs::create_dir(&sub).unwrap();
    let mut fs = fs;
    sh(Command::new("mount")
        .args(["-o", "subvol=vms"])
        .arg(&fs.dev)
        .arg(&sub));
    fs.extra_mounts.push(sub.clone());
    let found = mounts::filesystems_on(&[&fs.dev]).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].mount_point, fs.mnt,
        "the top-level mount is chosen"
    );
    assert_eq!(found[0].fs_type, "btrfs");
    assert_eq!(
        found[0].superblock.major, 0,
        "btrfs reports an anonymous device"
    );
    // btrfs's per-subvolume st_dev matches no mountinfo line; the mount id
    // finds the file's mount anyway.
    std::fs::write(sub.join("disk.raw"), b"x").unwrap();
    let held = mounts::filesystem_holding(&sub.join("disk.raw")).unwrap();
    assert_eq!(held.mount_point, sub);
    assert_eq!(held.fs_type, "btrfs");
    // Freezing through either mount freezes the one superblock.
    let frozen = guard::freeze(&request(found, 10_000), Path::new(AGENT)).unwrap();
    assert!(is_frozen(&sub));
    frozen.thaw().unwrap();
    assert!(!is_frozen(&sub));
}

#[test]
fn missing_devices_and_files_are_named() {
    let e = mounts::filesystems_on(&["/dev/tideline-no-such-disk"]).unwrap_err();
    assert!(e.to_string().contains("/dev/tideline-no-such-disk"), "{e}");
    let e = mounts::filesystem_holding(Path::new("/tideline/no/such.raw")).unwrap_err();
    assert!(e.to_string().contains("/tideline/no/such.raw"), "{e}");
}

// ---------------------------------------------------------------------------
// guard

fn freeze_blocks_a_writer_until_thaw(fs_type: &str) {
    let fs = LoopFs::new(fs_type, "data");
    let target = fs.path("written");
    let frozen =
        guard::freeze(&request(vec![fs.mounted()], 10_000), Path::new(AGENT)).expect("freeze");
    assert_eq!(frozen.oom_protected(), may_lower_oom_score_adj());
    assert!(frozen.frozen_at() <= Instant::now());
    let mut writer = Writer::start(&target);
    writer.wait_blocked();
    let report = frozen.thaw().expect("thaw");
    assert_eq!(report.cause, ThawCause::Requested);
    assert!(report.trustworthy());
    assert!(report.frozen_for < Duration::from_secs(10));
    writer.wait_done(Duration::from_secs(5));
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 16 * 4096);
    assert!(!is_frozen(&fs.mnt));
}

#[test]
fn freeze_blocks_a_writer_until_thaw_ext4() {
    freeze_blocks_a_writer_until_thaw("ext4");
}

#[test]
fn freeze_blocks_a_writer_until_thaw_xfs() {
    freeze_blocks_a_writer_until_thaw("xfs");
}

#[test]
fn freeze_blocks_a_writer_until_thaw_btrfs() {
    freeze_blocks_a_writer_until_thaw("btrfs");
}

/// The agent (here: `tideline-agent freeze-guard --test-freeze`, which runs
/// the same `freeze` as the sync engine) is SIGKILLed while it holds a
/// filesystem frozen: the guard sees the connection end and thaws at once,
/// long before its deadline.
fn sigkill_of_the_agent_thaws(fs_type: &str) {
    let fs = LoopFs::new(fs_type, "data");
    let bound = Duration::from_secs(20);
    let mut agent = Command::new(AGENT)
        .args([
            "freeze-guard",
            "--max-frozen-ms",
            &bound.as_millis().to_string(),
            "--test-freeze",
        ])
        .arg(&fs.mnt)
        .env(guard::FAULT_HOLD_FROZEN_MS, "600000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    /// Kills the agent if the test fails before it does.
    struct KillOnDrop(Option<u32>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                // SAFETY: plain kill(2) of our own child, not yet reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
    let mut armed = KillOnDrop(Some(agent.id()));
    let mut stderr = BufReader::new(agent.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("holding 1 filesystem(s) frozen"), "{line:?}");
    let guard_pid: u32 = line
        .trim_end()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no guard pid in {line:?}"));
    let mut writer = Writer::start(&fs.path("written"));
    writer.wait_blocked();

    let killed_at = Instant::now();
    agent.kill().unwrap();
    armed.0 = None;
    agent.wait().unwrap();
    let took = writer.wait_done(bound);
    assert!(
        took < Duration::from_secs(2),
        "thawed {took:?} after the kill; the deadline ({bound:?}) should not be what thawed it"
    );
    assert!(killed_at.elapsed() < bound);
    assert!(!is_frozen(&fs.mnt));
    wait_until(Duration::from_secs(5), "the guard to exit", || {
        gone_or_zombie(guard_pid)
    });
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
}

#[test]
fn sigkill_of_the_agent_thaws_ext4() {
    sigkill_of_the_agent_thaws("ext4");
}

#[test]
fn sigkill_of_the_agent_thaws_xfs() {
    sigkill_of_the_agent_thaws("xfs");
}

#[test]
fn sigkill_of_the_agent_thaws_btrfs() {
    sigkill_of_the_agent_thaws("btrfs");
}

#[test]
fn the_deadline_thaws_by_itself_and_thaw_says_so() {
    let fs = LoopFs::new("xfs", "data");
    let bound = Duration::from_millis(700);
    let frozen =
        guard::freeze(&request(vec![fs.mounted()], 700), Path::new(AGENT)).expect("freeze");
    let deadline = frozen.deadline();
    assert_eq!(deadline - frozen.frozen_at(), bound);
    let mut writer = Writer::start(&fs.path("written"));
    writer.wait_blocked();
    // Nobody asks: the guard thaws by itself.
    writer.wait_done(Duration::from_secs(10));
    assert!(Instant::now() >= deadline);
    assert!(!is_frozen(&fs.mnt));
    let report = frozen.thaw().expect("thaw");
    assert_eq!(report.cause, ThawCause::Deadline);
    assert!(report.deadline_fired());
    assert!(!report.trustworthy());
    assert!(report.frozen_for >= bound, "{report:?}");
    assert!(
        report.frozen_for < bound + Duration::from_millis(500),
        "{report:?}"
    );
}

#[test]
fn freezing_slower_than_the_bound_fails_and_thaws() {
    // Each FIFREEZE takes tens of milliseconds even idle: a 1 ms bound is
    // always exceeded.
    let a = LoopFs::new("ext4", "a");
    let b = LoopFs::new("xfs", "b");
    let err = guard::freeze(
        &request(vec![a.mounted(), b.mounted()], 1),
        Path::new(AGENT),
    )
    .unwrap_err();
    match &err {
        FreezeError::TooSlow {
            mount_point,
            max_frozen,
            took,
        } => {
            assert_eq!(*max_frozen, Duration::from_millis(1));
            assert!(*took >= *max_frozen, "{err}");
            // The deadline had passed after the first FIFREEZE already.
            assert_eq!(mount_point, (&a.mnt).min(&b.mnt));
        }
        other => panic!("{other:?}"),
    }
    assert!(!is_frozen(&a.mnt));
    assert!(!is_frozen(&b.mnt));
}

#[test]
fn a_foreign_freeze_fails_the_group_and_is_left_alone() {
    let x = LoopFs::new("ext4", "x");
    let y = LoopFs::new("xfs", "y");
    // Freezing goes by mount point: `a` is frozen first, then `b` fails.
    let (a, b) = if x.mnt < y.mnt { (x, y) } else { (y, x) };
    let (ma, mb) = (a.mounted(), b.mounted());
    sh(Command::new("fsfreeze").arg("-f").arg(&b.mnt));
    let err = guard::freeze(&request(vec![mb, ma], 10_000), Path::new(AGENT)).unwrap_err();
    match &err {
        FreezeError::AlreadyFrozen { mount_point } => assert_eq!(mount_point, &b.mnt),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&*b.mnt.to_string_lossy()), "{err}");
    // The first was thawed: a writer completes.
    let mut writer = Writer::start(&a.path("written"));
    writer.wait_done(Duration::from_secs(5));
    // The foreign freeze is still there.
    assert!(is_frozen(&b.mnt));
    sh(Command::new("fsfreeze").arg("-u").arg(&b.mnt));
}

#[test]
fn sigterm_to_the_guard_thaws_and_thaw_reports_the_signal() {
    let fs = LoopFs::new("ext4", "data");
    let frozen =
        guard::freeze(&request(vec![fs.mounted()], 10_000), Path::new(AGENT)).expect("freeze");
    let mut writer = Writer::start(&fs.path("written"));
    writer.wait_blocked();
    // SAFETY: plain kill(2) of the guard, our child.
    unsafe { libc::kill(frozen.guard_pid() as i32, libc::SIGTERM) };
    writer.wait_done(Duration::from_secs(2));
    let report = frozen.thaw().expect("thaw");
    assert_eq!(report.cause, ThawCause::Signal(libc::SIGTERM));
    assert!(!report.trustworthy());
}

#[test]
fn sigkill_of_the_guard_makes_the_agent_thaw() {
    let fs = LoopFs::new("xfs", "data");
    let frozen =
        guard::freeze(&request(vec![fs.mounted()], 20_000), Path::new(AGENT)).expect("freeze");
    let mut writer = Writer::start(&fs.path("written"));
    writer.wait_blocked();
    // SAFETY: plain kill(2) of the guard, our child.
    unsafe { libc::kill(frozen.guard_pid() as i32, libc::SIGKILL) };
    // The agent's watcher thread thaws without being asked.
    writer.wait_done(Duration::from_secs(2));
    let report = frozen.thaw().expect("thaw");
    assert_eq!(report.cause, ThawCause::ConnectionLost);
    assert!(!report.trustworthy());
}

#[test]
fn dropping_frozen_thaws() {
    let fs = LoopFs::new("ext4", "data");
    let frozen =
        guard::freeze(&request(vec![fs.mounted()], 20_000), Path::new(AGENT)).expect("freeze");
    let pid = frozen.guard_pid();
    let mut writer = Writer::start(&fs.path("written"));
    writer.wait_blocked();
    drop(frozen);
    writer.wait_done(Duration::from_secs(2));
    wait_until(Duration::from_secs(5), "the guard to exit", || {
        gone_or_zombie(pid)
    });
}

#[test]
fn a_filesystem_without_freeze_support_is_named() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tmpfs");
    std::fs::create_dir(&mnt).unwrap();
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tideline-test"])
        .arg(&mnt));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let ext4 = LoopFs::new("ext4", "a");
    let tmp = mounts::mounted_at(&mnt).unwrap();
    assert_eq!(tmp.fs_type, "tmpfs");
    let err = guard::freeze(
        &request(vec![ext4.mounted(), tmp], 10_000),
        Path::new(AGENT),
    )
    .unwrap_err();
    match &err {
        FreezeError::NotSupported {
            mount_point,
            fs_type,
            ..
        } => {
            assert_eq!((mount_point, fs_type.as_str()), (&mnt, "tmpfs"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!is_frozen(&ext4.mnt), "the ext4 frozen before is thawed");
}

#[test]
fn a_mount_point_that_changed_is_refused() {
    let fs = LoopFs::new("ext4", "data");
    let m = fs.mounted();
    let mut fs = fs;
    sh(Command::new("umount").arg(&fs.mnt));
    fs.extra_mounts.clear();
    // The path is now a directory of the filesystem below (here the root):
    // it must not be frozen in its place.
    match guard::freeze(&request(vec![m], 10_000), Path::new(AGENT)) {
        Err(FreezeError::MountChanged { mount_point, .. }) => assert_eq!(mount_point, fs.mnt),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_test_freeze_mode_reports_timings() {
    let fs = LoopFs::new("xfs", "data");
    let out = sh(Command::new(AGENT)
        .args(["freeze-guard", "--test-freeze"])
        .arg(&fs.mnt));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["cause"], "request", "{v}");
    assert_eq!(v["trustworthy"], true, "{v}");
    assert!(v["frozen_ms"].as_f64().unwrap() < 2000.0, "{v}");
}

// ---------------------------------------------------------------------------
// hooks

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn context(phase: HookPhase) -> HookContext {
    HookContext {
        phase,
        point: 7,
        session: "session-1".into(),
        group: "db".into(),
        disks: vec![HookDisk {
            id: "data".into(),
            device: PathBuf::from("/dev/loop9"),
        }],
        freeze: (phase == HookPhase::PostThaw).then_some(FreezeSummary::Ok),
    }
}

#[test]
fn a_hook_that_succeeds_sees_its_environment() {
    // What the agent inherits from systemd, or a stale variable of ours, is
    // not what the hook sees. (std's environment functions take a lock; no
    // other test reads these variables.)
    std::env::set_var("NOTIFY_SOCKET", "/run/systemd/notify");
    std::env::set_var("TIDELINE_FREEZE", "stale");
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "pre",
        "echo \"$TIDELINE_PHASE $TIDELINE_POINT $TIDELINE_SESSION $TIDELINE_GROUP $TIDELINE_DISKS $TIDELINE_DISK_0_DEVICE ${TIDELINE_FREEZE-unset} ${NOTIFY_SOCKET-no-notify}\"\nread x && echo stdin-not-null\nexit 0",
    );
    let run = hooks::run(
        &Hook {
            path: path.clone(),
            timeout: Duration::from_secs(10),
        },
        &context(HookPhase::PreFreeze),
    );
    assert!(run.succeeded(), "{run}");
    match &run.outcome {
        HookOutcome::Succeeded { stdout, .. } => assert_eq!(
            String::from_utf8_lossy(&stdout.bytes),
            "pre-freeze 7 session-1 db data /dev/loop9 unset no-notify\n"
        ),
        other => panic!("{other:?}"),
    }
    let post = hooks::run(
        &Hook {
            path,
            timeout: Duration::from_secs(10),
        },
        &context(HookPhase::PostThaw),
    );
    match &post.outcome {
        HookOutcome::Succeeded { stdout, .. } => {
            assert!(String::from_utf8_lossy(&stdout.bytes).starts_with("post-thaw 7 "));
            assert!(String::from_utf8_lossy(&stdout.bytes).contains(" ok "));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failing_hook_reports_its_exit_code_and_stderr_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "pre",
        "i=0; while [ $i -lt 2000 ]; do echo \"noise $i\" >&2; i=$((i+1)); done\necho 'database refused to flush' >&2\nexit 3",
    );
    let run = hooks::run(
        &Hook {
            path,
            timeout: Duration::from_secs(20),
        },
        &context(HookPhase::PreFreeze),
    );
    match &run.outcome {
        HookOutcome::Failed { exit, stderr, .. } => {
            assert_eq!(*exit, ExitKind::Code(3));
            assert_eq!(stderr.bytes.len(), hooks::TAIL_BYTES);
            assert!(stderr.dropped > 0);
            assert!(stderr.to_string().ends_with("database refused to flush"));
        }
        other => panic!("{other:?}"),
    }
    assert!(run.to_string().contains("exit code 3"), "{run}");
}

#[test]
fn a_hook_that_hangs_is_killed_with_its_children_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let path = script(
        dir.path(),
        "hang",
        &format!(
            "sleep 1000 &\necho $! > '{p}.child'\necho $$ > '{p}.main'\necho started\nsleep 1000",
            p = pids.display()
        ),
    );
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let run = hooks::run(&Hook { path, timeout }, &context(HookPhase::PreFreeze));
    let took = started.elapsed();
    match &run.outcome {
        HookOutcome::TimedOut {
            timeout: t,
            killed_with,
            stdout,
            ..
        } => {
            assert_eq!(*t, timeout);
            assert_eq!(*killed_with, nix::sys::signal::Signal::SIGTERM);
            assert_eq!(String::from_utf8_lossy(&stdout.bytes), "started\n");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "{took:?}"
    );
    for f in ["child", "main"] {
        let pid: u32 = std::fs::read_to_string(format!("{}.{f}", pids.display()))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_until(
            Duration::from_secs(5),
            &format!("the hook's {f} process to die"),
            || gone_or_zombie(pid),
        );
    }
}

#[test]
fn a_hook_ignoring_sigterm_gets_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let path = script(
        dir.path(),
        "stubborn",
        &format!(
            "trap '' TERM\nsleep 1000 &\necho $! > '{}'\nwait",
            pid_file.display()
        ),
    );
    let started = Instant::now();
    let run = hooks::run(
        &Hook {
            path,
            timeout: Duration::from_millis(300),
        },
        &context(HookPhase::PostThaw),
    );
    match &run.outcome {
        HookOutcome::TimedOut { killed_with, .. } => {
            assert_eq!(*killed_with, nix::sys::signal::Signal::SIGKILL)
        }
        other => panic!("{other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) + hooks::KILL_GRACE,
        "{took:?}"
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(Duration::from_secs(5), "the hook's child to die", || {
        gone_or_zombie(pid)
    });
}

#[test]
fn a_missing_hook_could_not_start_and_is_named() {
    let run = hooks::run(
        &Hook {
            path: PathBuf::from("/nonexistent/tideline-hook"),
            timeout: Duration::from_secs(1),
        },
        &context(HookPhase::PreFreeze),
    );
    match &run.outcome {
        HookOutcome::CouldNotStart(e) => {
            assert_eq!(e.cause.kind(), std::io::ErrorKind::NotFound);
            assert!(e.to_string().contains("/nonexistent/tideline-hook"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!run.succeeded());
}

// ---------------------------------------------------------------------------
// snapshot

/// Writes 4 KiB blocks: each is filled with (generation, block index).
fn block(generation: u32, index: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    while b.len() < 4096 {
        b.extend_from_slice(&generation.to_le_bytes());
        b.extend_from_slice(&index.to_le_bytes());
    }
    b
}

fn clone_stays_as_it_was(fs_type: &str) {
    let fs = LoopFs::new(fs_type, "images");
    let image = fs.path("vm disk.raw");
    const BLOCKS: u32 = 2048; // 8 MiB
    let mut data = Vec::new();
    for i in 0..BLOCKS {
        data.extend_from_slice(&block(1, i));
    }
    std::fs::write(&image, &data).unwrap();

    // A clone of a file that is not changing equals it bit for bit.
    let snap = ReflinkSnapshot::create(&image).expect("reflink");
    let name = snap
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with(".vm disk.raw.tideline-snap-"), "{name}");
    assert_eq!(snap.path().parent(), image.parent());
    let mode = std::fs::metadata(snap.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read(snap.path()).unwrap(), data);
    // The image changes; the clone does not.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&block(2, 5), 5 * 4096).unwrap();
        f.sync_all().unwrap();
    }
    assert_ne!(std::fs::read(&image).unwrap(), data);
    assert_eq!(std::fs::read(snap.path()).unwrap(), data);
    let path = snap.path().to_owned();
    drop(snap);
    assert!(!path.exists(), "the clone is removed on drop");

    // A clone taken while a writer rewrites the image block by block, in
    // order, is one instant of it: generation g+1 up to some block, g after.
    let writer = {
        let image = image.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap();
            let mut generation = 3;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                for i in 0..BLOCKS {
                    f.write_all_at(&block(generation, i), u64::from(i) * 4096)
                        .unwrap();
                }
                generation += 1;
            }
        });
        (stop, h)
    };
    wait_until(Duration::from_secs(10), "the writer to start", || {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        std::fs::File::open(&image)
            .and_then(|f| f.read_exact_at(&mut b, 0))
            .is_ok()
            && u32::from_le_bytes(b) >= 3
    });
    let snap = ReflinkSnapshot::create(&image).expect("reflink under writes");
    let first = std::fs::read(snap.path()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    writer.0.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.1.join().unwrap();
    assert_eq!(
        std::fs::read(snap.path()).unwrap(),
        first,
        "the clone did not change"
    );
    assert_ne!(std::fs::read(&image).unwrap(), first, "the image did");
    let gens: Vec<u32> = (0..BLOCKS as usize)
        .map(|i| {
            let b = &first[i * 4096..(i + 1) * 4096];
            let g = u32::from_le_bytes(b[..4].try_into().unwrap());
            assert_eq!(b, block(g, i as u32), "block {i} is whole");
            g
        })
        .collect();
    // Blocks 0..p of generation g, the rest as the pass before left them
    // (generation 1, and 2 at block 5, before the writer's first pass 3).
    let top = gens[0];
    assert!(top >= 3, "{top}");
    let before = |i: usize| match (top, i) {
        (3, 5) => 2,
        (3, _) => 1,
        _ => top - 1,
    };
    let p = gens.iter().position(|&g| g != top).unwrap_or(gens.len());
    for (i, &g) in gens.iter().enumerate().skip(p) {
        assert_eq!(
            g,
            before(i),
            "one instant: generation {top} up to block {p}, then the pass before; block {i}"
        );
    }
}

#[test]
fn reflink_clone_stays_as_it_was_xfs() {
    clone_stays_as_it_was("xfs");
}

#[test]
fn reflink_clone_stays_as_it_was_btrfs() {
    clone_stays_as_it_was("btrfs");
}

#[test]
fn reflink_on_ext4_is_not_supported() {
    let fs = LoopFs::new("ext4", "images");
    let image = fs.path("disk.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    match ReflinkSnapshot::create(&image) {
        Err(e @ SnapshotError::NotSupported { .. }) => {
            let SnapshotError::NotSupported { fs_type, .. } = &e else {
                unreachable!()
            };
            assert_eq!(fs_type, "ext4");
            assert!(e.to_string().contains("disk.raw"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Nothing is left behind.
    let names: Vec<_> = std::fs::read_dir(&fs.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().contains("tideline-snap")),
        "{names:?}"
    );
}

#[test]
fn stale_clones_are_removed_and_live_ones_kept() {
    let fs = LoopFs::new("xfs", "images");
    let image = fs.path("disk.raw");
    std::fs::write(&image, vec![1u8; 1 << 20]).unwrap();
    let live = ReflinkSnapshot::create(&image).unwrap();
    // What a crashed agent leaves: a clone nobody holds.
    let stale = fs.path(".disk.raw.tideline-snap-00000000deadbeef");
    std::fs::write(&stale, b"old").unwrap();
    // Lookalikes that are not clones of this image.
    let keep = [
        fs.path(".other.raw.tideline-snap-00000000deadbeef"),
        fs.path(".disk.raw.tideline-snap-notahexname00000"),
        fs.path("disk.raw.tideline-snap-00000000deadbeef"),
    ];
    for k in &keep {
        std::fs::write(k, b"keep").unwrap();
    }
    let removed = snapshot::remove_stale_clones(&image).unwrap();
    assert_eq!(removed, std::slice::from_ref(&stale));
    assert!(!stale.exists());
    assert!(live.path().exists(), "a live clone is kept");
    for k in &keep {
        assert!(k.exists(), "{}", k.display());
    }
    assert!(image.exists());
    drop(live);
    assert!(snapshot::remove_stale_clones(&image).unwrap().is_empty());
}
