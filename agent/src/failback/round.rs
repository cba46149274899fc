//! Rounds of a failback pass, and the writer thread that puts them on the
//! target.
//!
//! ```text
//!  pass thread                                  writer thread
//!  ───────────                                  ─────────────
//!  decode + check blocks into round N+1         round N: mark its map entries
//!  (an aligned buffer)                            unknown (msync), write it,
//!  round N+1 full: hand it over ──────────────▶   flush, re-read it, compare
//!    (waits while round N is still written)       byte for byte with what was
//!  ◀──────────────── round N's buffer, reused     written, record the digests
//!                                                 in the map, seal its header
//! ```
//!
//! The pass thread does the CPU work (decompression, digests), the writer
//! thread the device work, side by side. At most two rounds are in memory,
//! and their buffers go round between the threads. Raw files and devices are
//! written and re-read through a second, `O_DIRECT` descriptor
//! ([`DirectIo`]): from the round's aligned buffer to the device and back,
//! with no copy through the page cache (a run that is not aligned, such as a
//! disk's short last block, is written through the page cache and its
//! writeback started at once). The comparison is of bytes: every block's
//! bytes were checked against the point's digest when they arrived, so bytes
//! read back equal to them carry that digest too, without hashing them a
//! second time.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tideline_protocol::message::ErrorCode;
use tideline_protocol::{Digest, Geometry, ZeroDigests};

use super::map::{TargetMap, TargetStamp};
use super::pass::{fail, PassFailure, SlotCounters};
use super::target::{DirectIo, WritableDisk};
use crate::source::{AlignedBuf, DiskSource};

/// Largest piece of a run re-read at once.
const REREAD_BYTES: usize = 4 << 20;

/// One target of a pass, shared by the pass thread and the writer.
pub(super) struct Target {
    /// Target id (configuration).
    pub id: String,
    /// Path or URI.
    pub location: String,
    /// The open target.
    pub disk: Box<dyn WritableDisk>,
    /// `O_DIRECT` access, when the target allows it.
    pub direct: Option<DirectIo>,
    /// Geometry of the point written into it.
    pub geometry: Geometry,
    /// Digests of zero blocks.
    pub zeros: ZeroDigests,
    /// Where its map lives.
    pub map_path: PathBuf,
    /// The map: the last pass's when it vouches for the target, else the
    /// scan's once the target is described.
    pub map: Mutex<Option<TargetMap>>,
}

impl Target {
    /// The map, locked (a poisoned lock is taken as is: the map's own
    /// header and unknown entries keep it safe).
    pub fn map(&self) -> MutexGuard<'_, Option<TargetMap>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A block of a round.
#[derive(Debug, Clone, Copy)]
pub(super) struct RoundBlock {
    /// Block number.
    pub block: u64,
    /// Offset of its bytes in the round's data (unused for zero blocks).
    pub at: usize,
    /// A zero block: written as zeros, holds no data.
    pub zero: bool,
    /// Its digest in the point.
    pub digest: Digest,
}

/// Blocks buffered until they are written together.
#[derive(Debug)]
pub(super) struct Round {
    /// Blocks in arrival order (ascending block numbers).
    pub blocks: Vec<RoundBlock>,
    /// Bytes of the data blocks, back to back, from the start of an aligned
    /// buffer: full blocks keep every run's start aligned for `O_DIRECT`.
    pub data: AlignedBuf,
    /// Bytes of `data` in use.
    pub filled: usize,
}

impl Round {
    /// An empty round whose buffer holds `capacity` bytes.
    pub fn new(capacity: usize) -> Round {
        Round::reusing(AlignedBuf::zeroed(capacity))
    }

    /// An empty round over a buffer of an earlier one.
    pub fn reusing(data: AlignedBuf) -> Round {
        Round {
            blocks: Vec::new(),
            data,
            filled: 0,
        }
    }

    /// Room for `len` more bytes, at the end of the filled part.
    pub fn room(&mut self, len: usize) -> Option<&mut [u8]> {
        let end = self.filled.checked_add(len)?;
        self.data.get_mut(self.filled..end)
    }
}

/// Byte offset where block `end` starts (the disk size past the last).
pub(super) fn end_byte(g: &Geometry, end: u64) -> u64 {
    if end < g.block_count {
        g.offset(end)
    } else {
        g.disk_size
    }
}

/// Index ranges of `blocks` that form runs: consecutive block numbers of
/// the same kind. Data blocks are appended to the round buffer in arrival
/// order, so a run of data blocks is also contiguous in the buffer.
pub(super) fn runs(blocks: &[RoundBlock]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for k in 1..=blocks.len() {
        let breaks = k == blocks.len() || {
            let (prev, b) = (&blocks[k - 1], &blocks[k]);
            b.block != prev.block + 1 || b.zero != prev.zero
        };
        if breaks {
            out.push(start..k);
            start = k;
        }
    }
    out
}

/// Marks the round's blocks unknown in the map (durably), then writes them:
/// runs of data blocks in one write, runs of zero blocks in one zeroing.
/// Returns the bytes written.
pub(super) fn write(t: &Target, round: &Round) -> Result<u64, PassFailure> {
    {
        let mut map = t.map();
        let map = map
            .as_mut()
            .ok_or_else(|| fail(ErrorCode::Internal, format!("target {}: no map", t.id)))?;
        let numbers: Vec<u64> = round.blocks.iter().map(|b| b.block).collect();
        map.invalidate(&numbers)
            .map_err(|e| fail(ErrorCode::Internal, format!("target {}: {e}", t.id)))?;
    }
    let unwritable = |e| fail(ErrorCode::TargetUnwritable, format!("target {}: {e}", t.id));
    let g = &t.geometry;
    let mut written = 0u64;
    for run in runs(&round.blocks) {
        let first = round.blocks[run.start];
        let offset = g.offset(first.block);
        let len = end_byte(g, round.blocks[run.end - 1].block + 1) - offset;
        if first.zero {
            t.disk.write_zeroes(offset, len).map_err(unwritable)?;
        } else {
            let bytes = &round.data[first.at..first.at + len as usize];
            let direct = match &t.direct {
                Some(d) => d.write_at(bytes, offset).map_err(unwritable)?,
                None => false,
            };
            if !direct {
                t.disk.write_all_at(bytes, offset).map_err(unwritable)?;
                t.disk.start_writeback(offset, len);
            }
        }
        written += len;
    }
    Ok(written)
}

/// Flushes the target, re-reads the round from it (in pieces of at most
/// `scratch.len()` bytes) and compares it with what was written; on success
/// records the digests in the map and seals it.
pub(super) fn verify(t: &Target, round: &Round, scratch: &mut [u8]) -> Result<(), PassFailure> {
    t.disk
        .flush()
        .map_err(|e| fail(ErrorCode::TargetUnwritable, format!("target {}: {e}", t.id)))?;
    let reader: &dyn DiskSource = match &t.direct {
        Some(d) => d.reader(),
        None => t.disk.as_ref(),
    };
    let g = &t.geometry;
    for run in runs(&round.blocks) {
        let first = round.blocks[run.start];
        let start = g.offset(first.block);
        let end = end_byte(g, round.blocks[run.end - 1].block + 1);
        // Clean now: dropping cached copies frees memory, and makes a
        // buffered re-read come from the device.
        t.disk.forget_cached(start, end - start);
        let mut at = start;
        while at < end {
            let len = ((end - at) as usize).min(scratch.len());
            let buf = &mut scratch[..len];
            reader.read_exact_at(buf, at).map_err(|e| {
                fail(
                    ErrorCode::VerifyFailed,
                    format!("target {}: re-read failed: {e}", t.id),
                )
            })?;
            let same = if first.zero {
                is_zero(buf)
            } else {
                let from = first.at + (at - start) as usize;
                buf[..] == round.data[from..from + len]
            };
            if !same {
                return Err(mismatch(t, &round.blocks[run.clone()], at, buf));
            }
            at += len as u64;
        }
    }
    let mut map = t.map();
    let map = map
        .as_mut()
        .ok_or_else(|| fail(ErrorCode::Internal, format!("target {}: no map", t.id)))?;
    for b in &round.blocks {
        map.set(b.block, &b.digest);
    }
    let stamp = TargetStamp::of(std::path::Path::new(&t.location), t.disk.size());
    map.seal_header(stamp, true)
        .map_err(|e| fail(ErrorCode::Internal, format!("target {}: {e}", t.id)))
}

/// The failure for a re-read piece (`read`, at byte `at`) that differs from
/// what was written: names the first block wholly inside the piece whose
/// digest differs, else the piece's offset (a block split across two
/// pieces is not hashed).
fn mismatch(t: &Target, run: &[RoundBlock], at: u64, read: &[u8]) -> PassFailure {
    let g = &t.geometry;
    let piece_end = at + read.len() as u64;
    for b in run {
        let (start, end) = (g.offset(b.block), end_byte(g, b.block + 1));
        if start < at || end > piece_end {
            continue;
        }
        let got = Digest::of(&read[(start - at) as usize..(end - at) as usize]);
        if got != b.digest {
            return fail(
                ErrorCode::VerifyFailed,
                format!(
                    "target {} ({}): block {} reads back as {got} after writing {}",
                    t.id, t.location, b.block, b.digest
                ),
            );
        }
    }
    fail(
        ErrorCode::VerifyFailed,
        format!(
            "target {} ({}): bytes at offset {at} read back differ from those written",
            t.id, t.location
        ),
    )
}

/// Whether every byte is zero (64 bytes at a time, which vectorises).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// What the pass thread hands the writer.
enum Job {
    /// Write and verify a round of `slot`.
    Round {
        target: Arc<Target>,
        slot: usize,
        round: Round,
    },
    /// Answer once every round handed over before is written and verified.
    Drain,
}

/// The writer thread: writes and verifies rounds while the next is filled.
pub(super) struct Writer {
    jobs: Option<SyncSender<Job>>,
    results: Receiver<Result<(), PassFailure>>,
    /// Buffers of finished rounds, for the next rounds.
    spare: Receiver<AlignedBuf>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread; it counts written and verified blocks in
    /// `counters`.
    pub fn spawn(counters: Arc<Vec<SlotCounters>>) -> std::io::Result<Writer> {
        // A rendezvous channel: the pass thread waits while a round is
        // written, so at most two rounds are in memory.
        let (jobs, rx) = mpsc::sync_channel::<Job>(0);
        let (results_tx, results) = mpsc::channel();
        let (spare_tx, spare) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("failback-write".into())
            .spawn(move || {
                let mut first_failure: Option<PassFailure> = None;
                let mut scratch = AlignedBuf::zeroed(REREAD_BYTES);
                for job in rx {
                    match job {
                        Job::Round {
                            target,
                            slot,
                            round,
                        } => {
                            if first_failure.is_none() {
                                let c = &counters[slot];
                                let n = round.blocks.len() as u64;
                                let r = write(&target, &round).and_then(|bytes| {
                                    c.written_blocks.fetch_add(n, Ordering::Relaxed);
                                    c.written_bytes.fetch_add(bytes, Ordering::Relaxed);
                                    verify(&target, &round, &mut scratch)
                                });
                                match r {
                                    Ok(()) => {
                                        c.verified_blocks.fetch_add(n, Ordering::Relaxed);
                                    }
                                    Err(f) => {
                                        flag.store(true, Ordering::Relaxed);
                                        first_failure = Some(f);
                                    }
                                }
                            }
                            let _ = spare_tx.send(round.data);
                        }
                        Job::Drain => {
                            let r = first_failure.clone().map_or(Ok(()), Err);
                            if results_tx.send(r).is_err() {
                                break;
                            }
                        }
                    }
                }
            })?;
        Ok(Writer {
            jobs: Some(jobs),
            results,
            spare,
            failed,
            thread: Some(thread),
        })
    }

    /// Hands a round over, waiting while the previous one is still being
    /// written; reports an earlier round's failure instead.
    pub fn submit(
        &self,
        target: Arc<Target>,
        slot: usize,
        round: Round,
    ) -> Result<(), PassFailure> {
        if self.failed.load(Ordering::Relaxed) {
            return self.drain();
        }
        self.send(Job::Round {
            target,
            slot,
            round,
        })
    }

    /// The buffer of a finished round, when one is back.
    pub fn spare_buffer(&self) -> Option<AlignedBuf> {
        self.spare.try_recv().ok()
    }

    /// Waits until every round handed over is written and verified; the
    /// first failure.
    pub fn drain(&self) -> Result<(), PassFailure> {
        self.send(Job::Drain)?;
        self.results.recv().unwrap_or_else(|_| Err(stopped()))
    }

    fn send(&self, job: Job) -> Result<(), PassFailure> {
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())
    }
}

fn stopped() -> PassFailure {
    fail(
        ErrorCode::Internal,
        "the failback writer thread stopped".into(),
    )
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{DiskSource, RawDisk, SourceError};

    /// A raw file whose reads come back with one byte flipped at `flip`
    /// (a target that loses a write), for the writer's failure path.
    struct LosesAWrite {
        inner: RawDisk,
        flip: Option<u64>,
    }

    impl DiskSource for LosesAWrite {
        fn describe(&self) -> &str {
            self.inner.describe()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
            self.inner.read_exact_at(buf, offset)?;
            if let Some(f) = self
                .flip
                .filter(|&f| f >= offset && f < offset + buf.len() as u64)
            {
                buf[(f - offset) as usize] ^= 0x40;
            }
            Ok(())
        }
        fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
            self.inner.next_data(offset)
        }
    }

    impl WritableDisk for LosesAWrite {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), SourceError> {
            self.inner.write_all_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), SourceError> {
            self.inner.write_zeroes(offset, len)
        }
        fn flush(&self) -> Result<(), SourceError> {
            self.inner.flush()
        }
    }

    /// A 16-block target of 4 KiB blocks whose reads flip `flip`, and a
    /// round of blocks 2..6 (data), 6..8 (zeros), 9 (data).
    fn setup(dir: &std::path::Path, flip: Option<u64>) -> (Target, Round) {
        let path = dir.join("t.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(16 * 4096)
            .unwrap();
        let g = Geometry::new(16 * 4096, 4096);
        let map_path = dir.join("t.map");
        let map = TargetMap::create(&map_path, "t.raw", g).unwrap();
        let t = Target {
            id: "t".into(),
            location: path.display().to_string(),
            disk: Box::new(LosesAWrite {
                inner: RawDisk::open_writable(&path, false).unwrap(),
                flip,
            }),
            direct: None,
            geometry: g,
            zeros: ZeroDigests::new(g.disk_size, g.block_size),
            map_path,
            map: Mutex::new(Some(map)),
        };
        let mut round = Round::new(16 * 4096);
        for b in (2..8).chain([9]) {
            let zero = (6..8).contains(&b);
            let at = round.filled;
            let digest = if zero {
                t.zeros.for_block(b)
            } else {
                let bytes = vec![b as u8 + 1; 4096];
                round.room(4096).unwrap().copy_from_slice(&bytes);
                round.filled += 4096;
                Digest::of(&bytes)
            };
            round.blocks.push(RoundBlock {
                block: b,
                at,
                zero,
                digest,
            });
        }
        (t, round)
    }

    #[test]
    fn a_verified_round_is_recorded_in_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let (t, round) = setup(dir.path(), None);
        assert_eq!(write(&t, &round).unwrap(), 7 * 4096);
        verify(&t, &round, &mut [0u8; 3 * 4096]).unwrap();
        let map = t.map();
        let map = map.as_ref().unwrap();
        for b in &round.blocks {
            assert_eq!(map.get(b.block), Some(b.digest), "block {}", b.block);
        }
        assert_eq!(map.get(8), None, "a block not in the round stays unknown");
        let bytes = std::fs::read(dir.path().join("t.raw")).unwrap();
        assert!(bytes[2 * 4096..3 * 4096].iter().all(|&x| x == 3));
        assert!(bytes[6 * 4096..8 * 4096].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_block_that_reads_back_differently_fails_the_round_and_stays_unknown() {
        let dir = tempfile::tempdir().unwrap();
        // One byte inside block 4, then one inside the zero run (block 7).
        for (flip, block) in [(4 * 4096 + 17, 4), (7 * 4096 + 5, 7)] {
            let (t, round) = setup(dir.path(), Some(flip));
            write(&t, &round).unwrap();
            let f = verify(&t, &round, &mut [0u8; 3 * 4096]).unwrap_err();
            assert_eq!(f.code, ErrorCode::VerifyFailed);
            assert!(
                f.message.contains(&format!("block {block} reads back")),
                "{}",
                f.message
            );
            let map = t.map();
            let map = map.as_ref().unwrap();
            assert!(round.blocks.iter().all(|b| map.get(b.block).is_none()));
        }
    }

    #[test]
    fn the_writer_reports_the_first_failure_at_the_next_drain() {
        let dir = tempfile::tempdir().unwrap();
        let (t, round) = setup(dir.path(), Some(9 * 4096));
        let t = Arc::new(t);
        let counters = Arc::new(vec![SlotCounters::default()]);
        let v = Writer::spawn(counters.clone()).unwrap();
        v.submit(t.clone(), 0, round).unwrap();
        let f = v.drain().unwrap_err();
        assert!(f.message.contains("block 9 reads back"), "{}", f.message);
        assert_eq!(counters[0].written_blocks.load(Ordering::Relaxed), 7);
        assert_eq!(counters[0].verified_blocks.load(Ordering::Relaxed), 0);
        assert!(v.spare_buffer().is_some(), "the round's buffer comes back");
        // Later rounds are not verified once one failed.
        let (_, round2) = setup(dir.path(), None);
        assert!(v.submit(t, 0, round2).is_err());
    }

    fn rb(block: u64, at: usize, zero: bool) -> RoundBlock {
        RoundBlock {
            block,
            at,
            zero,
            digest: Digest([0; 32]),
        }
    }

    #[test]
    fn runs_split_on_gaps_and_kind_changes() {
        let blocks = [
            rb(1, 0, false),
            rb(2, 10, false),
            rb(3, 0, true),
            rb(4, 0, true),
            rb(6, 20, false),
            rb(7, 30, false),
        ];
        assert_eq!(runs(&blocks), vec![0..2, 2..4, 4..6]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn zero_check_sees_a_single_byte_anywhere() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 1, 15, 16, 2048, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            assert_eq!(
                is_zero(&v[1..]),
                i == 0,
                "byte {i}, from the second byte on"
            );
            v[i] = 0;
        }
    }
}
