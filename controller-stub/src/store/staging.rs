//! The staging log: the blocks a session has recorded for a point that is
//! not committed yet, `staging/<agent>/<disk>/<point:016x>.log`.
//!
//! Recording a block appends a fixed-size record, so memory stays bounded
//! whatever the number of changed blocks, and a session that drops can
//! resume: `begin_point` reopens a log whose header matches the new
//! session's parameters and keeps its valid prefix.
//!
//! # Layout (integers little-endian)
//!
//! Header, 48 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"TDLSTG01"` |
//! | 8 | 8 | point id |
//! | 16 | 8 | base point id, `u64::MAX` for none |
//! | 24 | 8 | disk size |
//! | 32 | 4 | block size |
//! | 36 | 4 | reserved, zero |
//! | 40 | 4 | CRC32 of bytes 0..40 |
//! | 44 | 4 | reserved, zero |
//!
//! then records of 40 bytes, strictly ascending by block: block number
//! (u64), digest (32 bytes).
//!
//! The log is made durable by `PointBuilder::checkpoint` (flush, fsync,
//! after the packs); records past the last checkpoint may be lost or torn
//! by a crash, so a reopened log is cut at its first record that is torn,
//! out of order, out of range or names a chunk the store does not hold.
//! The log is removed after the point is committed (or aborted).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tideline_protocol::Digest;

use super::error::{io_err, StoreError};
use super::{fsutil, PointId};

const MAGIC: &[u8; 8] = b"TDLSTG01";
/// Length of the header.
pub(crate) const HEADER_LEN: u64 = 48;
/// Length of one record.
pub(crate) const RECORD_LEN: u64 = 40;
const READ_BATCH: usize = 1024 * RECORD_LEN as usize;

/// What a log was started for; a log is resumed only by a session with the
/// same parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LogParams {
    pub point: PointId,
    pub base: Option<PointId>,
    pub disk_size: u64,
    pub block_size: u32,
}

impl LogParams {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&self.point.to_le_bytes());
        h[16..24].copy_from_slice(&self.base.unwrap_or(u64::MAX).to_le_bytes());
        h[24..32].copy_from_slice(&self.disk_size.to_le_bytes());
        h[32..36].copy_from_slice(&self.block_size.to_le_bytes());
        let crc = crc32fast::hash(&h[..40]);
        h[40..44].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

/// One recorded block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub block: u64,
    pub digest: Digest,
}

fn decode_record(b: &[u8]) -> Record {
    let mut n = [0u8; 8];
    n.copy_from_slice(&b[..8]);
    let mut d = [0u8; 32];
    d.copy_from_slice(&b[8..40]);
    Record {
        block: u64::from_le_bytes(n),
        digest: Digest(d),
    }
}

/// An open staging log.
pub(crate) struct StagingLog {
    path: PathBuf,
    out: BufWriter<File>,
    /// Number of records.
    count: u64,
    /// Block of the last record.
    last: Option<u64>,
}

impl StagingLog {
    /// Opens the log at `path`, resuming it if its header matches `params`
    /// (keeping the prefix of records `valid` accepts, in ascending order),
    /// or starting it afresh otherwise.
    pub fn open(
        path: &Path,
        params: LogParams,
        mut valid: impl FnMut(&Record) -> bool,
    ) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        let header = params.encode();
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut existing = [0u8; HEADER_LEN as usize];
        let resumable =
            len >= HEADER_LEN && file.read_exact_at(&mut existing, 0).is_ok() && existing == header;
        let (count, last) = if resumable {
            let (count, last) = scan_valid_prefix(&file, path, len, &mut valid)?;
            let keep = HEADER_LEN + count * RECORD_LEN;
            if keep != len {
                tracing::warn!(
                    log = %path.display(),
                    kept = count,
                    "staging log cut after its last valid record"
                );
                file.set_len(keep).map_err(io_err(path))?;
            }
            (count, last)
        } else {
            if len > 0 {
                tracing::info!(log = %path.display(), "staging log of other parameters restarted");
            }
            file.set_len(0).map_err(io_err(path))?;
            file.write_all_at(&header, 0).map_err(io_err(path))?;
            (0, None)
        };
        file.sync_all().map_err(io_err(path))?;
        fsutil::fsync_dir(&fsutil::parent_of(path))?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        out.seek(SeekFrom::Start(HEADER_LEN + count * RECORD_LEN))
            .map_err(io_err(path))?;
        Ok(StagingLog {
            path: path.to_path_buf(),
            out,
            count,
            last,
        })
    }

    /// Number of records.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Block of the last record.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Appends a record (buffered). The caller checks the order.
    pub fn append(&mut self, rec: &Record) -> Result<(), StoreError> {
        let mut b = [0u8; RECORD_LEN as usize];
        b[..8].copy_from_slice(&rec.block.to_le_bytes());
        b[8..].copy_from_slice(&rec.digest.0);
        self.out.write_all(&b).map_err(io_err(&self.path))?;
        self.count += 1;
        self.last = Some(rec.block);
        Ok(())
    }

    /// Writes out buffered records (not durable yet).
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.out.flush().map_err(io_err(&self.path))
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        self.out.get_ref().sync_data().map_err(io_err(&self.path))
    }

    /// Drops every record for a block `>= block`: records are fixed-size and
    /// ascending, so a binary search finds the cut.
    pub fn truncate_from(&mut self, block: u64) -> Result<(), StoreError> {
        self.flush()?;
        let file = self.out.get_ref();
        let read_block = |i: u64| -> Result<u64, StoreError> {
            let mut b = [0u8; 8];
            file.read_exact_at(&mut b, HEADER_LEN + i * RECORD_LEN)
                .map_err(io_err(&self.path))?;
            Ok(u64::from_le_bytes(b))
        };
        // First record index whose block is >= `block`.
        let (mut lo, mut hi) = (0u64, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if read_block(mid)? < block {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let last = if lo == 0 {
            None
        } else {
            Some(read_block(lo - 1)?)
        };
        let end = HEADER_LEN + lo * RECORD_LEN;
        file.set_len(end).map_err(io_err(&self.path))?;
        self.out
            .seek(SeekFrom::Start(end))
            .map_err(io_err(&self.path))?;
        self.count = lo;
        self.last = last;
        Ok(())
    }

    /// A reader over the records, in order (flush first).
    pub fn records(&mut self) -> Result<RecordCursor<'_>, StoreError> {
        self.flush()?;
        Ok(RecordCursor {
            file: self.out.get_ref(),
            path: &self.path,
            next: 0,
            count: self.count,
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// Removes the log file.
    pub fn remove(self) -> Result<(), StoreError> {
        let path = self.path.clone();
        drop(self.out.into_inner());
        fsutil::remove_if_exists(&path)?;
        fsutil::fsync_dir(&fsutil::parent_of(&path))
    }
}

/// Counts the valid prefix of the records of `file`.
fn scan_valid_prefix(
    file: &File,
    path: &Path,
    len: u64,
    valid: &mut impl FnMut(&Record) -> bool,
) -> Result<(u64, Option<u64>), StoreError> {
    let whole = (len - HEADER_LEN) / RECORD_LEN;
    let mut cursor = RecordCursor {
        file,
        path,
        next: 0,
        count: whole,
        buf: Vec::new(),
        pos: 0,
    };
    let mut count = 0;
    let mut last: Option<u64> = None;
    while let Some(rec) = cursor.next_record()? {
        if last.is_some_and(|l| rec.block <= l) || !valid(&rec) {
            break;
        }
        count += 1;
        last = Some(rec.block);
    }
    Ok((count, last))
}

/// Reads records in batches with positioned reads (the writer's file
/// position is left alone).
pub(crate) struct RecordCursor<'a> {
    file: &'a File,
    path: &'a Path,
    next: u64,
    count: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl RecordCursor<'_> {
    /// The next record, or `None` after the last one.
    pub fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        if self.pos >= self.buf.len() {
            if self.next >= self.count {
                return Ok(None);
            }
            let n = ((self.count - self.next) as usize).min(READ_BATCH / RECORD_LEN as usize);
            self.buf.resize(n * RECORD_LEN as usize, 0);
            self.file
                .read_exact_at(&mut self.buf, HEADER_LEN + self.next * RECORD_LEN)
                .map_err(io_err(self.path))?;
            self.next += n as u64;
            self.pos = 0;
        }
        let rec = decode_record(&self.buf[self.pos..self.pos + RECORD_LEN as usize]);
        self.pos += RECORD_LEN as usize;
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LogParams {
        LogParams {
            point: 7,
            base: Some(3),
            disk_size: 1 << 20,
            block_size: 4096,
        }
    }

    fn rec(block: u64) -> Record {
        Record {
            block,
            digest: Digest::of(&block.to_le_bytes()),
        }
    }

    fn all(log: &mut StagingLog) -> Vec<u64> {
        let mut c = log.records().unwrap();
        let mut out = Vec::new();
        while let Some(r) = c.next_record().unwrap() {
            assert_eq!(r, rec(r.block));
            out.push(r.block);
        }
        out
    }

    #[test]
    fn append_truncate_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let mut log = StagingLog::open(&path, params(), |_| true).unwrap();
        for b in [1, 4, 9, 10, 30] {
            log.append(&rec(b)).unwrap();
        }
        log.truncate_from(9).unwrap();
        assert_eq!((log.count(), log.last()), (2, Some(4)));
        log.append(&rec(12)).unwrap();
        assert_eq!(all(&mut log), vec![1, 4, 12]);
        log.truncate_from(0).unwrap();
        assert_eq!((log.count(), log.last()), (0, None));
        for b in [2, 3, 5] {
            log.append(&rec(b)).unwrap();
        }
        log.sync().unwrap();
        drop(log);

        // Torn tail: half a record.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_LEN + 2 * RECORD_LEN + 17).unwrap();
        let mut log = StagingLog::open(&path, params(), |_| true).unwrap();
        assert_eq!(all(&mut log), vec![2, 3]);
        drop(log);

        // The validator cuts at the first record it refuses.
        let mut log = StagingLog::open(&path, params(), |r| r.block < 3).unwrap();
        assert_eq!(all(&mut log), vec![2]);
        drop(log);

        // Other parameters restart the log.
        let mut other = params();
        other.disk_size += 4096;
        let mut log = StagingLog::open(&path, other, |_| true).unwrap();
        assert_eq!(log.count(), 0);
        assert!(all(&mut log).is_empty());
        log.remove().unwrap();
        assert!(!path.exists());
    }
}
