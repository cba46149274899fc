//! The transmission half of the wire format: requests, simple replies and
//! structured reply chunks, and the checks on what a reply may cover.
//!
//! ```text
//! C: u32 0x25609513, u16 command flags, u16 type, u64 cookie, u64 offset,
//!    u32 length                                     (28 bytes)
//!    then, for NBD_CMD_WRITE only, exactly `length` bytes of data
//! S: simple reply: u32 0x67446698, u32 error, u64 cookie, then for a
//!    successful NBD_CMD_READ exactly `length` bytes  (16 bytes + data)
//! S: structured reply chunk: u32 0x668e33ef, u16 flags (bit 0 = DONE),
//!    u16 type, u64 cookie, u32 payload length, payload (20 bytes + payload)
//! ```
//!
//! Chunk types and payloads:
//!
//! | type | value | payload |
//! | --- | --- | --- |
//! | `NBD_REPLY_TYPE_NONE` | 0 | empty; only with DONE |
//! | `NBD_REPLY_TYPE_OFFSET_DATA` | 1 | u64 offset, data |
//! | `NBD_REPLY_TYPE_OFFSET_HOLE` | 2 | u64 offset, u32 hole length (reads as zeros) |
//! | `NBD_REPLY_TYPE_BLOCK_STATUS` | 5 | u32 context id, then (u32 length, u32 flags) descriptors |
//! | `NBD_REPLY_TYPE_ERROR` | 2^15 + 1 | u32 errno, u16 message length, message |
//! | `NBD_REPLY_TYPE_ERROR_OFFSET` | 2^15 + 2 | as ERROR, then u64 offset |
//!
//! Other types with bit 15 set are errors of unknown shape: their leading
//! u32 errno is still honoured. Any other unknown type is a protocol error.
//!
//! Block status flags: for `base:allocation` bit 0 is `NBD_STATE_HOLE`, bit 1
//! `NBD_STATE_ZERO`; for `qemu:dirty-bitmap:NAME` bit 0 means dirty.
//!
//! # Commands
//!
//! | command | value | offset, length | valid replies |
//! | --- | --- | --- | --- |
//! | `NBD_CMD_READ` | 0 | the range | data, holes, errors |
//! | `NBD_CMD_WRITE` | 1 | the range; `length` bytes follow the header | no payload: simple, or `NONE` / errors |
//! | `NBD_CMD_DISC` | 2 | both 0 | none |
//! | `NBD_CMD_FLUSH` | 3 | both 0 | no payload: simple, or `NONE` / errors |
//! | `NBD_CMD_WRITE_ZEROES` | 6 | the range; no data follows | no payload: simple, or `NONE` / errors |
//! | `NBD_CMD_BLOCK_STATUS` | 7 | the range | block status chunks, errors |
//!
//! The client sends `NBD_CMD_FLUSH` only when the export has
//! `NBD_FLAG_SEND_FLUSH` (bit 2) and `NBD_CMD_WRITE_ZEROES` only with
//! `NBD_FLAG_SEND_WRITE_ZEROES` (bit 6); it writes nothing to an export with
//! `NBD_FLAG_READ_ONLY` (bit 1). Command flags are always 0: in particular
//! no `NBD_CMD_FLAG_NO_HOLE` (bit 1), so the server may punch a hole
//! wherever it zeroes, and no `NBD_CMD_FLAG_FUA` (durability comes from
//! the flush).
//!
//! An error chunk's offset (`ERROR_OFFSET`) must lie inside the request it
//! answers; for a flush, whose request has no range, it is ignored (the
//! spec makes an unexpected error type an error of the reply, not of the
//! stream).

use std::collections::BTreeMap;

use super::{be16, be32, be64, message_text, need, WireError};

/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Transmission flag: the other flags are valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server understands `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server understands `NBD_CMD_WRITE_ZEROES` (and
/// its `NBD_CMD_FLAG_NO_HOLE`).
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server has no cache, or one cache shared by all
/// connections, so several connections see the same data and a flush on
/// any of them covers writes completed on all of them.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`: the request header is followed by the data.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: orderly disconnect, no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`: offset and length 0.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_WRITE_ZEROES`: no data follows the header.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag of `NBD_CMD_WRITE_ZEROES`: the range must stay allocated.
/// Never sent: zeroed ranges may become holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks a chunk type as an error.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// `base:allocation`: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent changed since the bitmap started.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Largest read or write payload when the server does not say (the spec's
/// advice to clients: 2^25 bytes is never taken for a denial of service).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest `NBD_CMD_WRITE_ZEROES` when the server sets no maximum block
/// size (nothing is sent for it, so only the server's work is bounded; a
/// multiple of every possible minimum block size).
pub const DEFAULT_MAX_ZEROES: u32 = 1 << 30;
/// "No inherent limit" as a maximum block size in `NBD_INFO_BLOCK_SIZE`.
pub const BLOCK_SIZE_UNLIMITED: u32 = u32::MAX;
/// Most descriptors accepted in one block status chunk (8 MiB of payload;
/// qemu-nbd sends at most 128 Ki).
pub const MAX_STATUS_DESCRIPTORS: u32 = 1 << 20;
/// Largest error chunk payload: u32 + u16 + a u16-sized message + u64.
pub const MAX_ERROR_PAYLOAD: u32 = 4 + 2 + 0xffff + 8;
/// Most disjoint pieces a structured read reply may arrive in.
pub const MAX_READ_PIECES: usize = 64 * 1024;
/// Most chunks accepted in a reply to a write, a write of zeroes or a flush
/// (a `NONE` and error chunks: one `ERROR_OFFSET` per failed piece).
pub const MAX_WRITE_REPLY_CHUNKS: usize = 64 * 1024;

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// The header of a transmission reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes).
    Simple {
        /// Error number (0 = success).
        error: u32,
        /// Cookie of the request.
        cookie: u64,
    },
    /// A structured reply chunk (20 bytes).
    Chunk(ChunkHeader),
}

/// The header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Flags (`NBD_REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type.
    pub kind: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length (not yet bounded: see [`max_chunk_payload`]).
    pub len: u32,
}

impl ChunkHeader {
    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Length of the reply header that starts with these 4 bytes of magic.
pub fn reply_header_len(magic: [u8; 4]) -> Result<usize, WireError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
        other => Err(WireError::BadMagic {
            what: "transmission reply",
            got: other.into(),
        }),
    }
}

/// Parses a simple reply header or a structured chunk header.
pub fn parse_reply_header(b: &[u8]) -> Result<ReplyHeader, WireError> {
    need("reply header", b, 4)?;
    let len = reply_header_len([b[0], b[1], b[2], b[3]])?;
    need("reply header", b, len)?;
    if len == SIMPLE_REPLY_LEN {
        return Ok(ReplyHeader::Simple {
            error: be32(b, 4),
            cookie: be64(b, 8),
        });
    }
    Ok(ReplyHeader::Chunk(ChunkHeader {
        flags: be16(b, 4),
        kind: be16(b, 6),
        cookie: be64(b, 8),
        len: be32(b, 16),
    }))
}

/// What a chunk answers, for bounding and checking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` of `len` bytes.
    Read {
        /// Bytes requested.
        len: u32,
    },
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// `NBD_CMD_WRITE`: the reply carries no data.
    Write,
    /// `NBD_CMD_WRITE_ZEROES`: the reply carries no data.
    WriteZeroes,
    /// `NBD_CMD_FLUSH`: the reply carries no data, and the request no range.
    Flush,
}

impl Command {
    /// The command's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "NBD_CMD_READ",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
            Command::Write => "NBD_CMD_WRITE",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::Flush => "NBD_CMD_FLUSH",
        }
    }

    /// The command's type field.
    pub fn kind(&self) -> u16 {
        match self {
            Command::Read { .. } => CMD_READ,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Write => CMD_WRITE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::Flush => CMD_FLUSH,
        }
    }
}

/// Encodes a request header. Command flags are always 0 (see the module
/// documentation); for `NBD_CMD_WRITE` the caller sends `len` bytes of data
/// right after it.
pub fn encode_request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut msg = [0u8; REQUEST_LEN];
    msg[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // msg[4..6]: command flags, 0.
    msg[6..8].copy_from_slice(&kind.to_be_bytes());
    msg[8..16].copy_from_slice(&cookie.to_be_bytes());
    msg[16..24].copy_from_slice(&offset.to_be_bytes());
    msg[24..28].copy_from_slice(&len.to_be_bytes());
    msg
}

/// The offset an error chunk names, checked against the request `[offset,
/// offset + len)` it answers. A flush has no range: its offset is dropped.
pub fn error_offset_in_request(
    command: Command,
    at: Option<u64>,
    offset: u64,
    len: u64,
) -> Result<Option<u64>, WireError> {
    match (command, at) {
        (Command::Flush, _) | (_, None) => Ok(None),
        (_, Some(at)) if at >= offset && at - offset < len => Ok(Some(at)),
        (_, Some(at)) => Err(WireError::ErrorOffsetOutside {
            offset: at,
            req_start: offset,
            req_end: offset.saturating_add(len),
        }),
    }
}

/// The largest payload a chunk of this header may carry in reply to
/// `command`; checked before the payload is read or allocated. Chunk types
/// that do not belong to the command are refused here.
pub fn max_chunk_payload(h: &ChunkHeader, command: Command) -> Result<u32, WireError> {
    let wrong = || WireError::ChunkForWrongCommand {
        kind: h.kind,
        command: command.name(),
    };
    let max = match (h.kind, command) {
        (REPLY_TYPE_NONE, _) => 0,
        (REPLY_TYPE_OFFSET_DATA, Command::Read { len }) => len.saturating_add(8),
        (REPLY_TYPE_OFFSET_HOLE, Command::Read { .. }) => 12,
        (REPLY_TYPE_BLOCK_STATUS, Command::BlockStatus) => 4 + 8 * MAX_STATUS_DESCRIPTORS,
        (REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE | REPLY_TYPE_BLOCK_STATUS, _) => {
            return Err(wrong())
        }
        (k, _) if k & REPLY_TYPE_ERROR_BIT != 0 => MAX_ERROR_PAYLOAD,
        (k, _) => return Err(WireError::UnknownChunkType(k)),
    };
    if h.len > max {
        return Err(WireError::TooLong {
            what: "structured reply chunk",
            len: h.len.into(),
            max: max.into(),
        });
    }
    Ok(max)
}

/// A parsed structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    Data {
        /// Export offset of the data.
        offset: u64,
        /// The bytes (non-empty).
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    Hole {
        /// Export offset of the hole.
        offset: u64,
        /// Its length (non-zero).
        len: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Context id.
        context: u32,
        /// Descriptors: a non-empty multiple of 8 bytes.
        descriptors: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_ERROR`, `ERROR_OFFSET` or an unknown error type.
    Error {
        /// Error number (never 0: a zero errno is turned into EIO).
        errno: u32,
        /// The server's message.
        message: String,
        /// The offset, for `ERROR_OFFSET`.
        offset: Option<u64>,
    },
}

const EIO: u32 = 5;

/// Parses a chunk's payload (exactly `h.len` bytes) by its type.
pub fn parse_chunk_payload<'a>(h: &ChunkHeader, p: &'a [u8]) -> Result<Chunk<'a>, WireError> {
    if p.len() as u64 != u64::from(h.len) {
        return Err(WireError::Short {
            what: "structured reply payload",
            got: p.len(),
            need: h.len as usize,
        });
    }
    match h.kind {
        REPLY_TYPE_NONE => {
            if !p.is_empty() {
                return Err(WireError::BadLength {
                    what: "NBD_REPLY_TYPE_NONE",
                    len: p.len() as u64,
                    expected: "0",
                });
            }
            if !h.done() {
                return Err(WireError::NoneNotDone);
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            need("NBD_REPLY_TYPE_OFFSET_DATA", p, 8)?;
            if p.len() == 8 {
                return Err(WireError::ZeroLength("NBD_REPLY_TYPE_OFFSET_DATA chunk"));
            }
            Ok(Chunk::Data {
                offset: be64(p, 0),
                data: &p[8..],
            })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if p.len() != 12 {
                return Err(WireError::BadLength {
                    what: "NBD_REPLY_TYPE_OFFSET_HOLE",
                    len: p.len() as u64,
                    expected: "12",
                });
            }
            let len = be32(p, 8);
            if len == 0 {
                return Err(WireError::ZeroLength("NBD_REPLY_TYPE_OFFSET_HOLE chunk"));
            }
            Ok(Chunk::Hole {
                offset: be64(p, 0),
                len,
            })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            need("NBD_REPLY_TYPE_BLOCK_STATUS", p, 12)?;
            if (p.len() - 4) & 7 != 0 {
                return Err(WireError::BadLength {
                    what: "NBD_REPLY_TYPE_BLOCK_STATUS",
                    len: p.len() as u64,
                    expected: "4 + a multiple of 8",
                });
            }
            Ok(Chunk::BlockStatus {
                context: be32(p, 0),
                descriptors: &p[4..],
            })
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            need("error chunk", p, 4)?;
            let errno = match be32(p, 0) {
                0 => EIO,
                e => e,
            };
            if k != REPLY_TYPE_ERROR && k != REPLY_TYPE_ERROR_OFFSET {
                // Unknown error type: the errno is all that can be trusted.
                return Ok(Chunk::Error {
                    errno,
                    message: format!("error reply of unknown type {k}"),
                    offset: None,
                });
            }
            need("error chunk", p, 6)?;
            let mlen = usize::from(be16(p, 4));
            let tail = if k == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if p.len() != 6 + mlen + tail {
                return Err(WireError::BadLength {
                    what: "error chunk",
                    len: p.len() as u64,
                    expected: "6 + message length (+ 8 for ERROR_OFFSET)",
                });
            }
            let message = message_text(&p[6..6 + mlen]);
            let offset = (tail == 8).then(|| be64(p, 6 + mlen));
            Ok(Chunk::Error {
                errno,
                message,
                offset,
            })
        }
        k => Err(WireError::UnknownChunkType(k)),
    }
}

/// Parses one whole structured chunk (header and payload) from the start of
/// `b`, for the reply to `command`; returns the header, the chunk and the
/// bytes used.
pub fn parse_structured_chunk(
    b: &[u8],
    command: Command,
) -> Result<(ChunkHeader, Chunk<'_>, usize), WireError> {
    let ReplyHeader::Chunk(h) = parse_reply_header(b)? else {
        return Err(WireError::BadMagic {
            what: "structured reply chunk",
            got: SIMPLE_REPLY_MAGIC.into(),
        });
    };
    max_chunk_payload(&h, command)?;
    let end = CHUNK_HEADER_LEN + h.len as usize;
    need("structured reply payload", b, end)?;
    let chunk = parse_chunk_payload(&h, &b[CHUNK_HEADER_LEN..end])?;
    Ok((h, chunk, end))
}

/// Tracks which bytes of a read request the chunks so far have covered.
#[derive(Debug)]
pub struct ReadCoverage {
    start: u64,
    len: u64,
    /// Disjoint covered intervals, start → end, merged when adjacent.
    covered: BTreeMap<u64, u64>,
    total: u64,
}

impl ReadCoverage {
    /// Coverage of a read of `len` bytes at `start` (the caller has checked
    /// that `start + len` does not overflow and lies within the export).
    pub fn new(start: u64, len: u32) -> ReadCoverage {
        ReadCoverage {
            start,
            len: len.into(),
            covered: BTreeMap::new(),
            total: 0,
        }
    }

    /// Records a chunk of `len` bytes at export offset `offset`; returns
    /// its index in the request's buffer.
    pub fn place(&mut self, offset: u64, len: u64) -> Result<usize, WireError> {
        let req_end = self.start + self.len;
        let end = offset.checked_add(len).filter(|&e| e <= req_end);
        let Some(end) = end.filter(|_| offset >= self.start && len > 0) else {
            return Err(WireError::OutOfRange {
                start: offset,
                end: offset.saturating_add(len),
                req_start: self.start,
                req_end,
            });
        };
        // Overlap with the interval starting at or before `offset`, or with
        // the first one starting after it.
        let before = self
            .covered
            .range(..=offset)
            .next_back()
            .map(|(&s, &e)| (s, e));
        if let Some((_, e)) = before {
            if e > offset {
                return Err(WireError::Overlap(offset));
            }
        }
        let after = self.covered.range(offset..).next().map(|(&s, &e)| (s, e));
        if let Some((s, _)) = after {
            if s < end {
                return Err(WireError::Overlap(s));
            }
        }
        let (mut new_start, mut new_end) = (offset, end);
        if let Some((s, e)) = before.filter(|&(_, e)| e == offset) {
            self.covered.remove(&s);
            new_start = s;
            debug_assert!(e == offset);
        }
        if let Some((s, e)) = after.filter(|&(s, _)| s == end) {
            self.covered.remove(&s);
            new_end = e;
        }
        self.covered.insert(new_start, new_end);
        if self.covered.len() > MAX_READ_PIECES {
            return Err(WireError::TooFragmented(MAX_READ_PIECES));
        }
        self.total += len;
        // Fits: offset - start < len of the request, which is a u32.
        Ok((offset - self.start) as usize)
    }

    /// Checks that the whole request was covered.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.total != self.len {
            return Err(WireError::Incomplete {
                covered: self.total,
                len: self.len,
            });
        }
        Ok(())
    }
}

/// One block status extent: `[start, end)` with its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Context-specific flags.
    pub flags: u32,
}

/// Turns a block status chunk's descriptors for a request `[offset,
/// offset + len)` into extents. Every descriptor must be non-empty and
/// start inside the request; the last may reach past it (the specification
/// allows this) and is cut at the request's end.
pub fn parse_descriptors(offset: u64, len: u64, d: &[u8]) -> Result<Vec<Extent>, WireError> {
    if d.is_empty() || d.len() & 7 != 0 {
        return Err(WireError::BadLength {
            what: "block status descriptors",
            len: d.len() as u64,
            expected: "a non-zero multiple of 8",
        });
    }
    let req_end = offset.saturating_add(len);
    let mut out = Vec::with_capacity(d.len() / 8);
    let mut at = offset;
    for desc in d.chunks_exact(8) {
        let (dlen, flags) = (be32(desc, 0), be32(desc, 4));
        if dlen == 0 {
            return Err(WireError::ZeroLength("block status descriptor"));
        }
        if at >= req_end {
            return Err(WireError::DescriptorPastRange {
                start: at,
                end: req_end,
            });
        }
        let end = at.saturating_add(dlen.into()).min(req_end);
        out.push(Extent {
            start: at,
            end,
            flags,
        });
        at = end;
    }
    Ok(out)
}
