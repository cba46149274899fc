//! The NBD wire format: constants and pure parsers for what a server sends.
//!
//! Everything here works on byte slices and never touches a socket, so the
//! fuzz target `nbd_reply` can drive it with arbitrary input. All integers
//! are big-endian ("network byte order"). Reference: the NBD protocol
//! specification, `doc/proto.md` in the NetworkBlockDevice/nbd repository.
//!
//! # Handshake (fixed newstyle)
//!
//! ```text
//! S: u64 NBDMAGIC (0x4e42444d41474943, "NBDMAGIC")
//! S: u64 IHAVEOPT (0x49484156454f5054, "IHAVEOPT"); oldstyle servers send
//!    0x00420281861253 instead and are refused
//! S: u16 handshake flags: FIXED_NEWSTYLE (bit 0), NO_ZEROES (bit 1)
//! C: u32 client flags: the same bits, echoed for what the client supports
//! ```
//!
//! # Option haggling
//!
//! ```text
//! C: u64 IHAVEOPT, u32 option, u32 length, payload
//! S: u64 0x3e889045565a9, u32 option (echoed), u32 reply type, u32 length,
//!    payload (bounded here to MAX_OPTION_PAYLOAD)
//! ```
//!
//! Options used: `NBD_OPT_STRUCTURED_REPLY` (8, no payload, answered with
//! `NBD_REP_ACK`), `NBD_OPT_SET_META_CONTEXT` (10: u32 export name length,
//! name, u32 query count, each query as u32 length + string; answered with one
//! `NBD_REP_META_CONTEXT` (4: u32 context id + name) per selected context,
//! then `NBD_REP_ACK`), `NBD_OPT_GO` (7: u32 export name length, name, u16
//! info request count, u16 info types; answered with `NBD_REP_INFO` (3)
//! replies, then `NBD_REP_ACK`) and, for servers without `NBD_OPT_GO`,
//! `NBD_OPT_EXPORT_NAME` (1: the name; answered with u64 size, u16
//! transmission flags and 124 zero bytes unless NO_ZEROES was agreed).
//!
//! `NBD_REP_INFO` payloads start with a u16 info type: `NBD_INFO_EXPORT` (0:
//! u64 export size, u16 transmission flags) and `NBD_INFO_BLOCK_SIZE` (3:
//! u32 minimum, u32 preferred, u32 maximum payload). Reply types with bit
//! 31 set are errors (`NBD_REP_ERR_UNSUP` = 2^31 + 1, ...), whose payload
//! is an optional human-readable message.
//!
//! # Transmission
//!
//! ```text
//! C: u32 0x25609513, u16 command flags, u16 type, u64 cookie, u64 offset,
//!    u32 length                                     (28 bytes)
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

use std::collections::BTreeMap;

/// "NBDMAGIC": the first 8 bytes every server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle server greeting and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// What an oldstyle server sends instead of `IHAVEOPT`.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`: select an export, the old way (no error replies).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_GO`: select an export and end the handshake.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: ask for structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_SET_META_CONTEXT`: select block status contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`: the option is done.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`: one piece of export information.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one selected context and its id.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an option reply as an error.
pub const REP_ERR_BIT: u32 = 1 << 31;

/// `NBD_INFO_EXPORT`: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the other flags are valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: several connections see the same data (safe to read
/// in parallel over several connections).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_DISC`: orderly disconnect, no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

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

/// Largest option reply payload accepted (no legitimate reply comes near).
pub const MAX_OPTION_PAYLOAD: u32 = 64 * 1024;
/// Maximum read payload when the server does not say (the spec's default).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Most descriptors accepted in one block status chunk (8 MiB of payload;
/// qemu-nbd sends at most 128 Ki).
pub const MAX_STATUS_DESCRIPTORS: u32 = 1 << 20;
/// Largest error chunk payload: u32 + u16 + a u16-sized message + u64.
pub const MAX_ERROR_PAYLOAD: u32 = 4 + 2 + 0xffff + 8;
/// Most disjoint pieces a structured read reply may arrive in.
pub const MAX_READ_PIECES: usize = 64 * 1024;
/// Longest error message kept from a server.
const MAX_MESSAGE: usize = 4096;

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// A defect in what the server sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("short {what}: {got} bytes, need {need}")]
    Short {
        /// The structure.
        what: &'static str,
        /// Bytes available.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A magic number is wrong.
    #[error("bad magic in {what}: {got:#x}")]
    BadMagic {
        /// The structure.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// The server is an oldstyle server.
    #[error("oldstyle NBD servers are not supported (fixed newstyle required)")]
    Oldstyle,
    /// The server does not offer fixed newstyle negotiation.
    #[error("server does not support fixed newstyle negotiation (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    /// An option reply answers another option.
    #[error("option reply for option {got}, expected {expected}")]
    WrongOption {
        /// The option sent.
        expected: u32,
        /// The option the reply names.
        got: u32,
    },
    /// A length field is larger than the structure allows.
    #[error("{what} length {len} exceeds the limit of {max}")]
    TooLong {
        /// The structure.
        what: &'static str,
        /// The length received.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A structure's payload has the wrong size for its type.
    #[error("{what} payload has {len} bytes, expected {expected}")]
    BadLength {
        /// The structure.
        what: &'static str,
        /// The length received.
        len: u64,
        /// What the type requires.
        expected: &'static str,
    },
    /// An option reply type that makes no sense for the option.
    #[error("unexpected reply type {reply:#x} to option {option}")]
    UnexpectedOptionReply {
        /// The option.
        option: u32,
        /// The reply type.
        reply: u32,
    },
    /// Block sizes that violate the specification.
    #[error("invalid block sizes: minimum {min}, preferred {preferred}, maximum {max}")]
    BadBlockSizes {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// `NBD_OPT_GO` ended without `NBD_INFO_EXPORT`.
    #[error("server ended NBD_OPT_GO without sending the export size")]
    NoExportInfo,
    /// The server selected a context that was not asked for.
    #[error("server selected meta context {0:?}, which was not requested")]
    UnrequestedContext(String),
    /// A reply's cookie matches no outstanding request.
    #[error("reply cookie {got:#x} matches no request (outstanding {expected:#x})")]
    UnknownCookie {
        /// The cookie in flight.
        expected: u64,
        /// The cookie received.
        got: u64,
    },
    /// A chunk type this client does not know.
    #[error("unknown structured reply type {0}")]
    UnknownChunkType(u16),
    /// A known chunk type that does not belong to the command.
    #[error("reply type {kind} is not valid for {command}")]
    ChunkForWrongCommand {
        /// The chunk type.
        kind: u16,
        /// The command.
        command: &'static str,
    },
    /// `NBD_REPLY_TYPE_NONE` without the DONE flag.
    #[error("NBD_REPLY_TYPE_NONE chunk without the DONE flag")]
    NoneNotDone,
    /// A simple reply where structured replies were agreed, carrying data.
    #[error("simple reply with data to {0} after structured replies were negotiated")]
    UnexpectedSimpleReply(&'static str),
    /// A read chunk outside the request or the export.
    #[error("reply covers [{start}, {end}), outside the request [{req_start}, {req_end})")]
    OutOfRange {
        /// Start of the chunk.
        start: u64,
        /// End of the chunk.
        end: u64,
        /// Start of the request.
        req_start: u64,
        /// End of the request.
        req_end: u64,
    },
    /// Two read chunks cover the same bytes.
    #[error("reply chunks overlap at offset {0}")]
    Overlap(u64),
    /// A read reply arrived in too many disjoint pieces.
    #[error("read reply split into more than {0} disjoint pieces")]
    TooFragmented(usize),
    /// A successful read reply did not cover the whole request.
    #[error("read reply covers {covered} of {len} requested bytes")]
    Incomplete {
        /// Bytes covered.
        covered: u64,
        /// Bytes requested.
        len: u64,
    },
    /// A zero-length chunk or descriptor.
    #[error("zero-length {0}")]
    ZeroLength(&'static str),
    /// Block status for a context that was not negotiated.
    #[error("block status for context id {0}, which was not negotiated")]
    UnknownContext(u32),
    /// Two block status chunks for one context in one reply.
    #[error("two block status chunks for context id {0} in one reply")]
    DuplicateContext(u32),
    /// A block status reply without the wanted context.
    #[error("block status reply has no descriptors for context id {0}")]
    MissingContext(u32),
    /// A descriptor starting at or past the end of the request.
    #[error(
        "block status descriptor at offset {start} is past the requested range ending at {end}"
    )]
    DescriptorPastRange {
        /// Where the descriptor starts.
        start: u64,
        /// End of the request.
        end: u64,
    },
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        return Err(WireError::Short {
            what,
            got: b.len(),
            need: n,
        });
    }
    Ok(())
}

/// A server message, as text: lossy UTF-8, at most 4096 bytes.
pub fn message_text(b: &[u8]) -> String {
    let b = &b[..b.len().min(MAX_MESSAGE)];
    String::from_utf8_lossy(b).into_owned()
}

/// Parses the 18-byte server greeting; returns the handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, WireError> {
    need("server greeting", b, 18)?;
    let magic = be64(b, 0);
    if magic != NBDMAGIC {
        return Err(WireError::BadMagic {
            what: "server greeting",
            got: magic,
        });
    }
    match be64(b, 8) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(WireError::Oldstyle),
        other => {
            return Err(WireError::BadMagic {
                what: "server greeting",
                got: other,
            })
        }
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(WireError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Reply type (`NBD_REP_*`).
    pub reply: u32,
    /// Payload length, at most [`MAX_OPTION_PAYLOAD`].
    pub len: u32,
}

/// Parses a 20-byte option reply header answering `option`.
pub fn parse_option_reply_header(b: &[u8], option: u32) -> Result<OptionReplyHeader, WireError> {
    need("option reply header", b, OPTION_REPLY_HEADER_LEN)?;
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(WireError::BadMagic {
            what: "option reply",
            got: magic,
        });
    }
    let got = be32(b, 8);
    if got != option {
        return Err(WireError::WrongOption {
            expected: option,
            got,
        });
    }
    let len = be32(b, 16);
    if len > MAX_OPTION_PAYLOAD {
        return Err(WireError::TooLong {
            what: "option reply",
            len: len.into(),
            max: MAX_OPTION_PAYLOAD.into(),
        });
    }
    Ok(OptionReplyHeader {
        reply: be32(b, 12),
        len,
    })
}

/// The name of an `NBD_REP_ERR_*` reply type.
pub fn option_error_name(reply: u32) -> &'static str {
    match reply ^ REP_ERR_BIT {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        10 => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown NBD_REP_ERR",
    }
}

/// A parsed `NBD_REP_INFO` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`, validated.
    BlockSize {
        /// Minimum block size (alignment of requests).
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest read payload.
        max: u32,
    },
    /// An information type this client ignores.
    Other(u16),
}

/// Parses an `NBD_REP_INFO` payload.
pub fn parse_info(b: &[u8]) -> Result<Info, WireError> {
    need("NBD_REP_INFO", b, 2)?;
    match be16(b, 0) {
        INFO_EXPORT => {
            if b.len() != 12 {
                return Err(WireError::BadLength {
                    what: "NBD_INFO_EXPORT",
                    len: b.len() as u64,
                    expected: "12",
                });
            }
            Ok(Info::Export {
                size: be64(b, 2),
                flags: be16(b, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            if b.len() != 14 {
                return Err(WireError::BadLength {
                    what: "NBD_INFO_BLOCK_SIZE",
                    len: b.len() as u64,
                    expected: "14",
                });
            }
            let (min, preferred, max) = (be32(b, 2), be32(b, 6), be32(b, 10));
            // The spec: minimum a power of two up to 64 KiB, preferred a
            // power of two at least the minimum, maximum at least the
            // preferred size (or the minimum) and a multiple of the minimum.
            let valid = min.is_power_of_two()
                && min <= 64 * 1024
                && preferred.is_power_of_two()
                && preferred >= min
                && max >= min
                && max & (min - 1) == 0;
            if !valid {
                return Err(WireError::BadBlockSizes {
                    min,
                    preferred,
                    max,
                });
            }
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        other => Ok(Info::Other(other)),
    }
}

/// Parses an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_meta_context(b: &[u8]) -> Result<(u32, String), WireError> {
    need("NBD_REP_META_CONTEXT", b, 5)?;
    Ok((be32(b, 0), message_text(&b[4..])))
}

/// Parses the reply to `NBD_OPT_EXPORT_NAME` (without padding): size, flags.
pub fn parse_export_name_reply(b: &[u8]) -> Result<(u64, u16), WireError> {
    need("NBD_OPT_EXPORT_NAME reply", b, 10)?;
    Ok((be64(b, 0), be16(b, 8)))
}

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
}

impl Command {
    /// The command's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "NBD_CMD_READ",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        }
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
