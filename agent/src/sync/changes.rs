//! Change sources that already know what changed: VMware CBT lists and
//! QEMU dirty bitmaps, and when the agent may trust them.
//!
//! A change source replaces the full read of a hash scan with a list of
//! extents that may have changed since the base point. The blocks in those
//! extents are still read, hashed and compared with the block map, so only
//! real differences are sent and every block is verified end to end; blocks
//! outside them are taken to be unchanged. That is only safe when the source
//! covers everything since the base point, so the agent records, when a
//! point is committed, what the change source looked like
//! (`<state_dir>/disks/<id>/change-source.json`), and trusts a list at the
//! next sync only when it follows that record. Anything else falls back to a
//! hash scan, and the log says why.
//!
//! ## CBT list file
//!
//! The JSON a vSphere `QueryChangedDiskAreas` call yields, with the two
//! change ids that frame it:
//!
//! ```json
//! { "changeId": "52 a1 ... 0f/18",          // CBT id of the snapshot exported now
//!   "previousChangeId": "52 a1 ... 0f/17",  // the id the query was made against ("*" = since the start)
//!   "startOffset": 0, "length": 10737418240,
//!   "changedArea": [ { "start": 1048576, "length": 65536 }, ... ] }
//! ```
//!
//! The list is trusted when `previousChangeId` equals the `changeId`
//! recorded at the base point. Bounds: the file is at most 64 MiB, areas
//! must lie within the disk, and at most 4 million areas are read.
//!
//! ## Dirty bitmaps
//!
//! A QEMU dirty bitmap exported over NBD (`qemu:dirty-bitmap:NAME`) marks
//! every area written since it was enabled. It is trusted when the record of
//! the base point names the same bitmap, i.e. the bitmap was already
//! tracking when the base point was read. A bitmap the server does not
//! offer falls back to a scan.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Largest CBT file read.
const MAX_CBT_FILE: u64 = 64 << 20;
/// Largest number of changed areas accepted.
const MAX_CBT_AREAS: usize = 4 << 20;
/// File name of the record, in the disk's state directory.
pub const RECORD_FILE: &str = "change-source.json";

/// Why a change source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChangeSourceError {
    /// The CBT file could not be read.
    #[error("cannot read CBT list {}: {cause}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
    /// The CBT file is not valid.
    #[error("invalid CBT list {}: {why}", path.display())]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CbtFile {
    change_id: String,
    previous_change_id: Option<String>,
    #[serde(default)]
    changed_area: Vec<CbtArea>,
}

#[derive(Debug, Deserialize)]
struct CbtArea {
    start: u64,
    length: u64,
}

/// A validated CBT list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CbtList {
    /// Id of the snapshot the export shows.
    pub change_id: String,
    /// Id the query was made against (`None` or `"*"`: since the start).
    pub previous_change_id: Option<String>,
    /// Changed byte extents `[start, end)`, sorted and merged.
    pub extents: Vec<(u64, u64)>,
}

impl CbtList {
    /// Reads and validates a CBT list for a disk of `disk_size` bytes.
    pub fn load(path: &Path, disk_size: u64) -> Result<CbtList, ChangeSourceError> {
        let invalid = |why: String| ChangeSourceError::Invalid {
            path: path.to_owned(),
            why,
        };
        let len = std::fs::metadata(path)
            .map_err(|source| ChangeSourceError::Read {
                path: path.to_owned(),
                cause: source,
            })?
            .len();
        if len > MAX_CBT_FILE {
            return Err(invalid(format!(
                "{len} bytes, more than the {MAX_CBT_FILE} accepted"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ChangeSourceError::Read {
            path: path.to_owned(),
            cause: source,
        })?;
        let file: CbtFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if file.change_id.trim().is_empty() {
            return Err(invalid("changeId is empty".into()));
        }
        if file.changed_area.len() > MAX_CBT_AREAS {
            return Err(invalid(format!(
                "{} changed areas, more than {MAX_CBT_AREAS}",
                file.changed_area.len()
            )));
        }
        let mut extents = Vec::with_capacity(file.changed_area.len());
        for (i, a) in file.changed_area.iter().enumerate() {
            let end = a
                .start
                .checked_add(a.length)
                .filter(|&e| e <= disk_size)
                .ok_or_else(|| {
                    invalid(format!(
                        "changedArea[{i}] ({} + {}) runs past the disk's {disk_size} bytes",
                        a.start, a.length
                    ))
                })?;
            if a.length > 0 {
                extents.push((a.start, end));
            }
        }
        Ok(CbtList {
            change_id: file.change_id,
            previous_change_id: file.previous_change_id,
            extents: merge(extents),
        })
    }
}

/// Sorts and merges overlapping or touching extents.
pub fn merge(mut extents: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    extents.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
    for (s, e) in extents {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// What the change source looked like when a point was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// The committed point.
    pub point: u64,
    /// CBT change id of the snapshot that point was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt_change_id: Option<String>,
    /// Dirty bitmap that was tracking while that point was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// The kernel write tracker's registration that recorded every write
    /// since that point (the point's instant): while it stays continuous,
    /// the blocks it names are all that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::tracking::writes::Registration>,
}

impl ChangeRecord {
    /// Reads the record in a disk's state directory; a missing or damaged
    /// record means "nothing can be vouched for".
    pub fn load(disk_dir: &Path) -> Option<ChangeRecord> {
        let path = disk_dir.join(RECORD_FILE);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(file = %path.display(), error = %e, "ignoring damaged change-source record");
                None
            }
        }
    }

    /// Writes the record atomically (temp file, fsync, rename).
    pub fn save(&self, disk_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let path = disk_dir.join(RECORD_FILE);
        let tmp = disk_dir.join(format!("{RECORD_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(self)
                .map_err(std::io::Error::other)?
                .as_bytes(),
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(disk_dir)?.sync_all()
    }
}

/// Decides whether a CBT list may stand in for a scan against `base_point`.
pub fn trust_cbt(
    disk: &str,
    list: &CbtList,
    record: Option<&ChangeRecord>,
    base_point: u64,
) -> bool {
    let prev = list.previous_change_id.as_deref().filter(|p| *p != "*");
    let recorded = record
        .filter(|r| r.point == base_point)
        .and_then(|r| r.cbt_change_id.as_deref());
    match (prev, recorded) {
        (Some(p), Some(r)) if p == r => {
            info!(disk, change_id = %list.change_id, previous = p, areas = list.extents.len(), "using the CBT list: only its changed areas are read");
            true
        }
        _ => {
            warn!(
                disk,
                list_previous = ?prev,
                recorded_at_base = ?recorded,
                base_point,
                "CBT list does not follow the last committed point; falling back to a hash scan"
            );
            false
        }
    }
}

/// Decides whether a dirty bitmap may stand in for a scan against
/// `base_point`.
pub fn trust_bitmap(
    disk: &str,
    bitmap: &str,
    offered: bool,
    record: Option<&ChangeRecord>,
    base_point: u64,
) -> bool {
    let tracked =
        record.is_some_and(|r| r.point == base_point && r.bitmap.as_deref() == Some(bitmap));
    if offered && tracked {
        info!(
            disk,
            bitmap, "using the dirty bitmap: only dirty extents are read"
        );
        true
    } else {
        warn!(
            disk,
            bitmap,
            offered_by_server = offered,
            tracking_since_base = tracked,
            base_point,
            "dirty bitmap cannot vouch for the last committed point; falling back to a hash scan"
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("cbt.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn cbt_list_is_validated_and_merged() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            r#"{"changeId":"b/2","previousChangeId":"b/1","startOffset":0,"length":1048576,
                "changedArea":[{"start":65536,"length":4096},{"start":0,"length":65536},{"start":200000,"length":0}]}"#,
        );
        let l = CbtList::load(&p, 1 << 20).unwrap();
        assert_eq!(l.extents, vec![(0, 69632)]);
        assert_eq!(l.previous_change_id.as_deref(), Some("b/1"));
    }

    #[test]
    fn cbt_area_past_the_disk_is_refused_with_its_index() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            r#"{"changeId":"x","changedArea":[{"start":0,"length":1},{"start":1048570,"length":100}]}"#,
        );
        let e = CbtList::load(&p, 1 << 20).unwrap_err().to_string();
        assert!(
            e.contains("changedArea[1]") && e.contains("cbt.json"),
            "{e}"
        );
        let p = write(
            d.path(),
            r#"{"changeId":"x","changedArea":[{"start":18446744073709551615,"length":2}]}"#,
        );
        assert!(CbtList::load(&p, 1 << 20).is_err());
        let p = write(d.path(), "{not json");
        assert!(CbtList::load(&p, 1 << 20).is_err());
    }

    #[test]
    fn trust_needs_an_unbroken_chain() {
        let list = CbtList {
            change_id: "id/3".into(),
            previous_change_id: Some("id/2".into()),
            extents: vec![],
        };
        let rec = ChangeRecord {
            point: 7,
            cbt_change_id: Some("id/2".into()),
            bitmap: None,
            tracking: None,
        };
        assert!(trust_cbt("d", &list, Some(&rec), 7));
        assert!(
            !trust_cbt("d", &list, Some(&rec), 8),
            "record of another point"
        );
        assert!(!trust_cbt("d", &list, None, 7), "no record");
        let star = CbtList {
            previous_change_id: Some("*".into()),
            ..list.clone()
        };
        assert!(
            !trust_cbt("d", &star, Some(&rec), 7),
            "'*' lists everything, not a delta"
        );
        let bm = ChangeRecord {
            point: 7,
            cbt_change_id: None,
            bitmap: Some("b".into()),
            tracking: None,
        };
        assert!(trust_bitmap("d", "b", true, Some(&bm), 7));
        assert!(
            !trust_bitmap("d", "b", false, Some(&bm), 7),
            "server does not offer it"
        );
        assert!(
            !trust_bitmap("d", "c", true, Some(&bm), 7),
            "another bitmap"
        );
    }

    #[test]
    fn record_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let r = ChangeRecord {
            point: 3,
            cbt_change_id: Some("a/1".into()),
            bitmap: None,
            tracking: None,
        };
        r.save(d.path()).unwrap();
        assert_eq!(ChangeRecord::load(d.path()), Some(r));
    }
}
