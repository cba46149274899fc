//! Guards checked before a failback pass writes anything.
//!
//! A target must be at least as large as the point written into it, and
//! must not be in use: a block device that is mounted (itself or one of its
//! partitions), held by another device (LVM, RAID, device-mapper, a loop
//! device's backing), or opened exclusively elsewhere; an image file that
//! backs a loop device. NBD exports cannot be inspected from here: the
//! server that exports them owns them. An admin who knows better passes
//! `force`; the pass then logs the reason and goes on.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::source::is_nbd_uri;

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The target cannot hold the point.
    #[error("target {target} ({location}) is {target_size} bytes, smaller than {lineage} point {point} ({point_size} bytes); nothing was written")]
    TooSmall {
        /// Target id.
        target: String,
        /// Its path or URI.
        location: String,
        /// Its size.
        target_size: u64,
        /// Where the point comes from (`agent/disk`).
        lineage: String,
        /// Point id.
        point: u64,
        /// Point's disk size.
        point_size: u64,
    },
    /// The target is in use and the pass was not forced.
    #[error("target {target} ({location}) is in use: {why}; nothing was written (force the pass to write anyway)")]
    InUse {
        /// Target id.
        target: String,
        /// Its path or URI.
        location: String,
        /// What uses it.
        why: String,
    },
    /// The agent has no target by that id.
    #[error("target {target} is not configured on this agent")]
    Unknown {
        /// Target id.
        target: String,
    },
    /// The target could not be opened.
    #[error("target {target} ({location}) cannot be opened: {why}; nothing was written")]
    Unopenable {
        /// Target id.
        target: String,
        /// Its path or URI.
        location: String,
        /// The error.
        why: String,
    },
}

/// Why `location` is in use, if it is. Only local paths can be checked.
pub fn in_use(location: &Path) -> Option<String> {
    if is_nbd_uri(&location.to_string_lossy()) {
        return None;
    }
    let meta = fs::metadata(location).ok()?;
    if meta.file_type().is_block_device() {
        block_device_in_use(meta.rdev())
    } else if meta.is_file() {
        loop_backing(location)
    } else {
        None
    }
}

fn major_minor(rdev: u64) -> (u64, u64) {
    (libc::major(rdev) as u64, libc::minor(rdev) as u64)
}

/// Mounts, holders and partitions of the device `rdev`.
fn block_device_in_use(rdev: u64) -> Option<String> {
    let (major, minor) = major_minor(rdev);
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // The device and its partitions (directories with a `partition` file).
    let mut devices = vec![(format!("{major}:{minor}"), sys.clone())];
    if let Ok(entries) = fs::read_dir(&sys) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Ok(dev) = fs::read_to_string(p.join("dev")) {
                    devices.push((dev.trim().to_owned(), p));
                }
            }
        }
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for (dev, dir) in &devices {
        // mountinfo: id parent major:minor root mountpoint ...
        if let Some(line) = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(dev.as_str()))
        {
            let at = line.split_whitespace().nth(4).unwrap_or("?");
            return Some(format!("device {dev} is mounted at {at}"));
        }
        let holders: Vec<String> = fs::read_dir(dir.join("holders"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !holders.is_empty() {
            return Some(format!("device {dev} is held by {}", holders.join(", ")));
        }
    }
    None
}

/// The loop device `file` backs, if any.
fn loop_backing(file: &Path) -> Option<String> {
    let file = fs::canonicalize(file).ok()?;
    for e in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        let backing = backing.trim().trim_end_matches(" (deleted)");
        if !backing.is_empty() && Path::new(backing) == file {
            return Some(format!("the file backs loop device /dev/{name}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_files_and_nbd_uris_are_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.img");
        fs::write(&f, vec![0u8; 4096]).unwrap();
        assert_eq!(in_use(&f), None);
        assert_eq!(in_use(Path::new("nbd://127.0.0.1:1/x")), None);
    }

    #[test]
    fn refusals_name_the_target_and_the_reason() {
        let r = Refusal::TooSmall {
            target: "web-disk0".into(),
            location: "/dev/vdb".into(),
            target_size: 100,
            lineage: "cloud/disk0".into(),
            point: 4,
            point_size: 200,
        };
        let text = r.to_string();
        assert!(
            text.contains("web-disk0") && text.contains("/dev/vdb") && text.contains("smaller")
        );
    }
}
