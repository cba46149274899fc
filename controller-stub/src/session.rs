//! A sync session on the controller: where its blocks are verified and
//! stored, and how far it has come.
//!
//! Each session has one writer thread that owns the session's
//! [`PointBuilder`]s. The connection task hands it blocks, checkpoints and
//! disk ends through a bounded channel (so a slow disk holds the agent back
//! through TCP), and the thread answers with acks and commits. The thread
//! belongs to the session, not to the connection: when the link drops, the
//! builders stay, and a reconnecting agent resumes where the last ack stood.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tideline_protocol::message::{Block, ErrorCode};
use tideline_protocol::{Digest, Encoding, PointConsistency, Position, ZeroDigests};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::store::{PointBuilder, PointId, PointInfo, PutOutcome, Store, StoreError};

/// What the connection task asks of the writer thread. `disk` is the
/// index of the disk in the session's original request (stable across
/// resumes, unlike slots).
pub enum WriteCmd {
    /// Open (or reopen on resume) the point builder of a disk.
    Begin {
        /// Disk index.
        disk: usize,
        /// Point id.
        point: PointId,
        /// Base point.
        base: Option<PointId>,
        /// Disk size of the new point.
        disk_size: u64,
        /// Block size.
        block_size: u32,
        /// Records at and after this position are forgotten.
        resume_from: Position,
    },
    /// Start the next round of a disk's blocks.
    Round {
        /// Disk index.
        disk: usize,
        /// The round that begins.
        round: u32,
    },
    /// Verify, store and record a block.
    Block {
        /// Disk index.
        disk: usize,
        /// The block.
        block: Block,
    },
    /// Make everything so far durable, then acknowledge `at`.
    Checkpoint {
        /// Disk index.
        disk: usize,
        /// Slot to acknowledge on.
        slot: u16,
        /// Resume position.
        at: Position,
    },
    /// Answer `Barrier` once every command before this one is done (used
    /// when a link drops, so the session is quiescent before it waits).
    Barrier {
        /// Echoed in the reply.
        token: u64,
    },
    /// Commit the disk's point if its root matches.
    End {
        /// Disk index.
        disk: usize,
        /// Slot to answer on.
        slot: u16,
        /// The agent's root.
        root: Digest,
        /// What the agent says of the point's consistency.
        consistency: PointConsistency,
    },
}

/// The writer thread's answers.
#[derive(Debug)]
pub enum WriteReply {
    /// Everything before `at` is durable.
    Acked {
        /// Slot.
        slot: u16,
        /// Disk index.
        disk: usize,
        /// Resume position.
        at: Position,
    },
    /// A point is committed.
    Committed {
        /// Slot.
        slot: u16,
        /// Disk index.
        disk: usize,
        /// The point.
        info: PointInfo,
    },
    /// Every command before the barrier is done.
    Barrier {
        /// The barrier's token.
        token: u64,
    },
    /// The session cannot go on.
    Failed {
        /// Error code for the agent.
        code: ErrorCode,
        /// What went wrong, naming the disk and block.
        message: String,
    },
}

/// A position as the admin interface shows it: `{"round": r, "block": b}`.
fn position_json<S: serde::Serializer>(p: &Position, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("Position", 2)?;
    st.serialize_field("round", &p.round)?;
    st.serialize_field("block", &p.block)?;
    st.end()
}

/// Session state as the admin interface shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Waiting for or streaming from the agent.
    Running,
    /// The link dropped; waiting for the agent to come back and resume.
    Interrupted,
    /// Every disk committed.
    Done,
    /// Gave up; see `error`.
    Failed,
}

/// Progress of one disk of a session.
#[derive(Debug, Clone, Serialize)]
pub struct DiskProgress {
    /// Disk id.
    pub disk: String,
    /// Point being built.
    pub point: PointId,
    /// Base point.
    pub base: Option<PointId>,
    /// Blocks in the new point (known once the agent answered).
    pub block_count: u64,
    /// Acknowledged resume position: round, then block within it.
    #[serde(serialize_with = "position_json")]
    pub acked: Position,
    /// Position of the last block or checkpoint received.
    #[serde(serialize_with = "position_json")]
    pub scanned: Position,
    /// Blocks received (all sessions of this point, counting resends).
    pub blocks_received: u64,
    /// Payload bytes received.
    pub payload_bytes: u64,
    /// Bytes newly stored (after deduplication).
    pub stored_bytes: u64,
    /// The committed point, once done.
    pub committed: Option<PointInfo>,
}

/// Status of a session, shared between its connection task and the admin
/// interface.
#[derive(Debug, Clone, Serialize)]
pub struct SessionStatus {
    /// Session id.
    pub session: u64,
    /// Agent id.
    pub agent: String,
    /// State.
    pub state: SessionState,
    /// Per disk.
    pub disks: Vec<DiskProgress>,
    /// Unix time the session started.
    pub started_unix: u64,
    /// Seconds from start to end (or to now).
    pub elapsed_secs: f64,
    /// Bytes received from the agent on the wire during this session
    /// (frames, before TLS).
    pub wire_bytes: u64,
    /// How many times the session was resumed after a dropped link.
    pub resumes: u32,
    /// Why it failed.
    pub error: Option<String>,
    #[serde(skip)]
    started: Option<Instant>,
}

impl SessionStatus {
    /// A new running session.
    pub fn new(session: u64, agent: &str, disks: Vec<DiskProgress>) -> Self {
        SessionStatus {
            session,
            agent: agent.to_owned(),
            state: SessionState::Running,
            disks,
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            elapsed_secs: 0.0,
            wire_bytes: 0,
            resumes: 0,
            error: None,
            started: Some(Instant::now()),
        }
    }

    /// Updates `elapsed_secs` for a running session.
    pub fn touch(&mut self) {
        if matches!(
            self.state,
            SessionState::Running | SessionState::Interrupted
        ) {
            if let Some(s) = self.started {
                self.elapsed_secs = s.elapsed().as_secs_f64();
            }
        }
    }

    /// Whether the session is over.
    pub fn finished(&self) -> bool {
        matches!(self.state, SessionState::Done | SessionState::Failed)
    }
}

/// Shared handle on a session's status.
pub type SharedStatus = Arc<Mutex<SessionStatus>>;

/// The writer thread of a session.
pub struct SessionWriter {
    tx: SyncSender<WriteCmd>,
    /// Why the thread stopped, recorded before it stops taking commands:
    /// whoever notices first (a reply, a closed queue) reports this cause.
    failure: Arc<Mutex<Option<(ErrorCode, String)>>>,
}

impl SessionWriter {
    /// Starts the writer thread for `agent`'s session with `disks` (ids in
    /// request order). Replies arrive on `replies`.
    pub fn start(
        store: Arc<Store>,
        agent: String,
        disks: Vec<String>,
        status: SharedStatus,
        replies: mpsc::Sender<WriteReply>,
    ) -> std::io::Result<SessionWriter> {
        let (tx, rx) = sync_channel(256);
        let failure = Arc::new(Mutex::new(None));
        let failed = Arc::clone(&failure);
        std::thread::Builder::new()
            .name("tideline-store".into())
            .spawn(move || {
                let fail = |code: ErrorCode, message: String| {
                    warn!(agent, error = %message, "session failed in the store");
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, message));
                };
                writer_loop(&store, &agent, &disks, &status, rx, replies.clone(), fail);
                // The queue is closed now (the loop owned it), so a
                // connection waiting to queue more cannot hold this reply up.
                let failure = failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some((code, message)) = failure {
                    let _ = replies.blocking_send(WriteReply::Failed { code, message });
                }
            })?;
        Ok(SessionWriter { tx, failure })
    }

    /// Why the thread stopped: the failure it recorded, or (if it ended
    /// without one, e.g. it panicked) a generic cause.
    pub fn failure(&self) -> (ErrorCode, String) {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| {
                (
                    ErrorCode::Internal,
                    "the session's store thread stopped".to_owned(),
                )
            })
    }

    /// Hands a command to the thread; waits while its queue is full. Must be
    /// called from a blocking context or through `tokio::task::block_in_place`.
    pub fn send(&self, cmd: WriteCmd) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// A clone of the sending side, for use from `spawn_blocking`.
    pub fn sender(&self) -> SyncSender<WriteCmd> {
        self.tx.clone()
    }
}

fn store_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::DigestMismatch { .. }
        | StoreError::Decode { .. }
        | StoreError::BlockLength { .. } => ErrorCode::DigestMismatch,
        StoreError::IndexRootMismatch { .. } => ErrorCode::IndexMismatch,
        _ => ErrorCode::StoreFailure,
    }
}

/// Blocks verified together; each batch is split over [`VERIFIERS`] threads.
const VERIFY_BATCH: usize = 32;
/// Threads that decompress and re-hash a batch.
const VERIFIERS: usize = 2;

/// Verifies and stores a batch of blocks (decode, re-hash, deduplicate) on
/// parallel threads, then records them in arrival order.
fn store_batch(
    store: &Store,
    disks: &[String],
    zeros: &[Option<ZeroDigests>],
    builders: &mut [Option<PointBuilder<'_>>],
    status: &SharedStatus,
    batch: Vec<(usize, Block)>,
) -> Result<(), (ErrorCode, String)> {
    let verify = |(disk, block): &(usize, Block)| -> Result<u64, (ErrorCode, String)> {
        let id = disks.get(*disk).map(String::as_str).unwrap_or("?");
        let z = zeros.get(*disk).and_then(Option::as_ref).ok_or_else(|| {
            (
                ErrorCode::Internal,
                format!("block for disk {id} before its point was started"),
            )
        })?;
        match block.encoding {
            Encoding::Zero if z.is_zero(block.block, &block.digest) => Ok(0),
            Encoding::Zero => Err((
                ErrorCode::DigestMismatch,
                format!(
                    "disk {id} block {}: zero block carries digest {} which is not the zero digest",
                    block.block, block.digest
                ),
            )),
            _ => {
                match store.put_block(&block.digest, block.encoding, block.raw_len, &block.payload)
                {
                    Ok(PutOutcome::Stored { stored_bytes }) => Ok(stored_bytes),
                    Ok(PutOutcome::Deduplicated) => Ok(0),
                    Err(e) => Err((
                        store_code(&e),
                        format!("disk {id} block {}: {e}", block.block),
                    )),
                }
            }
        }
    };
    let results: Vec<Result<u64, (ErrorCode, String)>> = if batch.len() < 4 {
        batch.iter().map(verify).collect()
    } else {
        let per = batch.len().div_ceil(VERIFIERS);
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .chunks(per)
                .map(|part| scope.spawn(move || part.iter().map(verify).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err((
                            ErrorCode::Internal,
                            "a verifier thread panicked".into(),
                        ))]
                    })
                })
                .collect()
        })
    };
    for ((disk, block), result) in batch.iter().zip(results) {
        let stored = result?;
        let id = &disks[*disk];
        let b = builders
            .get_mut(*disk)
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                (
                    ErrorCode::Internal,
                    format!("block for disk {id} before its point was started"),
                )
            })?;
        b.record(block.block, block.digest).map_err(|e| {
            (
                store_code(&e),
                format!("disk {id} block {}: {e}", block.block),
            )
        })?;
        if let Ok(mut s) = status.lock() {
            let d = &mut s.disks[*disk];
            d.blocks_received += 1;
            d.payload_bytes += block.payload.len() as u64;
            d.stored_bytes += stored;
            d.scanned.block = block.block + 1;
        }
    }
    Ok(())
}

fn writer_loop(
    store: &Store,
    agent: &str,
    disks: &[String],
    status: &SharedStatus,
    rx: Receiver<WriteCmd>,
    replies: mpsc::Sender<WriteReply>,
    fail: impl Fn(ErrorCode, String),
) {
    let mut builders: Vec<Option<PointBuilder<'_>>> = disks.iter().map(|_| None).collect();
    let mut zeros: Vec<Option<ZeroDigests>> = disks.iter().map(|_| None).collect();
    let mut pending: Option<WriteCmd> = None;
    loop {
        let cmd = match pending.take() {
            Some(c) => c,
            None => match rx.recv() {
                Ok(c) => c,
                Err(_) => break,
            },
        };
        match cmd {
            WriteCmd::Begin {
                disk,
                point,
                base,
                disk_size,
                block_size,
                resume_from,
            } => {
                let Some(slot_builder) = builders.get_mut(disk) else {
                    continue;
                };
                let id = &disks[disk];
                let r = match slot_builder.take() {
                    Some(mut b)
                        if b.geometry().disk_size == disk_size
                            && b.geometry().block_size == block_size =>
                    {
                        b.truncate_from(resume_from).map(|()| b)
                    }
                    other => {
                        if let Some(b) = other {
                            let _ = b.abort();
                        }
                        store
                            .begin_point(agent, id, point, base, disk_size, block_size)
                            .and_then(|mut b| b.truncate_from(resume_from).map(|()| b))
                    }
                };
                match r {
                    Ok(b) => {
                        zeros[disk] = Some(ZeroDigests::new(disk_size, block_size));
                        *slot_builder = Some(b);
                    }
                    Err(e) => {
                        fail(
                            store_code(&e),
                            format!("disk {id}: cannot start point {point}: {e}"),
                        );
                        break;
                    }
                }
            }
            WriteCmd::Block { disk, block } => {
                // Take the blocks already queued behind this one, verify
                // them on parallel threads, then record them in order.
                let mut batch = vec![(disk, block)];
                while batch.len() < VERIFY_BATCH {
                    match rx.try_recv() {
                        Ok(WriteCmd::Block { disk, block }) => batch.push((disk, block)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Err((code, message)) =
                    store_batch(store, disks, &zeros, &mut builders, status, batch)
                {
                    fail(code, message);
                    break;
                }
            }
            WriteCmd::Round { disk, round } => {
                let Some(Some(b)) = builders.get_mut(disk) else {
                    continue;
                };
                if let Err(e) = b.begin_round(round) {
                    fail(
                        store_code(&e),
                        format!("disk {}: cannot begin round {round}: {e}", disks[disk]),
                    );
                    break;
                }
                if let Ok(mut s) = status.lock() {
                    s.disks[disk].scanned = Position::new(round, 0);
                }
            }
            WriteCmd::Checkpoint { disk, slot, at } => {
                let Some(Some(b)) = builders.get_mut(disk) else {
                    continue;
                };
                match b.checkpoint() {
                    Ok(()) => {
                        if let Ok(mut s) = status.lock() {
                            s.disks[disk].acked = at;
                            s.disks[disk].scanned = at;
                        }
                        let _ = replies.blocking_send(WriteReply::Acked { slot, disk, at });
                    }
                    Err(e) => {
                        fail(
                            store_code(&e),
                            format!("disk {}: checkpoint failed: {e}", disks[disk]),
                        );
                        break;
                    }
                }
            }
            WriteCmd::Barrier { token } => {
                let _ = replies.blocking_send(WriteReply::Barrier { token });
            }
            WriteCmd::End {
                disk,
                slot,
                root,
                consistency,
            } => {
                let Some(b) = builders.get_mut(disk).and_then(Option::take) else {
                    continue;
                };
                let new_bytes = status
                    .lock()
                    .map(|s| s.disks[disk].stored_bytes)
                    .unwrap_or(0);
                match b.commit(&root, new_bytes, &consistency) {
                    Ok(info) => {
                        info!(
                            agent,
                            disk = %disks[disk],
                            point = info.point,
                            root = %info.root,
                            consistency = info.consistency.level.as_str(),
                            frozen_ms = info.consistency.frozen_ms,
                            rounds = info.consistency.rounds,
                            "point committed"
                        );
                        if let Ok(mut s) = status.lock() {
                            s.disks[disk].committed = Some(info.clone());
                            s.disks[disk].acked =
                                Position::new(s.disks[disk].acked.round, info.block_count);
                        }
                        let _ = replies.blocking_send(WriteReply::Committed { slot, disk, info });
                    }
                    Err(e) => {
                        fail(
                            store_code(&e),
                            format!("disk {}: point not committed: {e}", disks[disk]),
                        );
                        break;
                    }
                }
            }
        }
    }
    // The session is over (or abandoned): builders not committed are
    // aborted, which removes their staging logs.
    for b in builders.into_iter().flatten() {
        let _ = b.abort();
    }
}
