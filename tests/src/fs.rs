//! Real filesystems on loop devices, for the consistency tests: make one,
//! mount it, run a database on it, and check a recovery point of it the
//! way a restore would (mount the exported image, journal replayed, fsck,
//! the database's own integrity check, a prefix of its transactions).
//!
//! Everything here needs root (losetup, mount); [`root_or_skip`] says so
//! when it is missing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::run;

/// Whether the test can run: root and the tools; prints why not.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["losetup", "mount", "mkfs.ext4", "mkfs.xfs", "sqlite3"]
        .iter()
        .all(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if !root || !tools {
        eprintln!("SKIPPED {test}: needs root, losetup, mount, mkfs.ext4, mkfs.xfs and sqlite3");
    }
    root && tools
}

/// A filesystem type the tests make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    /// ext4, without lazy initialisation (so an idle filesystem is idle).
    Ext4,
    /// XFS (reflinks on).
    Xfs,
    /// btrfs.
    Btrfs,
}

impl Fs {
    fn mkfs(self, dev: &Path) -> Result<()> {
        let mut cmd = match self {
            Fs::Ext4 => {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]);
                c
            }
            Fs::Xfs => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-q", "-f", "-m", "reflink=1"]);
                c
            }
            Fs::Btrfs => {
                let mut c = Command::new("mkfs.btrfs");
                c.args(["-q", "-f"]);
                c
            }
        };
        run(cmd.arg(dev)).with_context(|| format!("mkfs {self:?} on {}", dev.display()))?;
        Ok(())
    }

    /// Mount options for a second copy of the same filesystem (XFS refuses
    /// a duplicate UUID without `nouuid`).
    fn copy_options(self) -> &'static str {
        match self {
            Fs::Xfs => "nouuid",
            _ => "defaults",
        }
    }
}

/// A loop device over an image file, optionally partitioned, with a
/// filesystem mounted from it. Dropping it thaws, unmounts and detaches.
pub struct LoopDisk {
    /// The image file behind the loop device.
    pub image: PathBuf,
    /// The loop device (the whole disk).
    pub device: PathBuf,
    /// The device the filesystem is on (the disk, or its partition).
    pub fs_device: PathBuf,
    /// Where it is mounted (None: not mounted).
    pub mount: Option<PathBuf>,
    /// Its type.
    pub fs: Fs,
}

impl LoopDisk {
    /// An image of `size` bytes in `dir`, as a loop device with `fs` on it
    /// (on partition 1 of a GPT when `partitioned`), mounted at
    /// `dir/<name>.mnt`.
    pub fn create(
        dir: &Path,
        name: &str,
        size: u64,
        fs: Fs,
        partitioned: bool,
    ) -> Result<LoopDisk> {
        // mkfs.xfs refuses filesystems under 300 MB; the image is sparse.
        let size = if fs == Fs::Xfs {
            size.max(320 << 20)
        } else {
            size
        };
        let mut disk = LoopDisk::raw(dir, name, size, partitioned)?;
        disk.fs = fs;
        fs.mkfs(&disk.fs_device)?;
        let mount = dir.join(format!("{name}.mnt"));
        std::fs::create_dir_all(&mount)?;
        run(Command::new("mount").arg(&disk.fs_device).arg(&mount)).context("mount")?;
        disk.mount = Some(mount);
        Ok(disk)
    }

    /// An image of `size` bytes in `dir` as a loop device, with no
    /// filesystem; when `partitioned`, a GPT with partition 1 from 1 MiB
    /// to near the end and a small partition 2 after it (`fs_device` is
    /// partition 1).
    pub fn raw(dir: &Path, name: &str, size: u64, partitioned: bool) -> Result<LoopDisk> {
        let image = dir.join(format!("{name}.img"));
        File::create(&image)?.set_len(size)?;
        let mut args = vec!["--find", "--show"];
        if partitioned {
            args.push("--partscan");
        }
        let device = PathBuf::from(
            run(Command::new("losetup").args(&args).arg(&image))
                .context("losetup")?
                .trim(),
        );
        let mut disk = LoopDisk {
            image,
            fs_device: device.clone(),
            device,
            mount: None,
            fs: Fs::Ext4,
        };
        if partitioned {
            let script = format!(
                "label: gpt\nstart=2048, size={}\nsize=8192\n",
                size / 512 - 2048 - 8192 - 2048
            );
            let mut child = Command::new("sfdisk")
                .args(["--quiet", "--no-reread"])
                .arg(&disk.device)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()?;
            std::io::Write::write_all(
                child.stdin.as_mut().context("sfdisk stdin")?,
                script.as_bytes(),
            )?;
            if !child.wait()?.success() {
                bail!("sfdisk failed on {}", disk.device.display());
            }
            // losetup -P finds no partitions on an empty image; tell the
            // kernel about the new table.
            let _ = Command::new("partx").arg("-a").arg(&disk.device).output();
            let part = PathBuf::from(format!("{}p1", disk.device.display()));
            wait_for(Duration::from_secs(10), "the partition device", || {
                part.exists()
            })?;
            disk.fs_device = part;
        }
        Ok(disk)
    }

    /// Partition `n` of the disk.
    pub fn partition(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.device.display()))
    }

    /// The mount point.
    pub fn mount_point(&self) -> &Path {
        self.mount.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// Flushes the filesystem (syncfs).
    pub fn sync_fs(&self) -> Result<()> {
        run(Command::new("sync").arg("-f").arg(self.mount_point()))?;
        Ok(())
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            // Never leave a filesystem frozen: a test may have died mid-freeze.
            let _ = Command::new("fsfreeze").arg("-u").arg(&m).output();
            for _ in 0..50 {
                if Command::new("umount")
                    .arg(&m)
                    .output()
                    .is_ok_and(|o| o.status.success())
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// A small tmpfs mounted for one test (a file system that fills up),
/// unmounted when dropped.
pub struct Tmpfs {
    mount: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes on `mount` (created if missing).
    pub fn mount(mount: &Path, size: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(mount)?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tideline-test")
            .arg(mount))?;
        Ok(Tmpfs {
            mount: mount.to_owned(),
        })
    }

    /// Grows (or shrinks) it to `size` bytes in place.
    pub fn resize(&self, size: u64) -> Result<()> {
        run(Command::new("mount")
            .arg("-o")
            .arg(format!("remount,size={size}"))
            .arg(&self.mount))?;
        Ok(())
    }

    /// Writes a file of zeros at `path` (on this file system) until the
    /// file system is full; returns how much it took.
    pub fn fill(&self, path: &Path) -> Result<u64> {
        use std::io::Write;
        let mut f = File::create(path)?;
        let buf = vec![0u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
            }
        }
        Ok(written)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A process of a failed test may still hold files on it: then it
        // is detached now and freed when they close.
        let done = Command::new("umount")
            .arg(&self.mount)
            .output()
            .is_ok_and(|o| o.status.success());
        if !done {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
        }
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

/// The SQLite workload: durable transactions (fsync on every commit) into
/// one database, or into two attached databases in one transaction (a
/// super-journal makes the commit atomic across both files), each
/// transaction inserting row `n` with a random payload. After each commit
/// it writes `n` to a progress file the test reads.
pub struct DbWriter {
    child: Child,
    progress: PathBuf,
}

impl DbWriter {
    /// Starts the workload on `db` (and `second`, if given), reporting in
    /// `progress`.
    pub fn start(db: &Path, second: Option<&Path>, progress: &Path) -> Result<DbWriter> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/sqlite_writer.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg(db).arg(progress);
        if let Some(s) = second {
            cmd.arg("--second").arg(s);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let w = DbWriter {
            child,
            progress: progress.to_owned(),
        };
        wait_for(
            Duration::from_secs(30),
            "the database writer's first commits",
            || w.committed() >= 20,
        )?;
        Ok(w)
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        let Ok(f) = File::open(&self.progress) else {
            return 0;
        };
        let mut b = [0u8; 32];
        let n = f.read_at(&mut b, 0).unwrap_or(0);
        std::str::from_utf8(&b[..n])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether the writer is still running (it stops on its own only on an
    /// error, which its stderr then says).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("the database writer stopped ({status}): {err}");
        }
        Ok(())
    }

    /// Stops the workload.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DbWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An exported image attached and mounted (read-write, so that the journal
/// is replayed) for checking. Dropping it unmounts and detaches.
pub struct MountedCopy {
    device: PathBuf,
    /// Device the filesystem is on.
    pub fs_device: PathBuf,
    /// Mount point.
    pub mount: PathBuf,
    fs: Fs,
    mounted: bool,
}

impl MountedCopy {
    /// Attaches `image` and mounts its filesystem (partition 1 when
    /// `partitioned`) at `mount`.
    pub fn mount(image: &Path, fs: Fs, partitioned: bool, mount: &Path) -> Result<MountedCopy> {
        let mut args = vec!["--find", "--show"];
        if partitioned {
            args.push("--partscan");
        }
        let device = PathBuf::from(run(Command::new("losetup").args(&args).arg(image))?.trim());
        let fs_device = if partitioned {
            let p = PathBuf::from(format!("{}p1", device.display()));
            wait_for(Duration::from_secs(10), "the copy's partition", || {
                p.exists()
            })?;
            p
        } else {
            device.clone()
        };
        let mut copy = MountedCopy {
            device,
            fs_device,
            mount: mount.to_owned(),
            fs,
            mounted: false,
        };
        std::fs::create_dir_all(mount)?;
        run(Command::new("mount")
            .args(["-o", fs.copy_options()])
            .arg(&copy.fs_device)
            .arg(mount))
        .with_context(|| format!("mounting the exported image {}", image.display()))?;
        copy.mounted = true;
        Ok(copy)
    }

    /// Unmounts, then checks the filesystem read-only (`e2fsck -fn`,
    /// `xfs_repair -n`, `btrfs check --readonly`).
    pub fn unmount_and_fsck(mut self) -> Result<()> {
        run(Command::new("umount").arg(&self.mount))?;
        self.mounted = false;
        let mut cmd = match self.fs {
            Fs::Ext4 => {
                let mut c = Command::new("e2fsck");
                c.arg("-fn");
                c
            }
            Fs::Xfs => {
                let mut c = Command::new("xfs_repair");
                c.arg("-n");
                c
            }
            Fs::Btrfs => {
                let mut c = Command::new("btrfs");
                c.args(["check", "--readonly"]);
                c
            }
        };
        run(cmd.arg(&self.fs_device)).with_context(|| "fsck of the exported filesystem")?;
        Ok(())
    }
}

impl Drop for MountedCopy {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mount).output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// What a database copy holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbState {
    /// Rows.
    pub rows: u64,
    /// Largest id.
    pub max_id: u64,
}

/// Runs SQLite's integrity check on `db` and counts its rows; fails unless
/// the check says `ok` and the rows are exactly 1..=n.
pub fn check_db(db: &Path) -> Result<DbState> {
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA integrity_check; SELECT count(*), coalesce(max(id), 0) FROM t;"))
    .with_context(|| format!("sqlite3 on {}", db.display()))?;
    let mut lines = out.lines();
    let check = lines.next().unwrap_or_default();
    if check.trim() != "ok" {
        bail!("integrity check of {} says: {out}", db.display());
    }
    let counts = lines.next().unwrap_or_default();
    let (rows, max_id) = counts
        .split_once('|')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .with_context(|| format!("unexpected row count output {counts:?}"))?;
    if rows != max_id {
        bail!(
            "{} holds {rows} rows but its largest id is {max_id}: not a prefix",
            db.display()
        );
    }
    Ok(DbState { rows, max_id })
}
