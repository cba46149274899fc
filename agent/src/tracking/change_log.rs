//! The change log: which blocks a sync session sent, and with which digest.
//!
//! While a session runs, the sync engine appends a record for every block it
//! sends, in block order, and syncs the log before it relies on the
//! controller's acknowledgement. When a connection drops, the session resumes
//! where the controller's acknowledgement stood: [`ChangeLog::truncate_from`]
//! drops the records from there on, and they are sent again. When the
//! controller has committed the point, the log is sealed with the point's
//! index root and applied to the block map (`BlockMap::apply`); the map never
//! advances on a point the controller did not commit.
//!
//! # File format (`<state_dir>/disks/<disk_id>/changes.log`, little-endian)
//!
//! ```text
//! offset size  field
//!      0    8  magic       b"TDLCLOG1"
//!      8    4  version     u32 = 1
//!     12    4  block_size  u32, a valid block size
//!     16    8  disk_size   u64, at most MAX_DISK_SIZE
//!     24    8  session     u64, the session that writes the log
//!     32    8  point       u64, the recovery point the session creates
//!     40    8  base_point  u64, the point the changes are relative to (0 = none)
//!     48    8  check       u64, first 8 bytes (LE) of BLAKE3(bytes 0..48)
//!     56    8  reserved    zero
//!     64  40×n records     block u64, digest [32]; blocks strictly ascending
//!                          and below the block count
//!   [last 40   seal]       block = u64::MAX, digest = the point's index root
//! ```
//!
//! # Atomicity
//!
//! The header is written to `changes.log.tmp`, fsynced and renamed into
//! place (directory fsynced), so a log either exists with a whole header or
//! not at all. Records are appended: records after the last
//! [`ChangeLog::sync`] may be lost in a crash, and a crash can leave a torn
//! last record, or (on filesystems that extend a file before its data is
//! written) trailing records of zeros. [`ChangeLog::open`] truncates the file
//! to whole records and drops trailing all-zero records: no real record is
//! all zeros, as no block's BLAKE3 digest is.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tideline_protocol::{Digest, Geometry};

use super::{check_geometry, header_check, io_err, sync_parent, tmp_path, TrackingError};

/// Magic at the start of a change log.
pub const MAGIC: [u8; 8] = *b"TDLCLOG1";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// Length of the header; records start here.
pub const HEADER_LEN: u64 = 64;
/// Length of one record.
pub const RECORD_LEN: u64 = 40;
/// Block number of the seal record.
pub const SEAL_BLOCK: u64 = u64::MAX;

const CHECKED_LEN: usize = 48;
/// Appended records are buffered up to this many bytes before a write.
const WRITE_BUFFER: usize = 4096 * RECORD_LEN as usize;
/// Records read per `pread` when iterating.
const READ_RECORDS: usize = 1024;

fn encode_record(block: u64, digest: &Digest) -> [u8; RECORD_LEN as usize] {
    let mut r = [0u8; RECORD_LEN as usize];
    r[..8].copy_from_slice(&block.to_le_bytes());
    r[8..].copy_from_slice(&digest.0);
    r
}

fn decode_record(r: &[u8]) -> (u64, Digest) {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r[..8]);
    let mut d = [0u8; 32];
    d.copy_from_slice(&r[8..40]);
    (u64::from_le_bytes(b), Digest(d))
}

/// The change log of one disk's sync session.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
    file: File,
    geometry: Geometry,
    session: u64,
    point: u64,
    base_point: u64,
    /// Bytes of the file written (header and records), excluding `pending`.
    written: u64,
    /// Encoded records not yet written.
    pending: Vec<u8>,
    /// The last record's block, seal excluded.
    last_block: Option<u64>,
    sealed: Option<Digest>,
}

impl ChangeLog {
    /// Creates an empty log at `path` for `session`, which creates `point`
    /// relative to `base_point` (0 = none) on a disk of `geometry`. Replaces
    /// any existing log.
    pub fn create(
        path: &Path,
        session: u64,
        point: u64,
        base_point: u64,
        geometry: Geometry,
    ) -> Result<ChangeLog, TrackingError> {
        check_geometry(path, &geometry)?;
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&geometry.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&geometry.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&session.to_le_bytes());
        h[32..40].copy_from_slice(&point.to_le_bytes());
        h[40..48].copy_from_slice(&base_point.to_le_bytes());
        let check = header_check(&h[..CHECKED_LEN]);
        h[48..56].copy_from_slice(&check.to_le_bytes());

        let tmp = tmp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let written = file
            .write_all_at(&h, 0)
            .map_err(io_err("write", &tmp))
            .and_then(|()| file.sync_all().map_err(io_err("fsync", &tmp)))
            .and_then(|()| fs::rename(&tmp, path).map_err(io_err("rename into place", path)));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_parent(path)?;
        Ok(ChangeLog {
            path: path.to_path_buf(),
            file,
            geometry,
            session,
            point,
            base_point,
            written: HEADER_LEN,
            pending: Vec::new(),
            last_block: None,
            sealed: None,
        })
    }

    /// Opens the log at `path`; `None` if there is none. A torn last record
    /// (and trailing all-zero records) are dropped and the file truncated to
    /// the records that remain. A bad header is an error naming the file.
    pub fn open(path: &Path) -> Result<Option<ChangeLog>, TrackingError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open change log", path)(e)),
        };
        let corrupt = |reason: String| TrackingError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let len = file
            .metadata()
            .map_err(io_err("inspect change log", path))?
            .len();
        if len < HEADER_LEN {
            return Err(corrupt(format!("{len} bytes is shorter than the header")));
        }
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(io_err("read change log header", path))?;
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        if h[0..8] != MAGIC {
            return Err(TrackingError::BadMagic {
                path: path.to_path_buf(),
                kind: "change log",
            });
        }
        if u32_at(8) != VERSION {
            return Err(TrackingError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: u32_at(8),
            });
        }
        if u64_at(48) != header_check(&h[..CHECKED_LEN]) {
            return Err(TrackingError::BadCheck {
                path: path.to_path_buf(),
            });
        }
        let geometry = Geometry::new(u64_at(16), u32_at(12));
        check_geometry(path, &geometry)?;

        let mut log = ChangeLog {
            path: path.to_path_buf(),
            file,
            geometry,
            session: u64_at(24),
            point: u64_at(32),
            base_point: u64_at(40),
            written: HEADER_LEN,
            pending: Vec::new(),
            last_block: None,
            sealed: None,
        };

        // Whole records only, then no trailing zero records.
        let mut count = (len - HEADER_LEN) / RECORD_LEN;
        let mut last = None;
        while count > 0 {
            let (block, digest) = log.read_record(count - 1)?;
            if block == 0 && digest == Digest::default() {
                count -= 1;
            } else {
                last = Some((block, digest));
                break;
            }
        }
        log.written = HEADER_LEN + count * RECORD_LEN;
        if log.written != len {
            log.file
                .set_len(log.written)
                .map_err(io_err("truncate torn tail of", path))?;
            log.file.sync_data().map_err(io_err("fsync", path))?;
        }

        let in_range = |block: u64| block < geometry.block_count;
        match last {
            None => {}
            Some((SEAL_BLOCK, root)) => {
                log.sealed = Some(root);
                if count >= 2 {
                    let (block, _) = log.read_record(count - 2)?;
                    if !in_range(block) {
                        return Err(corrupt(format!("record {} has block {block}", count - 2)));
                    }
                    log.last_block = Some(block);
                }
            }
            Some((block, _)) if in_range(block) => log.last_block = Some(block),
            Some((block, _)) => {
                return Err(corrupt(format!("record {} has block {block}", count - 1)));
            }
        }
        Ok(Some(log))
    }

    /// Record `index` as written in the file.
    fn read_record(&self, index: u64) -> Result<(u64, Digest), TrackingError> {
        let mut r = [0u8; RECORD_LEN as usize];
        self.file
            .read_exact_at(&mut r, HEADER_LEN + index * RECORD_LEN)
            .map_err(io_err("read change log", &self.path))?;
        Ok(decode_record(&r))
    }

    /// The file this log lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The session that writes the log.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The recovery point the session creates.
    pub fn point(&self) -> u64 {
        self.point
    }

    /// The point the changes are relative to (0 = none).
    pub fn base_point(&self) -> u64 {
        self.base_point
    }

    /// The disk geometry of the session.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The index root the log was sealed with, once the point is committed.
    pub fn sealed_root(&self) -> Option<Digest> {
        self.sealed
    }

    /// Records that `block` was sent with `digest`. Buffered: durable after
    /// the next [`ChangeLog::sync`]. Blocks must strictly ascend and be
    /// within the disk; a sealed log takes no more records.
    pub fn append(&mut self, block: u64, digest: Digest) -> Result<(), TrackingError> {
        if self.sealed.is_some() {
            return Err(TrackingError::Sealed {
                path: self.path.clone(),
            });
        }
        if block >= self.geometry.block_count {
            return Err(TrackingError::BlockOutOfRange {
                path: self.path.clone(),
                block,
                block_count: self.geometry.block_count,
            });
        }
        if let Some(previous) = self.last_block {
            if block <= previous {
                return Err(TrackingError::OutOfOrder {
                    path: self.path.clone(),
                    previous,
                    block,
                });
            }
        }
        self.pending
            .extend_from_slice(&encode_record(block, &digest));
        self.last_block = Some(block);
        if self.pending.len() >= WRITE_BUFFER {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Writes buffered records to the file (not yet durable). On failure
    /// they stay buffered and the next call writes them at the same offset.
    fn write_pending(&mut self) -> Result<(), TrackingError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.pending, self.written)
            .map_err(io_err("append to", &self.path))?;
        self.written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Writes buffered records and makes them durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), TrackingError> {
        self.write_pending()?;
        self.file.sync_data().map_err(io_err("fsync", &self.path))
    }

    /// Drops every record of block `block` or later, and the seal, durably:
    /// the session resumes sending from `block`.
    pub fn truncate_from(&mut self, block: u64) -> Result<(), TrackingError> {
        self.write_pending()?;
        // Records ascend (and the seal is last, at u64::MAX), so the first
        // record at or past `block` is found by bisection.
        let (mut lo, mut hi) = (0u64, (self.written - HEADER_LEN) / RECORD_LEN);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.read_record(mid)?.0 < block {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        self.written = HEADER_LEN + lo * RECORD_LEN;
        self.file
            .set_len(self.written)
            .map_err(io_err("truncate", &self.path))?;
        self.file.sync_data().map_err(io_err("fsync", &self.path))?;
        self.sealed = None;
        self.last_block = match lo {
            0 => None,
            n => Some(self.read_record(n - 1)?.0),
        };
        Ok(())
    }

    /// Seals the log with the committed point's index root and syncs it.
    pub fn seal(&mut self, root: Digest) -> Result<(), TrackingError> {
        if self.sealed.is_some() {
            return Err(TrackingError::Sealed {
                path: self.path.clone(),
            });
        }
        self.pending
            .extend_from_slice(&encode_record(SEAL_BLOCK, &root));
        self.sealed = Some(root);
        self.sync()
    }

    /// The records in block order, buffered ones included, the seal
    /// excluded. Streams the file in fixed-size batches: memory stays
    /// bounded whatever the log's length. Records that do not ascend, lie
    /// past the disk or follow the seal are a `Corrupt` error, after which
    /// the iterator ends.
    pub fn records(&self) -> Records<'_> {
        Records {
            log: self,
            next: 0,
            file_records: (self.written - HEADER_LEN) / RECORD_LEN,
            total: (self.written - HEADER_LEN) / RECORD_LEN
                + (self.pending.len() as u64) / RECORD_LEN,
            batch: Vec::new(),
            batch_start: 0,
            previous: None,
            done: false,
        }
    }

    /// Deletes the log (after it was applied, or when its session is
    /// abandoned).
    pub fn remove(self) -> Result<(), TrackingError> {
        fs::remove_file(&self.path).map_err(io_err("remove", &self.path))?;
        sync_parent(&self.path)
    }
}

/// Iterator over a change log's records; see [`ChangeLog::records`].
#[derive(Debug)]
pub struct Records<'a> {
    log: &'a ChangeLog,
    /// Index of the next record.
    next: u64,
    /// Records in the file (the rest are buffered in memory).
    file_records: u64,
    total: u64,
    /// Raw records read from the file, starting at record `batch_start`.
    batch: Vec<u8>,
    batch_start: u64,
    previous: Option<u64>,
    done: bool,
}

impl Records<'_> {
    fn raw(&mut self, index: u64) -> Result<[u8; RECORD_LEN as usize], TrackingError> {
        let rl = RECORD_LEN as usize;
        let mut r = [0u8; RECORD_LEN as usize];
        if index >= self.file_records {
            let o = (index - self.file_records) as usize * rl;
            r.copy_from_slice(&self.log.pending[o..o + rl]);
            return Ok(r);
        }
        let in_batch = (self.batch.len() / rl) as u64;
        if index < self.batch_start || index >= self.batch_start + in_batch {
            let n = (self.file_records - index).min(READ_RECORDS as u64) as usize;
            self.batch.resize(n * rl, 0);
            self.log
                .file
                .read_exact_at(&mut self.batch, HEADER_LEN + index * RECORD_LEN)
                .map_err(io_err("read change log", &self.log.path))?;
            self.batch_start = index;
        }
        let o = (index - self.batch_start) as usize * rl;
        r.copy_from_slice(&self.batch[o..o + rl]);
        Ok(r)
    }

    fn step(&mut self) -> Result<Option<(u64, Digest)>, TrackingError> {
        if self.next >= self.total {
            return Ok(None);
        }
        let index = self.next;
        self.next += 1;
        let (block, digest) = decode_record(&self.raw(index)?);
        let corrupt = |reason: String| TrackingError::Corrupt {
            path: self.log.path.clone(),
            reason,
        };
        if block == SEAL_BLOCK {
            if self.next != self.total {
                return Err(corrupt(format!(
                    "record {index} is a seal but not the last"
                )));
            }
            return Ok(None);
        }
        if block >= self.log.geometry.block_count {
            return Err(corrupt(format!(
                "record {index} has block {block}, past the disk's {} blocks",
                self.log.geometry.block_count
            )));
        }
        if let Some(previous) = self.previous {
            if block <= previous {
                return Err(corrupt(format!(
                    "record {index} has block {block} after block {previous}"
                )));
            }
        }
        self.previous = Some(block);
        Ok(Some((block, digest)))
    }
}

impl Iterator for Records<'_> {
    type Item = Result<(u64, Digest), TrackingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.step();
        if !matches!(item, Ok(Some(_))) {
            self.done = true;
        }
        item.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const BS: u32 = 4096;

    fn geometry() -> Geometry {
        Geometry::new(100_000 * u64::from(BS), BS)
    }

    fn collect(log: &ChangeLog) -> Vec<(u64, Digest)> {
        log.records().collect::<Result<_, _>>().unwrap()
    }

    fn d(block: u64) -> Digest {
        Digest::of(&block.to_le_bytes())
    }

    #[test]
    fn create_open_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        assert!(ChangeLog::open(&path).unwrap().is_none());
        let mut log = ChangeLog::create(&path, 11, 12, 10, geometry()).unwrap();
        for b in [0, 5, 99_999] {
            log.append(b, d(b)).unwrap();
        }
        // Buffered records are visible before they are written.
        assert_eq!(collect(&log).len(), 3);
        log.sync().unwrap();
        drop(log);

        let log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(
            (log.session(), log.point(), log.base_point(), log.geometry()),
            (11, 12, 10, geometry())
        );
        assert_eq!(log.sealed_root(), None);
        assert_eq!(
            collect(&log),
            vec![(0, d(0)), (5, d(5)), (99_999, d(99_999))]
        );
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            HEADER_LEN + 3 * RECORD_LEN
        );
    }

    #[test]
    fn create_replaces_an_existing_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        let mut log = ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap();
        log.append(1, d(1)).unwrap();
        log.seal(d(9)).unwrap();
        let log = ChangeLog::create(&path, 2, 3, 2, geometry()).unwrap();
        drop(log);
        let log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(log.session(), 2);
        assert!(collect(&log).is_empty());
        assert_eq!(log.sealed_root(), None);
    }

    #[test]
    fn ascending_order_and_range_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        let mut log = ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap();
        log.append(7, d(7)).unwrap();
        assert!(matches!(
            log.append(7, d(7)),
            Err(TrackingError::OutOfOrder {
                previous: 7,
                block: 7,
                ..
            })
        ));
        assert!(matches!(
            log.append(3, d(3)),
            Err(TrackingError::OutOfOrder { .. })
        ));
        assert!(matches!(
            log.append(100_000, d(0)),
            Err(TrackingError::BlockOutOfRange { .. })
        ));
        log.sync().unwrap();
        drop(log);
        // The order survives a reopen.
        let mut log = ChangeLog::open(&path).unwrap().unwrap();
        assert!(matches!(
            log.append(6, d(6)),
            Err(TrackingError::OutOfOrder { previous: 7, .. })
        ));
        log.append(8, d(8)).unwrap();
    }

    #[test]
    fn torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        let mut log = ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap();
        for b in 0..10 {
            log.append(b * 3, d(b * 3)).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let full = fs::read(&path).unwrap();

        // A partial record.
        let mut torn = full.clone();
        torn.extend_from_slice(&encode_record(40, &d(40))[..17]);
        fs::write(&path, &torn).unwrap();
        let mut log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(collect(&log).len(), 10);
        assert_eq!(fs::metadata(&path).unwrap().len(), full.len() as u64);
        log.append(28, d(28)).unwrap();

        // Zero-filled records past the data (extended but never written).
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0u8; 2 * RECORD_LEN as usize + 5]);
        fs::write(&path, &zeros).unwrap();
        let log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(collect(&log).last(), Some(&(27, d(27))));
        assert_eq!(fs::metadata(&path).unwrap().len(), full.len() as u64);
    }

    #[test]
    fn corrupt_header_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        drop(ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap());
        let good = fs::read(&path).unwrap();
        for (at, is_check) in [(0, false), (20, true), (35, true), (50, true)] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            let err = ChangeLog::open(&path).unwrap_err();
            assert_eq!(
                matches!(err, TrackingError::BadCheck { .. }),
                is_check,
                "{err}"
            );
            assert!(err.to_string().contains("changes.log"), "{err}");
        }
        fs::write(&path, &good[..40]).unwrap();
        assert!(matches!(
            ChangeLog::open(&path),
            Err(TrackingError::Corrupt { .. })
        ));
    }

    #[test]
    fn seal_is_final_until_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        let mut log = ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap();
        log.append(1, d(1)).unwrap();
        log.append(2, d(2)).unwrap();
        let root = Digest::of(b"root");
        log.seal(root).unwrap();
        assert!(matches!(
            log.append(3, d(3)),
            Err(TrackingError::Sealed { .. })
        ));
        assert!(matches!(log.seal(root), Err(TrackingError::Sealed { .. })));
        assert_eq!(log.sealed_root(), Some(root));
        drop(log);

        let mut log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(log.sealed_root(), Some(root));
        assert_eq!(collect(&log), vec![(1, d(1)), (2, d(2))]);
        assert!(matches!(
            log.append(3, d(3)),
            Err(TrackingError::Sealed { .. })
        ));

        // Truncating past the last record only drops the seal.
        log.truncate_from(3).unwrap();
        assert_eq!(log.sealed_root(), None);
        log.append(3, d(3)).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(collect(&log).len(), 3);
        log.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn records_after_the_seal_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        let mut log = ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap();
        log.append(1, d(1)).unwrap();
        log.seal(d(0)).unwrap();
        drop(log);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&encode_record(5, &d(5)));
        fs::write(&path, &bytes).unwrap();
        let log = ChangeLog::open(&path).unwrap().unwrap();
        let items: Vec<_> = log.records().collect();
        assert_eq!(items.len(), 2);
        assert!(matches!(items[1], Err(TrackingError::Corrupt { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn truncate_from_keeps_exactly_the_earlier_records(
            blocks in proptest::collection::btree_set(0u64..100_000, 0..3000),
            cut in 0u64..100_001,
            sealed: bool,
            reopen: bool,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("changes.log");
            let mut log = ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap();
            let want: BTreeMap<u64, Digest> = blocks.iter().map(|&b| (b, d(b))).collect();
            for (&b, &dg) in &want {
                log.append(b, dg).unwrap();
            }
            if sealed {
                log.seal(d(u64::MAX)).unwrap();
            } else {
                log.sync().unwrap();
            }
            if reopen {
                drop(log);
                log = ChangeLog::open(&path).unwrap().unwrap();
                prop_assert_eq!(log.sealed_root().is_some(), sealed);
            }
            prop_assert_eq!(collect(&log), want.iter().map(|(&b, &d)| (b, d)).collect::<Vec<_>>());

            log.truncate_from(cut).unwrap();
            prop_assert_eq!(log.sealed_root(), None);
            let kept: Vec<(u64, Digest)> = want.range(..cut).map(|(&b, &d)| (b, d)).collect();
            prop_assert_eq!(collect(&log), kept.clone());
            // Appending resumes right after the last kept block.
            if let Some(&(last, _)) = kept.last() {
                prop_assert!(log.append(last, d(last)).is_err());
            }
            if cut < 100_000 {
                log.append(cut, d(cut)).unwrap();
            }
        }
    }
}
