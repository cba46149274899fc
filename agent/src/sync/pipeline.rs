//! The scan pipeline: read → hash and compare → compress → in-order output.
//!
//! ```text
//!  reader thread ──batches──▶ worker threads (N) ──results──▶ orderer thread ──▶ tokio channel
//!  (large sequential reads,   (BLAKE3 per block, compare     (restores block      (the connection
//!   holes skipped via          with the expected index,        order)               loop sends
//!   SEEK_DATA/SEEK_HOLE)       zstd for changed blocks)                             frames)
//! ```
//!
//! Every channel is bounded and read buffers are recycled through a pool, so
//! memory stays at a few batches whatever the disk size, and the slowest
//! stage (disk, CPU or network) sets the pace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tideline_protocol::{Digest, Encoding, Geometry};
use tokio::sync::mpsc;

use super::expected::ExpectedIndex;
use crate::source::DiskSource;

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
    /// The disk could not be read.
    Failed(String),
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
}

struct Batch {
    seq: u64,
    first_block: u64,
    blocks: u64,
    buf: Vec<u8>,
    holes: Vec<bool>,
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
        let (batch_tx, batch_rx) = sync_channel::<Batch>(workers * 2);
        let (result_tx, result_rx) = sync_channel::<Result<BatchResult, String>>(workers * 2);
        let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(workers * 3);
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        let mut threads = Vec::new();

        {
            let cancel = cancel.clone();
            let source = job.source.clone();
            let result_tx = result_tx.clone();
            let from = job.from_block;
            threads.push(spawn("tideline-read", move || {
                let r = read_stage(
                    &*source,
                    geometry,
                    from,
                    blocks_per_batch,
                    workers * 2 + 1,
                    &batch_tx,
                    &pool_rx,
                    &cancel,
                );
                if let Err(e) = r {
                    let _ = result_tx.send(Err(e));
                }
            }));
        }
        for i in 0..workers {
            let batch_rx = batch_rx.clone();
            let result_tx = result_tx.clone();
            let pool_tx = pool_tx.clone();
            let expected = job.expected.clone();
            let level = job.compression_level;
            threads.push(spawn(&format!("tideline-hash{i}"), move || {
                work_stage(&batch_rx, &result_tx, &pool_tx, &expected, level);
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

#[allow(clippy::too_many_arguments)]
fn read_stage(
    source: &dyn DiskSource,
    g: Geometry,
    from: u64,
    per_batch: u64,
    buffers: usize,
    batch_tx: &SyncSender<Batch>,
    pool_rx: &Receiver<Vec<u8>>,
    cancel: &AtomicBool,
) -> Result<(), String> {
    let batch_len = (per_batch * u64::from(g.block_size)) as usize;
    let mut block = from;
    let mut seq = 0;
    let mut spare = buffers;
    while block < g.block_count {
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let blocks = per_batch.min(g.block_count - block);
        let start = g.offset(block);
        let end = (start + blocks * u64::from(g.block_size)).min(g.disk_size);
        let len = (end - start) as usize;
        let mut buf = match pool_rx.try_recv() {
            Ok(b) => b,
            Err(_) if spare > 0 => {
                spare -= 1;
                Vec::with_capacity(batch_len)
            }
            Err(_) => match pool_rx.recv() {
                Ok(b) => b,
                Err(_) => return Ok(()),
            },
        };
        buf.clear();
        buf.resize(len, 0);

        // Find the data extents of [start, end); everything else is a hole
        // and stays zero in the buffer without being read.
        let mut extents = Vec::new();
        let mut pos = start;
        while pos < end {
            match source.next_data(pos).map_err(|e| e.to_string())? {
                None => break,
                Some((ds, de)) => {
                    if ds >= end {
                        break;
                    }
                    let s = ds.max(pos);
                    let e = de.min(end);
                    if e > s {
                        extents.push((s, e));
                    }
                    pos = de.max(pos + 1);
                }
            }
        }
        let mut holes = vec![true; blocks as usize];
        for &(s, e) in &extents {
            source
                .read_exact_at(&mut buf[(s - start) as usize..(e - start) as usize], s)
                .map_err(|e| e.to_string())?;
            let first = (s - start) / u64::from(g.block_size);
            let last = (e - 1 - start) / u64::from(g.block_size);
            for h in &mut holes[first as usize..=last as usize] {
                *h = false;
            }
        }
        source.done_with(start, end - start);
        if batch_tx
            .send(Batch {
                seq,
                first_block: block,
                blocks,
                buf,
                holes,
            })
            .is_err()
        {
            return Ok(());
        }
        seq += 1;
        block += blocks;
    }
    Ok(())
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
    batch_rx: &Mutex<Receiver<Batch>>,
    result_tx: &SyncSender<Result<BatchResult, String>>,
    pool_tx: &SyncSender<Vec<u8>>,
    expected: &ExpectedIndex,
    level: i32,
) {
    let g = expected.geometry();
    let zero = *expected.zero_digests();
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            let _ = result_tx.send(Err(format!("cannot start zstd: {e}")));
            return;
        }
    };
    loop {
        let batch = {
            let Ok(rx) = batch_rx.lock() else { return };
            match rx.recv() {
                Ok(b) => b,
                Err(_) => return,
            }
        };
        let mut stats = ScanStats::default();
        let mut changed = Vec::new();
        let mut off = 0usize;
        for i in 0..batch.blocks {
            let block = batch.first_block + i;
            let len = g.block_len(block) as usize;
            let data = &batch.buf[off..off + len];
            off += len;
            stats.blocks += 1;
            let is_hole = batch.holes[i as usize];
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
        let _ = pool_tx.try_send(batch.buf);
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
    result_rx: Receiver<Result<BatchResult, String>>,
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
        let _ = out.blocking_send(ScanItem::Failed(format!(
            "scan stopped at block {next_block} of {block_count}"
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
