//! The block map: the digest of every block of a disk as of the last
//! recovery point the controller committed.
//!
//! A hash scan reads the map sequentially beside the disk ([`BlockMap::entries`])
//! and sends the blocks whose digest differs. The map is memory-mapped
//! (memmap2): a 1 TiB disk at 64 KiB blocks has 16 Mi entries, 512 MiB that
//! the page cache holds or drops as needed, with no parse at start-up.
//!
//! # File format (`<state_dir>/disks/<disk_id>/blockmap`, little-endian)
//!
//! ```text
//! offset size  field
//!      0    8  magic        b"TDLBMAP1"
//!      8    4  version      u32 = 1
//!     12    4  flags        u32; bit 0 = APPLYING: a change log is being
//!                           applied (or the map resized), entries may be
//!                           half-updated; other bits must be zero
//!     16    4  block_size   u32, a valid block size (4 KiB ..= 4 MiB, power of two)
//!     20    4  reserved     zero (aligns the u64 fields)
//!     24    8  disk_size    u64, bytes, at most MAX_DISK_SIZE
//!     32    8  block_count  u64 = ceil(disk_size / block_size)
//!     40    8  point        u64, the recovery point the entries describe; 0 = none
//!     48   32  root         index root of that point; zero if none
//!     80    8  check        u64, first 8 bytes (LE) of BLAKE3(bytes 0..80)
//!     88 4008  zero padding up to 4096
//!   4096  32×n entries      block i's BLAKE3 digest at 4096 + 32·i, n = block_count
//! ```
//!
//! The file length is exactly `4096 + 32 × block_count`; anything else, a bad
//! magic, version or check makes [`BlockMap::open`] fail with an error naming
//! the file, and the caller discards the map and scans against nothing.
//!
//! # Atomicity
//!
//! A new map ([`BlockMap::create_zero`], [`BlockMap::create_with`]) is written
//! to `blockmap.tmp`, fsynced, renamed over `blockmap`, and the directory is
//! fsynced: a crash leaves the old map or the new one. Updating a map in
//! place ([`BlockMap::apply`], [`BlockMap::resize`]) first sets APPLYING in
//! the header and msyncs it, and clears it only after the entries are
//! msynced: a crash in between leaves APPLYING set, which
//! [`BlockMap::is_consistent`] reports, and the caller then rescans (applying
//! the same sealed log again is also safe, as apply is idempotent). A torn
//! header fails its check and is treated as a corrupt map.
//!
//! The map must not be opened by two processes at once; the agent holds a
//! lock on its state directory. Truncating the file under a live mapping
//! would fault the process (SIGBUS), which is why nothing else may touch it.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use tideline_protocol::resize::carried_entry;
use tideline_protocol::{Digest, Geometry, IndexRootHasher, ZeroDigests, PAGE_BLOCKS};

use super::change_log::ChangeLog;
use super::{check_geometry, header_check, io_err, sync_parent, tmp_path, TrackingError};

/// Magic at the start of a block map.
pub const MAGIC: [u8; 8] = *b"TDLBMAP1";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// Length of the header; entries start here.
pub const HEADER_LEN: usize = 4096;
/// Header flag: a change log is being applied, entries may be half-updated.
pub const FLAG_APPLYING: u32 = 1;

const CHECKED_LEN: usize = 80;
const ENTRY: usize = Digest::LEN;

/// The decoded header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    flags: u32,
    geometry: Geometry,
    point: u64,
    root: Digest,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.geometry.block_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.geometry.disk_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.geometry.block_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.point.to_le_bytes());
        b[48..80].copy_from_slice(&self.root.0);
        let check = header_check(&b[..CHECKED_LEN]);
        b[80..88].copy_from_slice(&check.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8; HEADER_LEN]) -> Result<Header, TrackingError> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let corrupt = |reason: String| TrackingError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if b[0..8] != MAGIC {
            return Err(TrackingError::BadMagic {
                path: path.to_path_buf(),
                kind: "block map",
            });
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(TrackingError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        if u64_at(80) != header_check(&b[..CHECKED_LEN]) {
            return Err(TrackingError::BadCheck {
                path: path.to_path_buf(),
            });
        }
        let flags = u32_at(12);
        if flags & !FLAG_APPLYING != 0 {
            return Err(corrupt(format!("unknown flags {flags:#x}")));
        }
        let geometry = Geometry::new(u64_at(24), u32_at(16));
        check_geometry(path, &geometry)?;
        let block_count = u64_at(32);
        if block_count != geometry.block_count {
            return Err(corrupt(format!(
                "block count {block_count} does not match disk size {} / block size {}",
                geometry.disk_size, geometry.block_size
            )));
        }
        let mut root = [0u8; 32];
        root.copy_from_slice(&b[48..80]);
        Ok(Header {
            flags,
            geometry,
            point: u64_at(40),
            root: Digest(root),
        })
    }
}

/// File length of a map of `geometry`. Cannot overflow: check_geometry
/// bounds the disk size to 2^50 bytes and the block size to at least 4 KiB.
fn file_len(geometry: &Geometry) -> u64 {
    HEADER_LEN as u64 + geometry.block_count * ENTRY as u64
}

/// Maps `file` read-write.
fn map_file(path: &Path, file: &File) -> Result<MmapMut, TrackingError> {
    // SAFETY: the mapping is only valid while nobody truncates or rewrites
    // the file behind it. The file lives in the agent's private state
    // directory, which the agent locks, and this process only changes its
    // length through `resize`, which remaps right after.
    unsafe { MmapMut::map_mut(file) }.map_err(io_err("memory-map", path))
}

/// The digests of one disk as of its last committed point, memory-mapped.
#[derive(Debug)]
pub struct BlockMap {
    path: PathBuf,
    file: File,
    map: MmapMut,
    header: Header,
}

impl BlockMap {
    /// Opens the map at `path`; `None` if there is no file. A bad magic,
    /// version, check or length is an error naming the file: the caller
    /// then discards the map. A map left half-updated opens, with
    /// [`BlockMap::is_consistent`] false.
    pub fn open(path: &Path) -> Result<Option<BlockMap>, TrackingError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open block map", path)(e)),
        };
        let len = file
            .metadata()
            .map_err(io_err("inspect block map", path))?
            .len();
        if len < HEADER_LEN as u64 {
            return Err(TrackingError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("{len} bytes is shorter than the header"),
            });
        }
        let mut raw = [0u8; HEADER_LEN];
        file.read_exact_at(&mut raw, 0)
            .map_err(io_err("read block map header", path))?;
        let header = Header::decode(path, &raw)?;
        let expected = file_len(&header.geometry);
        if len != expected {
            return Err(TrackingError::Corrupt {
                path: path.to_path_buf(),
                reason: format!(
                    "file is {len} bytes, {} blocks need {expected}",
                    header.geometry.block_count
                ),
            });
        }
        let map = map_file(path, &file)?;
        Ok(Some(BlockMap {
            path: path.to_path_buf(),
            file,
            map,
            header,
        }))
    }

    /// Creates (or replaces) the map at `path` with every entry the zero
    /// digest of its block and no point: the map of a disk never synced,
    /// against which a scan sends every block that is not all zeros.
    pub fn create_zero(path: &Path, geometry: Geometry) -> Result<BlockMap, TrackingError> {
        check_geometry(path, &geometry)?;
        let header = Header {
            flags: 0,
            geometry,
            point: 0,
            root: Digest::default(),
        };
        let tmp = tmp_path(path);
        let result = (|| {
            let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
            let mut w = BufWriter::with_capacity(1 << 20, &file);
            w.write_all(&header.encode())
                .map_err(io_err("write", &tmp))?;
            let zero = ZeroDigests::new(geometry.disk_size, geometry.block_size);
            for i in 0..geometry.block_count {
                w.write_all(&zero.for_block(i).0)
                    .map_err(io_err("write", &tmp))?;
            }
            w.flush().map_err(io_err("write", &tmp))?;
            drop(w);
            file.sync_all().map_err(io_err("fsync", &tmp))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        sync_parent(path)?;
        BlockMap::open(path)?.ok_or_else(|| TrackingError::Io {
            op: "reopen block map",
            path: path.to_path_buf(),
            cause: ErrorKind::NotFound.into(),
        })
    }

    /// Starts rebuilding the map at `path` from the controller's index of
    /// `point`, whose root is `root`. Fill it with
    /// [`BlockMapWriter::write_range`]; [`BlockMapWriter::finish`] replaces
    /// the map only if the entries hash to `root`. Until then the existing
    /// map is untouched.
    pub fn create_with(
        path: &Path,
        geometry: Geometry,
        point: u64,
        root: Digest,
    ) -> Result<BlockMapWriter, TrackingError> {
        check_geometry(path, &geometry)?;
        let header = Header {
            flags: 0,
            geometry,
            point,
            root,
        };
        let tmp = tmp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let built = (|| {
            file.write_all_at(&header.encode(), 0)
                .map_err(io_err("write", &tmp))?;
            file.set_len(file_len(&geometry))
                .map_err(io_err("size", &tmp))?;
            map_file(&tmp, &file)
        })();
        match built {
            Ok(map) => Ok(BlockMapWriter {
                path: path.to_path_buf(),
                tmp,
                open: Some((file, map)),
                header,
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// The file this map lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The geometry the entries describe.
    pub fn geometry(&self) -> Geometry {
        self.header.geometry
    }

    /// The recovery point the entries describe, if any.
    pub fn point(&self) -> Option<u64> {
        (self.header.point != 0).then_some(self.header.point)
    }

    /// The index root of [`BlockMap::point`], if any.
    pub fn root(&self) -> Option<Digest> {
        (self.header.point != 0).then_some(self.header.root)
    }

    /// False when an update was interrupted (APPLYING set): the entries may
    /// be half-updated and must not be trusted.
    pub fn is_consistent(&self) -> bool {
        self.header.flags & FLAG_APPLYING == 0
    }

    fn offset(block: u64) -> usize {
        // block < block_count and the whole map is mapped, so this is below
        // the mapping's length, which fits in usize.
        HEADER_LEN + block as usize * ENTRY
    }

    /// The digest of `block`.
    ///
    /// # Panics
    ///
    /// If `block` is not below the block count: that is the caller's bug,
    /// not bad data.
    pub fn get(&self, block: u64) -> Digest {
        assert!(
            block < self.header.geometry.block_count,
            "block {block} out of range ({} blocks)",
            self.header.geometry.block_count
        );
        let o = Self::offset(block);
        let mut d = [0u8; ENTRY];
        d.copy_from_slice(&self.map[o..o + ENTRY]);
        Digest(d)
    }

    /// The raw entries of blocks `first .. first + count`, 32 bytes each, for
    /// comparing a batch of digests at once.
    ///
    /// # Panics
    ///
    /// If the range is not within the block count (the caller's bug).
    pub fn entries(&self, first: u64, count: usize) -> &[u8] {
        let end = first.checked_add(count as u64);
        assert!(
            end.is_some_and(|e| e <= self.header.geometry.block_count),
            "blocks {first}+{count} out of range ({} blocks)",
            self.header.geometry.block_count
        );
        let o = Self::offset(first);
        &self.map[o..o + count * ENTRY]
    }

    /// The index root of the entries as they are.
    pub fn compute_root(&self) -> Digest {
        root_of(&self.map[HEADER_LEN..])
    }

    /// Carries the map to a disk of `new_disk_size` bytes with the same block
    /// size, by the rule both ends apply
    /// ([`tideline_protocol::resize`]): entries below the smaller block count
    /// are kept, new entries are the zero digests of the new geometry. The
    /// point and root are kept: they still name the base the entries came
    /// from.
    pub fn resize(&mut self, new_disk_size: u64) -> Result<(), TrackingError> {
        let old = self.header.geometry;
        let new = Geometry::new(new_disk_size, old.block_size);
        check_geometry(&self.path, &new)?;
        if new == old {
            return Ok(());
        }
        self.set_flags(self.header.flags | FLAG_APPLYING)?;
        self.map.flush().map_err(io_err("msync", &self.path))?;
        self.file
            .set_len(file_len(&new))
            .map_err(io_err("resize", &self.path))?;
        self.file.sync_all().map_err(io_err("fsync", &self.path))?;
        self.map = map_file(&self.path, &self.file)?;

        let zero = ZeroDigests::new(new.disk_size, new.block_size);
        for i in old.block_count..new.block_count {
            // Entries past the old end: always the zero digest (the base
            // closure is never called for them).
            let d = carried_entry(i, old.block_count, &zero, |_| Digest::default());
            let o = Self::offset(i);
            self.map[o..o + ENTRY].copy_from_slice(&d.0);
        }
        self.map.flush().map_err(io_err("msync", &self.path))?;
        self.header.geometry = new;
        self.set_flags(self.header.flags & !FLAG_APPLYING)
    }

    /// Applies a sealed change log: the map then describes the log's point.
    ///
    /// Sets APPLYING and msyncs it, writes every record's digest, msyncs,
    /// checks that the entries hash to the log's sealed root, then records
    /// the log's point and root and clears APPLYING. Applying the same log
    /// twice is harmless, so a crash mid-way is repaired by applying again.
    ///
    /// The log must have the map's geometry (call [`BlockMap::resize`]
    /// first if the disk changed size). If the entries do not hash to the
    /// sealed root, the map and the point disagree: the error is
    /// [`TrackingError::RootMismatch`] and APPLYING stays set, so the map is
    /// not trusted again.
    pub fn apply(&mut self, log: &ChangeLog) -> Result<(), TrackingError> {
        if log.geometry() != self.header.geometry {
            return Err(TrackingError::GeometryMismatch {
                path: self.path.clone(),
                map: self.header.geometry,
                log: log.geometry(),
            });
        }
        let root = log.sealed_root().ok_or_else(|| TrackingError::NotSealed {
            path: log.path().to_path_buf(),
        })?;
        self.set_flags(self.header.flags | FLAG_APPLYING)?;
        for record in log.records() {
            let (block, digest) = record?;
            // records() already bounds blocks by the log's geometry, which
            // is the map's.
            let o = Self::offset(block);
            self.map[o..o + ENTRY].copy_from_slice(&digest.0);
        }
        self.map.flush().map_err(io_err("msync", &self.path))?;
        let computed = self.compute_root();
        if computed != root {
            return Err(TrackingError::RootMismatch {
                path: self.path.clone(),
                expected: root,
                computed,
            });
        }
        self.header.point = log.point();
        self.header.root = root;
        self.set_flags(self.header.flags & !FLAG_APPLYING)
    }

    /// Writes the header with `flags` and msyncs it.
    fn set_flags(&mut self, flags: u32) -> Result<(), TrackingError> {
        self.header.flags = flags;
        self.map[..HEADER_LEN].copy_from_slice(&self.header.encode());
        self.map
            .flush_range(0, HEADER_LEN)
            .map_err(io_err("msync header of", &self.path))
    }
}

/// The index root of raw entries (32 bytes each): full pages are hashed as
/// one slice, which is what a page digest is.
fn root_of(entries: &[u8]) -> Digest {
    let mut hasher = IndexRootHasher::new();
    let page_bytes = PAGE_BLOCKS * ENTRY;
    let mut pages = entries.chunks_exact(page_bytes);
    for page in &mut pages {
        hasher.push_page(&Digest(*blake3::hash(page).as_bytes()), PAGE_BLOCKS);
    }
    for e in pages.remainder().chunks_exact(ENTRY) {
        let mut d = [0u8; ENTRY];
        d.copy_from_slice(e);
        hasher.push(&Digest(d));
    }
    hasher.finish()
}

/// A block map being rebuilt from the controller's index (see
/// [`BlockMap::create_with`]). Dropped without [`BlockMapWriter::finish`],
/// it removes its temporary file.
#[derive(Debug)]
pub struct BlockMapWriter {
    path: PathBuf,
    tmp: PathBuf,
    open: Option<(File, MmapMut)>,
    header: Header,
}

impl BlockMapWriter {
    /// Sets the entries of blocks `first_block ..` to `digests`.
    pub fn write_range(
        &mut self,
        first_block: u64,
        digests: &[Digest],
    ) -> Result<(), TrackingError> {
        let count = self.header.geometry.block_count;
        let in_range =
            matches!(first_block.checked_add(digests.len() as u64), Some(e) if e <= count);
        if !in_range {
            return Err(TrackingError::BlockOutOfRange {
                path: self.path.clone(),
                block: first_block
                    .saturating_add(digests.len() as u64)
                    .saturating_sub(1),
                block_count: count,
            });
        }
        let Some((_, map)) = self.open.as_mut() else {
            unreachable!("the mapping lives until finish() or drop");
        };
        for (i, d) in digests.iter().enumerate() {
            let o = BlockMap::offset(first_block + i as u64);
            map[o..o + ENTRY].copy_from_slice(&d.0);
        }
        Ok(())
    }

    /// Verifies that the entries hash to the expected root, makes the file
    /// durable and renames it over the map. On a mismatch the temporary file
    /// is removed and the old map is left as it was.
    pub fn finish(mut self) -> Result<BlockMap, TrackingError> {
        let Some((file, map)) = self.open.take() else {
            unreachable!("finish() consumes the writer");
        };
        let computed = root_of(&map[HEADER_LEN..]);
        if computed != self.header.root {
            drop(map);
            let _ = fs::remove_file(&self.tmp);
            return Err(TrackingError::RootMismatch {
                path: self.path.clone(),
                expected: self.header.root,
                computed,
            });
        }
        let durable = map
            .flush()
            .map_err(io_err("msync", &self.tmp))
            .and_then(|()| file.sync_all().map_err(io_err("fsync", &self.tmp)))
            .and_then(|()| {
                fs::rename(&self.tmp, &self.path).map_err(io_err("rename into place", &self.path))
            });
        if let Err(e) = durable {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        sync_parent(&self.path)?;
        Ok(BlockMap {
            path: self.path.clone(),
            file,
            map,
            header: self.header,
        })
    }
}

impl Drop for BlockMapWriter {
    fn drop(&mut self) {
        if self.open.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: u32 = 4096;

    fn digests(n: u64, salt: u8) -> Vec<Digest> {
        (0..n)
            .map(|i| Digest::of(&[&i.to_le_bytes()[..], &[salt]].concat()))
            .collect()
    }

    fn root_by_blocks(ds: &[Digest]) -> Digest {
        let mut h = IndexRootHasher::new();
        for d in ds {
            h.push(d);
        }
        h.finish()
    }

    fn all(map: &BlockMap) -> Vec<Digest> {
        (0..map.geometry().block_count)
            .map(|i| map.get(i))
            .collect()
    }

    #[test]
    fn zero_map_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockmap");
        assert!(BlockMap::open(&path).unwrap().is_none());
        let g = Geometry::new(10 * u64::from(BS) + 100, BS);
        let map = BlockMap::create_zero(&path, g).unwrap();
        assert_eq!(map.point(), None);
        assert_eq!(map.root(), None);
        assert!(map.is_consistent());
        drop(map);
        assert!(!tmp_path(&path).exists());

        let map = BlockMap::open(&path).unwrap().unwrap();
        assert_eq!(map.geometry(), g);
        assert_eq!(map.get(0), Digest::of_zeros(BS as usize));
        assert_eq!(map.get(10), Digest::of_zeros(100));
        assert_eq!(map.entries(9, 2).len(), 64);
        assert_eq!(map.entries(10, 1), &Digest::of_zeros(100).0[..]);
        assert_eq!(map.compute_root(), root_by_blocks(&all(&map)));
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            HEADER_LEN as u64 + 11 * 32
        );
    }

    #[test]
    fn empty_disk_has_an_empty_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockmap");
        let map = BlockMap::create_zero(&path, Geometry::new(0, BS)).unwrap();
        assert_eq!(map.compute_root(), IndexRootHasher::new().finish());
        drop(map);
        assert_eq!(
            BlockMap::open(&path)
                .unwrap()
                .unwrap()
                .geometry()
                .block_count,
            0
        );
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn get_past_the_end_panics() {
        let dir = tempfile::tempdir().unwrap();
        let map =
            BlockMap::create_zero(&dir.path().join("m"), Geometry::new(2 * u64::from(BS), BS))
                .unwrap();
        map.get(2);
    }

    #[test]
    fn corrupt_headers_are_detected_and_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockmap");
        drop(BlockMap::create_zero(&path, Geometry::new(1 << 20, BS)).unwrap());
        let good = fs::read(&path).unwrap();

        type Expect = fn(&TrackingError) -> bool;
        let cases: Vec<(usize, Expect)> = vec![
            (0, |e| matches!(e, TrackingError::BadMagic { .. })),
            (8, |e| matches!(e, TrackingError::UnsupportedVersion { .. })),
            (30, |e| matches!(e, TrackingError::BadCheck { .. })),
            (45, |e| matches!(e, TrackingError::BadCheck { .. })),
            (82, |e| matches!(e, TrackingError::BadCheck { .. })),
        ];
        for (at, expect) in cases {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            let err = BlockMap::open(&path).unwrap_err();
            assert!(expect(&err), "byte {at}: {err}");
            assert!(err.to_string().contains("blockmap"), "{err}");
        }
        // Right header, wrong length.
        fs::write(&path, &good[..good.len() - 32]).unwrap();
        assert!(matches!(
            BlockMap::open(&path),
            Err(TrackingError::Corrupt { .. })
        ));
        fs::write(&path, &good[..100]).unwrap();
        assert!(matches!(
            BlockMap::open(&path),
            Err(TrackingError::Corrupt { .. })
        ));
    }

    #[test]
    fn writer_with_wrong_root_leaves_old_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockmap");
        let g = Geometry::new(300 * u64::from(BS), BS);
        let old_root = BlockMap::create_zero(&path, g).unwrap().compute_root();

        let ds = digests(300, 1);
        let mut w = BlockMap::create_with(&path, g, 7, Digest::of(b"not the root")).unwrap();
        w.write_range(0, &ds).unwrap();
        assert!(matches!(
            w.finish(),
            Err(TrackingError::RootMismatch { .. })
        ));
        assert!(!tmp_path(&path).exists());
        let map = BlockMap::open(&path).unwrap().unwrap();
        assert_eq!(map.point(), None);
        assert_eq!(map.compute_root(), old_root);

        // Dropping an unfinished writer also leaves the old map.
        let w = BlockMap::create_with(&path, g, 7, root_by_blocks(&ds)).unwrap();
        drop(w);
        assert!(!tmp_path(&path).exists());
        assert_eq!(
            BlockMap::open(&path).unwrap().unwrap().compute_root(),
            old_root
        );
    }

    #[test]
    fn writer_with_right_root_replaces_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockmap");
        let g = Geometry::new(300 * u64::from(BS), BS);
        drop(BlockMap::create_zero(&path, g).unwrap());

        let ds = digests(300, 2);
        let root = root_by_blocks(&ds);
        let mut w = BlockMap::create_with(&path, g, 7, root).unwrap();
        // Out of order ranges, as chunks may arrive.
        w.write_range(128, &ds[128..]).unwrap();
        w.write_range(0, &ds[..128]).unwrap();
        assert!(matches!(
            w.write_range(299, &ds[..2]),
            Err(TrackingError::BlockOutOfRange { .. })
        ));
        let map = w.finish().unwrap();
        assert_eq!(map.point(), Some(7));
        assert_eq!(map.root(), Some(root));
        drop(map);
        let map = BlockMap::open(&path).unwrap().unwrap();
        assert_eq!(all(&map), ds);
        assert_eq!(map.root(), Some(root));
    }

    fn sealed_log(
        dir: &Path,
        g: Geometry,
        changes: &[(u64, Digest)],
        point: u64,
        root: Digest,
    ) -> ChangeLog {
        let mut log = ChangeLog::create(&dir.join("changes.log"), 1, point, 0, g).unwrap();
        for (b, d) in changes {
            log.append(*b, *d).unwrap();
        }
        log.seal(root).unwrap();
        log
    }

    #[test]
    fn apply_is_idempotent_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockmap");
        let g = Geometry::new(200 * u64::from(BS), BS);
        let map = BlockMap::create_zero(&path, g).unwrap();
        let mut expected = all(&map);
        let changes: Vec<(u64, Digest)> = [3u64, 17, 128, 199]
            .iter()
            .map(|&b| (b, Digest::of(&b.to_le_bytes())))
            .collect();
        for (b, d) in &changes {
            expected[*b as usize] = *d;
        }
        let root = root_by_blocks(&expected);
        let log = sealed_log(dir.path(), g, &changes, 5, root);

        // Simulate a crash mid-apply: APPLYING set, one entry written, the
        // header still at the old point.
        let mut map = map;
        map.set_flags(FLAG_APPLYING).unwrap();
        let o = BlockMap::offset(3);
        map.map[o..o + 32].copy_from_slice(&changes[0].1 .0);
        map.map.flush().unwrap();
        drop(map);

        let mut map = BlockMap::open(&path).unwrap().unwrap();
        assert!(!map.is_consistent());
        assert_eq!(map.point(), None);
        map.apply(&log).unwrap();
        assert!(map.is_consistent());
        assert_eq!(map.point(), Some(5));
        assert_eq!(map.root(), Some(root));
        // And once more: nothing changes.
        map.apply(&log).unwrap();
        drop(map);
        let map = BlockMap::open(&path).unwrap().unwrap();
        assert!(map.is_consistent());
        assert_eq!(all(&map), expected);
        assert_eq!(map.compute_root(), root);
    }

    #[test]
    fn apply_refuses_unsealed_mismatched_and_wrong_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockmap");
        let g = Geometry::new(20 * u64::from(BS), BS);
        let mut map = BlockMap::create_zero(&path, g).unwrap();

        let mut log = ChangeLog::create(&dir.path().join("changes.log"), 1, 2, 0, g).unwrap();
        log.append(1, Digest::of(b"x")).unwrap();
        assert!(matches!(
            map.apply(&log),
            Err(TrackingError::NotSealed { .. })
        ));
        assert!(map.is_consistent());

        let other = ChangeLog::create(
            &dir.path().join("other.log"),
            1,
            2,
            0,
            Geometry::new(21 * u64::from(BS), BS),
        )
        .unwrap();
        assert!(matches!(
            map.apply(&other),
            Err(TrackingError::GeometryMismatch { .. })
        ));

        log.seal(Digest::of(b"wrong root")).unwrap();
        assert!(matches!(
            map.apply(&log),
            Err(TrackingError::RootMismatch { .. })
        ));
        assert!(!map.is_consistent());
        assert_eq!(map.point(), None);
        drop(map);
        assert!(!BlockMap::open(&path).unwrap().unwrap().is_consistent());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn resize_follows_the_protocol_rule(old_size in 0u64..2_000_000, new_size in 0u64..2_000_000) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("blockmap");
            let old = Geometry::new(old_size, BS);
            let ds = digests(old.block_count, 3);
            let root = root_by_blocks(&ds);
            let mut w = BlockMap::create_with(&path, old, 9, root).unwrap();
            w.write_range(0, &ds).unwrap();
            let mut map = w.finish().unwrap();

            map.resize(new_size).unwrap();
            let new = Geometry::new(new_size, BS);
            prop_assert_eq!(map.geometry(), new);
            prop_assert_eq!(map.point(), Some(9));
            prop_assert_eq!(map.root(), Some(root));
            prop_assert!(map.is_consistent());
            drop(map);

            let map = BlockMap::open(&path).unwrap().unwrap();
            let zero = ZeroDigests::new(new_size, BS);
            for i in 0..new.block_count {
                let want = if i < old.block_count { ds[i as usize] } else { zero.for_block(i) };
                prop_assert_eq!(map.get(i), want, "block {}", i);
            }
        }

        #[test]
        fn root_of_entries_matches_block_by_block(n in 0u64..600) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("blockmap");
            let g = Geometry::new(n * u64::from(BS), BS);
            let ds = digests(n, 4);
            let root = root_by_blocks(&ds);
            let mut w = BlockMap::create_with(&path, g, 1, root).unwrap();
            w.write_range(0, &ds).unwrap();
            let map = w.finish().unwrap();
            prop_assert_eq!(map.compute_root(), root);
        }
    }
}
