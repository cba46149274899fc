//! The one error type of the recovery-point store.
//!
//! Every failure the store can meet, from a file it cannot read to a block
//! whose bytes do not hash to the digest the agent claimed, is one variant
//! here, so that the session layer can tell a peer's fault (a digest
//! mismatch, a block out of order) from the store's own (I/O, corruption).

use std::path::{Path, PathBuf};

use tideline_protocol::Digest;

use super::PointId;

/// What went wrong in the recovery-point store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A caller's callback stopped a walk of a point (its peer went away,
    /// or sent something out of step).
    #[error("stopped: {0}")]
    Protocol(String),
    /// A file or directory operation failed; `path` names the file.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file system holding the store is full (ENOSPC, or a quota).
    #[error("no space left on the store's file system (writing {})", path.display())]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// The store takes no new points (it is full), but serves the ones it
    /// holds.
    #[error("the store at {} takes no new points: {reason}", root.display())]
    ReadOnly {
        /// The store's root.
        root: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A block's bytes do not hash to the digest it was sent or stored with.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the block was announced or referenced with.
        expected: Digest,
        /// The digest of the bytes actually decoded.
        actual: Digest,
    },
    /// A payload could not be decoded into a block (bad zstd frame, wrong
    /// length, output larger than announced, unsupported encoding).
    #[error("cannot decode chunk {digest}: {reason}")]
    Decode {
        /// The digest of the chunk being decoded.
        digest: Digest,
        /// Why decoding failed.
        reason: String,
    },
    /// A file of the store does not have the format it must have.
    #[error("corrupt store file {}: {what}", path.display())]
    Corrupt {
        /// The file found corrupt.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// An agent, disk or point that was asked for does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The index built for a new point does not have the root the agent
    /// computed; nothing was committed.
    #[error("index root mismatch: expected {expected}, built {actual}")]
    IndexRootMismatch {
        /// The root the agent sent.
        expected: Digest,
        /// The root of the index the store built.
        actual: Digest,
    },
    /// An index references a chunk the store does not hold.
    #[error("chunk {digest} is not in the store")]
    MissingChunk {
        /// The digest of the missing chunk.
        digest: Digest,
    },
    /// Blocks were recorded out of ascending order.
    #[error("block {block} recorded after block {last}")]
    BlockOrder {
        /// The block being recorded.
        block: u64,
        /// The last block recorded before it.
        last: u64,
    },
    /// A round does not follow the current one (or a resume names a round
    /// the staging log never started).
    #[error("round {round} cannot follow round {current}")]
    RoundOrder {
        /// The round asked for.
        round: u32,
        /// The staging log's current round.
        current: u32,
    },
    /// A block number lies past the end of the disk.
    #[error("block {block} is out of range (disk has {block_count} blocks)")]
    BlockOutOfRange {
        /// The block number.
        block: u64,
        /// The number of blocks of the disk.
        block_count: u64,
    },
    /// A chunk's decoded length is not the length of the block it stands for.
    #[error("block {block} should be {expected} bytes long, its chunk holds {actual}")]
    BlockLength {
        /// The block number.
        block: u64,
        /// The block's length in the point's geometry.
        expected: u32,
        /// The chunk's decoded length.
        actual: u32,
    },
    /// An agent or disk id is not a valid id (it would not be a safe
    /// directory name).
    #[error("invalid id {0:?}")]
    InvalidId(String),
    /// A disk size or block size is outside what the store accepts.
    #[error("invalid geometry: disk size {disk_size}, block size {block_size}")]
    InvalidGeometry {
        /// The disk size in bytes.
        disk_size: u64,
        /// The block size in bytes.
        block_size: u32,
    },
    /// A point with this id already exists for this disk.
    #[error("point {point:016x} of {agent}/{disk} already exists")]
    PointExists {
        /// The agent id.
        agent: String,
        /// The disk id.
        disk: String,
        /// The point id.
        point: PointId,
    },
    /// Another builder is already writing this point.
    #[error("point {point:016x} of {agent}/{disk} is being written by another session")]
    PointBusy {
        /// The agent id.
        agent: String,
        /// The disk id.
        disk: String,
        /// The point id.
        point: PointId,
    },
    /// The base point cannot be carried to the new geometry (its block size
    /// differs), so the new point must be built without a base.
    #[error("base point {base:016x} has block size {base_block_size}, cannot carry it to block size {block_size}")]
    CannotCarry {
        /// The base point id.
        base: PointId,
        /// The base point's block size.
        base_block_size: u32,
        /// The new point's block size.
        block_size: u32,
    },
}

/// Builds the [`StoreError::Io`] mapper for an operation on `path`
/// ([`StoreError::NoSpace`] when the file system is full). The path is only
/// copied when the operation fails.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| {
        if is_no_space(&source) {
            StoreError::NoSpace {
                path: path.to_path_buf(),
            }
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Whether an I/O error means the file system (or the user's quota) is full.
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl StoreError {
    /// Whether this is the store running out of space.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Io { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}
