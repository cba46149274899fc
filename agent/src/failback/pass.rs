//! One failback pass on the agent: guards, describe, write, verify.
//!
//! ```text
//!  connection task                         pass thread
//!  ───────────────                         ───────────
//!  StartFailback ─▶ FailbackPass::prepare  (opens every target, checks the
//!                   └─ FailbackReady        guards; nothing written yet)
//!                                          describe each target, in slot order:
//!  TargetChunk/TargetEnd ◀── PassItem ───   map of the last pass, or a scan
//!  Block, FailbackSent ──── BlockIn ────▶  decode, check digest, buffer a round;
//!                                          a full round goes to the writer
//!                                          thread (mark map entries unknown,
//!                                          write, flush, re-read, compare,
//!                                          record digests: see `round.rs`)
//!  FailbackProgress ◀── counters (1/s)
//!  FailbackDone ◀────────── PassItem ────  root of the map == point root?
//! ```
//!
//! Both channels are bounded: a slow target holds the connection task back,
//! which stops reading the socket, which holds the controller back. After a
//! dropped link or a shutdown the thread hands over its round and waits
//! until the writer has written and verified it, so that what it wrote is
//! recorded in the map, then stops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tideline_protocol::limits::MAX_INDEX_CHUNK;
use tideline_protocol::message::{
    Block, ErrorCode, FailbackDone, FailbackReady, IndexChunk, ReadyTarget, StartFailback,
    TargetDescription,
};
use tideline_protocol::{Digest, Encoding, Geometry, ZeroDigests};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::describe::{self, hash_blocks};
use super::guard::{self, Refusal};
use super::map::{TargetMap, TargetStamp};
use super::round::{Round, RoundBlock, Target, Writer};
use super::target::{open_target, WritableDisk};
use crate::config::AgentConfig;
use crate::source::SourceError;

/// What the pass thread hands to the connection task.
#[derive(Debug)]
pub enum PassItem {
    /// Digests of a target, in order.
    Chunk(IndexChunk),
    /// A target is fully described.
    Described {
        /// Slot.
        slot: u16,
    },
    /// A slot is written and verified.
    Done(FailbackDone),
    /// The pass failed; nothing more comes.
    Failed {
        /// Code for the controller.
        code: ErrorCode,
        /// What happened, naming the target.
        message: String,
    },
}

/// What the connection task hands to the pass thread, in arrival order.
#[derive(Debug)]
pub enum BlockIn {
    /// A block to write.
    Block(Block),
    /// The controller sent every block of a slot.
    Sent {
        /// Slot.
        slot: u16,
        /// How many it sent.
        sent_blocks: u64,
    },
}

/// Counters of one slot, read by the connection task for progress reports.
#[derive(Debug, Default)]
pub struct SlotCounters {
    /// Blocks received from the controller.
    pub received_blocks: AtomicU64,
    /// Blocks written.
    pub written_blocks: AtomicU64,
    /// Blocks written, flushed, re-read and verified.
    pub verified_blocks: AtomicU64,
    /// Bytes written.
    pub written_bytes: AtomicU64,
}

/// A running pass, owned by the connection task.
pub struct FailbackPass {
    /// Session id.
    pub session: u64,
    /// Target ids by slot.
    pub targets: Vec<String>,
    /// Blocks to the pass thread.
    pub blocks: mpsc::Sender<BlockIn>,
    /// Items from the pass thread.
    pub items: mpsc::Receiver<PassItem>,
    /// Per-slot counters.
    pub counters: Arc<Vec<SlotCounters>>,
    /// Slots whose `FailbackDone` went out; the pass is finished when all
    /// have.
    pub done_slots: usize,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// One target of the pass, opened and checked.
struct Slot {
    target: Arc<Target>,
    /// Blocks buffered for the current round.
    round: Round,
    /// Blocks received in this pass.
    received: u64,
}

impl FailbackPass {
    /// Opens and checks every target of `req`; on success starts the pass
    /// thread and returns the answer for the controller. Nothing is written
    /// before every target has passed its guards.
    pub fn prepare(
        req: &StartFailback,
        cfg: &AgentConfig,
    ) -> Result<(FailbackPass, FailbackReady), Refusal> {
        let mut slots = Vec::with_capacity(req.targets.len());
        let mut ready = Vec::with_capacity(req.targets.len());
        for t in &req.targets {
            let conf = cfg
                .targets
                .iter()
                .find(|c| c.id == t.target)
                .ok_or_else(|| Refusal::Unknown {
                    target: t.target.clone(),
                })?;
            let location = conf.path.to_string_lossy().into_owned();
            let in_use = guard::in_use(&conf.path);
            if let Some(why) = &in_use {
                if !t.force {
                    return Err(Refusal::InUse {
                        target: t.target.clone(),
                        location,
                        why: why.clone(),
                    });
                }
                warn!(target = %t.target, location = %location, why = %why, "target in use; writing anyway (forced)");
            }
            let disk = open_target(&conf.path, t.force).map_err(|e| match &e {
                SourceError::Open { cause: source, .. }
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    Refusal::InUse {
                        target: t.target.clone(),
                        location: location.clone(),
                        why: "the device is busy (mounted or opened exclusively elsewhere)".into(),
                    }
                }
                _ => Refusal::Unopenable {
                    target: t.target.clone(),
                    location: location.clone(),
                    why: e.to_string(),
                },
            })?;
            if disk.size() < t.disk_size {
                return Err(Refusal::TooSmall {
                    target: t.target.clone(),
                    location,
                    target_size: disk.size(),
                    lineage: t.source.clone(),
                    point: t.point,
                    point_size: t.disk_size,
                });
            }
            let geometry = Geometry::new(t.disk_size, t.block_size);
            let map_path = TargetMap::path_for(&cfg.state.dir, &t.target);
            let stamp = TargetStamp::of(&conf.path, disk.size());
            let map = if t.rescan {
                None
            } else {
                TargetMap::open_vouching(&map_path, &location, geometry, stamp)
            };
            let zeros = ZeroDigests::new(geometry.disk_size, geometry.block_size);
            let map = map.filter(|m| {
                spot_check(
                    disk.as_ref(),
                    m,
                    &geometry,
                    &zeros,
                    cfg.failback.spot_check_blocks,
                )
                .map_err(|why| {
                    warn!(target = %t.target, why = %why, "the last pass's map does not match the target; scanning it")
                })
                .is_ok()
            });
            ready.push(ReadyTarget {
                target_size: disk.size(),
                described_by: if map.is_some() {
                    TargetDescription::Map
                } else {
                    TargetDescription::Scanned
                },
            });
            slots.push(Slot {
                target: Arc::new(Target {
                    id: t.target.clone(),
                    location,
                    direct: disk.direct(),
                    disk,
                    geometry,
                    zeros,
                    map_path,
                    map: Mutex::new(map),
                }),
                round: Round::new(round_capacity(cfg.failback.verify_bytes, t.block_size)),
                received: 0,
            });
        }
        let counters: Arc<Vec<SlotCounters>> =
            Arc::new(slots.iter().map(|_| SlotCounters::default()).collect());
        let (blocks_tx, blocks_rx) = mpsc::channel(256);
        let (items_tx, items_rx) = mpsc::channel(slots.len() + 16);
        let cancel = Arc::new(AtomicBool::new(false));
        let writer = Writer::spawn(counters.clone()).map_err(|e| Refusal::Unopenable {
            target: req.targets[0].target.clone(),
            location: String::new(),
            why: format!("cannot start the writer thread: {e}"),
        })?;
        let worker = Worker {
            slots,
            writer,
            decompressor: None,
            items: items_tx,
            counters: counters.clone(),
            cancel: cancel.clone(),
            workers: cfg.sync.worker_count(),
            batch_bytes: u64::from(cfg.sync.batch_bytes),
            verify_bytes: cfg.failback.verify_bytes,
            session: req.session,
            pass: req.pass,
        };
        let thread = std::thread::Builder::new()
            .name("failback".into())
            .spawn(move || worker.run(blocks_rx))
            .map_err(|e| Refusal::Unopenable {
                target: req.targets[0].target.clone(),
                location: String::new(),
                why: format!("cannot start the pass thread: {e}"),
            })?;
        Ok((
            FailbackPass {
                session: req.session,
                targets: req.targets.iter().map(|t| t.target.clone()).collect(),
                blocks: blocks_tx,
                items: items_rx,
                counters,
                done_slots: 0,
                cancel,
                thread: Some(thread),
            },
            FailbackReady {
                session: req.session,
                targets: ready,
            },
        ))
    }

    /// Stops the pass: the thread finishes and verifies its current round
    /// (so the map records it) and exits; waits up to `grace` for that.
    pub fn stop(mut self, grace: Duration) {
        self.cancel.store(true, Ordering::Relaxed);
        let thread = self.thread.take();
        drop(self);
        if let Some(t) = thread {
            let deadline = std::time::Instant::now() + grace;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for FailbackPass {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Bytes of a round's buffer: a round is handed over once it holds
/// `verify_bytes`, so it never needs more than that plus one block.
fn round_capacity(verify_bytes: u64, block_size: u32) -> usize {
    (verify_bytes as usize).saturating_add(block_size as usize)
}

/// Re-reads a sample of blocks and compares them with the map.
fn spot_check(
    disk: &dyn WritableDisk,
    map: &TargetMap,
    g: &Geometry,
    zeros: &ZeroDigests,
    n: u32,
) -> Result<(), String> {
    let mut buf = Vec::new();
    for b in describe::spot_check_blocks(g.block_count, n) {
        let got = hash_blocks(disk, g, zeros, b, b + 1, &mut buf).map_err(|e| e.to_string())?;
        if map.get(b) != got.first().copied() {
            return Err(format!("block {b} differs from the map"));
        }
    }
    Ok(())
}

/// The pass thread.
struct Worker {
    slots: Vec<Slot>,
    writer: Writer,
    /// Reused across blocks (made at the first zstd block).
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    items: mpsc::Sender<PassItem>,
    counters: Arc<Vec<SlotCounters>>,
    cancel: Arc<AtomicBool>,
    workers: usize,
    batch_bytes: u64,
    verify_bytes: u64,
    session: u64,
    pass: u32,
}

/// A failure of the pass, with the code the controller gets.
#[derive(Debug, Clone)]
pub(super) struct PassFailure {
    pub code: ErrorCode,
    pub message: String,
}

pub(super) fn fail(code: ErrorCode, message: String) -> PassFailure {
    PassFailure { code, message }
}

impl Worker {
    fn run(mut self, mut blocks: mpsc::Receiver<BlockIn>) {
        // A panic must still reach the controller as a failed pass: without
        // a verdict it would wait for one as long as the link lives.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.describe_all().and_then(|described| {
                if described {
                    self.write_all(&mut blocks)
                } else {
                    Ok(())
                }
            })
        }));
        let r = caught.unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(fail(
                ErrorCode::Internal,
                format!("the failback pass thread panicked: {why}"),
            ))
        });
        if let Err(f) = r {
            warn!(session = self.session, error = %f.message, "failback pass failed");
            let _ = self.items.blocking_send(PassItem::Failed {
                code: f.code,
                message: f.message,
            });
        }
    }

    fn send(&self, item: PassItem) -> Result<(), PassFailure> {
        self.items
            .blocking_send(item)
            .map_err(|_| fail(ErrorCode::SessionAborted, "the connection went away".into()))
    }

    /// Describes every target in slot order. `Ok(false)` when cancelled.
    fn describe_all(&mut self) -> Result<bool, PassFailure> {
        for i in 0..self.slots.len() {
            let slot = i as u16;
            if self.slots[i].target.map().is_some() {
                self.describe_from_map(slot)?;
            } else if !self.describe_by_scan(slot)? {
                return Ok(false);
            }
            self.send(PassItem::Described { slot })?;
        }
        Ok(true)
    }

    fn describe_from_map(&self, slot: u16) -> Result<(), PassFailure> {
        let s = &self.slots[usize::from(slot)].target;
        let map = s.map();
        let Some(map) = map.as_ref() else {
            return Ok(());
        };
        info!(target = %s.id, pass = self.pass, "describing the target from the last pass's map");
        let mut first = 0;
        while first < s.geometry.block_count {
            let end = (first + MAX_INDEX_CHUNK as u64).min(s.geometry.block_count);
            // An entry the map cannot vouch for is sent as unknown (all
            // zeros): it matches no point digest, so the block is resent.
            let digests = (first..end)
                .map(|b| map.get(b).unwrap_or(Digest([0; 32])))
                .collect();
            self.send(PassItem::Chunk(IndexChunk {
                slot,
                first_block: first,
                digests,
            }))?;
            first = end;
        }
        Ok(())
    }

    fn describe_by_scan(&mut self, slot: u16) -> Result<bool, PassFailure> {
        let t = self.slots[usize::from(slot)].target.clone();
        let (geometry, location) = (t.geometry, t.location.clone());
        info!(target = %t.id, pass = self.pass, "scanning the target to describe it");
        let mut map = TargetMap::create(&t.map_path, &location, geometry)
            .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        let items = self.items.clone();
        let started = std::time::Instant::now();
        let done = describe::scan(
            t.disk.as_ref(),
            geometry,
            self.workers,
            self.batch_bytes,
            &self.cancel,
            &mut |first, digests| {
                for (b, d) in (first..).zip(&digests) {
                    map.set(b, d);
                }
                // Chunks of at most MAX_INDEX_CHUNK digests.
                for (k, part) in digests.chunks(MAX_INDEX_CHUNK).enumerate() {
                    let chunk = IndexChunk {
                        slot,
                        first_block: first + (k * MAX_INDEX_CHUNK) as u64,
                        digests: part.to_vec(),
                    };
                    items
                        .blocking_send(PassItem::Chunk(chunk))
                        .map_err(|_| SourceError::Read {
                            disk: location.clone(),
                            offset: 0,
                            cause: std::io::Error::other("connection went away"),
                        })?;
                }
                Ok(())
            },
        )
        .map_err(|e| fail(ErrorCode::DiskUnreadable, format!("target {}: {e}", t.id)))?;
        if !done {
            return Ok(false);
        }
        let s = &t;
        let stamp = TargetStamp::of(std::path::Path::new(&s.location), s.disk.size());
        map.seal_header(stamp, true)
            .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        info!(target = %s.id, blocks = geometry.block_count, seconds = started.elapsed().as_secs_f64(), "target scanned");
        *s.map() = Some(map);
        Ok(true)
    }

    /// Receives, writes and verifies blocks until every slot is done or the
    /// link goes away.
    fn write_all(&mut self, blocks: &mut mpsc::Receiver<BlockIn>) -> Result<(), PassFailure> {
        let mut done = 0;
        while done < self.slots.len() {
            let Some(item) = blocks.blocking_recv() else {
                // Link gone or pass stopped: record what is buffered.
                for i in 0..self.slots.len() {
                    self.finish_round(i)?;
                }
                return self.writer.drain();
            };
            match item {
                BlockIn::Block(b) => self.take_block(b)?,
                BlockIn::Sent { slot, sent_blocks } => {
                    self.finish_slot(usize::from(slot), sent_blocks)?;
                    done += 1;
                }
            }
        }
        Ok(())
    }

    fn take_block(&mut self, b: Block) -> Result<(), PassFailure> {
        let i = usize::from(b.slot);
        let s = self
            .slots
            .get_mut(i)
            .ok_or_else(|| fail(ErrorCode::UnexpectedMessage, format!("no slot {}", b.slot)))?;
        let t = &s.target;
        let expected_len = t.geometry.block_len(b.block) as usize;
        let at = s.round.filled;
        let too_long = || {
            fail(
                ErrorCode::DigestMismatch,
                format!(
                    "target {}: block {} is longer than the round has room for",
                    t.id, b.block
                ),
            )
        };
        let zero = match b.encoding {
            Encoding::Zero => {
                if b.digest != t.zeros.for_block(b.block) {
                    return Err(fail(
                        ErrorCode::DigestMismatch,
                        format!(
                            "target {}: zero block {} carries a non-zero digest",
                            t.id, b.block
                        ),
                    ));
                }
                true
            }
            Encoding::Raw => {
                s.round
                    .room(b.payload.len())
                    .ok_or_else(too_long)?
                    .copy_from_slice(&b.payload);
                s.round.filled += b.payload.len();
                false
            }
            Encoding::Zstd => {
                // Straight into the round's buffer, with one reused context.
                let undecodable = |e: std::io::Error| {
                    fail(
                        ErrorCode::DigestMismatch,
                        format!(
                            "target {}: block {} does not decompress: {e}",
                            t.id, b.block
                        ),
                    )
                };
                let dctx = match &mut self.decompressor {
                    Some(d) => d,
                    None => self
                        .decompressor
                        .insert(zstd::bulk::Decompressor::new().map_err(undecodable)?),
                };
                let room = s.round.room(expected_len).ok_or_else(too_long)?;
                s.round.filled += dctx
                    .decompress_to_buffer(&b.payload, room)
                    .map_err(undecodable)?;
                false
            }
        };
        if !zero {
            let bytes = &s.round.data[at..s.round.filled];
            if bytes.len() != expected_len || Digest::of(bytes) != b.digest {
                return Err(fail(
                    ErrorCode::DigestMismatch,
                    format!(
                        "target {}: block {} from the controller does not match its digest; nothing of it was written",
                        t.id, b.block
                    ),
                ));
            }
        }
        s.round.blocks.push(RoundBlock {
            block: b.block,
            at,
            zero,
            digest: b.digest,
        });
        s.received += 1;
        self.counters[i]
            .received_blocks
            .fetch_add(1, Ordering::Relaxed);
        if s.round.filled as u64 >= self.verify_bytes || s.round.blocks.len() >= 8192 {
            self.finish_round(i)?;
        }
        Ok(())
    }

    /// Hands the buffered round of slot `i` to the writer thread.
    fn finish_round(&mut self, i: usize) -> Result<(), PassFailure> {
        let s = &mut self.slots[i];
        if s.round.blocks.is_empty() {
            return Ok(());
        }
        let capacity = s.round.data.len();
        let next = match self.writer.spare_buffer() {
            Some(buf) if buf.len() == capacity => Round::reusing(buf),
            _ => Round::new(capacity),
        };
        let round = std::mem::replace(&mut s.round, next);
        self.writer.submit(s.target.clone(), i, round)
    }

    fn finish_slot(&mut self, i: usize, sent_blocks: u64) -> Result<(), PassFailure> {
        self.finish_round(i)?;
        self.writer.drain()?;
        let s = &self.slots[i];
        let t = &s.target;
        if s.received != sent_blocks {
            return Err(fail(
                ErrorCode::Internal,
                format!(
                    "target {}: controller sent {sent_blocks} blocks, {} arrived",
                    t.id, s.received
                ),
            ));
        }
        let root = {
            let map = t.map();
            let map = map
                .as_ref()
                .ok_or_else(|| fail(ErrorCode::Internal, format!("target {}: no map", t.id)))?;
            map.root().ok_or_else(|| {
                fail(
                    ErrorCode::VerifyFailed,
                    format!(
                        "target {}: {} blocks of the target are still unknown after the pass",
                        t.id,
                        map.unknown_blocks()
                    ),
                )
            })?
        };
        let c = &self.counters[i];
        let done = FailbackDone {
            slot: i as u16,
            written_blocks: c.written_blocks.load(Ordering::Relaxed),
            verified_blocks: c.verified_blocks.load(Ordering::Relaxed),
            root,
        };
        info!(
            target = %t.id,
            written = done.written_blocks,
            verified = done.verified_blocks,
            root = %root,
            "failback target written and verified"
        );
        self.send(PassItem::Done(done))
    }
}
