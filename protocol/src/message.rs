//! Protocol v2 messages and their encoding. `docs/protocol.md` describes
//! each one, who sends it and when.

use crate::consistency::{Consistency, PointConsistency};
use crate::digest::Digest;
use crate::encoding::Encoding;
use crate::frame::{begin_frame, finish_frame, RawFrame};
use crate::limits::{
    valid_block_size, MAX_BLOCK_SIZE, MAX_DISKS, MAX_DISK_SIZE, MAX_INDEX_CHUNK, MAX_ROUNDS,
    MAX_TEXT_LEN,
};
use crate::wire::{DecodeError, Reader, Writer};

/// The protocol version this crate speaks. Version 2 added rounds
/// (`Round`, positions in `Checkpoint`, `Ack` and `StartSync`) and the
/// point's consistency in `DiskEnd`; version 1 peers are refused at `Hello`.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes that open every `Hello` body, so that a peer speaking something else
/// is recognised at once.
pub const HELLO_MAGIC: &[u8; 8] = b"TIDELINE";

/// Message kind bytes.
#[allow(missing_docs)]
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const INVENTORY: u8 = 0x03;
    pub const START_SYNC: u8 = 0x10;
    pub const SYNC_READY: u8 = 0x11;
    pub const INDEX_CHUNK: u8 = 0x12;
    pub const INDEX_END: u8 = 0x13;
    pub const BLOCK: u8 = 0x14;
    pub const CHECKPOINT: u8 = 0x15;
    pub const ACK: u8 = 0x16;
    pub const DISK_END: u8 = 0x17;
    pub const COMMITTED: u8 = 0x18;
    pub const SESSION_END: u8 = 0x19;
    pub const ROUND: u8 = 0x1A;
    pub const ERROR: u8 = 0x20;
    pub const HEARTBEAT: u8 = 0x21;
    pub const HEARTBEAT_ACK: u8 = 0x22;
    pub const START_FAILBACK: u8 = 0x30;
    pub const FAILBACK_READY: u8 = 0x31;
    pub const TARGET_CHUNK: u8 = 0x32;
    pub const TARGET_END: u8 = 0x33;
    pub const FAILBACK_SENT: u8 = 0x34;
    pub const FAILBACK_PROGRESS: u8 = 0x35;
    pub const FAILBACK_DONE: u8 = 0x36;
}

/// Agent → controller, first message: who is calling and which versions it
/// speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the agent speaks.
    pub min_version: u16,
    /// Highest protocol version the agent speaks.
    pub max_version: u16,
    /// Agent software name and version, for logs.
    pub software: String,
}

/// Controller → agent, answer to `Hello`: the chosen version and the
/// identity the controller took from the agent's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version both ends now speak.
    pub version: u16,
    /// Controller software name and version.
    pub controller: String,
    /// The agent id, as the controller read it from the client certificate.
    pub agent_id: String,
}

/// One disk the agent protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Stable disk id from the agent's configuration.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
}

/// One failback target the agent may write: a disk of a newly created
/// source machine, declared in the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// Stable target id from the agent's configuration.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
}

/// Agent → controller: the disks it protects and the failback targets it
/// offers (after `Welcome`, and again whenever they change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// The disks, at most `MAX_DISKS`.
    pub disks: Vec<DiskInfo>,
    /// The failback targets, at most `MAX_DISKS`.
    pub targets: Vec<TargetInfo>,
}

/// The point a new point builds on, as the controller stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseRef {
    /// Point id.
    pub point: u64,
    /// Disk size of that point.
    pub disk_size: u64,
    /// Block size of that point.
    pub block_size: u32,
    /// Index root of that point.
    pub root: Digest,
}

/// A place in a slot's stream of blocks: a round, then a block within it.
///
/// A slot's blocks are sent in rounds. Round 0 is the first copy; each
/// later round (opened by `Round`) copies again blocks that changed while
/// the previous one ran, and a block of a later round replaces the same
/// block of an earlier one. Within a round blocks ascend. Positions order
/// by round, then block, which is the order in which blocks are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Round, from 0.
    pub round: u32,
    /// Block within the round.
    pub block: u64,
}

impl Position {
    /// Block `block` of round `round`.
    pub fn new(round: u32, block: u64) -> Position {
        Position { round, block }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "round {} block {}", self.round, self.block)
    }
}

/// One disk of a sync session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncDisk {
    /// Disk id.
    pub id: String,
    /// Id the new point will have.
    pub point: u64,
    /// The committed point the changes are taken against, if any.
    pub base: Option<BaseRef>,
    /// Where to go on (non-zero when resuming an interrupted session: the
    /// last position the controller acknowledged).
    pub resume_from: Position,
}

/// Controller → agent: sync these disks as new points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartSync {
    /// Session id, unique per controller; reused when resuming.
    pub session: u64,
    /// The disks; their position in this list is their *slot*.
    pub disks: Vec<SyncDisk>,
}

/// The agent's state for one disk of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyDisk {
    /// Current disk size.
    pub disk_size: u64,
    /// Block size.
    pub block_size: u32,
    /// True when the agent's block map cannot vouch for the base point and
    /// the controller must send the base index first.
    pub needs_index: bool,
}

/// Agent → controller: the session is accepted; one entry per slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReady {
    /// Session id.
    pub session: u64,
    /// One entry per slot of `StartSync`.
    pub disks: Vec<ReadyDisk>,
}

/// Controller → agent: a run of the base index for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexChunk {
    /// Slot.
    pub slot: u16,
    /// Block number of the first digest.
    pub first_block: u64,
    /// Digests, at most `MAX_INDEX_CHUNK`.
    pub digests: Vec<Digest>,
}

/// A block of data, as sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Slot.
    pub slot: u16,
    /// Block number.
    pub block: u64,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Uncompressed length of the block.
    pub raw_len: u32,
    /// BLAKE3 digest of the uncompressed block.
    pub digest: Digest,
    /// Payload (empty for `Encoding::Zero`).
    pub payload: Vec<u8>,
}

/// Agent → controller: a slot is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEnd {
    /// Slot.
    pub slot: u16,
    /// Number of blocks in the new point.
    pub block_count: u64,
    /// Blocks sent in this session for this slot (including before a resume).
    pub sent_blocks: u64,
    /// Root of the new index as the agent computes it.
    pub root: Digest,
    /// How consistent the point is.
    pub consistency: PointConsistency,
}

/// Controller → agent: a slot's point is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Slot.
    pub slot: u16,
    /// Committed point id.
    pub point: u64,
    /// Its index root.
    pub root: Digest,
}

/// One target of a failback pass: write point `point` (geometry and root
/// given) into the agent's target `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailbackTarget {
    /// Target id from the agent's configuration.
    pub target: String,
    /// Where the point comes from (`agent/disk`), for logs and refusals.
    pub source: String,
    /// Point id.
    pub point: u64,
    /// Disk size of the point.
    pub disk_size: u64,
    /// Block size of the point.
    pub block_size: u32,
    /// Index root of the point: what the target's digests must hash to once
    /// the pass is done.
    pub root: Digest,
    /// Write even if the target looks mounted or in use.
    pub force: bool,
    /// Describe the target by reading it, even when the agent's map of the
    /// previous pass could vouch for it.
    pub rescan: bool,
}

/// Controller → agent: run one failback pass into these targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailback {
    /// Session id, unique per controller.
    pub session: u64,
    /// Pass number within the failback job (1 for the first), for logs.
    pub pass: u32,
    /// The targets; their position in this list is their *slot*.
    pub targets: Vec<FailbackTarget>,
}

/// How the agent learnt what a target holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetDescription {
    /// It read and hashed the target.
    Scanned,
    /// Its map of the previous pass vouched for the target.
    Map,
}

impl TargetDescription {
    /// Wire value.
    pub fn code(self) -> u8 {
        match self {
            TargetDescription::Scanned => 0,
            TargetDescription::Map => 1,
        }
    }

    /// The description for wire value `v`.
    pub fn from_code(v: u8) -> Option<Self> {
        match v {
            0 => Some(TargetDescription::Scanned),
            1 => Some(TargetDescription::Map),
            _ => None,
        }
    }
}

/// The agent's answer for one target of a failback pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyTarget {
    /// Size of the target in bytes (at least the point's disk size).
    pub target_size: u64,
    /// How the digests that follow were obtained.
    pub described_by: TargetDescription,
}

/// Agent → controller: the pass is accepted (every target passed its
/// guards); the target digests follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailbackReady {
    /// Session id.
    pub session: u64,
    /// One entry per slot of `StartFailback`.
    pub targets: Vec<ReadyTarget>,
}

/// Agent → controller: how far a slot's writing has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailbackProgress {
    /// Slot.
    pub slot: u16,
    /// Blocks written so far in this pass.
    pub written_blocks: u64,
    /// Blocks written, flushed, re-read and found to match their digest.
    pub verified_blocks: u64,
    /// Bytes written so far in this pass.
    pub written_bytes: u64,
}

/// Agent → controller: a slot is done; every block the controller sent was
/// written, flushed, re-read and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailbackDone {
    /// Slot.
    pub slot: u16,
    /// Blocks written in this pass.
    pub written_blocks: u64,
    /// Blocks verified in this pass.
    pub verified_blocks: u64,
    /// Index root over what the target now holds (its first
    /// `block_count` blocks); equal to the point's root when the target
    /// matches the point.
    pub root: Digest,
}

/// Error codes carried by [`ErrorMsg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No protocol version in common.
    VersionUnsupported,
    /// A frame or message could not be decoded.
    Malformed,
    /// A message arrived in a state that does not allow it.
    UnexpectedMessage,
    /// A session names a disk the agent does not protect.
    UnknownDisk,
    /// The agent cannot read a disk.
    DiskUnreadable,
    /// A block's payload does not hash to its digest.
    DigestMismatch,
    /// The index roots of the two ends differ.
    IndexMismatch,
    /// The controller could not store data.
    StoreFailure,
    /// The peer is busy with another session.
    Busy,
    /// The session was cancelled.
    SessionAborted,
    /// The peer is shutting down.
    ShuttingDown,
    /// Anything else.
    Internal,
    /// A failback target failed a guard (too small, mounted, in use,
    /// unknown); nothing was written.
    TargetRefused,
    /// Writing or flushing a failback target failed.
    TargetUnwritable,
    /// A block re-read from a failback target does not match its digest.
    VerifyFailed,
    /// The controller revoked the agent's certificate: it closes the
    /// connection and refuses new ones until the entry is lifted.
    Revoked,
    /// A code this version does not know.
    Unknown(u16),
}

impl ErrorCode {
    /// Wire value.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::VersionUnsupported => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::UnexpectedMessage => 3,
            ErrorCode::UnknownDisk => 4,
            ErrorCode::DiskUnreadable => 5,
            ErrorCode::DigestMismatch => 6,
            ErrorCode::IndexMismatch => 7,
            ErrorCode::StoreFailure => 8,
            ErrorCode::Busy => 9,
            ErrorCode::SessionAborted => 10,
            ErrorCode::ShuttingDown => 11,
            ErrorCode::Internal => 12,
            ErrorCode::TargetRefused => 13,
            ErrorCode::TargetUnwritable => 14,
            ErrorCode::VerifyFailed => 15,
            ErrorCode::Revoked => 16,
            ErrorCode::Unknown(c) => c,
        }
    }

    /// The code for wire value `v`.
    pub fn from_code(v: u16) -> Self {
        match v {
            1 => ErrorCode::VersionUnsupported,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::UnexpectedMessage,
            4 => ErrorCode::UnknownDisk,
            5 => ErrorCode::DiskUnreadable,
            6 => ErrorCode::DigestMismatch,
            7 => ErrorCode::IndexMismatch,
            8 => ErrorCode::StoreFailure,
            9 => ErrorCode::Busy,
            10 => ErrorCode::SessionAborted,
            11 => ErrorCode::ShuttingDown,
            12 => ErrorCode::Internal,
            13 => ErrorCode::TargetRefused,
            14 => ErrorCode::TargetUnwritable,
            15 => ErrorCode::VerifyFailed,
            16 => ErrorCode::Revoked,
            c => ErrorCode::Unknown(c),
        }
    }
}

/// Either direction: something went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Session it concerns (0 = none).
    pub session: u64,
    /// True when the sender will close the connection.
    pub fatal: bool,
    /// Human-readable detail naming the disk, file or block.
    pub message: String,
}

/// Every protocol v1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Inventory(Inventory),
    StartSync(StartSync),
    SyncReady(SyncReady),
    IndexChunk(IndexChunk),
    /// Controller → agent: the base index of a slot is complete.
    IndexEnd {
        slot: u16,
    },
    Block(Block),
    /// Agent → controller: every block of the slot before `at` has been
    /// scanned and, if changed, sent.
    Checkpoint {
        slot: u16,
        at: Position,
    },
    /// Controller → agent: every block before `at` is durably stored; a
    /// resumed session starts there.
    Ack {
        slot: u16,
        at: Position,
    },
    /// Agent → controller: the slot's current round is complete and round
    /// `round` (the next one) begins at block 0.
    Round {
        slot: u16,
        round: u32,
    },
    DiskEnd(DiskEnd),
    Committed(Committed),
    /// Controller → agent: the session is over.
    SessionEnd {
        session: u64,
    },
    Error(ErrorMsg),
    /// Either direction: are you there?
    Heartbeat {
        seq: u64,
    },
    /// Answer to `Heartbeat`.
    HeartbeatAck {
        seq: u64,
    },
    StartFailback(StartFailback),
    FailbackReady(FailbackReady),
    /// Agent → controller: a run of a failback target's digests.
    TargetChunk(IndexChunk),
    /// Agent → controller: a target's digests are complete.
    TargetEnd {
        slot: u16,
    },
    /// Controller → agent: every block of the slot that differs has been
    /// sent (`sent_blocks` of them).
    FailbackSent {
        slot: u16,
        sent_blocks: u64,
    },
    FailbackProgress(FailbackProgress),
    FailbackDone(FailbackDone),
}

/// Why a frame did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The kind byte names no message.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// The body is malformed.
    #[error("malformed {kind} message: {cause}")]
    Body {
        /// Message name.
        kind: &'static str,
        /// What was wrong (in the message; not a `source`, so that an
        /// error chain does not print it twice).
        cause: DecodeError,
    },
}

impl Message {
    /// Name of the message, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Inventory(_) => "Inventory",
            Message::StartSync(_) => "StartSync",
            Message::SyncReady(_) => "SyncReady",
            Message::IndexChunk(_) => "IndexChunk",
            Message::IndexEnd { .. } => "IndexEnd",
            Message::Block(_) => "Block",
            Message::Checkpoint { .. } => "Checkpoint",
            Message::Ack { .. } => "Ack",
            Message::DiskEnd(_) => "DiskEnd",
            Message::Committed(_) => "Committed",
            Message::SessionEnd { .. } => "SessionEnd",
            Message::Round { .. } => "Round",
            Message::Error(_) => "Error",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::HeartbeatAck { .. } => "HeartbeatAck",
            Message::StartFailback(_) => "StartFailback",
            Message::FailbackReady(_) => "FailbackReady",
            Message::TargetChunk(_) => "TargetChunk",
            Message::TargetEnd { .. } => "TargetEnd",
            Message::FailbackSent { .. } => "FailbackSent",
            Message::FailbackProgress(_) => "FailbackProgress",
            Message::FailbackDone(_) => "FailbackDone",
        }
    }

    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let k = self.kind();
        let start = begin_frame(out, k);
        self.encode_body(&mut Writer::new(out));
        finish_frame(out, start);
    }

    /// This message as one frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Welcome(_) => kind::WELCOME,
            Message::Inventory(_) => kind::INVENTORY,
            Message::StartSync(_) => kind::START_SYNC,
            Message::SyncReady(_) => kind::SYNC_READY,
            Message::IndexChunk(_) => kind::INDEX_CHUNK,
            Message::IndexEnd { .. } => kind::INDEX_END,
            Message::Block(_) => kind::BLOCK,
            Message::Checkpoint { .. } => kind::CHECKPOINT,
            Message::Ack { .. } => kind::ACK,
            Message::DiskEnd(_) => kind::DISK_END,
            Message::Committed(_) => kind::COMMITTED,
            Message::SessionEnd { .. } => kind::SESSION_END,
            Message::Round { .. } => kind::ROUND,
            Message::Error(_) => kind::ERROR,
            Message::Heartbeat { .. } => kind::HEARTBEAT,
            Message::HeartbeatAck { .. } => kind::HEARTBEAT_ACK,
            Message::StartFailback(_) => kind::START_FAILBACK,
            Message::FailbackReady(_) => kind::FAILBACK_READY,
            Message::TargetChunk(_) => kind::TARGET_CHUNK,
            Message::TargetEnd { .. } => kind::TARGET_END,
            Message::FailbackSent { .. } => kind::FAILBACK_SENT,
            Message::FailbackProgress(_) => kind::FAILBACK_PROGRESS,
            Message::FailbackDone(_) => kind::FAILBACK_DONE,
        }
    }

    fn encode_body(&self, w: &mut Writer<'_>) {
        match self {
            Message::Hello(h) => {
                w.bytes(HELLO_MAGIC);
                w.u16(h.min_version);
                w.u16(h.max_version);
                w.str(&h.software);
            }
            Message::Welcome(m) => {
                w.u16(m.version);
                w.str(&m.controller);
                w.str(&m.agent_id);
            }
            Message::Inventory(inv) => {
                w.u32(inv.disks.len() as u32);
                for d in &inv.disks {
                    w.str(&d.id);
                    w.u64(d.size);
                    w.u32(d.block_size);
                }
                w.u32(inv.targets.len() as u32);
                for t in &inv.targets {
                    w.str(&t.id);
                    w.u64(t.size);
                }
            }
            Message::StartSync(s) => {
                w.u64(s.session);
                w.u32(s.disks.len() as u32);
                for d in &s.disks {
                    w.str(&d.id);
                    w.u64(d.point);
                    match &d.base {
                        None => w.u8(0),
                        Some(b) => {
                            w.u8(1);
                            w.u64(b.point);
                            w.u64(b.disk_size);
                            w.u32(b.block_size);
                            w.digest(&b.root);
                        }
                    }
                    w.u32(d.resume_from.round);
                    w.u64(d.resume_from.block);
                }
            }
            Message::SyncReady(r) => {
                w.u64(r.session);
                w.u32(r.disks.len() as u32);
                for d in &r.disks {
                    w.u64(d.disk_size);
                    w.u32(d.block_size);
                    w.u8(u8::from(d.needs_index));
                }
            }
            Message::IndexChunk(c) => {
                w.u16(c.slot);
                w.u64(c.first_block);
                w.u32(c.digests.len() as u32);
                for d in &c.digests {
                    w.digest(d);
                }
            }
            Message::IndexEnd { slot } => w.u16(*slot),
            Message::Block(b) => {
                w.u16(b.slot);
                w.u64(b.block);
                w.u8(b.encoding.code());
                w.u32(b.raw_len);
                w.digest(&b.digest);
                w.bytes(&b.payload);
            }
            Message::Checkpoint { slot, at } | Message::Ack { slot, at } => {
                w.u16(*slot);
                w.u32(at.round);
                w.u64(at.block);
            }
            Message::Round { slot, round } => {
                w.u16(*slot);
                w.u32(*round);
            }
            Message::DiskEnd(e) => {
                w.u16(e.slot);
                w.u64(e.block_count);
                w.u64(e.sent_blocks);
                w.digest(&e.root);
                w.u8(e.consistency.level.code());
                w.u32(e.consistency.frozen_ms);
                w.u32(e.consistency.rounds);
                w.str(&e.consistency.note);
            }
            Message::Committed(c) => {
                w.u16(c.slot);
                w.u64(c.point);
                w.digest(&c.root);
            }
            Message::SessionEnd { session } => w.u64(*session),
            Message::Error(e) => {
                w.u16(e.code.code());
                w.u64(e.session);
                w.u8(u8::from(e.fatal));
                w.str(&e.message);
            }
            Message::Heartbeat { seq } | Message::HeartbeatAck { seq } => w.u64(*seq),
            Message::StartFailback(s) => {
                w.u64(s.session);
                w.u32(s.pass);
                w.u32(s.targets.len() as u32);
                for t in &s.targets {
                    w.str(&t.target);
                    w.str(&t.source);
                    w.u64(t.point);
                    w.u64(t.disk_size);
                    w.u32(t.block_size);
                    w.digest(&t.root);
                    w.u8(u8::from(t.force) | (u8::from(t.rescan) << 1));
                }
            }
            Message::FailbackReady(r) => {
                w.u64(r.session);
                w.u32(r.targets.len() as u32);
                for t in &r.targets {
                    w.u64(t.target_size);
                    w.u8(t.described_by.code());
                }
            }
            Message::TargetChunk(c) => {
                w.u16(c.slot);
                w.u64(c.first_block);
                w.u32(c.digests.len() as u32);
                for d in &c.digests {
                    w.digest(d);
                }
            }
            Message::TargetEnd { slot } => w.u16(*slot),
            Message::FailbackSent { slot, sent_blocks } => {
                w.u16(*slot);
                w.u64(*sent_blocks);
            }
            Message::FailbackProgress(p) => {
                w.u16(p.slot);
                w.u64(p.written_blocks);
                w.u64(p.verified_blocks);
                w.u64(p.written_bytes);
            }
            Message::FailbackDone(d) => {
                w.u16(d.slot);
                w.u64(d.written_blocks);
                w.u64(d.verified_blocks);
                w.digest(&d.root);
            }
        }
    }

    /// Decodes a checked frame into a message. Any input yields a message or
    /// an error; nothing is allocated beyond the frame's own size.
    pub fn decode(frame: RawFrame<'_>) -> Result<Message, MessageError> {
        let name = kind_name(frame.kind).ok_or(MessageError::UnknownKind(frame.kind))?;
        let mut r = Reader::new(frame.body);
        let msg = decode_body(frame.kind, &mut r)
            .and_then(|m| r.finish().map(|()| m))
            .map_err(|cause| MessageError::Body { kind: name, cause })?;
        Ok(msg)
    }
}

fn kind_name(k: u8) -> Option<&'static str> {
    Some(match k {
        kind::HELLO => "Hello",
        kind::WELCOME => "Welcome",
        kind::INVENTORY => "Inventory",
        kind::START_SYNC => "StartSync",
        kind::SYNC_READY => "SyncReady",
        kind::INDEX_CHUNK => "IndexChunk",
        kind::INDEX_END => "IndexEnd",
        kind::BLOCK => "Block",
        kind::CHECKPOINT => "Checkpoint",
        kind::ACK => "Ack",
        kind::DISK_END => "DiskEnd",
        kind::COMMITTED => "Committed",
        kind::SESSION_END => "SessionEnd",
        kind::ROUND => "Round",
        kind::ERROR => "Error",
        kind::HEARTBEAT => "Heartbeat",
        kind::HEARTBEAT_ACK => "HeartbeatAck",
        kind::START_FAILBACK => "StartFailback",
        kind::FAILBACK_READY => "FailbackReady",
        kind::TARGET_CHUNK => "TargetChunk",
        kind::TARGET_END => "TargetEnd",
        kind::FAILBACK_SENT => "FailbackSent",
        kind::FAILBACK_PROGRESS => "FailbackProgress",
        kind::FAILBACK_DONE => "FailbackDone",
        _ => return None,
    })
}

fn block_size(r: &mut Reader<'_>, field: &'static str) -> Result<u32, DecodeError> {
    let bs = r.u32(field)?;
    if !valid_block_size(bs) {
        return Err(DecodeError::BadValue {
            field,
            value: u64::from(bs),
        });
    }
    Ok(bs)
}

fn disk_size(r: &mut Reader<'_>, field: &'static str) -> Result<u64, DecodeError> {
    let size = r.u64(field)?;
    if size > MAX_DISK_SIZE {
        return Err(DecodeError::TooLarge {
            field,
            value: size,
            limit: MAX_DISK_SIZE,
        });
    }
    Ok(size)
}

fn decode_body(k: u8, r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(match k {
        kind::HELLO => {
            let magic = r.u64("magic")?;
            if magic != u64::from_le_bytes(*HELLO_MAGIC) {
                return Err(DecodeError::BadValue {
                    field: "magic",
                    value: magic,
                });
            }
            Message::Hello(Hello {
                min_version: r.u16("min_version")?,
                max_version: r.u16("max_version")?,
                software: r.str("software", MAX_TEXT_LEN)?,
            })
        }
        kind::WELCOME => Message::Welcome(Welcome {
            version: r.u16("version")?,
            controller: r.str("controller", MAX_TEXT_LEN)?,
            agent_id: r.id("agent_id")?,
        }),
        kind::INVENTORY => {
            // id (2 + 1) + size (8) + block size (4)
            let n = r.count("disk count", MAX_DISKS, 15)?;
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                disks.push(DiskInfo {
                    id: r.id("disk id")?,
                    size: disk_size(r, "disk size")?,
                    block_size: block_size(r, "block size")?,
                });
            }
            // id (3) + size (8)
            let n = r.count("target count", MAX_DISKS, 11)?;
            let mut targets = Vec::with_capacity(n);
            for _ in 0..n {
                targets.push(TargetInfo {
                    id: r.id("target id")?,
                    size: disk_size(r, "target size")?,
                });
            }
            Message::Inventory(Inventory { disks, targets })
        }
        kind::START_SYNC => {
            let session = r.u64("session")?;
            // id (3) + point (8) + base tag (1) + resume (4 + 8)
            let n = r.count("disk count", MAX_DISKS, 24)?;
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.id("disk id")?;
                let point = r.u64("point")?;
                let base = match r.u8("base tag")? {
                    0 => None,
                    1 => Some(BaseRef {
                        point: r.u64("base point")?,
                        disk_size: disk_size(r, "base disk size")?,
                        block_size: block_size(r, "base block size")?,
                        root: r.digest("base root")?,
                    }),
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "base tag",
                            value: u64::from(v),
                        })
                    }
                };
                let resume_from = position(r, "resume_from")?;
                disks.push(SyncDisk {
                    id,
                    point,
                    base,
                    resume_from,
                });
            }
            Message::StartSync(StartSync { session, disks })
        }
        kind::SYNC_READY => {
            let session = r.u64("session")?;
            let n = r.count("disk count", MAX_DISKS, 13)?;
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                disks.push(ReadyDisk {
                    disk_size: disk_size(r, "disk size")?,
                    block_size: block_size(r, "block size")?,
                    needs_index: r.bool("needs_index")?,
                });
            }
            Message::SyncReady(SyncReady { session, disks })
        }
        kind::INDEX_CHUNK => Message::IndexChunk(index_chunk(r)?),
        kind::TARGET_CHUNK => Message::TargetChunk(index_chunk(r)?),
        kind::INDEX_END => Message::IndexEnd {
            slot: r.u16("slot")?,
        },
        kind::BLOCK => {
            let slot = r.u16("slot")?;
            let block = r.u64("block")?;
            let code = r.u8("encoding")?;
            let encoding = Encoding::from_code(code).ok_or(DecodeError::BadValue {
                field: "encoding",
                value: u64::from(code),
            })?;
            let raw_len = r.u32("raw_len")?;
            if raw_len == 0 || raw_len > MAX_BLOCK_SIZE {
                return Err(DecodeError::BadValue {
                    field: "raw_len",
                    value: u64::from(raw_len),
                });
            }
            let digest = r.digest("digest")?;
            let payload = r.rest();
            let bad_len = match encoding {
                Encoding::Zero => !payload.is_empty(),
                Encoding::Raw => payload.len() != raw_len as usize,
                Encoding::Zstd => payload.is_empty(),
            };
            if bad_len {
                return Err(DecodeError::BadValue {
                    field: "payload length",
                    value: payload.len() as u64,
                });
            }
            Message::Block(Block {
                slot,
                block,
                encoding,
                raw_len,
                digest,
                payload: payload.to_vec(),
            })
        }
        kind::CHECKPOINT => Message::Checkpoint {
            slot: r.u16("slot")?,
            at: position(r, "checkpoint")?,
        },
        kind::ACK => Message::Ack {
            slot: r.u16("slot")?,
            at: position(r, "ack")?,
        },
        kind::ROUND => {
            let slot = r.u16("slot")?;
            let round = r.u32("round")?;
            if round == 0 || round >= MAX_ROUNDS {
                return Err(DecodeError::BadValue {
                    field: "round",
                    value: u64::from(round),
                });
            }
            Message::Round { slot, round }
        }
        kind::DISK_END => {
            let slot = r.u16("slot")?;
            let block_count = r.u64("block_count")?;
            let sent_blocks = r.u64("sent_blocks")?;
            let root = r.digest("root")?;
            let code = r.u8("consistency")?;
            let level = Consistency::from_code(code).ok_or(DecodeError::BadValue {
                field: "consistency",
                value: u64::from(code),
            })?;
            let frozen_ms = r.u32("frozen_ms")?;
            let rounds = r.u32("rounds")?;
            if rounds > MAX_ROUNDS {
                return Err(DecodeError::BadValue {
                    field: "rounds",
                    value: u64::from(rounds),
                });
            }
            Message::DiskEnd(DiskEnd {
                slot,
                block_count,
                sent_blocks,
                root,
                consistency: PointConsistency {
                    level,
                    frozen_ms,
                    rounds,
                    note: r.str("note", MAX_TEXT_LEN)?,
                },
            })
        }
        kind::COMMITTED => Message::Committed(Committed {
            slot: r.u16("slot")?,
            point: r.u64("point")?,
            root: r.digest("root")?,
        }),
        kind::SESSION_END => Message::SessionEnd {
            session: r.u64("session")?,
        },
        kind::ERROR => Message::Error(ErrorMsg {
            code: ErrorCode::from_code(r.u16("code")?),
            session: r.u64("session")?,
            fatal: r.bool("fatal")?,
            message: r.str("message", MAX_TEXT_LEN)?,
        }),
        kind::HEARTBEAT => Message::Heartbeat { seq: r.u64("seq")? },
        kind::HEARTBEAT_ACK => Message::HeartbeatAck { seq: r.u64("seq")? },
        kind::START_FAILBACK => {
            let session = r.u64("session")?;
            let pass = r.u32("pass")?;
            // target (3) + source (3) + point (8) + size (8) + block size (4)
            // + root (32) + flags (1)
            let n = r.count("target count", MAX_DISKS, 59)?;
            let mut targets = Vec::with_capacity(n);
            for _ in 0..n {
                let target = r.id("target id")?;
                let source = r.str("source", MAX_TEXT_LEN)?;
                let point = r.u64("point")?;
                let disk_size = disk_size(r, "disk size")?;
                let block_size = block_size(r, "block size")?;
                let root = r.digest("root")?;
                let flags = r.u8("flags")?;
                if flags & !0b11 != 0 {
                    return Err(DecodeError::BadValue {
                        field: "flags",
                        value: u64::from(flags),
                    });
                }
                targets.push(FailbackTarget {
                    target,
                    source,
                    point,
                    disk_size,
                    block_size,
                    root,
                    force: flags & 1 != 0,
                    rescan: flags & 2 != 0,
                });
            }
            Message::StartFailback(StartFailback {
                session,
                pass,
                targets,
            })
        }
        kind::FAILBACK_READY => {
            let session = r.u64("session")?;
            let n = r.count("target count", MAX_DISKS, 9)?;
            let mut targets = Vec::with_capacity(n);
            for _ in 0..n {
                let target_size = disk_size(r, "target size")?;
                let code = r.u8("described_by")?;
                let described_by =
                    TargetDescription::from_code(code).ok_or(DecodeError::BadValue {
                        field: "described_by",
                        value: u64::from(code),
                    })?;
                targets.push(ReadyTarget {
                    target_size,
                    described_by,
                });
            }
            Message::FailbackReady(FailbackReady { session, targets })
        }
        kind::TARGET_END => Message::TargetEnd {
            slot: r.u16("slot")?,
        },
        kind::FAILBACK_SENT => Message::FailbackSent {
            slot: r.u16("slot")?,
            sent_blocks: r.u64("sent_blocks")?,
        },
        kind::FAILBACK_PROGRESS => Message::FailbackProgress(FailbackProgress {
            slot: r.u16("slot")?,
            written_blocks: r.u64("written_blocks")?,
            verified_blocks: r.u64("verified_blocks")?,
            written_bytes: r.u64("written_bytes")?,
        }),
        kind::FAILBACK_DONE => Message::FailbackDone(FailbackDone {
            slot: r.u16("slot")?,
            written_blocks: r.u64("written_blocks")?,
            verified_blocks: r.u64("verified_blocks")?,
            root: r.digest("root")?,
        }),
        other => {
            return Err(DecodeError::BadValue {
                field: "kind",
                value: u64::from(other),
            })
        }
    })
}

/// A position, with its round bounded by [`MAX_ROUNDS`].
fn position(r: &mut Reader<'_>, field: &'static str) -> Result<Position, DecodeError> {
    let round = r.u32(field)?;
    if round >= MAX_ROUNDS {
        return Err(DecodeError::BadValue {
            field,
            value: u64::from(round),
        });
    }
    Ok(Position {
        round,
        block: r.u64(field)?,
    })
}

/// A run of digests (base index or failback target).
fn index_chunk(r: &mut Reader<'_>) -> Result<IndexChunk, DecodeError> {
    let slot = r.u16("slot")?;
    let first_block = r.u64("first_block")?;
    let n = r.count("digest count", MAX_INDEX_CHUNK, 32)?;
    let mut digests = Vec::with_capacity(n);
    for _ in 0..n {
        digests.push(r.digest("digest")?);
    }
    Ok(IndexChunk {
        slot,
        first_block,
        digests,
    })
}

/// Decodes every whole frame at the start of `bytes` (for tests and fuzzing).
pub fn decode_stream(bytes: &[u8]) -> Result<Vec<Message>, crate::ProtocolError> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((frame, used)) = crate::frame::parse_frame(&bytes[at..])? {
        out.push(Message::decode(frame)?);
        at += used;
    }
    Ok(out)
}
