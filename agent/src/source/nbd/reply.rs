//! Receiving one transmission reply: the reply to an `NBD_CMD_READ`, an
//! `NBD_CMD_BLOCK_STATUS`, or one of the commands whose reply carries no
//! data (`NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_FLUSH`), simple or
//! structured, checked chunk by chunk.
//!
//! The functions here read from any [`Read`] (a socket in use, a byte slice
//! in the fuzz target) and never trust a length before it is bounded:
//!
//! * a reply header is 16 (simple) or 20 (structured) bytes, chosen by its
//!   magic; any other magic is an error;
//! * the cookie must be the one of the request in flight (one request per
//!   connection at a time);
//! * a chunk's payload is bounded by [`wire::max_chunk_payload`] for the
//!   command before it is read: read data by the requested length, block
//!   status by [`wire::MAX_STATUS_DESCRIPTORS`], errors by a u16 message;
//! * read chunks must lie inside the request and not overlap, and a
//!   successful reply must cover it exactly ([`wire::ReadCoverage`]);
//!   `OFFSET_HOLE` chunks fill zeros;
//! * block status chunks must name a negotiated context, at most once per
//!   reply, with non-empty descriptors inside the request
//!   ([`wire::parse_descriptors`]).
//! * a reply to a write, a write of zeroes or a flush is a simple reply or
//!   structured chunks of type `NONE` (empty, with DONE) and errors, at most
//!   [`wire::MAX_WRITE_REPLY_CHUNKS`] of them; any chunk that would carry
//!   data is a protocol error, and an `ERROR_OFFSET` must name an offset
//!   inside the request ([`wire::error_offset_in_request`]).
//!
//! Error chunks are remembered and the reply is read to its DONE chunk, so
//! that the connection stays usable after a server-side error.

use std::io::{self, Read};

use super::wire::{
    self, parse_chunk_payload, parse_reply_header, reply_header_len, Chunk, ChunkHeader, Command,
    Extent, ReadCoverage, ReplyHeader, WireError, CHUNK_HEADER_LEN, REPLY_TYPE_OFFSET_DATA,
};

/// Why a reply could not be received.
#[derive(Debug)]
pub enum ReplyError {
    /// The connection failed.
    Io(io::Error),
    /// The server sent something malformed: the connection is unusable.
    Wire(WireError),
    /// The server reported an error for the request.
    Server {
        /// Error number (`EIO`, `EINVAL`, ...).
        errno: u32,
        /// The server's message (may be empty).
        message: String,
        /// Offset the server named, if any.
        offset: Option<u64>,
        /// Whether the whole reply was consumed (connection reusable).
        in_sync: bool,
    },
}

impl From<WireError> for ReplyError {
    fn from(e: WireError) -> Self {
        ReplyError::Wire(e)
    }
}

/// `NBD_ESHUTDOWN`: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

impl ReplyError {
    /// Whether the connection can carry further requests: only after a
    /// server error whose reply was read to its end, and not after
    /// `NBD_ESHUTDOWN` (the spec: the client must then disconnect).
    pub fn connection_usable(&self) -> bool {
        matches!(self, ReplyError::Server { in_sync: true, errno, .. } if *errno != ESHUTDOWN)
    }
}

/// `read_exact`, with a connection closed mid-structure reported as a
/// short reply rather than a bare I/O error.
fn fill(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), ReplyError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(ReplyError::Wire(WireError::Short {
                    what,
                    got,
                    need: buf.len(),
                }))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReplyError::Io(e)),
        }
    }
    Ok(())
}

fn read_header(r: &mut impl Read, cookie: u64) -> Result<ReplyHeader, ReplyError> {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    fill(r, &mut b[..4], "reply header")?;
    let n = reply_header_len([b[0], b[1], b[2], b[3]])?;
    fill(r, &mut b[4..n], "reply header")?;
    let h = parse_reply_header(&b[..n])?;
    let got = match h {
        ReplyHeader::Simple { cookie, .. } => cookie,
        ReplyHeader::Chunk(c) => c.cookie,
    };
    if got != cookie {
        return Err(WireError::UnknownCookie {
            expected: cookie,
            got,
        }
        .into());
    }
    Ok(h)
}

/// Reads a chunk's payload into `scratch` after bounding it.
fn read_payload<'s>(
    r: &mut impl Read,
    h: &ChunkHeader,
    command: Command,
    scratch: &'s mut Vec<u8>,
) -> Result<Chunk<'s>, ReplyError> {
    wire::max_chunk_payload(h, command)?;
    // Bounded just above: at most the request's length plus 8, or the
    // block status / error bounds.
    let len = h.len as usize;
    scratch.clear();
    scratch.resize(len, 0);
    fill(r, scratch, "structured reply payload")?;
    Ok(parse_chunk_payload(h, scratch)?)
}

/// The first server error of a reply.
struct FirstError(Option<(u32, String, Option<u64>)>);

impl FirstError {
    fn note(&mut self, errno: u32, message: String, offset: Option<u64>) {
        if self.0.is_none() {
            self.0 = Some((errno, message, offset));
        }
    }

    fn check(self) -> Result<(), ReplyError> {
        match self.0 {
            Some((errno, message, offset)) => Err(ReplyError::Server {
                errno,
                message,
                offset,
                in_sync: true,
            }),
            None => Ok(()),
        }
    }
}

/// Receives the reply to an `NBD_CMD_READ` of `buf.len()` bytes at
/// `offset` sent with `cookie`, into `buf`. `structured`: whether
/// structured replies were negotiated. `buf.len()` must fit a u32 and
/// `offset + buf.len()` must not overflow (the caller checked it against
/// the export size).
pub fn receive_read(
    r: &mut impl Read,
    cookie: u64,
    offset: u64,
    buf: &mut [u8],
    structured: bool,
    scratch: &mut Vec<u8>,
) -> Result<(), ReplyError> {
    let len = u32::try_from(buf.len()).map_err(|_| WireError::TooLong {
        what: "read request",
        len: buf.len() as u64,
        max: u32::MAX.into(),
    })?;
    let command = Command::Read { len };
    let mut coverage = ReadCoverage::new(offset, len);
    let mut error = FirstError(None);
    loop {
        let h = match read_header(r, cookie)? {
            ReplyHeader::Simple { error: 0, .. } if structured => {
                return Err(WireError::UnexpectedSimpleReply(command.name()).into())
            }
            ReplyHeader::Simple { error: 0, .. } => {
                return fill(r, buf, "simple read reply data");
            }
            ReplyHeader::Simple { error, .. } => {
                // Old servers may send data after a simple error reply to a
                // read, so the stream position is unknown: do not reuse.
                return Err(ReplyError::Server {
                    errno: error,
                    message: String::new(),
                    offset: None,
                    in_sync: structured,
                });
            }
            ReplyHeader::Chunk(h) => h,
        };
        if h.kind == REPLY_TYPE_OFFSET_DATA {
            // Read the data straight into the caller's buffer, once its
            // place there is known to be valid.
            wire::max_chunk_payload(&h, command)?;
            if h.len <= 8 {
                return Err(WireError::ZeroLength("NBD_REPLY_TYPE_OFFSET_DATA chunk").into());
            }
            let mut off = [0u8; 8];
            fill(r, &mut off, "NBD_REPLY_TYPE_OFFSET_DATA offset")?;
            let data_len = u64::from(h.len - 8);
            let at = coverage.place(u64::from_be_bytes(off), data_len)?;
            // `place` checked at + data_len <= buf.len().
            fill(r, &mut buf[at..at + data_len as usize], "read data")?;
        } else {
            match read_payload(r, &h, command, scratch)? {
                Chunk::None => {}
                Chunk::Hole { offset, len } => {
                    let at = coverage.place(offset, len.into())?;
                    buf[at..at + len as usize].fill(0);
                }
                Chunk::Error {
                    errno,
                    message,
                    offset,
                } => error.note(errno, message, offset),
                // max_chunk_payload refuses block status for a read, and
                // data was handled above.
                Chunk::Data { .. } | Chunk::BlockStatus { .. } => {
                    return Err(WireError::ChunkForWrongCommand {
                        kind: h.kind,
                        command: command.name(),
                    }
                    .into())
                }
            }
        }
        if h.done() {
            break;
        }
    }
    error.check()?;
    coverage.finish()?;
    Ok(())
}

/// Receives the reply to an `NBD_CMD_BLOCK_STATUS` for `[offset, offset +
/// len)` sent with `cookie`. `contexts` are the context ids negotiated on
/// this connection (the server sends one chunk for each); the extents of
/// `want` are returned, in order, contiguous from `offset`.
pub fn receive_block_status(
    r: &mut impl Read,
    cookie: u64,
    offset: u64,
    len: u32,
    contexts: &[u32],
    want: u32,
    scratch: &mut Vec<u8>,
) -> Result<Vec<Extent>, ReplyError> {
    let command = Command::BlockStatus;
    let mut seen: Vec<u32> = Vec::with_capacity(contexts.len());
    let mut wanted = None;
    let mut error = FirstError(None);
    loop {
        let h = match read_header(r, cookie)? {
            ReplyHeader::Simple { error: 0, .. } => {
                return Err(WireError::UnexpectedSimpleReply(command.name()).into())
            }
            ReplyHeader::Simple { error, .. } => {
                return Err(ReplyError::Server {
                    errno: error,
                    message: String::new(),
                    offset: None,
                    in_sync: true,
                })
            }
            ReplyHeader::Chunk(h) => h,
        };
        match read_payload(r, &h, command, scratch)? {
            Chunk::None => {}
            Chunk::BlockStatus {
                context,
                descriptors,
            } => {
                if !contexts.contains(&context) {
                    return Err(WireError::UnknownContext(context).into());
                }
                if seen.contains(&context) {
                    return Err(WireError::DuplicateContext(context).into());
                }
                seen.push(context);
                let extents = wire::parse_descriptors(offset, len.into(), descriptors)?;
                if context == want {
                    wanted = Some(extents);
                }
            }
            Chunk::Error {
                errno,
                message,
                offset,
            } => error.note(errno, message, offset),
            Chunk::Data { .. } | Chunk::Hole { .. } => {
                return Err(WireError::ChunkForWrongCommand {
                    kind: h.kind,
                    command: command.name(),
                }
                .into())
            }
        }
        if h.done() {
            break;
        }
    }
    error.check()?;
    wanted.ok_or_else(|| WireError::MissingContext(want).into())
}

/// Receives the reply to a command whose reply carries no data
/// (`NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES` or `NBD_CMD_FLUSH`) for the
/// request `[offset, offset + len)` sent with `cookie`. `structured`:
/// whether structured replies were negotiated; either way the server may
/// answer with a simple reply.
pub fn receive_write_reply(
    r: &mut impl Read,
    cookie: u64,
    command: Command,
    offset: u64,
    len: u32,
    structured: bool,
    scratch: &mut Vec<u8>,
) -> Result<(), ReplyError> {
    let mut error = FirstError(None);
    let mut chunks = 0usize;
    loop {
        let h = match read_header(r, cookie)? {
            ReplyHeader::Simple { .. } if chunks > 0 => {
                return Err(WireError::SimpleInsideStructured(command.name()).into())
            }
            ReplyHeader::Simple { error: 0, .. } => return Ok(()),
            // Nothing follows a simple reply to these commands, so the
            // stream stays in step after an error.
            ReplyHeader::Simple { error, .. } => {
                return Err(ReplyError::Server {
                    errno: error,
                    message: String::new(),
                    offset: None,
                    in_sync: true,
                })
            }
            ReplyHeader::Chunk(_) if !structured => {
                return Err(WireError::UnexpectedChunk(command.name()).into())
            }
            ReplyHeader::Chunk(h) => h,
        };
        chunks += 1;
        if chunks > wire::MAX_WRITE_REPLY_CHUNKS {
            return Err(WireError::TooManyChunks {
                command: command.name(),
                max: wire::MAX_WRITE_REPLY_CHUNKS,
            }
            .into());
        }
        // max_chunk_payload (in read_payload) allows these commands only
        // NONE (no payload) and error chunks.
        match read_payload(r, &h, command, scratch)? {
            Chunk::None => {}
            Chunk::Error {
                errno,
                message,
                offset: at,
            } => {
                let at = wire::error_offset_in_request(command, at, offset, len.into())?;
                error.note(errno, message, at);
            }
            Chunk::Data { .. } | Chunk::Hole { .. } | Chunk::BlockStatus { .. } => {
                return Err(WireError::ChunkForWrongCommand {
                    kind: h.kind,
                    command: command.name(),
                }
                .into())
            }
        }
        if h.done() {
            break;
        }
    }
    error.check()
}
