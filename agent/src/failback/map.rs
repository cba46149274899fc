//! The target map: what a failback target holds, as far as the agent has
//! verified it, kept between passes.
//!
//! A pass that can trust the map describes the target without reading it,
//! so that a pass after no change costs nothing but the map, and a pass cut
//! off by a dropped link or a SIGKILL is resumed by the next one without
//! rewriting what it had verified.
//!
//! File `<state_dir>/failback/<target>.map`, little-endian:
//!
//! ```text
//! offset size
//!      0    8  magic "TLFBMAP1"
//!      8    4  version (1)
//!     12    4  block size of the point geometry
//!     16    8  disk size of the point geometry
//!     24    8  target size when the map was last written
//!     32    8  target mtime, seconds (regular files; 0 otherwise)
//!     40    4  target mtime, nanoseconds
//!     44    4  complete: 1 once every entry was filled by a scan
//!     48   32  BLAKE3 of the target's path or URI
//!     80    4  CRC-32 of bytes 0..80
//!   4096  32n  one digest per block; all zeros = unknown
//! ```
//!
//! Invariant: an entry names a digest only if the target held exactly that
//! block when the entry was written. Before a block is written, its entry
//! is set to unknown and that is made durable (`msync`); only after the
//! write was flushed, re-read and verified does the entry get the new
//! digest. A crash at any moment leaves entries that are either true or
//! unknown, and unknown entries differ from every point's digest, so the
//! next pass rewrites those blocks. The map is created as a `.tmp` file,
//! sized, and renamed into place; the directory is fsynced.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use tideline_protocol::{Digest, Geometry, IndexRootHasher};

const MAGIC: &[u8; 8] = b"TLFBMAP1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 4096;
const CRC_AT: usize = 80;
const UNKNOWN: [u8; 32] = [0; 32];

/// Why the map could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// I/O on the map file.
    #[error("target map {}: {cause}", path.display())]
    Io {
        /// The map file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
}

/// How a target looks from outside, to tell whether something else wrote
/// it since the map was last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetStamp {
    /// Target size.
    pub size: u64,
    /// Modification time of a regular-file target (0 otherwise).
    pub mtime_sec: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
}

impl TargetStamp {
    /// The stamp of the target at `location` with size `size`.
    pub fn of(location: &Path, size: u64) -> TargetStamp {
        use std::os::unix::fs::MetadataExt;
        match fs::metadata(location) {
            Ok(m) if m.is_file() => TargetStamp {
                size,
                mtime_sec: m.mtime(),
                mtime_nsec: m.mtime_nsec() as u32,
            },
            _ => TargetStamp {
                size,
                ..TargetStamp::default()
            },
        }
    }
}

/// The map of one target, memory-mapped.
pub struct TargetMap {
    path: PathBuf,
    map: MmapMut,
    geometry: Geometry,
}

fn location_hash(location: &str) -> Digest {
    Digest::of(location.as_bytes())
}

impl TargetMap {
    /// Path of the map of target `target` under `state_dir`.
    pub fn path_for(state_dir: &Path, target: &str) -> PathBuf {
        state_dir.join("failback").join(format!("{target}.map"))
    }

    /// Opens the map at `path` if it can vouch for the target: the header is
    /// intact, complete, for this geometry and location, and the target's
    /// stamp has not changed since the map was last written. `None` when it
    /// cannot (missing, stale, damaged).
    pub fn open_vouching(
        path: &Path,
        location: &str,
        geometry: Geometry,
        stamp: TargetStamp,
    ) -> Option<TargetMap> {
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        let len = file.metadata().ok()?.len();
        if len != HEADER_LEN as u64 + geometry.block_count * 32 {
            return None;
        }
        // SAFETY: the file is ours (state directory, held under the agent's
        // state lock); nothing else maps or truncates it while we run.
        let map = unsafe { MmapMut::map_mut(&file) }.ok()?;
        let m = TargetMap {
            path: path.to_path_buf(),
            map,
            geometry,
        };
        let h = &m.map[..HEADER_LEN];
        let crc = u32::from_le_bytes(h[CRC_AT..CRC_AT + 4].try_into().ok()?);
        let ok = &h[0..8] == MAGIC
            && crc == crc32fast::hash(&h[..CRC_AT])
            && u32_at(h, 8) == VERSION
            && u32_at(h, 12) == geometry.block_size
            && u64_at(h, 16) == geometry.disk_size
            && u64_at(h, 24) == stamp.size
            && u64_at(h, 32) as i64 == stamp.mtime_sec
            && u32_at(h, 40) == stamp.mtime_nsec
            && u32_at(h, 44) == 1
            && h[48..80] == location_hash(location).0;
        ok.then_some(m)
    }

    /// Creates a fresh map at `path` with every entry unknown, replacing
    /// any older one.
    pub fn create(path: &Path, location: &str, geometry: Geometry) -> Result<TargetMap, MapError> {
        let io = |source| MapError::Io {
            path: path.to_path_buf(),
            cause: source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("map.tmp");
        let file = File::create(&tmp).map_err(io)?;
        file.set_len(HEADER_LEN as u64 + geometry.block_count * 32)
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)?;
        if let Ok(d) = File::open(dir) {
            d.sync_all().map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        // SAFETY: as in `open_vouching`.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
        let mut m = TargetMap {
            path: path.to_path_buf(),
            map,
            geometry,
        };
        let h = &mut m.map[..HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&geometry.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&geometry.disk_size.to_le_bytes());
        h[48..80].copy_from_slice(&location_hash(location).0);
        m.seal_header(TargetStamp::default(), false)?;
        Ok(m)
    }

    /// The geometry the map describes.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn entry_range(&self, block: u64) -> std::ops::Range<usize> {
        let at = HEADER_LEN + block as usize * 32;
        at..at + 32
    }

    /// What the map says block `block` holds; `None` when unknown.
    pub fn get(&self, block: u64) -> Option<Digest> {
        let e: [u8; 32] = self.map[self.entry_range(block)].try_into().ok()?;
        (e != UNKNOWN).then_some(Digest(e))
    }

    /// Records that block `block` holds `digest` (durable at the next
    /// [`TargetMap::sync`]).
    pub fn set(&mut self, block: u64, digest: &Digest) {
        let r = self.entry_range(block);
        self.map[r].copy_from_slice(&digest.0);
    }

    /// Marks `blocks` (ascending) unknown and makes that durable before
    /// returning: they are about to be written.
    pub fn invalidate(&mut self, blocks: &[u64]) -> Result<(), MapError> {
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else {
            return Ok(());
        };
        for &b in blocks {
            let r = self.entry_range(b);
            self.map[r].fill(0);
        }
        let start = self.entry_range(first).start;
        let stop = self.entry_range(last).end;
        self.map
            .flush_range(start, stop - start)
            .map_err(|source| MapError::Io {
                path: self.path.clone(),
                cause: source,
            })
    }

    /// Makes every entry written so far durable.
    pub fn sync(&self) -> Result<(), MapError> {
        self.map.flush().map_err(|source| MapError::Io {
            path: self.path.clone(),
            cause: source,
        })
    }

    /// Writes the header with the target's current stamp; `complete` once
    /// every entry has been filled. Durable before returning.
    pub fn seal_header(&mut self, stamp: TargetStamp, complete: bool) -> Result<(), MapError> {
        let h = &mut self.map[..HEADER_LEN];
        h[24..32].copy_from_slice(&stamp.size.to_le_bytes());
        h[32..40].copy_from_slice(&(stamp.mtime_sec as u64).to_le_bytes());
        h[40..44].copy_from_slice(&stamp.mtime_nsec.to_le_bytes());
        h[44..48].copy_from_slice(&u32::from(complete).to_le_bytes());
        let crc = crc32fast::hash(&h[..CRC_AT]);
        h[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        self.sync()
    }

    /// The index root of what the target holds, if every entry is known.
    pub fn root(&self) -> Option<Digest> {
        let mut h = IndexRootHasher::new();
        for b in 0..self.geometry.block_count {
            h.push(&self.get(b)?);
        }
        Some(h.finish())
    }

    /// Blocks whose entry is unknown.
    pub fn unknown_blocks(&self) -> u64 {
        (0..self.geometry.block_count)
            .filter(|&b| self.get(b).is_none())
            .count() as u64
    }
}

fn u32_at(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn u64_at(h: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_map_vouches_only_for_the_same_target_and_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = TargetMap::path_for(dir.path(), "t0");
        let g = Geometry::new(10 * 4096 + 512, 4096);
        let mut m = TargetMap::create(&path, "/dev/vdb", g).unwrap();
        assert_eq!(m.root(), None);
        for b in 0..g.block_count {
            m.set(b, &Digest([b as u8 + 1; 32]));
        }
        let root = m.root().unwrap();
        let stamp = TargetStamp {
            size: 1 << 20,
            mtime_sec: 5,
            mtime_nsec: 6,
        };
        // Not complete yet: no vouching.
        m.seal_header(stamp, false).unwrap();
        assert!(TargetMap::open_vouching(&path, "/dev/vdb", g, stamp).is_none());
        m.seal_header(stamp, true).unwrap();
        drop(m);
        let m = TargetMap::open_vouching(&path, "/dev/vdb", g, stamp).unwrap();
        assert_eq!(m.root(), Some(root));
        assert_eq!(m.get(3), Some(Digest([4; 32])));
        drop(m);
        // Another location, geometry or stamp: no.
        assert!(TargetMap::open_vouching(&path, "/dev/vdc", g, stamp).is_none());
        assert!(TargetMap::open_vouching(
            &path,
            "/dev/vdb",
            Geometry::new(g.disk_size, 8192),
            stamp
        )
        .is_none());
        let touched = TargetStamp {
            mtime_nsec: 7,
            ..stamp
        };
        assert!(TargetMap::open_vouching(&path, "/dev/vdb", g, touched).is_none());
        // A damaged header: no.
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(TargetMap::open_vouching(&path, "/dev/vdb", g, stamp).is_none());
    }

    #[test]
    fn invalidated_entries_are_unknown_on_disk_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = TargetMap::path_for(dir.path(), "t1");
        let g = Geometry::new(8 * 4096, 4096);
        let mut m = TargetMap::create(&path, "x", g).unwrap();
        for b in 0..8 {
            m.set(b, &Digest([9; 32]));
        }
        m.sync().unwrap();
        m.invalidate(&[2, 3, 4, 6]).unwrap();
        // Read the file, not the mapping.
        let bytes = fs::read(&path).unwrap();
        for b in 0..8usize {
            let e = &bytes[HEADER_LEN + b * 32..HEADER_LEN + b * 32 + 32];
            assert_eq!(e == UNKNOWN, [2, 3, 4, 6].contains(&b), "block {b}");
        }
        assert_eq!(m.unknown_blocks(), 4);
    }
}
