//! The change log: which blocks a sync session sent, and with which digest.
//!
//! While a session runs, the sync engine appends a record for every block it
//! sends, and syncs the log before it relies on the controller's
//! acknowledgement. Blocks go in *rounds* (protocol §6.4): round 0 is the
//! first copy, and each later round copies again the blocks that changed
//! while the previous one ran; within a round blocks ascend, and a block of
//! a later round replaces the same block of an earlier one. When a
//! connection drops, the session resumes where the controller's
//! acknowledgement stood: [`ChangeLog::truncate_from`] drops the records from
//! there on, and they are sent again. When the controller has committed the
//! point, the log is sealed with the point's index root and applied to the
//! block map (`BlockMap::apply`); the map never advances on a point the
//! controller did not commit. [`ChangeLog::records`] reads the rounds back
//! merged, ascending, the latest round winning, which is exactly the list
//! of changes the point makes to its base.
//!
//! # File format (`<state_dir>/disks/<disk_id>/changes.log`, little-endian)
//!
//! ```text
//! offset size  field
//!      0    8  magic       b"TDLCLOG2"
//!      8    4  version     u32 = 2
//!     12    4  block_size  u32, a valid block size
//!     16    8  disk_size   u64, at most MAX_DISK_SIZE
//!     24    8  session     u64, the session that writes the log
//!     32    8  point       u64, the recovery point the session creates
//!     40    8  base_point  u64, the point the changes are relative to (0 = none)
//!     48    8  check       u64, first 8 bytes (LE) of BLAKE3(bytes 0..48)
//!     56    8  reserved    zero
//!     64  40×n records     block u64, digest [32]:
//!                          a block of the current round (below the block count,
//!                          strictly ascending within the round), or
//!                          a round marker: block = u64::MAX - 1, digest = the
//!                          round number (u32) then 28 zero bytes; it starts the
//!                          next round (1, 2, … below MAX_ROUNDS)
//!   [last 40   seal]       block = u64::MAX, digest = the point's index root
//! ```
//!
//! Version 1 logs (no rounds) are not read: a session that finds one starts
//! afresh, as it does with any log it cannot use.
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
//! all zeros, as no block's BLAKE3 digest is, and no marker is (its block
//! number is not 0).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tideline_protocol::limits::MAX_ROUNDS;
use tideline_protocol::{Digest, Geometry, Position};

use super::{check_geometry, header_check, io_err, sync_parent, tmp_path, TrackingError};

/// Magic at the start of a change log.
pub const MAGIC: [u8; 8] = *b"TDLCLOG2";
/// The format version written and read.
pub const VERSION: u32 = 2;
/// Length of the header; records start here.
pub const HEADER_LEN: u64 = 64;
/// Length of one record.
pub const RECORD_LEN: u64 = 40;
/// Block number of the seal record.
pub const SEAL_BLOCK: u64 = u64::MAX;
/// Block number of a round marker.
pub const ROUND_BLOCK: u64 = u64::MAX - 1;

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

fn marker_digest(round: u32) -> Digest {
    let mut d = [0u8; 32];
    d[..4].copy_from_slice(&round.to_le_bytes());
    Digest(d)
}

/// The round a marker's digest names, if it is well formed.
fn marker_round(d: &Digest) -> Option<u32> {
    if d.0[4..].iter().any(|&b| b != 0) {
        return None;
    }
    let mut r = [0u8; 4];
    r.copy_from_slice(&d.0[..4]);
    Some(u32::from_le_bytes(r))
}

/// Where one round's block records are: `count` records from record index
/// `first` (markers excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RoundSpan {
    number: u32,
    first: u64,
    count: u64,
    last: Option<u64>,
}

impl RoundSpan {
    fn start(number: u32, first: u64) -> RoundSpan {
        RoundSpan {
            number,
            first,
            count: 0,
            last: None,
        }
    }
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
    /// The rounds, in order; round 0 always exists.
    rounds: Vec<RoundSpan>,
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
            rounds: vec![RoundSpan::start(0, 0)],
            sealed: None,
        })
    }

    /// Opens the log at `path`; `None` if there is none. A torn last record
    /// (and trailing all-zero records) are dropped and the file truncated to
    /// the records that remain. A bad header, or records that break the
    /// format's rules, are an error naming the file.
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
        if h[0..6] != MAGIC[0..6] {
            return Err(TrackingError::BadMagic {
                path: path.to_path_buf(),
                kind: "change log",
            });
        }
        if h[0..8] != MAGIC || u32_at(8) != VERSION {
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
            rounds: vec![RoundSpan::start(0, 0)],
            sealed: None,
        };

        // Whole records only, then no trailing zero records.
        let mut count = (len - HEADER_LEN) / RECORD_LEN;
        while count > 0 {
            let (block, digest) = log.read_record(count - 1)?;
            if block == 0 && digest == Digest::default() {
                count -= 1;
            } else {
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

        // Every record obeys the rules: rounds in sequence, blocks in range
        // and ascending within their round, the seal last.
        let mut buf = Vec::new();
        let mut index = 0u64;
        while index < count {
            let n = (count - index).min(READ_RECORDS as u64);
            buf.resize(n as usize * RECORD_LEN as usize, 0);
            log.file
                .read_exact_at(&mut buf, HEADER_LEN + index * RECORD_LEN)
                .map_err(io_err("read change log", path))?;
            for r in buf.chunks_exact(RECORD_LEN as usize) {
                let (block, digest) = decode_record(r);
                if log.sealed.is_some() {
                    return Err(corrupt(format!("record {index} follows the seal")));
                }
                let current = log.current();
                match block {
                    SEAL_BLOCK => log.sealed = Some(digest),
                    ROUND_BLOCK => match marker_round(&digest) {
                        Some(n) if n == current.number + 1 && n < MAX_ROUNDS => {
                            log.rounds.push(RoundSpan::start(n, index + 1));
                        }
                        _ => {
                            return Err(corrupt(format!(
                                "record {index} is a round marker out of sequence after round {}",
                                current.number
                            )))
                        }
                    },
                    b if b >= geometry.block_count => {
                        return Err(corrupt(format!(
                            "record {index} has block {b}, past the disk's {} blocks",
                            geometry.block_count
                        )));
                    }
                    b if current.last.is_some_and(|l| b <= l) => {
                        return Err(corrupt(format!(
                            "record {index} has block {b} after block {} in round {}",
                            current.last.unwrap_or(0),
                            current.number
                        )));
                    }
                    b => {
                        let last = log.rounds.len() - 1;
                        log.rounds[last].count += 1;
                        log.rounds[last].last = Some(b);
                    }
                }
                index += 1;
            }
        }
        Ok(Some(log))
    }

    fn current(&self) -> RoundSpan {
        // `rounds` is never empty: round 0 exists from the start.
        self.rounds[self.rounds.len() - 1]
    }

    /// Records in the file and in the buffer, markers and seal included.
    fn total_records(&self) -> u64 {
        (self.written - HEADER_LEN + self.pending.len() as u64) / RECORD_LEN
    }

    /// Record `index` as written in the file.
    fn read_record(&self, index: u64) -> Result<(u64, Digest), TrackingError> {
        let mut r = [0u8; RECORD_LEN as usize];
        self.file
            .read_exact_at(&mut r, HEADER_LEN + index * RECORD_LEN)
            .map_err(io_err("read change log", &self.path))?;
        Ok(decode_record(&r))
    }

    /// Reads the raw records `index..index + n` (file or buffer) into `buf`.
    fn read_raw(&self, index: u64, n: usize, buf: &mut Vec<u8>) -> Result<(), TrackingError> {
        let rl = RECORD_LEN as usize;
        buf.resize(n * rl, 0);
        let in_file = (self.written - HEADER_LEN) / RECORD_LEN;
        let from_file = in_file.saturating_sub(index).min(n as u64) as usize;
        if from_file > 0 {
            self.file
                .read_exact_at(&mut buf[..from_file * rl], HEADER_LEN + index * RECORD_LEN)
                .map_err(io_err("read change log", &self.path))?;
        }
        if from_file < n {
            let o = (index + from_file as u64 - in_file) as usize * rl;
            buf[from_file * rl..].copy_from_slice(&self.pending[o..o + (n - from_file) * rl]);
        }
        Ok(())
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

    /// The round being recorded.
    pub fn round(&self) -> u32 {
        self.current().number
    }

    /// The position after the last record: the current round, and the block
    /// after its last one.
    pub fn position(&self) -> Position {
        let c = self.current();
        Position::new(c.number, c.last.map_or(0, |l| l + 1))
    }

    /// Records that `block` was sent with `digest` in the current round.
    /// Buffered: durable after the next [`ChangeLog::sync`]. Blocks must
    /// strictly ascend within the round and be within the disk; a sealed log
    /// takes no more records.
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
        if let Some(previous) = self.current().last {
            if block <= previous {
                return Err(TrackingError::OutOfOrder {
                    path: self.path.clone(),
                    previous,
                    block,
                });
            }
        }
        self.push_raw(block, &digest)?;
        let last = self.rounds.len() - 1;
        self.rounds[last].count += 1;
        self.rounds[last].last = Some(block);
        Ok(())
    }

    /// Starts round `round`, which must follow the current one.
    pub fn begin_round(&mut self, round: u32) -> Result<(), TrackingError> {
        if self.sealed.is_some() {
            return Err(TrackingError::Sealed {
                path: self.path.clone(),
            });
        }
        let current = self.round();
        if round != current + 1 || round >= MAX_ROUNDS {
            return Err(TrackingError::RoundOrder {
                path: self.path.clone(),
                round,
                current,
            });
        }
        self.push_raw(ROUND_BLOCK, &marker_digest(round))?;
        let next = self.total_records();
        self.rounds.push(RoundSpan::start(round, next));
        Ok(())
    }

    fn push_raw(&mut self, block: u64, digest: &Digest) -> Result<(), TrackingError> {
        self.pending
            .extend_from_slice(&encode_record(block, digest));
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

    /// Drops every record at or after position `at` (later rounds, and the
    /// blocks `>= at.block` of round `at.round`) and the seal, durably: the
    /// session resumes sending from `at`. A round the log never started is
    /// refused.
    pub fn truncate_from(&mut self, at: Position) -> Result<(), TrackingError> {
        self.write_pending()?;
        let Some(keep) = self.rounds.iter().position(|r| r.number == at.round) else {
            return Err(TrackingError::RoundOrder {
                path: self.path.clone(),
                round: at.round,
                current: self.round(),
            });
        };
        self.rounds.truncate(keep + 1);
        let span = self.rounds[keep];
        // Records ascend within the round, so the first one at or past
        // `at.block` is found by bisection.
        let (mut lo, mut hi) = (span.first, span.first + span.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.read_record(mid)?.0 < at.block {
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
        let last = match lo {
            n if n == span.first => None,
            n => Some(self.read_record(n - 1)?.0),
        };
        self.rounds[keep].count = lo - span.first;
        self.rounds[keep].last = last;
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

    /// The changes the session made, ascending by block, each block with the
    /// digest of the latest round that sent it; buffered records included,
    /// markers and seal excluded. Streams the file in fixed-size batches,
    /// one per round: memory stays bounded whatever the log's length.
    pub fn records(&self) -> Records<'_> {
        let cursors = self
            .rounds
            .iter()
            .map(|r| RoundCursor {
                next: r.first,
                end: r.first + r.count,
                batch: Vec::new(),
                pos: 0,
            })
            .collect::<Vec<_>>();
        Records {
            log: self,
            heads: vec![None; cursors.len()],
            cursors,
            started: false,
            done: false,
        }
    }

    /// The digests this session sent for the blocks in `ranges` (block
    /// ranges `[first, end)`), as of the latest round that sent each. Costs
    /// a bisection per range and round, then a read of the records inside.
    pub fn sent_in(&self, ranges: &[(u64, u64)]) -> Result<HashMap<u64, Digest>, TrackingError> {
        let mut out = HashMap::new();
        let mut buf = Vec::new();
        for span in &self.rounds {
            for &(first, end) in ranges {
                let (mut lo, mut hi) = (span.first, span.first + span.count);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    self.read_raw(mid, 1, &mut buf)?;
                    if decode_record(&buf).0 < first {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                let span_end = span.first + span.count;
                'range: while lo < span_end {
                    let n = (span_end - lo).min(READ_RECORDS as u64) as usize;
                    self.read_raw(lo, n, &mut buf)?;
                    for r in buf.chunks_exact(RECORD_LEN as usize) {
                        let (block, digest) = decode_record(r);
                        if block >= end {
                            break 'range;
                        }
                        out.insert(block, digest);
                    }
                    lo += n as u64;
                }
            }
        }
        Ok(out)
    }

    /// Deletes the log (after it was applied, or when its session is
    /// abandoned).
    pub fn remove(self) -> Result<(), TrackingError> {
        fs::remove_file(&self.path).map_err(io_err("remove", &self.path))?;
        sync_parent(&self.path)
    }
}

/// Reads one round's records in batches.
#[derive(Debug)]
struct RoundCursor {
    next: u64,
    end: u64,
    batch: Vec<u8>,
    pos: usize,
}

impl RoundCursor {
    fn next_record(&mut self, log: &ChangeLog) -> Result<Option<(u64, Digest)>, TrackingError> {
        let rl = RECORD_LEN as usize;
        if self.pos >= self.batch.len() {
            if self.next >= self.end {
                return Ok(None);
            }
            let n = (self.end - self.next).min(READ_RECORDS as u64) as usize;
            log.read_raw(self.next, n, &mut self.batch)?;
            self.next += n as u64;
            self.pos = 0;
        }
        let r = decode_record(&self.batch[self.pos..self.pos + rl]);
        self.pos += rl;
        Ok(Some(r))
    }
}

/// Iterator over a change log's changes; see [`ChangeLog::records`].
#[derive(Debug)]
pub struct Records<'a> {
    log: &'a ChangeLog,
    cursors: Vec<RoundCursor>,
    /// The next record of each round, in round order.
    heads: Vec<Option<(u64, Digest)>>,
    started: bool,
    done: bool,
}

impl Records<'_> {
    fn step(&mut self) -> Result<Option<(u64, Digest)>, TrackingError> {
        if !self.started {
            self.started = true;
            for (head, c) in self.heads.iter_mut().zip(&mut self.cursors) {
                *head = c.next_record(self.log)?;
            }
        }
        let Some(block) = self.heads.iter().flatten().map(|r| r.0).min() else {
            return Ok(None);
        };
        let mut winner = None;
        for (head, c) in self.heads.iter_mut().zip(&mut self.cursors) {
            if let Some(r) = head.filter(|r| r.0 == block) {
                // Later rounds come later: the last match wins.
                winner = Some(r);
                *head = c.next_record(self.log)?;
            }
        }
        Ok(winner)
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
        log.truncate_from(Position::new(0, 3)).unwrap();
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
        let err = ChangeLog::open(&path).unwrap_err();
        assert!(matches!(err, TrackingError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("follows the seal"), "{err}");
    }

    #[test]
    fn rounds_merge_with_the_latest_winning_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        let mut log = ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap();
        let dr =
            |b: u64, r: u32| Digest::of(&[b.to_le_bytes(), u64::from(r).to_le_bytes()].concat());
        for b in [2, 4, 6, 8] {
            log.append(b, dr(b, 0)).unwrap();
        }
        log.begin_round(1).unwrap();
        assert!(matches!(
            log.begin_round(3),
            Err(TrackingError::RoundOrder { .. })
        ));
        // A later round may go back to earlier blocks.
        for b in [1, 4, 8] {
            log.append(b, dr(b, 1)).unwrap();
        }
        log.begin_round(2).unwrap();
        log.append(4, dr(4, 2)).unwrap();
        assert!(log.append(3, dr(3, 2)).is_err());
        let want = vec![
            (1, dr(1, 1)),
            (2, dr(2, 0)),
            (4, dr(4, 2)),
            (6, dr(6, 0)),
            (8, dr(8, 1)),
        ];
        assert_eq!(collect(&log), want);
        assert_eq!(log.position(), Position::new(2, 5));
        let sent = log.sent_in(&[(0, 5), (8, 9)]).unwrap();
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[&4], dr(4, 2));
        assert_eq!(sent[&8], dr(8, 1));
        log.sync().unwrap();
        drop(log);

        let mut log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(collect(&log), want);
        assert_eq!(log.position(), Position::new(2, 5));
        // Resume in round 1 at block 5: round 2 and round 1's block 8 go.
        log.truncate_from(Position::new(1, 5)).unwrap();
        assert_eq!(log.position(), Position::new(1, 5));
        assert_eq!(
            collect(&log),
            vec![
                (1, dr(1, 1)),
                (2, dr(2, 0)),
                (4, dr(4, 1)),
                (6, dr(6, 0)),
                (8, dr(8, 0))
            ]
        );
        assert!(matches!(
            log.truncate_from(Position::new(4, 0)),
            Err(TrackingError::RoundOrder { .. })
        ));
        log.seal(d(1)).unwrap();
        drop(log);
        let log = ChangeLog::open(&path).unwrap().unwrap();
        assert_eq!(log.sealed_root(), Some(d(1)));
        assert_eq!(log.round(), 1);
    }

    #[test]
    fn a_version_one_log_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        drop(ChangeLog::create(&path, 1, 2, 0, geometry()).unwrap());
        let mut bytes = fs::read(&path).unwrap();
        bytes[0..8].copy_from_slice(b"TDLCLOG1");
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            ChangeLog::open(&path),
            Err(TrackingError::UnsupportedVersion { version: 1, .. })
        ));
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

            log.truncate_from(Position::new(0, cut)).unwrap();
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
