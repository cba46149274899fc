//! How each disk's point is made consistent, decided when a session starts.
//!
//! | disk | method | best level |
//! |---|---|---|
//! | block device, writes tracked, filesystems mounted from it | [`DiskMethod::Tracked`]: pre-copy rounds, then the freeze | `crash (frozen)`, `application` with hooks |
//! | block device, writes tracked, nothing mounted (or `freeze = false`) | [`DiskMethod::Tracked`] without a freeze | `none` |
//! | raw image file on XFS or btrfs | [`DiskMethod::Reflink`]: read from a clone | `crash (snapshot)` |
//! | export declared a hypervisor snapshot | [`DiskMethod::Hypervisor`] | `crash (hypervisor)` |
//! | anything else | [`DiskMethod::Live`] | `none` |
//!
//! Write tracking is also what spares a hash scan: when the agent's record
//! of the base point names a tracker registration that has been continuous
//! since (no reboot, no lost pin, no overflow, same medium), the blocks the
//! tracker names are all that can have changed.
//!
//! Two records in the disk's state directory carry tracking across agent
//! restarts: `change-source.json` (`ChangeRecord::tracking`, written when a
//! point is committed: the registration that vouches for everything after
//! it) and `session-tracking.json` (written when a session starts: the
//! registration the session's rounds rely on, so a resumed session knows
//! whether it still can).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tideline_protocol::{Consistency, Requirement};
use tracing::{info, warn};

use crate::config::{AgentConfig, DiskSection};
use crate::consistency::{filesystem_holding, filesystems_on, MountedFs};
use crate::tracking::writes::{Registration, TrackedDisk, TrackerError, WriteTracker};

/// File name of the session record, in the disk's state directory.
pub const SESSION_RECORD_FILE: &str = "session-tracking.json";

/// How a disk's point is made consistent.
pub enum DiskMethod {
    /// A block device whose writes the kernel tracker records.
    Tracked(Tracked),
    /// An image file on a filesystem with reflinks: read from a clone.
    Reflink,
    /// An export the admin declared a hypervisor snapshot.
    Hypervisor,
    /// Read once while the machine runs.
    Live {
        /// Why nothing better is possible, for the point's note.
        why: String,
    },
}

/// A tracked block device.
pub struct Tracked {
    /// The tracker's handle on the device.
    pub disk: Arc<TrackedDisk>,
    /// Filesystems mounted from it, frozen for the last copy (empty: none,
    /// or freezing is off).
    pub filesystems: Vec<MountedFs>,
    /// Why nothing is frozen, when `filesystems` is empty.
    pub no_freeze: Option<String>,
}

impl DiskMethod {
    /// The best level this method can reach (hooks aside).
    pub fn best(&self) -> Consistency {
        match self {
            DiskMethod::Tracked(t) if !t.filesystems.is_empty() => Consistency::CrashFrozen,
            DiskMethod::Tracked(_) | DiskMethod::Live { .. } => Consistency::None,
            DiskMethod::Reflink => Consistency::CrashSnapshot,
            DiskMethod::Hypervisor => Consistency::CrashHypervisor,
        }
    }

    /// Why the best level is `none`, if it is.
    pub fn limitation(&self) -> Option<String> {
        match self {
            DiskMethod::Tracked(t) if t.filesystems.is_empty() => t.no_freeze.clone(),
            DiskMethod::Live { why } => Some(why.clone()),
            _ => None,
        }
    }

    /// The tracked device, if any.
    pub fn tracked(&self) -> Option<&Tracked> {
        match self {
            DiskMethod::Tracked(t) => Some(t),
            _ => None,
        }
    }

    /// Short name for logs and the status file.
    pub fn name(&self) -> &'static str {
        match self {
            DiskMethod::Tracked(t) if t.filesystems.is_empty() => "tracked",
            DiskMethod::Tracked(_) => "tracked+freeze",
            DiskMethod::Reflink => "reflink",
            DiskMethod::Hypervisor => "hypervisor",
            DiskMethod::Live { .. } => "live",
        }
    }
}

/// Whether `best` (with hooks able to lift crash to application) can
/// satisfy `required`.
pub fn can_meet(best: Consistency, has_hook: bool, required: Requirement) -> bool {
    let reachable = if has_hook && best == Consistency::CrashFrozen {
        Consistency::Application
    } else {
        best
    };
    reachable.meets(required)
}

/// The write tracker of this process: opened once, and if it cannot be,
/// the reason is logged once and kept.
pub fn tracker(cfg: &AgentConfig) -> Result<WriteTracker, String> {
    static TRACKER: OnceLock<Result<WriteTracker, String>> = OnceLock::new();
    TRACKER
        .get_or_init(|| {
            if !cfg.tracking.ebpf {
                return Err("write tracking is off ([tracking] ebpf = false)".into());
            }
            match WriteTracker::open(&cfg.tracking.pin_dir) {
                Ok(t) => {
                    info!(pin_dir = %cfg.tracking.pin_dir.display(), "kernel write tracking (eBPF) is on");
                    Ok(t)
                }
                Err(e) => {
                    let why = format!("kernel write tracking is unavailable: {e}");
                    warn!(error = %e, "kernel write tracking is unavailable; protected block devices are hash-scanned and their points read live");
                    Err(why)
                }
            }
        })
        .clone()
}

/// Decides how `dcfg`'s points are made consistent.
pub fn choose(cfg: &AgentConfig, dcfg: &DiskSection) -> Result<DiskMethod, TrackerError> {
    let location = dcfg.path.to_string_lossy();
    if crate::source::is_nbd_uri(&location)
        || dcfg
            .path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"))
    {
        return Ok(match dcfg.snapshot.as_deref() {
            Some("hypervisor") => DiskMethod::Hypervisor,
            _ => DiskMethod::Live {
                why: format!(
                    "{location} is read as its server exports it; if the export is a hypervisor snapshot, say so with snapshot = \"hypervisor\""
                ),
            },
        });
    }
    let meta = match std::fs::metadata(&dcfg.path) {
        Ok(m) => m,
        // The source's own open reports this with the disk named.
        Err(_) => {
            return Ok(DiskMethod::Live {
                why: format!("{} cannot be inspected", dcfg.path.display()),
            })
        }
    };
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        let tracker = match tracker(cfg) {
            Ok(t) => t,
            Err(why) => return Ok(DiskMethod::Live { why }),
        };
        let disk = Arc::new(tracker.track(&dcfg.path, dcfg.block_size)?);
        let (filesystems, no_freeze) = if !cfg.consistency.freeze {
            (
                Vec::new(),
                Some("freezing is off ([consistency] freeze = false)".to_string()),
            )
        } else {
            match filesystems_on(&[&dcfg.path]) {
                Ok(fs) if fs.is_empty() => (
                    fs,
                    Some(format!(
                        "no filesystem is mounted from {}, so there is nothing to freeze",
                        dcfg.path.display()
                    )),
                ),
                Ok(fs) => (fs, None),
                Err(e) => (
                    Vec::new(),
                    Some(format!("cannot tell what is mounted from it: {e}")),
                ),
            }
        };
        return Ok(DiskMethod::Tracked(Tracked {
            disk,
            filesystems,
            no_freeze,
        }));
    }
    match filesystem_holding(&dcfg.path) {
        Ok(fs) if fs.fs_type == "xfs" || fs.fs_type == "btrfs" => Ok(DiskMethod::Reflink),
        Ok(fs) => Ok(DiskMethod::Live {
            why: format!(
                "{} is on {} ({}), which has no reflinks to snapshot it with",
                dcfg.path.display(),
                fs.fs_type,
                fs.mount_point.display()
            ),
        }),
        Err(e) => Ok(DiskMethod::Live {
            why: format!("cannot find the filesystem holding it: {e}"),
        }),
    }
}

/// What a session relies on for its rounds: written when a fresh session
/// starts, read when it resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session.
    pub session: u64,
    /// The point it builds.
    pub point: u64,
    /// The registration its rounds rely on.
    pub registration: Registration,
    /// Whether its first round was a hash scan (else the tracker's set).
    pub first_round_hashed: bool,
}

impl SessionRecord {
    fn path(disk_dir: &Path) -> PathBuf {
        disk_dir.join(SESSION_RECORD_FILE)
    }

    /// The record in a disk's state directory, if readable.
    pub fn load(disk_dir: &Path) -> Option<SessionRecord> {
        let text = std::fs::read_to_string(Self::path(disk_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record atomically.
    pub fn save(&self, disk_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(&Self::path(disk_dir), &json)
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_lift_only_frozen_points_to_application() {
        use Consistency::*;
        assert!(can_meet(CrashFrozen, true, Requirement::Application));
        assert!(!can_meet(CrashFrozen, false, Requirement::Application));
        assert!(!can_meet(CrashSnapshot, true, Requirement::Application));
        assert!(can_meet(CrashSnapshot, false, Requirement::Crash));
        assert!(!can_meet(None, true, Requirement::Crash));
        assert!(can_meet(None, false, Requirement::None));
    }

    #[test]
    fn session_record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(SessionRecord::load(dir.path()).is_none());
        let r = SessionRecord {
            session: 9,
            point: 4,
            registration: Registration {
                boot_id: "b".into(),
                id: 1,
                map_id: 2,
                diskseq: 3,
                device: "/dev/loop9".into(),
                block_size: 65536,
            },
            first_round_hashed: true,
        };
        r.save(dir.path()).unwrap();
        assert_eq!(SessionRecord::load(dir.path()), Some(r));
    }
}
