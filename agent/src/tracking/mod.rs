//! Change tracking: what the agent remembers about each protected disk.
//!
//! A hash scan compares every block's digest with the [`BlockMap`], the
//! digests of the disk as of the last recovery point the controller
//! committed. Changed blocks are sent, and recorded in the session's
//! [`ChangeLog`]. Only when the controller has committed the point (and the
//! log is sealed with the point's index root) is the log applied to the map.
//! So the map never runs ahead of the controller: a crash, a dropped session
//! or a refused point leaves the map describing the last committed point,
//! and the next scan sends what is needed again.
//!
//! State layout, per protected disk:
//!
//! ```text
//! <state_dir>/disks/<disk_id>/blockmap     BlockMap (block_map.rs)
//! <state_dir>/disks/<disk_id>/changes.log  ChangeLog of the running or last session (change_log.rs)
//! ```

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use tideline_protocol::limits::valid_id;
use tideline_protocol::{Digest, Geometry};

pub mod block_map;
pub mod change_log;
pub mod writes;

pub use block_map::{BlockMap, BlockMapWriter};
pub use change_log::{ChangeLog, Records};

/// File name of a disk's block map.
pub const BLOCK_MAP_FILE: &str = "blockmap";
/// File name of a disk's change log.
pub const CHANGE_LOG_FILE: &str = "changes.log";

/// Where a protected disk's tracking state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskState {
    /// `<state_dir>/disks/<disk_id>`.
    pub dir: PathBuf,
    /// The block map file.
    pub block_map: PathBuf,
    /// The change log file.
    pub change_log: PathBuf,
}

impl DiskState {
    /// The state paths of `disk_id` under `state_dir`, creating the disk's
    /// directory. `disk_id` must be a valid id (it is used as a directory
    /// name).
    pub fn prepare(state_dir: &Path, disk_id: &str) -> Result<DiskState, TrackingError> {
        if !valid_id(disk_id) {
            return Err(TrackingError::InvalidDiskId(disk_id.to_string()));
        }
        let dir = state_dir.join("disks").join(disk_id);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(DiskState {
            block_map: dir.join(BLOCK_MAP_FILE),
            change_log: dir.join(CHANGE_LOG_FILE),
            dir,
        })
    }

    /// `(blockmap, changes.log)` of `disk_id` under `state_dir`, creating
    /// the disk's directory.
    pub fn paths(state_dir: &Path, disk_id: &str) -> Result<(PathBuf, PathBuf), TrackingError> {
        let state = DiskState::prepare(state_dir, disk_id)?;
        Ok((state.block_map, state.change_log))
    }
}

/// Why tracking state could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// A file operation failed.
    #[error("cannot {op} {}: {cause}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// The file does not start with the expected magic.
    #[error("{} is not a {kind} (bad magic)", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The kind of file expected.
        kind: &'static str,
    },
    /// The file's format version is not one this agent reads.
    #[error("{} has unsupported format version {version}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The header checksum does not match (torn or corrupted header).
    #[error("{} has a corrupt header (checksum mismatch)", path.display())]
    BadCheck {
        /// The file.
        path: PathBuf,
    },
    /// The header or the file's length is inconsistent.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is inconsistent.
        reason: String,
    },
    /// A rebuilt map's index root differs from the controller's.
    #[error("{}: index root {computed} does not match the expected {expected}", path.display())]
    RootMismatch {
        /// The map being built or applied to.
        path: PathBuf,
        /// The root that was expected.
        expected: Digest,
        /// The root of the entries.
        computed: Digest,
    },
    /// A block index is past the end of the disk.
    #[error("{}: block {block} is past the end ({block_count} blocks)", path.display())]
    BlockOutOfRange {
        /// The file.
        path: PathBuf,
        /// The block index.
        block: u64,
        /// Blocks in the disk.
        block_count: u64,
    },
    /// A change record is not after the previous one.
    #[error("{}: block {block} appended after block {previous} (records must ascend)", path.display())]
    OutOfOrder {
        /// The change log.
        path: PathBuf,
        /// The last block recorded.
        previous: u64,
        /// The block refused.
        block: u64,
    },
    /// A round does not follow the log's current one (or a resume names a
    /// round the log never started).
    #[error("{}: round {round} cannot follow round {current}", path.display())]
    RoundOrder {
        /// The change log.
        path: PathBuf,
        /// The round asked for.
        round: u32,
        /// The log's current round.
        current: u32,
    },
    /// The change log is sealed; nothing more can be appended.
    #[error("{} is sealed", path.display())]
    Sealed {
        /// The change log.
        path: PathBuf,
    },
    /// The change log is not sealed, so it cannot be applied.
    #[error("{} is not sealed: its point was not committed", path.display())]
    NotSealed {
        /// The change log.
        path: PathBuf,
    },
    /// A change log and a block map describe different geometries.
    #[error("{}: geometry {map:?} differs from the change log's {log:?}", path.display())]
    GeometryMismatch {
        /// The block map.
        path: PathBuf,
        /// The map's geometry.
        map: Geometry,
        /// The log's geometry.
        log: Geometry,
    },
    /// The geometry is out of bounds (block size, disk size).
    #[error("{}: invalid geometry: {reason}", path.display())]
    InvalidGeometry {
        /// The file.
        path: PathBuf,
        /// What is out of bounds.
        reason: String,
    },
    /// A disk id is not usable as a directory name.
    #[error("invalid disk id {0:?}")]
    InvalidDiskId(String),
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TrackingError + 'a {
    move |source| TrackingError::Io {
        op,
        path: path.to_path_buf(),
        cause: source,
    }
}

/// fsyncs the directory holding `path`, making a rename or removal in it
/// durable.
pub(crate) fn sync_parent(path: &Path) -> Result<(), TrackingError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// `path` with `.tmp` appended: where a file is built before its rename.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

/// First 8 bytes (little-endian) of BLAKE3 over `bytes`: the header check
/// of both tracking files.
pub(crate) fn header_check(bytes: &[u8]) -> u64 {
    let h = blake3::hash(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Validates a geometry read from a file or given by a caller.
pub(crate) fn check_geometry(path: &Path, g: &Geometry) -> Result<(), TrackingError> {
    use tideline_protocol::limits::{valid_block_size, MAX_DISK_SIZE};
    if !valid_block_size(g.block_size) {
        return Err(TrackingError::InvalidGeometry {
            path: path.to_path_buf(),
            reason: format!("block size {} is not supported", g.block_size),
        });
    }
    if g.disk_size > MAX_DISK_SIZE {
        return Err(TrackingError::InvalidGeometry {
            path: path.to_path_buf(),
            reason: format!("disk size {} exceeds {MAX_DISK_SIZE}", g.disk_size),
        });
    }
    Ok(())
}

/// An exclusive lock on a state directory (`<state_dir>/agent.lock`, held
/// with `flock` for the life of the process), so that two agents never share
/// block maps.
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock, or fails naming the directory if another process
    /// holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, TrackingError> {
        let path = state_dir.join("agent.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            return Err(TrackingError::Io {
                op: "lock (is another agent running on this state directory?)",
                path,
                cause: std::io::Error::last_os_error(),
            });
        }
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_per_disk_and_created() {
        let dir = tempfile::tempdir().unwrap();
        let (map, log) = DiskState::paths(dir.path(), "disk-0").unwrap();
        assert_eq!(map, dir.path().join("disks/disk-0/blockmap"));
        assert_eq!(log, dir.path().join("disks/disk-0/changes.log"));
        assert!(dir.path().join("disks/disk-0").is_dir());
        assert!(matches!(
            DiskState::paths(dir.path(), "../escape"),
            Err(TrackingError::InvalidDiskId(_))
        ));
    }
}
