//! Kernel write tracking on real loop devices: the eBPF program sees the
//! writes, discards and write-zeroes made through the block layer, files
//! them under the right device, survives an agent restart, and says when
//! it cannot vouch for a registration.
//!
//! Needs root, losetup and a kernel with BTF; each test says "skipped" and
//! why otherwise. Each test uses its own pin directory under /sys/fs/bpf,
//! removed when the test ends (even by a failure), so no program stays
//! attached.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tideline_agent::tracking::writes::{
    DirtyExtents, Discontinuity, MapCause, TrackerError, WriteTracker,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Why this machine cannot run the tests, if it cannot.
fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (loop devices and eBPF)");
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Some("needs losetup (util-linux)");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("needs a kernel with BTF (/sys/kernel/btf/vmlinux)");
    }
    None
}

macro_rules! require_root {
    ($name:literal) => {
        if let Some(why) = skip_reason() {
            eprintln!("skipped {}: {why}", $name);
            return;
        }
        init_log();
    };
}

/// The tracker's log (and libbpf's, through it) in the test's output.
fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `f` until it is true or `deadline` passes.
fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A pin directory of its own, removed (programs detached) on drop.
struct Pins(PathBuf);

impl Pins {
    fn new(test: &str) -> Pins {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/tideline-test-{}-{test}",
            std::process::id()
        ));
        let _ = WriteTracker::remove(&p);
        Pins(p)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = WriteTracker::remove(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A loop device over a sparse image file, detached on drop.
struct Loop {
    dev: PathBuf,
    _image: tempfile::NamedTempFile,
}

impl Loop {
    fn new(size: u64) -> Loop {
        Loop::with_image(image(size), false)
    }

    fn with_image(image: tempfile::NamedTempFile, partitions: bool) -> Loop {
        let dev = attach(None, image.path(), partitions);
        Loop { dev, _image: image }
    }

    /// `/dev/loopNpK`, waiting for the node.
    fn partition(&self, k: u32) -> PathBuf {
        let p = PathBuf::from(format!("{}p{k}", self.dev.display()));
        if !p.exists() {
            // This kernel may have no partition table parsers: add the
            // partitions from user space (BLKPG), as partx does.
            let _ = Command::new("partx").arg("-a").arg(&self.dev).output();
        }
        wait_until(Duration::from_secs(10), "the partition node", || p.exists());
        p
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn image(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    f.as_file().set_len(size).expect("size the image");
    f
}

/// losetup on `file` (at `dev`, or the first free device), retried: two
/// tests may race for the same free device.
fn attach(dev: Option<&Path>, file: &Path, partitions: bool) -> PathBuf {
    let mut last = String::new();
    for _ in 0..10 {
        let mut cmd = Command::new("losetup");
        if partitions {
            cmd.arg("-P");
        }
        match dev {
            Some(d) => cmd.arg(d),
            None => cmd.args(["--find", "--show"]),
        };
        let out = cmd.arg(file).output().expect("run losetup");
        if out.status.success() {
            let shown = String::from_utf8_lossy(&out.stdout).trim().to_string();
            return dev.map_or_else(|| PathBuf::from(shown), Path::to_path_buf);
        }
        last = String::from_utf8_lossy(&out.stderr).to_string();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("losetup {}: {last}", file.display());
}

/// Writes `len` bytes at `offset` with O_DIRECT (offset and length aligned
/// to 4 KiB).
fn write_direct(dev: &Path, offset: u64, len: usize, byte: u8) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open O_DIRECT");
    let mut buf = vec![byte; len + 4096];
    let start = buf.as_ptr().align_offset(4096);
    f.write_all_at(&buf[start..start + len], offset)
        .expect("direct write");
    buf.clear();
}

/// Writes `data` at `offset` through the page cache, then fsyncs.
fn write_buffered(dev: &Path, writes: &[(u64, &[u8])]) {
    let f = OpenOptions::new().write(true).open(dev).expect("open");
    for (offset, data) in writes {
        f.write_all_at(data, *offset).expect("buffered write");
    }
    f.sync_all().expect("fsync");
}

/// The block-aligned, merged extents covering byte ranges `[s, e)`.
fn blocks(ranges: &[(u64, u64)], block: u64, size: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(s, e)| (s / block * block, (e.div_ceil(block) * block).min(size)))
        .collect();
    r.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn assert_extents(got: &DirtyExtents, want: &[(u64, u64)], what: &str) {
    assert_eq!(got.extents, want, "{what}");
    assert_eq!(
        got.bytes,
        want.iter().map(|(s, e)| e - s).sum::<u64>(),
        "{what}: bytes"
    );
}

#[test]
fn direct_and_buffered_writes_are_exactly_the_dirty_set() {
    require_root!("direct_and_buffered_writes_are_exactly_the_dirty_set");
    let pins = Pins::new("exact");
    let lo = Loop::new(64 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let disk = tracker.track(&lo.dev, 4096).expect("track");
    assert!(
        disk.take(true).expect("take").is_empty(),
        "nothing written yet"
    );

    write_direct(&lo.dev, MIB, 4096, 1);
    write_direct(&lo.dev, 10 * MIB + 8 * KIB, 12 * KIB as usize, 2);
    write_direct(&lo.dev, 33 * MIB, 64 * KIB as usize, 3);
    write_buffered(
        &lo.dev,
        &[
            (20 * MIB + 100, b"0123456789"),
            (40 * MIB + 4000, &[7u8; 200]),
        ],
    );
    let want = blocks(
        &[
            (MIB, MIB + 4096),
            (10 * MIB + 8 * KIB, 10 * MIB + 20 * KIB),
            (33 * MIB, 33 * MIB + 64 * KIB),
            (20 * MIB + 100, 20 * MIB + 110),
            (40 * MIB + 4000, 40 * MIB + 4200),
        ],
        4096,
        64 * MIB,
    );
    assert_eq!(
        disk.dirty_bytes(),
        want.iter().map(|(s, e)| e - s).sum::<u64>()
    );
    assert_extents(&disk.take(false).expect("take"), &want, "written blocks");
    let c = disk.counters();
    assert!(c.write_events >= 5, "{c:?}");
    assert_eq!(c.overflows, 0, "{c:?}");
    disk.continuous_since(&disk.registration())
        .expect("continuous");
}

#[test]
fn partition_writes_land_in_their_partition_at_relative_offsets() {
    require_root!("partition_writes_land_in_their_partition_at_relative_offsets");
    let pins = Pins::new("parts");
    let img = image(64 * MIB);
    // p1 at 1 MiB (64 KiB aligned), p2 at 18 MiB + 4 KiB (only 4 KiB aligned).
    let table = "label: gpt\nstart=2048, size=32768\nstart=36872, size=40960\n";
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(img.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk");
    std::io::Write::write_all(sfdisk.stdin.as_mut().expect("stdin"), table.as_bytes())
        .expect("feed sfdisk");
    assert!(sfdisk.wait().expect("sfdisk").success(), "sfdisk failed");
    let lo = Loop::with_image(img, true);
    let (p1, p2) = (lo.partition(1), lo.partition(2));

    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let d1 = tracker.track(&p1, 65536).expect("track p1");
    let first_p1 = d1.registration();
    // p2 needs 4 KiB chunks: the disk's map is recreated, which ends p1's
    // registration.
    let d2 = tracker.track(&p2, 65536).expect("track p2");
    assert_eq!(
        d1.continuous_since(&first_p1),
        Err(Discontinuity::MapReplaced)
    );
    assert!(matches!(d1.take(false), Err(TrackerError::Stale { .. })));
    let r1 = d1.reset().expect("reset p1");
    assert_ne!(r1.id, first_p1.id);
    let d1_again = tracker.track(&p1, 65536).expect("track p1 again");
    assert_eq!(d1_again.registration().id, r1.id, "resumed");
    assert_eq!(
        d1_again.continuous_since(&first_p1),
        Err(Discontinuity::MapRecreated {
            cause: MapCause::FinerGranularity
        })
    );

    // Partition-relative offsets: 4 KiB at 0 and 8 KiB at 1 MiB + 4 KiB of p2.
    write_direct(&p2, 0, 4096, 1);
    write_direct(&p2, MIB + 4 * KIB, 8192, 2);
    // And a buffered write at the very end of p2.
    write_buffered(&p2, &[(20 * MIB - 10, b"end of p2!")]);
    let want2 = blocks(
        &[
            (0, 4096),
            (MIB + 4 * KIB, MIB + 12 * KIB),
            (20 * MIB - 10, 20 * MIB),
        ],
        65536,
        20 * MIB,
    );
    assert_extents(&d2.take(false).expect("take p2"), &want2, "p2");
    assert!(
        d1.take(true).expect("take p1").is_empty(),
        "p1 saw p2's writes"
    );

    write_direct(&p1, 16 * MIB - 4096, 4096, 3);
    assert_extents(
        &d1.take(false).expect("take p1"),
        &[(16 * MIB - 65536, 16 * MIB)],
        "p1",
    );
    assert!(
        d2.take(false).expect("take p2").is_empty(),
        "p2 saw p1's writes"
    );
    d2.continuous_since(&d2.registration())
        .expect("p2 continuous");
    d1.continuous_since(&r1)
        .expect("p1 continuous since its reset");
}

#[test]
fn merged_and_sequential_writes_are_covered() {
    require_root!("merged_and_sequential_writes_are_covered");
    let pins = Pins::new("merged");
    let lo = Loop::new(64 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let disk = tracker.track(&lo.dev, 4096).expect("track");

    // 1024 sequential 4 KiB buffered writes, flushed at once: writeback
    // sends few large requests.
    let chunk = [9u8; 4096];
    let writes: Vec<(u64, &[u8])> = (0..1024)
        .map(|i| (5 * MIB + i * 4096, &chunk[..]))
        .collect();
    write_buffered(&lo.dev, &writes);
    // 256 adjacent 4 KiB synchronous writes with dd.
    run(Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", lo.dev.display()))
        .args([
            "bs=4k",
            "count=256",
            "seek=5120",
            "oflag=sync",
            "status=none",
        ]));
    let mut want = vec![(5 * MIB, 9 * MIB), (20 * MIB, 21 * MIB)];
    // Adjacent direct writes submitted together (fio, io_submit batches of
    // 32): the block layer merges them into larger requests.
    if Command::new("fio").arg("--version").output().is_ok() {
        let stat = |dev: &Path| -> u64 {
            let name = dev
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let s = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap_or_default();
            s.split_whitespace()
                .nth(5)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let merges_before = stat(&lo.dev);
        run(Command::new("fio")
            .args([
                "--name=merge",
                "--rw=write",
                "--bs=4k",
                "--direct=1",
                "--ioengine=libaio",
            ])
            .args([
                "--iodepth=32",
                "--iodepth_batch_submit=32",
                "--size=4M",
                "--offset=40M",
            ])
            .arg(format!("--filename={}", lo.dev.display())));
        eprintln!(
            "write merges on {}: {}",
            lo.dev.display(),
            stat(&lo.dev) - merges_before
        );
        want.push((40 * MIB, 44 * MIB));
    } else {
        eprintln!("fio is missing: the io_submit batch case is not exercised");
    }
    assert_extents(&disk.take(false).expect("take"), &want, "sequential writes");
}

#[test]
fn discards_and_write_zeroes_are_tracked() {
    require_root!("discards_and_write_zeroes_are_tracked");
    let pins = Pins::new("discard");
    let lo = Loop::new(64 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let disk = tracker.track(&lo.dev, 4096).expect("track");

    run(Command::new("blkdiscard")
        .args(["-o", &(3 * MIB).to_string(), "-l", &(2 * MIB).to_string()])
        .arg(&lo.dev));
    assert_extents(
        &disk.take(false).expect("take"),
        &[(3 * MIB, 5 * MIB)],
        "discard",
    );

    run(Command::new("blkdiscard")
        .args([
            "-z",
            "-o",
            &(50 * MIB).to_string(),
            "-l",
            &(256 * KIB).to_string(),
        ])
        .arg(&lo.dev));
    assert_extents(
        &disk.take(false).expect("take"),
        &[(50 * MIB, 50 * MIB + 256 * KIB)],
        "write zeroes",
    );
    assert_eq!(disk.counters().overflows, 0);
    disk.continuous_since(&disk.registration())
        .expect("continuous");
}

#[test]
fn a_discard_past_the_per_event_cap_overflows() {
    require_root!("a_discard_past_the_per_event_cap_overflows");
    let pins = Pins::new("overflow");
    // At 512-byte chunks, one event may set 2048 words * 64 chunks: 64 MiB.
    let lo = Loop::new(256 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let disk = tracker.track(&lo.dev, 512).expect("track");
    let reg = disk.registration();
    disk.continuous_since(&reg).expect("continuous before");
    run(Command::new("blkdiscard").arg(&lo.dev));
    let c = disk.counters();
    assert!(c.overflows > 0, "{c:?}");
    match disk.continuous_since(&reg) {
        Err(Discontinuity::Overflow { count }) => assert!(count > 0),
        other => panic!("expected an overflow, got {other:?}"),
    }
    // A reset starts a registration that the old overflow does not break.
    let fresh = disk.reset().expect("reset");
    disk.continuous_since(&fresh)
        .expect("continuous after reset");
    assert_eq!(
        disk.continuous_since(&reg),
        Err(Discontinuity::Reregistered {
            then: reg.id,
            now: fresh.id
        })
    );
}

#[test]
fn a_restarted_agent_adopts_the_pins_and_sees_writes_made_meanwhile() {
    require_root!("a_restarted_agent_adopts_the_pins_and_sees_writes_made_meanwhile");
    let pins = Pins::new("adopt");
    let lo = Loop::new(32 * MIB);
    let reg = {
        let tracker = WriteTracker::open(&pins.0).expect("open tracker");
        let disk = tracker.track(&lo.dev, 65536).expect("track");
        disk.registration()
    };
    // No process holds the program or the maps now: only the pins.
    write_direct(&lo.dev, 7 * MIB, 4096, 5);
    let tracker = WriteTracker::open(&pins.0).expect("adopt");
    let disk = tracker.track(&lo.dev, 65536).expect("track again");
    assert_eq!(disk.registration(), reg, "the registration is resumed");
    disk.continuous_since(&reg)
        .expect("continuous across the restart");
    assert_extents(
        &disk.take(false).expect("take"),
        &[(7 * MIB, 7 * MIB + 65536)],
        "write made while no agent ran",
    );
}

#[test]
fn removing_the_pins_detaches_and_breaks_continuity() {
    require_root!("removing_the_pins_detaches_and_breaks_continuity");
    let pins = Pins::new("remove");
    let lo = Loop::new(32 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let old = tracker.track(&lo.dev, 65536).expect("track");
    let reg = old.registration();
    WriteTracker::remove(&pins.0).expect("remove");
    assert!(!pins.0.exists());
    let events = old.counters().write_events;
    write_direct(&lo.dev, MIB, 4096, 1);
    assert_eq!(
        old.counters().write_events,
        events,
        "the program is detached"
    );
    assert!(matches!(
        old.continuous_since(&reg),
        Err(Discontinuity::NotAttached { .. })
    ));
    assert!(matches!(old.take(false), Err(TrackerError::Stale { .. })));

    let tracker = WriteTracker::open(&pins.0).expect("open again");
    let disk = tracker.track(&lo.dev, 65536).expect("track again");
    let err = disk.continuous_since(&reg).expect_err("a new map");
    assert_eq!(
        err,
        Discontinuity::MapRecreated {
            cause: MapCause::NewDisk
        }
    );
    assert!(!err.to_string().is_empty());
    disk.continuous_since(&disk.registration())
        .expect("the new registration holds");
}

#[test]
fn unpinned_links_are_attached_again_and_count_a_gap() {
    require_root!("unpinned_links_are_attached_again_and_count_a_gap");
    let pins = Pins::new("gap");
    let lo = Loop::new(32 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let disk = tracker.track(&lo.dev, 65536).expect("track");
    let reg = disk.registration();
    drop((disk, tracker));
    std::fs::remove_file(pins.0.join("bio-queue-v1")).expect("unpin a link");
    std::fs::remove_file(pins.0.join("rq-complete-v1")).expect("unpin a link");
    let tracker = WriteTracker::open(&pins.0).expect("reopen");
    let disk = tracker.track(&lo.dev, 65536).expect("track");
    assert_eq!(disk.registration().id, reg.id);
    assert_eq!(
        disk.continuous_since(&reg),
        Err(Discontinuity::TrackingGap { count: 1 })
    );
    // Attached again: writes are seen.
    write_direct(&lo.dev, 3 * MIB, 4096, 1);
    assert_extents(
        &disk.take(false).expect("take"),
        &[(3 * MIB, 3 * MIB + 65536)],
        "after re-attach",
    );
}

#[test]
fn take_twice_returns_only_new_writes() {
    require_root!("take_twice_returns_only_new_writes");
    let pins = Pins::new("twice");
    let lo = Loop::new(32 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let disk = tracker.track(&lo.dev, 4096).expect("track");
    write_direct(&lo.dev, MIB, 8192, 1);
    assert_extents(
        &disk.take(false).expect("take"),
        &[(MIB, MIB + 8192)],
        "first",
    );
    write_direct(&lo.dev, 2 * MIB, 4096, 2);
    assert_extents(
        &disk.take(false).expect("take"),
        &[(2 * MIB, 2 * MIB + 4096)],
        "second",
    );
    assert!(disk.take(false).expect("take").is_empty(), "third");
    assert_extents(
        &disk.take(true).expect("take"),
        &[(MIB, MIB + 8192), (2 * MIB, 2 * MIB + 4096)],
        "with pending",
    );
}

#[test]
fn pending_survives_a_new_handle_and_clear_pending_empties_it() {
    require_root!("pending_survives_a_new_handle_and_clear_pending_empties_it");
    let pins = Pins::new("pending");
    let lo = Loop::new(32 * MIB);
    {
        let tracker = WriteTracker::open(&pins.0).expect("open tracker");
        let disk = tracker.track(&lo.dev, 4096).expect("track");
        write_direct(&lo.dev, 4 * MIB, 4096, 1);
        assert_extents(
            &disk.take(false).expect("take"),
            &[(4 * MIB, 4 * MIB + 4096)],
            "taken",
        );
    }
    let tracker = WriteTracker::open(&pins.0).expect("adopt");
    let disk = tracker.track(&lo.dev, 4096).expect("track again");
    assert!(disk.take(false).expect("take").is_empty(), "live was moved");
    assert_eq!(disk.dirty_bytes(), 4096);
    assert_extents(
        &disk.take(true).expect("take"),
        &[(4 * MIB, 4 * MIB + 4096)],
        "pending",
    );
    disk.clear_pending();
    assert_eq!(disk.dirty_bytes(), 0);
    assert!(disk.take(true).expect("take").is_empty(), "cleared");
}

#[test]
fn reattaching_the_loop_device_breaks_continuity() {
    require_root!("reattaching_the_loop_device_breaks_continuity");
    let pins = Pins::new("reattach");
    let lo = Loop::new(32 * MIB);
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let disk = tracker.track(&lo.dev, 65536).expect("track");
    let reg = disk.registration();
    let other = image(32 * MIB);
    run(Command::new("losetup").arg("-d").arg(&lo.dev));
    attach(Some(&lo.dev), other.path(), false);
    match disk.continuous_since(&reg) {
        Err(Discontinuity::DiskReplaced { then, now }) => {
            assert_eq!(then, reg.diskseq);
            assert_ne!(now, Some(then));
        }
        other => panic!("expected DiskReplaced, got {other:?}"),
    }
    // Tracking the device again starts over on a new map.
    let again = tracker.track(&lo.dev, 65536).expect("track the new medium");
    assert_ne!(again.registration().diskseq, reg.diskseq);
    assert!(matches!(
        again.continuous_since(&reg),
        Err(Discontinuity::DiskReplaced { .. })
    ));
    again
        .continuous_since(&again.registration())
        .expect("continuous on the new medium");
    drop(other);
}

#[test]
fn a_pin_dir_off_bpffs_is_reported_unavailable() {
    require_root!("a_pin_dir_off_bpffs_is_reported_unavailable");
    let dir = tempfile::tempdir().expect("temp dir");
    match WriteTracker::open(&dir.path().join("pins")) {
        Err(TrackerError::Unavailable { reason }) => {
            assert!(reason.contains("bpf file system"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn tracking_a_regular_file_is_refused() {
    require_root!("tracking_a_regular_file_is_refused");
    let pins = Pins::new("notblk");
    let tracker = WriteTracker::open(&pins.0).expect("open tracker");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    assert!(matches!(
        tracker.track(file.path(), 4096),
        Err(TrackerError::NotABlockDevice { .. })
    ));
    let lo = Loop::new(MIB);
    assert!(matches!(
        tracker.track(&lo.dev, 3000),
        Err(TrackerError::InvalidBlockSize { .. })
    ));
}

/// Whether a bpf file system is mounted at /sys/fs/bpf in this process's
/// mount namespace.
fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
        })
}

#[test]
fn a_missing_bpffs_is_mounted() {
    require_root!("a_missing_bpffs_is_mounted");
    if std::env::var_os("TIDELINE_TEST_IN_MOUNT_NS").is_some() {
        // In a private mount namespace (below): unmounting here touches
        // nothing outside it.
        while bpffs_mounted() {
            run(Command::new("umount").arg("/sys/fs/bpf"));
        }
        let pins = Pins::new("mount");
        let tracker = WriteTracker::open(&pins.0).expect("open without bpffs");
        assert!(bpffs_mounted(), "the tracker mounted bpffs");
        assert!(pins.0.join("disks-v1").exists(), "{tracker:?} pinned");
        return;
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("skipped a_missing_bpffs_is_mounted: needs unshare (util-linux)");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args(["--exact", "a_missing_bpffs_is_mounted", "--test-threads=1"])
        .env("TIDELINE_TEST_IN_MOUNT_NS", "1")
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "in a mount namespace without bpffs: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
