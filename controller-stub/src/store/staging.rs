//! The staging log: the blocks a session has recorded for a point that is
//! not committed yet, `staging/<agent>/<disk>/<point:016x>.log`.
//!
//! Recording a block appends a fixed-size record, so memory stays bounded
//! whatever the number of changed blocks, and a session that drops can
//! resume: `begin_point` reopens a log whose header matches the new
//! session's parameters and keeps its valid prefix.
//!
//! A point's blocks arrive in *rounds* (protocol §6.4): round 0 is the first
//! copy, and each later round copies again the blocks that changed while
//! the previous one ran. A block of a later round replaces the same block
//! of an earlier one. The log keeps the rounds in order, each one ascending,
//! and [`StagingLog::merged`] reads them back as one ascending list in
//! which the latest round wins, merging the rounds' runs without holding
//! them in memory.
//!
//! # Layout (integers little-endian)
//!
//! Header, 48 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"TDLSTG02"` |
//! | 8 | 8 | point id |
//! | 16 | 8 | base point id, `u64::MAX` for none |
//! | 24 | 8 | disk size |
//! | 32 | 4 | block size |
//! | 36 | 4 | reserved, zero |
//! | 40 | 4 | CRC32 of bytes 0..40 |
//! | 44 | 4 | reserved, zero |
//!
//! then records of 40 bytes: block number (u64), digest (32 bytes). Round 0
//! starts right after the header. A *round marker* (block `u64::MAX`, the
//! round number as u32 in the first 4 bytes of the digest, the other 28
//! zero) starts the next round; markers number rounds 1, 2, … in order,
//! below `MAX_ROUNDS`. Within a round, blocks are strictly ascending.
//!
//! The log is made durable by `PointBuilder::checkpoint` (flush, fsync,
//! after the packs); records past the last checkpoint may be lost or torn
//! by a crash, so a reopened log is cut at its first record that is torn,
//! out of order, out of range, a marker out of sequence, or names a chunk
//! the store does not hold. The log is removed after the point is committed
//! (or aborted).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tideline_protocol::limits::MAX_ROUNDS;
use tideline_protocol::{Digest, Position};

use super::error::{io_err, StoreError};
use super::{fsutil, PointId};

const MAGIC: &[u8; 8] = b"TDLSTG02";
/// Length of the header.
pub(crate) const HEADER_LEN: u64 = 48;
/// Length of one record.
pub(crate) const RECORD_LEN: u64 = 40;
const READ_BATCH: usize = 1024 * RECORD_LEN as usize;
/// Block number of a round marker.
const ROUND_MARK: u64 = u64::MAX;

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

fn encode_record(rec: &Record) -> [u8; RECORD_LEN as usize] {
    let mut b = [0u8; RECORD_LEN as usize];
    b[..8].copy_from_slice(&rec.block.to_le_bytes());
    b[8..].copy_from_slice(&rec.digest.0);
    b
}

fn round_marker(round: u32) -> Record {
    let mut d = [0u8; 32];
    d[..4].copy_from_slice(&round.to_le_bytes());
    Record {
        block: ROUND_MARK,
        digest: Digest(d),
    }
}

/// The round a marker record starts, if it is a well-formed marker.
fn marker_round(rec: &Record) -> Option<u32> {
    if rec.block != ROUND_MARK || rec.digest.0[4..].iter().any(|&b| b != 0) {
        return None;
    }
    let mut r = [0u8; 4];
    r.copy_from_slice(&rec.digest.0[..4]);
    Some(u32::from_le_bytes(r))
}

/// The records of one round: `count` records from record index `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Round {
    number: u32,
    first: u64,
    count: u64,
    last: Option<u64>,
}

impl Round {
    fn start(number: u32, first: u64) -> Round {
        Round {
            number,
            first,
            count: 0,
            last: None,
        }
    }
}

/// An open staging log.
pub(crate) struct StagingLog {
    path: PathBuf,
    out: BufWriter<File>,
    /// Records in the file, markers included.
    total: u64,
    /// The rounds, in order; never empty (round 0 always exists).
    rounds: Vec<Round>,
}

impl StagingLog {
    /// Opens the log at `path`, resuming it if its header matches `params`
    /// (keeping the prefix of well-ordered records `valid` accepts), or
    /// starting it afresh otherwise.
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
        let (total, rounds) = if resumable {
            let (total, rounds) = scan_valid_prefix(&file, path, len, &mut valid)?;
            let keep = HEADER_LEN + total * RECORD_LEN;
            if keep != len {
                tracing::warn!(
                    log = %path.display(),
                    kept = total,
                    "staging log cut after its last valid record"
                );
                file.set_len(keep).map_err(io_err(path))?;
            }
            (total, rounds)
        } else {
            if len > 0 {
                tracing::info!(log = %path.display(), "staging log of other parameters restarted");
            }
            file.set_len(0).map_err(io_err(path))?;
            file.write_all_at(&header, 0).map_err(io_err(path))?;
            (0, vec![Round::start(0, 0)])
        };
        file.sync_all().map_err(io_err(path))?;
        fsutil::fsync_dir(&fsutil::parent_of(path))?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        out.seek(SeekFrom::Start(HEADER_LEN + total * RECORD_LEN))
            .map_err(io_err(path))?;
        Ok(StagingLog {
            path: path.to_path_buf(),
            out,
            total,
            rounds,
        })
    }

    fn current(&self) -> &Round {
        // `rounds` is never empty: round 0 exists from the start.
        &self.rounds[self.rounds.len() - 1]
    }

    /// Block records in every round (a block recorded in two rounds counts
    /// twice).
    pub fn count(&self) -> u64 {
        self.rounds.iter().map(|r| r.count).sum()
    }

    /// The round being recorded.
    pub fn round(&self) -> u32 {
        self.current().number
    }

    /// Block of the last record of the current round.
    pub fn last(&self) -> Option<u64> {
        self.current().last
    }

    /// Appends a record to the current round (buffered). The caller checks
    /// the order.
    pub fn append(&mut self, rec: &Record) -> Result<(), StoreError> {
        self.out
            .write_all(&encode_record(rec))
            .map_err(io_err(&self.path))?;
        self.total += 1;
        let last = self.rounds.len() - 1;
        let r = &mut self.rounds[last];
        r.count += 1;
        r.last = Some(rec.block);
        Ok(())
    }

    /// Starts round `round`, which must follow the current one.
    pub fn begin_round(&mut self, round: u32) -> Result<(), StoreError> {
        let current = self.round();
        if round != current + 1 || round >= MAX_ROUNDS {
            return Err(StoreError::RoundOrder { round, current });
        }
        self.out
            .write_all(&encode_record(&round_marker(round)))
            .map_err(io_err(&self.path))?;
        self.total += 1;
        self.rounds.push(Round::start(round, self.total));
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

    /// Drops every record at or after position `at`: later rounds, and the
    /// blocks `>= at.block` of round `at.round` (records are fixed-size and
    /// ascending within a round, so a binary search finds the cut). A
    /// position in a round the log never started is refused.
    pub fn truncate_from(&mut self, at: Position) -> Result<(), StoreError> {
        self.flush()?;
        let Some(keep_rounds) = self.rounds.iter().position(|r| r.number == at.round) else {
            return Err(StoreError::RoundOrder {
                round: at.round,
                current: self.round(),
            });
        };
        self.rounds.truncate(keep_rounds + 1);
        let round = self.rounds[keep_rounds];
        let file = self.out.get_ref();
        let read_block = |i: u64| -> Result<u64, StoreError> {
            let mut b = [0u8; 8];
            file.read_exact_at(&mut b, HEADER_LEN + i * RECORD_LEN)
                .map_err(io_err(&self.path))?;
            Ok(u64::from_le_bytes(b))
        };
        // First record of the round whose block is >= `at.block`.
        let (mut lo, mut hi) = (round.first, round.first + round.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if read_block(mid)? < at.block {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let last = if lo == round.first {
            None
        } else {
            Some(read_block(lo - 1)?)
        };
        let end = HEADER_LEN + lo * RECORD_LEN;
        file.set_len(end).map_err(io_err(&self.path))?;
        self.out
            .seek(SeekFrom::Start(end))
            .map_err(io_err(&self.path))?;
        self.total = lo;
        let r = &mut self.rounds[keep_rounds];
        r.count = lo - r.first;
        r.last = last;
        Ok(())
    }

    /// Reads every round back as one list ascending by block in which the
    /// latest round's record of a block wins (flush first).
    pub fn merged(&mut self) -> Result<MergedRecords<'_>, StoreError> {
        self.flush()?;
        let file = self.out.get_ref();
        let path = self.path.as_path();
        let mut cursors = Vec::with_capacity(self.rounds.len());
        let mut heads = Vec::with_capacity(self.rounds.len());
        for r in &self.rounds {
            let mut c = RecordCursor::new(file, path, r.first, r.first + r.count);
            heads.push(c.next_record()?);
            cursors.push(c);
        }
        Ok(MergedRecords { cursors, heads })
    }

    /// Removes the log file.
    pub fn remove(self) -> Result<(), StoreError> {
        let path = self.path.clone();
        drop(self.out.into_inner());
        fsutil::remove_if_exists(&path)?;
        fsutil::fsync_dir(&fsutil::parent_of(&path))
    }
}

/// Counts the valid prefix of the records of `file` and finds its rounds.
fn scan_valid_prefix(
    file: &File,
    path: &Path,
    len: u64,
    valid: &mut impl FnMut(&Record) -> bool,
) -> Result<(u64, Vec<Round>), StoreError> {
    let whole = (len - HEADER_LEN) / RECORD_LEN;
    let mut cursor = RecordCursor::new(file, path, 0, whole);
    let mut rounds = vec![Round::start(0, 0)];
    let mut total = 0;
    while let Some(rec) = cursor.next_record()? {
        let last = rounds.len() - 1;
        let current = &mut rounds[last];
        if rec.block == ROUND_MARK {
            match marker_round(&rec) {
                Some(n) if n == current.number + 1 && n < MAX_ROUNDS => {
                    total += 1;
                    rounds.push(Round::start(n, total));
                    continue;
                }
                _ => break,
            }
        }
        if current.last.is_some_and(|l| rec.block <= l) || !valid(&rec) {
            break;
        }
        total += 1;
        current.count += 1;
        current.last = Some(rec.block);
    }
    Ok((total, rounds))
}

/// Reads the records `[next, end)` in batches with positioned reads (the
/// writer's file position is left alone).
pub(crate) struct RecordCursor<'a> {
    file: &'a File,
    path: &'a Path,
    next: u64,
    end: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<'a> RecordCursor<'a> {
    fn new(file: &'a File, path: &'a Path, first: u64, end: u64) -> RecordCursor<'a> {
        RecordCursor {
            file,
            path,
            next: first,
            end,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The next record, or `None` after the last one.
    pub fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        if self.pos >= self.buf.len() {
            if self.next >= self.end {
                return Ok(None);
            }
            let n = ((self.end - self.next) as usize).min(READ_BATCH / RECORD_LEN as usize);
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

/// The rounds of a log merged into one ascending list, the latest round
/// winning (see [`StagingLog::merged`]). Memory: one read batch per round.
pub(crate) struct MergedRecords<'a> {
    cursors: Vec<RecordCursor<'a>>,
    /// The next record of each round, in round order.
    heads: Vec<Option<Record>>,
}

impl MergedRecords<'_> {
    /// The next block and its digest as of the latest round that recorded
    /// it, or `None` after the last one.
    pub fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        let Some(block) = self.heads.iter().flatten().map(|r| r.block).min() else {
            return Ok(None);
        };
        let mut winner = None;
        for (head, cursor) in self.heads.iter_mut().zip(&mut self.cursors) {
            if let Some(r) = head.filter(|r| r.block == block) {
                // Later rounds come later in `heads`: the last match wins.
                winner = Some(r);
                *head = cursor.next_record()?;
            }
        }
        Ok(winner)
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
        let mut c = log.merged().unwrap();
        let mut out = Vec::new();
        while let Some(r) = c.next_record().unwrap() {
            assert_eq!(r, rec(r.block));
            out.push(r.block);
        }
        out
    }

    fn at(round: u32, block: u64) -> Position {
        Position::new(round, block)
    }

    #[test]
    fn append_truncate_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let mut log = StagingLog::open(&path, params(), |_| true).unwrap();
        for b in [1, 4, 9, 10, 30] {
            log.append(&rec(b)).unwrap();
        }
        log.truncate_from(at(0, 9)).unwrap();
        assert_eq!((log.count(), log.last()), (2, Some(4)));
        log.append(&rec(12)).unwrap();
        assert_eq!(all(&mut log), vec![1, 4, 12]);
        log.truncate_from(at(0, 0)).unwrap();
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

#[cfg(test)]
mod round_tests {
    use super::*;

    fn params() -> LogParams {
        LogParams {
            point: 9,
            base: None,
            disk_size: 1 << 20,
            block_size: 4096,
        }
    }

    /// A record whose digest says which round wrote it.
    fn rec(block: u64, round: u32) -> Record {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&block.to_le_bytes());
        d[8..12].copy_from_slice(&round.to_le_bytes());
        Record {
            block,
            digest: Digest(d),
        }
    }

    fn merged(log: &mut StagingLog) -> Vec<(u64, u32)> {
        let mut m = log.merged().unwrap();
        let mut out = Vec::new();
        while let Some(r) = m.next_record().unwrap() {
            let mut round = [0u8; 4];
            round.copy_from_slice(&r.digest.0[8..12]);
            out.push((r.block, u32::from_le_bytes(round)));
        }
        out
    }

    #[test]
    fn later_rounds_win_and_survive_reopen_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let mut log = StagingLog::open(&path, params(), |_| true).unwrap();
        for b in [1, 3, 5, 7] {
            log.append(&rec(b, 0)).unwrap();
        }
        log.begin_round(1).unwrap();
        for b in [0, 3, 7] {
            log.append(&rec(b, 1)).unwrap();
        }
        log.begin_round(2).unwrap();
        log.append(&rec(3, 2)).unwrap();
        assert!(log.begin_round(4).is_err(), "rounds follow each other");
        assert_eq!(
            merged(&mut log),
            vec![(0, 1), (1, 0), (3, 2), (5, 0), (7, 1)]
        );
        assert_eq!((log.round(), log.last(), log.count()), (2, Some(3), 8));
        log.sync().unwrap();
        drop(log);

        let mut log = StagingLog::open(&path, params(), |_| true).unwrap();
        assert_eq!((log.round(), log.last(), log.count()), (2, Some(3), 8));
        assert_eq!(
            merged(&mut log),
            vec![(0, 1), (1, 0), (3, 2), (5, 0), (7, 1)]
        );
        // Resume in round 1 at block 5: round 2 and block 7 of round 1 go.
        log.truncate_from(Position::new(1, 5)).unwrap();
        assert_eq!((log.round(), log.last()), (1, Some(3)));
        assert_eq!(
            merged(&mut log),
            vec![(0, 1), (1, 0), (3, 1), (5, 0), (7, 0)]
        );
        log.append(&rec(6, 1)).unwrap();
        log.begin_round(2).unwrap();
        assert!(log.truncate_from(Position::new(3, 0)).is_err());
        log.sync().unwrap();
        drop(log);

        // A marker out of sequence ends the valid prefix.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(&encode_record(&round_marker(7)), len)
            .unwrap();
        f.write_all_at(&encode_record(&rec(2, 7)), len + RECORD_LEN)
            .unwrap();
        drop(f);
        let mut log = StagingLog::open(&path, params(), |_| true).unwrap();
        assert_eq!(log.round(), 2);
        assert_eq!(
            merged(&mut log),
            vec![(0, 1), (1, 0), (3, 1), (5, 0), (6, 1), (7, 0)]
        );
    }
}
