//! The scan pipeline: plan → read, hash, compare, compress → in-order output.
//!
//! ```text
//!  planner thread ──jobs──▶ worker threads (N) ─────────────▶ orderer thread ──▶ tokio channel
//!  (cuts the disk into      (each reads its batch with one   (restores block     (the connection
//!   batches and finds their  large pread per data extent,     order)              loop sends
//!   data extents with        BLAKE3 per block, compares with                      frames)
//!   SEEK_DATA/SEEK_HOLE)     the expected index, zstd)
//! ```
//!
//! Reading happens in the workers so that the copy out of the page cache is
//! spread over every core, as hashing is; holes are never read nor zeroed.
//! Every channel is bounded and each worker owns one batch buffer, so memory
//! stays at a few batches whatever the disk size (the orderer holds at most
//! the results of the jobs in flight), and the slowest stage (disk, CPU or
//! network) sets the pace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tideline_protocol::{Digest, Encoding, Geometry};
use tokio::sync::mpsc;

use super::expected::ExpectedIndex;
use crate::source::{DiskSource, SourceError};

/// Why a scan stopped before the end of the disk. It crosses the stages'
/// threads as it is, so that the session can tell an unreadable disk from
/// a fault of the agent.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The disk could not be read, or its data extents not found.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A worker could not start its compressor.
    #[error("cannot start zstd: {cause}")]
    Compressor {
        /// zstd's error.
        cause: std::io::Error,
    },
    /// The stages ended without an error before the last block.
    #[error("scan stopped at block {next_block} of {block_count}")]
    Stopped {
        /// The first block not scanned.
        next_block: u64,
        /// Blocks of the disk.
        block_count: u64,
    },
}

/// A block whose digest differs from the expected index.
#[derive(Debug)]
pub struct ChangedBlock {
    /// Block number.
    pub block: u64,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Uncompressed length.
    pub raw_len: u32,
    /// BLAKE3 of the uncompressed block.
    pub digest: Digest,
    /// Payload (empty for zero blocks).
    pub payload: Vec<u8>,
}

/// Counters of one scan.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanStats {
    /// Blocks looked at.
    pub blocks: u64,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// Bytes skipped because the source reported a hole.
    pub bytes_in_holes: u64,
    /// Blocks that differ from the expected index.
    pub changed_blocks: u64,
    /// Bytes of changed blocks before compression.
    pub changed_bytes: u64,
    /// Payload bytes after compression.
    pub payload_bytes: u64,
    /// Blocks that were all zeros (read or hole).
    pub zero_blocks: u64,
    /// Blocks not looked at because the change source vouched for them.
    pub skipped_blocks: u64,
    /// Seconds from start to finish.
    pub seconds: f64,
}

impl ScanStats {
    fn add(&mut self, o: &ScanStats) {
        self.blocks += o.blocks;
        self.bytes_read += o.bytes_read;
        self.bytes_in_holes += o.bytes_in_holes;
        self.changed_blocks += o.changed_blocks;
        self.changed_bytes += o.changed_bytes;
        self.payload_bytes += o.payload_bytes;
        self.zero_blocks += o.zero_blocks;
        self.skipped_blocks += o.skipped_blocks;
    }
}

/// What the pipeline hands to the connection loop, in block order.
#[derive(Debug)]
pub enum ScanItem {
    /// A block to send.
    Changed(ChangedBlock),
    /// Every block before `next_block` has been scanned.
    Scanned {
        /// Next block to scan.
        next_block: u64,
        /// Counters so far.
        stats: ScanStats,
    },
    /// The scan reached the end of the disk.
    Finished(ScanStats),
    /// The scan stopped before the end of the disk.
    Failed(ScanError),
}

/// Parameters of one scan.
pub struct ScanJob {
    /// What to read.
    pub source: Arc<dyn DiskSource>,
    /// What the controller already has.
    pub expected: ExpectedIndex,
    /// First block to scan.
    pub from_block: u64,
    /// zstd level.
    pub compression_level: i32,
    /// Worker threads.
    pub workers: usize,
    /// Bytes per read batch (rounded to whole blocks).
    pub batch_bytes: u32,
    /// Drop read pages from the page cache after hashing them
    /// (`posix_fadvise(DONTNEED)`); off by default because it also drops
    /// pages the host's own workload had cached.
    pub drop_page_cache: bool,
    /// When a change source vouches for the base point: the byte extents
    /// `[start, end)` that may have changed, sorted and merged. Blocks
    /// outside them are not read and are taken to be unchanged.
    pub only: Option<Arc<Vec<(u64, u64)>>>,
    /// CPU and I/O priority of the scan threads.
    pub priority: super::priority::ScanPriority,
}

/// A batch to read and hash: its blocks and where their data is.
struct Job {
    seq: u64,
    first_block: u64,
    blocks: u64,
    /// Data extents `[start, end)` inside the batch; the rest are holes.
    extents: Vec<(u64, u64)>,
    /// With a change source: which blocks of the batch to look at at all
    /// (the others are unchanged by the source's word).
    active: Option<Vec<bool>>,
}

struct BatchResult {
    seq: u64,
    next_block: u64,
    changed: Vec<ChangedBlock>,
    stats: ScanStats,
}

/// A running scan. Dropping the receiver (or calling [`Scan::cancel`]) stops
/// every stage at its next batch.
pub struct Scan {
    cancel: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Scan {
    /// Starts the stages; items arrive on the returned receiver.
    pub fn start(job: ScanJob, capacity: usize) -> (Scan, mpsc::Receiver<ScanItem>) {
        let (out_tx, out_rx) = mpsc::channel(capacity.max(4));
        let cancel = Arc::new(AtomicBool::new(false));
        let geometry = job.expected.geometry();
        let blocks_per_batch = (u64::from(job.batch_bytes) / u64::from(geometry.block_size)).max(1);
        let workers = job.workers.max(1);
        let (job_tx, job_rx) = sync_channel::<Job>(workers * 2);
        let (result_tx, result_rx) = sync_channel::<Result<BatchResult, ScanError>>(workers * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut threads = Vec::new();

        {
            let cancel = cancel.clone();
            let source = job.source.clone();
            let result_tx = result_tx.clone();
            let from = job.from_block;
            let only = job.only.clone();
            threads.push(spawn("tideline-plan", move || {
                let only = only.as_ref().map(|v| v.as_slice());
                if let Err(e) = plan_stage(
                    &*source,
                    geometry,
                    from,
                    blocks_per_batch,
                    only,
                    &job_tx,
                    &cancel,
                ) {
                    let _ = result_tx.send(Err(e));
                }
            }));
        }
        for i in 0..workers {
            let job_rx = job_rx.clone();
            let result_tx = result_tx.clone();
            let expected = job.expected.clone();
            let source = job.source.clone();
            let level = job.compression_level;
            let drop_cache = job.drop_page_cache;
            let priority = job.priority;
            let batch_len = (blocks_per_batch * u64::from(geometry.block_size)) as usize;
            threads.push(spawn(&format!("tideline-scan{i}"), move || {
                if let Err(e) = priority.apply_to_current_thread() {
                    tracing::warn!(error = %e, "scan thread priority not applied");
                }
                work_stage(
                    &*source, &job_rx, &result_tx, &expected, level, batch_len, drop_cache,
                );
            }));
        }
        drop(result_tx);
        {
            let cancel = cancel.clone();
            let from = job.from_block;
            threads.push(spawn("tideline-order", move || {
                order_stage(result_rx, out_tx, from, geometry.block_count, &cancel);
            }));
        }
        (Scan { cancel, threads }, out_rx)
    }

    /// Asks every stage to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        self.cancel();
        // The stages notice the flag or their closed channels within one
        // batch; the threads are detached rather than joined so that a slow
        // disk read never blocks the async runtime.
        self.threads.clear();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        // Failing to create a thread means the process is out of resources;
        // there is no meaningful way to continue the scan.
        .expect("cannot spawn a pipeline thread")
}

/// The byte ranges of `[start, end)` that a change source names, widened to
/// whole blocks; `cursor` advances through the sorted `only` list.
fn active_ranges(
    only: &[(u64, u64)],
    cursor: &mut usize,
    start: u64,
    end: u64,
    bs: u64,
) -> Vec<(u64, u64)> {
    while *cursor < only.len() && only[*cursor].1 <= start {
        *cursor += 1;
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut i = *cursor;
    while i < only.len() && only[i].0 < end {
        let s = (only[i].0.max(start) / bs) * bs;
        let e = only[i].1.min(end).div_ceil(bs).saturating_mul(bs).min(end);
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
        i += 1;
    }
    out
}

fn plan_stage(
    source: &dyn DiskSource,
    g: Geometry,
    from: u64,
    per_batch: u64,
    only: Option<&[(u64, u64)]>,
    job_tx: &SyncSender<Job>,
    cancel: &AtomicBool,
) -> Result<(), ScanError> {
    let bs = u64::from(g.block_size);
    let mut block = from;
    let mut seq = 0;
    let mut cursor = 0usize;
    while block < g.block_count {
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let blocks = per_batch.min(g.block_count - block);
        let start = g.offset(block);
        let end = (start + blocks * bs).min(g.disk_size);
        let (ranges, active) = match only {
            None => (vec![(start, end)], None),
            Some(list) => {
                let ranges = active_ranges(list, &mut cursor, start, end, bs);
                let mut active = vec![false; blocks as usize];
                for &(s, e) in &ranges {
                    for a in &mut active
                        [((s - start) / bs) as usize..((e - start).div_ceil(bs)) as usize]
                    {
                        *a = true;
                    }
                }
                (ranges, Some(active))
            }
        };
        let mut extents = Vec::new();
        for (rs, re) in ranges {
            let mut pos = rs;
            while pos < re {
                match source.next_data(pos)? {
                    None => break,
                    Some((ds, de)) => {
                        if ds >= re {
                            break;
                        }
                        let (s, e) = (ds.max(pos), de.min(re));
                        if e > s {
                            extents.push((s, e));
                        }
                        pos = de.max(pos + 1);
                    }
                }
            }
        }
        let job = Job {
            seq,
            first_block: block,
            blocks,
            extents,
            active,
        };
        if job_tx.send(job).is_err() {
            return Ok(());
        }
        seq += 1;
        block += blocks;
    }
    Ok(())
}

/// Reads a job's data extents into `buf` (laid out from the batch start)
/// and returns which blocks are entirely holes. Bytes of a partly covered
/// block that fall in a hole are zeroed; fully hole blocks are not touched.
fn read_job(
    source: &dyn DiskSource,
    g: Geometry,
    job: &Job,
    buf: &mut [u8],
) -> Result<Vec<bool>, SourceError> {
    let start = g.offset(job.first_block);
    let bs = u64::from(g.block_size);
    let mut holes = vec![true; job.blocks as usize];
    for &(s, e) in &job.extents {
        source.read_exact_at(&mut buf[(s - start) as usize..(e - start) as usize], s)?;
        for h in &mut holes[((s - start) / bs) as usize..=((e - 1 - start) / bs) as usize] {
            *h = false;
        }
    }
    // Zero the hole parts of blocks that also hold data.
    let mut covered_to = start;
    let batch_end = (start + job.blocks * bs).min(g.disk_size);
    let gaps = job
        .extents
        .iter()
        .map(|&(s, e)| {
            let gap = (covered_to, s);
            covered_to = e;
            gap
        })
        .collect::<Vec<_>>();
    for (gs, ge) in gaps
        .into_iter()
        .chain(std::iter::once((covered_to, batch_end)))
    {
        if ge <= gs {
            continue;
        }
        let (first, last) = ((gs - start) / bs, (ge - 1 - start) / bs);
        for b in first..=last {
            if !holes[b as usize] {
                let bstart = start + b * bs;
                let (zs, ze) = (gs.max(bstart), ge.min(bstart + bs));
                buf[(zs - start) as usize..(ze - start) as usize].fill(0);
            }
        }
    }
    Ok(holes)
}

/// Whether every byte of `data` is zero, eight bytes at a time.
pub fn is_all_zero(data: &[u8]) -> bool {
    let (head, body, tail) = unsafe {
        // SAFETY: u64 has no invalid bit patterns, and align_to only
        // reinterprets the aligned middle part of the slice.
        data.align_to::<u64>()
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body
            .chunks(16)
            .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

fn work_stage(
    source: &dyn DiskSource,
    job_rx: &Mutex<Receiver<Job>>,
    result_tx: &SyncSender<Result<BatchResult, ScanError>>,
    expected: &ExpectedIndex,
    level: i32,
    batch_len: usize,
    drop_cache: bool,
) {
    let g = expected.geometry();
    let zero = *expected.zero_digests();
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            let _ = result_tx.send(Err(ScanError::Compressor { cause: e }));
            return;
        }
    };
    // Aligned, so that O_DIRECT sources read straight into it.
    let mut buf = crate::source::AlignedBuf::zeroed(batch_len);
    loop {
        let batch = {
            let Ok(rx) = job_rx.lock() else { return };
            match rx.recv() {
                Ok(b) => b,
                Err(_) => return,
            }
        };
        let holes = match read_job(source, g, &batch, &mut buf) {
            Ok(h) => h,
            Err(e) => {
                let _ = result_tx.send(Err(e.into()));
                return;
            }
        };
        if drop_cache {
            if let (Some(&(s, _)), Some(&(_, e))) = (batch.extents.first(), batch.extents.last()) {
                source.done_with(s, e - s);
            }
        }
        let mut stats = ScanStats::default();
        let mut changed = Vec::new();
        let mut off = 0usize;
        for i in 0..batch.blocks {
            let block = batch.first_block + i;
            let len = g.block_len(block) as usize;
            let is_hole = holes[i as usize];
            let data = &buf[off..off + len];
            off += len;
            if batch.active.as_ref().is_some_and(|a| !a[i as usize]) {
                stats.skipped_blocks += 1;
                continue;
            }
            stats.blocks += 1;
            if is_hole {
                stats.bytes_in_holes += len as u64;
            } else {
                stats.bytes_read += len as u64;
            }
            let zero_block = is_hole || is_all_zero(data);
            let digest = if zero_block {
                stats.zero_blocks += 1;
                zero.for_block(block)
            } else {
                Digest::of(data)
            };
            if digest == expected.get(block) {
                continue;
            }
            stats.changed_blocks += 1;
            stats.changed_bytes += len as u64;
            let (encoding, payload) = if zero_block {
                (Encoding::Zero, Vec::new())
            } else {
                match compressor.compress(data) {
                    Ok(c) if c.len() < len => (Encoding::Zstd, c),
                    _ => (Encoding::Raw, data.to_vec()),
                }
            };
            stats.payload_bytes += payload.len() as u64;
            changed.push(ChangedBlock {
                block,
                encoding,
                raw_len: len as u32,
                digest,
                payload,
            });
        }
        let next_block = batch.first_block + batch.blocks;
        if result_tx
            .send(Ok(BatchResult {
                seq: batch.seq,
                next_block,
                changed,
                stats,
            }))
            .is_err()
        {
            return;
        }
    }
}

fn order_stage(
    result_rx: Receiver<Result<BatchResult, ScanError>>,
    out: mpsc::Sender<ScanItem>,
    from: u64,
    block_count: u64,
    cancel: &AtomicBool,
) {
    let started = Instant::now();
    let mut pending = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut total = ScanStats::default();
    let mut next_block = from;
    for r in result_rx.iter() {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                let _ = out.blocking_send(ScanItem::Failed(e));
                cancel.store(true, Ordering::Relaxed);
                return;
            }
        };
        pending.insert(r.seq, r);
        while let Some(r) = pending.remove(&next_seq) {
            next_seq += 1;
            total.add(&r.stats);
            next_block = r.next_block;
            for c in r.changed {
                if out.blocking_send(ScanItem::Changed(c)).is_err() {
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
            }
            if out
                .blocking_send(ScanItem::Scanned {
                    next_block,
                    stats: total,
                })
                .is_err()
            {
                cancel.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
    if cancel.load(Ordering::Relaxed) {
        return;
    }
    if next_block == block_count {
        total.seconds = started.elapsed().as_secs_f64();
        let _ = out.blocking_send(ScanItem::Finished(total));
    } else {
        let _ = out.blocking_send(ScanItem::Failed(ScanError::Stopped {
            next_block,
            block_count,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceError;

    /// A disk whose data extents are given; bytes outside them are zero.
    struct Patchy {
        data: Vec<u8>,
        extents: Vec<(u64, u64)>,
    }

    impl DiskSource for Patchy {
        fn describe(&self) -> &str {
            "patchy"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
            Ok(self
                .extents
                .iter()
                .find(|&&(_, e)| e > offset)
                .map(|&(s, e)| (s.max(offset), e)))
        }
    }

    fn scan_all(
        source: Patchy,
        block_size: u32,
        batch_bytes: u32,
        workers: usize,
    ) -> (Vec<ChangedBlock>, ScanStats) {
        scan_only(source, block_size, batch_bytes, workers, None)
    }

    fn scan_only(
        source: Patchy,
        block_size: u32,
        batch_bytes: u32,
        workers: usize,
        only: Option<Vec<(u64, u64)>>,
    ) -> (Vec<ChangedBlock>, ScanStats) {
        let g = Geometry::new(source.size(), block_size);
        let job = ScanJob {
            source: Arc::new(source),
            expected: ExpectedIndex::zero(g),
            from_block: 0,
            compression_level: 1,
            workers,
            batch_bytes,
            drop_page_cache: false,
            only: only.map(Arc::new),
            priority: Default::default(),
        };
        let (_scan, mut rx) = Scan::start(job, 8);
        let mut changed = Vec::new();
        loop {
            match rx.blocking_recv() {
                Some(ScanItem::Changed(c)) => changed.push(c),
                Some(ScanItem::Scanned { .. }) => {}
                Some(ScanItem::Finished(s)) => return (changed, s),
                Some(ScanItem::Failed(e)) => panic!("scan failed: {e}"),
                None => panic!("scan ended without Finished"),
            }
        }
    }

    #[test]
    fn holes_and_stale_buffers_never_leak_into_digests() {
        // Batch 1 is all data (fills the worker's buffer); batch 2 has a
        // block half in a hole and a block entirely in a hole, whose buffer
        // bytes are stale from batch 1.
        let bs = 4096usize;
        let mut data = vec![0xAAu8; 8 * bs];
        let extents = vec![
            (0, 4 * bs as u64),
            (4 * bs as u64, 4 * bs as u64 + 1000),
            (7 * bs as u64, 8 * bs as u64),
        ];
        // Real content: zeros outside the extents.
        for b in &mut data[4 * bs + 1000..7 * bs] {
            *b = 0;
        }
        let source = Patchy {
            data: data.clone(),
            extents,
        };
        let (changed, stats) = scan_all(source, bs as u32, 4 * bs as u32, 1);
        let got: Vec<u64> = changed.iter().map(|c| c.block).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 7], "blocks 5 and 6 are holes");
        for c in &changed {
            let start = c.block as usize * bs;
            assert_eq!(
                c.digest,
                Digest::of(&data[start..start + bs]),
                "block {}",
                c.block
            );
        }
        assert_eq!(stats.bytes_in_holes, 2 * bs as u64);
    }

    #[test]
    fn a_change_source_limits_the_scan_to_its_extents() {
        // Every block holds data, but the change source names only bytes in
        // blocks 3, 4 (one extent straddling them) and 40: nothing else is
        // read or compared.
        let bs = 4096u64;
        let data = vec![7u8; 64 * bs as usize];
        let only = vec![(3 * bs + 100, 4 * bs + 1), (40 * bs + 4095, 40 * bs + 4096)];
        let source = Patchy {
            data,
            extents: vec![(0, 64 * bs)],
        };
        let (changed, stats) = scan_only(source, bs as u32, 16 * bs as u32, 2, Some(only));
        let blocks: Vec<u64> = changed.iter().map(|c| c.block).collect();
        assert_eq!(blocks, vec![3, 4, 40]);
        assert_eq!(stats.blocks, 3);
        assert_eq!(stats.skipped_blocks, 61);
        assert_eq!(stats.bytes_read, 3 * bs);
    }

    #[test]
    fn many_workers_keep_block_order_and_find_every_change() {
        let bs = 4096usize;
        let mut data = vec![0u8; 301 * bs + 17];
        for (i, chunk) in data.chunks_mut(bs).enumerate() {
            if i % 3 != 0 {
                chunk.fill((i % 251) as u8 + 1);
            }
        }
        let len = data.len() as u64;
        let (changed, stats) = scan_all(
            Patchy {
                data: data.clone(),
                extents: vec![(0, len)],
            },
            bs as u32,
            8 * bs as u32,
            3,
        );
        let blocks: Vec<u64> = changed.iter().map(|c| c.block).collect();
        let expected: Vec<u64> = (0..302u64).filter(|i| i % 3 != 0).collect();
        assert_eq!(blocks, expected);
        assert_eq!(stats.blocks, 302);
        let tail = changed.last().map(|c| c.raw_len);
        assert_eq!(tail, Some(17));
    }

    /// A disk every read of which fails, as a disk with bad sectors does.
    struct Unreadable;

    impl DiskSource for Unreadable {
        fn describe(&self) -> &str {
            "/dev/bad"
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_exact_at(&self, _buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
            Err(SourceError::Read {
                disk: self.describe().to_owned(),
                offset,
                cause: std::io::Error::from_raw_os_error(libc::EIO),
            })
        }
        fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
            Ok(Some((offset, self.size())))
        }
    }

    #[test]
    fn a_read_error_reaches_the_session_typed() {
        let g = Geometry::new(Unreadable.size(), 4096);
        let job = ScanJob {
            source: Arc::new(Unreadable),
            expected: ExpectedIndex::zero(g),
            from_block: 0,
            compression_level: 1,
            workers: 2,
            batch_bytes: 64 * 1024,
            drop_page_cache: false,
            only: None,
            priority: Default::default(),
        };
        let (_scan, mut rx) = Scan::start(job, 8);
        let err = loop {
            match rx.blocking_recv() {
                Some(ScanItem::Failed(e)) => break e,
                Some(ScanItem::Finished(_)) => panic!("a disk that cannot be read was scanned"),
                Some(_) => {}
                None => panic!("scan ended without Failed"),
            }
        };
        assert!(
            matches!(err, ScanError::Source(SourceError::Read { ref disk, .. }) if disk == "/dev/bad"),
            "{err:?}"
        );
        // The cause is said once, and is not also the error's source (which
        // a `{:#}` chain would print again).
        let text = err.to_string();
        assert_eq!(text.matches("os error 5").count(), 1, "{text}");
        assert!(std::error::Error::source(&err).is_none(), "{err:?}");
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 65536 + 3];
        assert!(is_all_zero(&v));
        assert!(is_all_zero(&v[1..]));
        v[65537] = 1;
        assert!(!is_all_zero(&v));
        assert!(!is_all_zero(&v[1..]));
        assert!(is_all_zero(&[]));
    }
}
