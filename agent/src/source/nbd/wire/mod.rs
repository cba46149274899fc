//! The NBD wire format: constants and pure parsers for what a server sends.
//!
//! Everything here works on byte slices and never touches a socket, so the
//! fuzz target `nbd_reply` can drive it with arbitrary input. All integers
//! are big-endian ("network byte order"). Reference: the NBD protocol
//! specification, `doc/proto.md` in the NetworkBlockDevice/nbd repository.
//!
//! * [`handshake`]: greeting, option replies, export information;
//! * [`transmission`]: requests, replies and reply chunks.
//!
//! Both halves are re-exported here, so every item is `wire::NAME`.

pub mod handshake;
pub mod transmission;

pub use handshake::*;
pub use transmission::*;

/// Longest error message kept from a server.
const MAX_MESSAGE: usize = 4096;

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
    /// A structured reply chunk although structured replies were not
    /// negotiated.
    #[error("structured reply chunk to {0}, but structured replies were not negotiated")]
    UnexpectedChunk(&'static str),
    /// A simple reply after the first chunk of a structured reply.
    #[error("simple reply to {0} in the middle of a structured reply")]
    SimpleInsideStructured(&'static str),
    /// A reply made of more chunks than the command can need.
    #[error("reply to {command} has more than {max} chunks")]
    TooManyChunks {
        /// The command.
        command: &'static str,
        /// The bound.
        max: usize,
    },
    /// An error chunk naming an offset outside the request.
    #[error("error reply names offset {offset}, outside the request [{req_start}, {req_end})")]
    ErrorOffsetOutside {
        /// The offset named.
        offset: u64,
        /// Start of the request.
        req_start: u64,
        /// End of the request.
        req_end: u64,
    },
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
