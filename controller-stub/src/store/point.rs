//! Recovery points on disk: where they live, their manifest, and listing.
//!
//! A committed point is the directory `points/<agent>/<disk>/<point:016x>/`
//! holding `index` (see `index_file.rs`) and `manifest.json`. The manifest
//! is the commit marker: it is written last inside `<point:016x>.tmp/`
//! (temp file, fsync, rename, fsync of the directory) and the directory is
//! then renamed to its final name and its parent fsynced. A directory named
//! `*.tmp`, or a point directory without `manifest.json`, is an interrupted
//! commit; `Store::open` removes it. A point directory whose manifest
//! exists but does not parse cannot come from an interrupted commit (the
//! manifest is renamed into place whole, before the directory): it is
//! damage, so it is left on disk for an operator, logged, and left out of
//! listings rather than deleted.
//!
//! # `manifest.json`
//!
//! A JSON object with the fields of [`PointInfo`] (`agent`, `disk`, `point`,
//! `base` (null or an id), `disk_size`, `block_size`, `block_count`, `root`
//! (64 hex digits), `created_unix`, `changed_blocks`, `new_bytes`,
//! `consistency`) and `index_crc`, the CRC of the `index` file it commits.
//! `consistency` is an object: `level` (`none`, `crash-hypervisor`,
//! `crash-snapshot`, `crash-frozen` or `application`), `frozen_ms` (how long
//! the agent kept the filesystems frozen), `rounds` (copies of the disk's
//! changes the session made) and `note` (why the level is not higher, or
//! what happened on the way). Manifests written before points stated their
//! consistency have no `consistency`, and read as level `none`: they were
//! read from live disks. Points are immutable: nothing rewrites a manifest.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tideline_protocol::{Consistency, Digest, Geometry, PointConsistency};

use super::error::{io_err, StoreError};
use super::index_file::valid_geometry;
use super::{check_id, fsutil, PointId, Store};

/// Name of the manifest file in a point directory.
pub(crate) const MANIFEST: &str = "manifest.json";
/// Name of the index file in a point directory.
pub(crate) const INDEX: &str = "index";
/// Largest manifest read (they are a few hundred bytes).
const MAX_MANIFEST_LEN: u64 = 64 * 1024;

/// What the store knows about one committed recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// Agent id.
    pub agent: String,
    /// Disk id.
    pub disk: String,
    /// Point id.
    pub point: PointId,
    /// The point it was built on, if any.
    pub base: Option<PointId>,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Number of blocks.
    pub block_count: u64,
    /// Index root, hexadecimal.
    pub root: String,
    /// Commit time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Blocks recorded by the session that built it.
    pub changed_blocks: u64,
    /// Bytes newly stored by that session, as its caller reported.
    #[serde(default)]
    pub new_bytes: u64,
    /// How consistent the point is, as the agent stated it.
    #[serde(default)]
    pub consistency: ConsistencyInfo,
}

/// A point's consistency as its manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConsistencyInfo {
    /// The level reached.
    #[serde(with = "level_spelling")]
    pub level: Consistency,
    /// Milliseconds the filesystems were frozen (0: not frozen).
    #[serde(default)]
    pub frozen_ms: u32,
    /// Rounds the session copied for this disk.
    #[serde(default)]
    pub rounds: u32,
    /// Why the level is not higher, or what happened on the way.
    #[serde(default)]
    pub note: String,
}

impl From<&PointConsistency> for ConsistencyInfo {
    fn from(c: &PointConsistency) -> Self {
        ConsistencyInfo {
            level: c.level,
            frozen_ms: c.frozen_ms,
            rounds: c.rounds,
            note: c.note.clone(),
        }
    }
}

/// `Consistency` in manifests and JSON: its stable spelling.
mod level_spelling {
    use serde::{Deserialize, Deserializer, Serializer};
    use tideline_protocol::Consistency;

    pub fn serialize<S: Serializer>(c: &Consistency, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Consistency, D::Error> {
        let s = String::deserialize(d)?;
        Consistency::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown consistency level {s:?}")))
    }
}

impl PointInfo {
    /// The point's geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.disk_size, self.block_size)
    }

    /// The index root as a digest (manifests are validated on load).
    pub fn root_digest(&self) -> Option<Digest> {
        Digest::from_hex(&self.root)
    }
}

/// The manifest: the point's info and the CRC of the index it commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    #[serde(flatten)]
    pub info: PointInfo,
    pub index_crc: u32,
}

/// Directory name of point `point`.
pub(crate) fn point_name(point: PointId) -> String {
    format!("{point:016x}")
}

/// Parses a point directory name (16 lower-case hex digits).
pub(crate) fn parse_point_name(name: &str) -> Option<PointId> {
    if name.len() != 16 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(name, 16).ok()
}

impl Store {
    pub(crate) fn points_dir(&self) -> PathBuf {
        self.root.join("points")
    }

    pub(crate) fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// `points/<agent>/<disk>`, ids checked.
    pub(crate) fn disk_dir(&self, agent: &str, disk: &str) -> Result<PathBuf, StoreError> {
        check_id(agent)?;
        check_id(disk)?;
        Ok(self.points_dir().join(agent).join(disk))
    }

    /// `points/<agent>/<disk>/<point>`, ids checked.
    pub(crate) fn point_dir(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
    ) -> Result<PathBuf, StoreError> {
        Ok(self.disk_dir(agent, disk)?.join(point_name(point)))
    }

    /// Agents that have at least a disk directory, sorted.
    pub fn agents(&self) -> Result<Vec<String>, StoreError> {
        Ok(fsutil::list_dir(&self.points_dir())?
            .into_iter()
            .filter(|(name, is_dir)| *is_dir && super::valid_id(name))
            .map(|(name, _)| name)
            .collect())
    }

    /// Disks of `agent`, sorted.
    pub fn disks(&self, agent: &str) -> Result<Vec<String>, StoreError> {
        check_id(agent)?;
        Ok(fsutil::list_dir(&self.points_dir().join(agent))?
            .into_iter()
            .filter(|(name, is_dir)| *is_dir && super::valid_id(name))
            .map(|(name, _)| name)
            .collect())
    }

    /// Committed points of a disk, ascending by id. A point whose manifest
    /// cannot be read is left out (and logged).
    pub fn points(&self, agent: &str, disk: &str) -> Result<Vec<PointInfo>, StoreError> {
        let dir = self.disk_dir(agent, disk)?;
        let mut out = Vec::new();
        for (name, is_dir) in fsutil::list_dir(&dir)? {
            let Some(id) = parse_point_name(&name).filter(|_| is_dir) else {
                continue;
            };
            match load_manifest(&dir.join(&name), agent, disk, id) {
                Ok(m) => out.push(m.info),
                Err(e) => tracing::warn!(agent, disk, point = id, "point left out: {e}"),
            }
        }
        out.sort_by_key(|p| p.point);
        Ok(out)
    }

    /// The committed point with the highest id, if any.
    pub fn latest_point(&self, agent: &str, disk: &str) -> Result<Option<PointInfo>, StoreError> {
        Ok(self.points(agent, disk)?.pop())
    }

    /// One committed point.
    pub fn point(&self, agent: &str, disk: &str, point: PointId) -> Result<PointInfo, StoreError> {
        Ok(self.manifest(agent, disk, point)?.info)
    }

    /// The manifest of one committed point.
    pub(crate) fn manifest(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
    ) -> Result<Manifest, StoreError> {
        let dir = self.point_dir(agent, disk, point)?;
        load_manifest(&dir, agent, disk, point)
    }

    /// Removes interrupted commits (`*.tmp` point directories, point
    /// directories without a manifest) and staging logs of points that are
    /// already committed. Run by `open`, before any builder exists.
    pub(crate) fn remove_incomplete_points(&self) -> Result<(), StoreError> {
        let points = self.points_dir();
        for (agent, a_dir) in fsutil::list_dir(&points)? {
            if !a_dir {
                continue;
            }
            for (disk, d_dir) in fsutil::list_dir(&points.join(&agent))? {
                if !d_dir {
                    continue;
                }
                let dir = points.join(&agent).join(&disk);
                let mut removed = false;
                for (name, is_dir) in fsutil::list_dir(&dir)? {
                    let path = dir.join(&name);
                    let incomplete = if name.ends_with(".tmp") {
                        true
                    } else if is_dir && parse_point_name(&name).is_some() {
                        !path.join(MANIFEST).exists()
                    } else {
                        false
                    };
                    if incomplete {
                        tracing::warn!(
                            point_dir = %path.display(),
                            "removing incomplete point left by an interrupted commit"
                        );
                        fsutil::remove_if_exists(&path)?;
                        removed = true;
                    }
                }
                if removed {
                    fsutil::fsync_dir(&dir)?;
                }
                // Staging logs of points that made it.
                let staging = self.staging_dir().join(&agent).join(&disk);
                for (name, _) in fsutil::list_dir(&staging)? {
                    let Some(stem) = name.strip_suffix(".log") else {
                        continue;
                    };
                    if parse_point_name(stem).is_some() && dir.join(stem).join(MANIFEST).exists() {
                        fsutil::remove_if_exists(&staging.join(&name))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads and checks the manifest in point directory `dir`: it must name this
/// agent, disk and point, and hold a geometry and root the store accepts.
pub(crate) fn load_manifest(
    dir: &Path,
    agent: &str,
    disk: &str,
    point: PointId,
) -> Result<Manifest, StoreError> {
    let path = dir.join(MANIFEST);
    let meta = fs::metadata(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound {
                what: format!("point {point:016x} of {agent}/{disk}"),
            }
        } else {
            io_err(&path)(e)
        }
    })?;
    let corrupt = |what: String| StoreError::Corrupt {
        path: path.clone(),
        what,
    };
    if meta.len() > MAX_MANIFEST_LEN {
        return Err(corrupt(format!("manifest is {} bytes", meta.len())));
    }
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("bad manifest: {e}")))?;
    let i = &m.info;
    if i.agent != agent || i.disk != disk || i.point != point {
        return Err(corrupt(format!(
            "manifest names {}/{}/{:016x}",
            i.agent, i.disk, i.point
        )));
    }
    if !valid_geometry(i.disk_size, i.block_size) || i.geometry().block_count != i.block_count {
        return Err(corrupt("manifest geometry is invalid".into()));
    }
    if i.root_digest().is_none() {
        return Err(corrupt("manifest root is not 64 hex digits".into()));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_names_round_trip() {
        assert_eq!(parse_point_name(&point_name(0x2a)), Some(0x2a));
        assert_eq!(parse_point_name("000000000000002A"), None);
        assert_eq!(parse_point_name("2a"), None);
        assert_eq!(parse_point_name("000000000000002a.tmp"), None);
    }
}
