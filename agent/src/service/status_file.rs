//! `<state_dir>/status.json`: what the running agent is doing, for
//! `tideline-agent status` (the agent listens on no socket, so it leaves a
//! file). Rewritten (temp file + rename) at most once a second while
//! something changes; the last committed point of each disk is kept across
//! restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// File name in the state directory.
pub const STATUS_FILE: &str = "status.json";

/// The whole status document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// When it was written (Unix seconds).
    pub updated_unix: u64,
    /// The agent's process id.
    pub pid: u32,
    /// Control channel up.
    pub connected: bool,
    /// Controller address.
    pub controller: String,
    /// Session running, if any.
    pub session: Option<u64>,
    /// Last error of the control channel or a session.
    pub last_error: Option<String>,
    /// Per disk id.
    pub disks: BTreeMap<String, DiskStatus>,
}

/// One disk's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Latest point the controller committed for it.
    pub last_point: Option<u64>,
    /// When that commit was seen (Unix seconds).
    pub last_point_unix: Option<u64>,
    /// Being scanned now.
    pub scanning: bool,
    /// Scan progress, percent.
    pub percent: Option<f64>,
    /// Scan speed.
    pub mib_per_s: Option<f64>,
    /// Seconds left at that speed.
    pub eta_secs: Option<f64>,
    /// Last error of a session on this disk.
    pub last_error: Option<String>,
    /// Consistency of the last point copied (`none`, `crash-frozen`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_consistency: Option<String>,
    /// How long the filesystems were frozen for it, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_frozen_ms: Option<u32>,
    /// Rounds it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rounds: Option<u32>,
    /// Bytes read from the disk for it, in every round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_bytes_read: Option<u64>,
    /// Why its level is not higher, or what happened on the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_note: Option<String>,
    /// How its changes are found and made consistent (`tracked+freeze`,
    /// `reflink`, `hypervisor`, `live`, `tracked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The status file of a running agent.
pub struct StatusFile {
    path: PathBuf,
    doc: Mutex<(StatusDoc, String)>,
}

impl StatusFile {
    /// The status file in `state_dir`, keeping what a previous run knew of
    /// each disk's last point.
    pub fn open(state_dir: &Path) -> StatusFile {
        let path = state_dir.join(STATUS_FILE);
        let mut doc = read(&path).unwrap_or_default();
        doc.pid = std::process::id();
        doc.connected = false;
        doc.session = None;
        for d in doc.disks.values_mut() {
            d.scanning = false;
            d.percent = None;
            d.mib_per_s = None;
            d.eta_secs = None;
        }
        StatusFile {
            path,
            doc: Mutex::new((doc, String::new())),
        }
    }

    /// Changes the document and writes it if anything changed.
    pub fn update(&self, f: impl FnOnce(&mut StatusDoc)) {
        let Ok(mut guard) = self.doc.lock() else {
            return;
        };
        let (doc, last) = &mut *guard;
        f(doc);
        doc.updated_unix = 0;
        let Ok(text) = serde_json::to_string_pretty(doc) else {
            return;
        };
        if text == *last {
            return;
        }
        *last = text;
        doc.updated_unix = unix_now();
        if let Ok(full) = serde_json::to_string_pretty(doc) {
            let tmp = self.path.with_extension("json.tmp");
            // Best effort: the status file is for people, not for recovery.
            if std::fs::write(&tmp, full).is_ok() {
                let _ = std::fs::rename(&tmp, &self.path);
            }
        }
    }
}

/// Reads a status file.
pub fn read(path: &Path) -> std::io::Result<StatusDoc> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_points_survive_a_restart_and_progress_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatusFile::open(dir.path());
        f.update(|d| {
            d.connected = true;
            let disk = d.disks.entry("sda".into()).or_default();
            disk.last_point = Some(4);
            disk.last_point_unix = Some(100);
            disk.scanning = true;
            disk.percent = Some(50.0);
        });
        let doc = read(&dir.path().join(STATUS_FILE)).unwrap();
        assert!(doc.connected && doc.updated_unix > 0);
        let again = StatusFile::open(dir.path());
        again.update(|_| {});
        let doc = read(&dir.path().join(STATUS_FILE)).unwrap();
        assert!(!doc.connected);
        assert_eq!(doc.disks["sda"].last_point, Some(4));
        assert_eq!(doc.disks["sda"].percent, None);
    }
}
