//! One NBD connection: the fixed newstyle handshake and synchronous
//! requests (one in flight at a time): reads, block status, and for a
//! writable export writes, writes of zeroes and flushes.
//!
//! Handshake, in order (layouts in [`super::wire`]):
//!
//! 1. greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (FIXED_NEWSTYLE is
//!    required); the client answers with FIXED_NEWSTYLE and, if offered,
//!    NO_ZEROES;
//! 2. `NBD_OPT_STRUCTURED_REPLY`: ACK turns structured replies on; any error
//!    reply leaves simple replies (reads still work, block status does not);
//! 3. with structured replies, `NBD_OPT_SET_META_CONTEXT` for
//!    `base:allocation` and, when wanted, `qemu:dirty-bitmap:NAME`: the ids
//!    in the server's `NBD_REP_META_CONTEXT` replies are recorded; a
//!    context the server does not return is unavailable;
//! 4. `NBD_OPT_GO` with the export name, asking for `NBD_INFO_EXPORT` and
//!    `NBD_INFO_BLOCK_SIZE`; errors become [`NbdError::OptionRefused`]. A
//!    server that does not know `NBD_OPT_GO` (`NBD_REP_ERR_UNSUP`) gets
//!    `NBD_OPT_EXPORT_NAME` instead.
//!
//! Dropping a connection sends `NBD_CMD_DISC` and shuts the socket down.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::reply::{self, ReplyError};
use super::uri::{Endpoint, Target};
use super::wire::{self, Extent, Info, WireError};
use super::NbdError;

/// How long a request may wait for the server before the connection is
/// given up (a hung server must not hang the scan forever).
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Most replies accepted for one option (a server looping on replies is
/// broken).
const MAX_OPTION_REPLIES: usize = 64;
/// Writes up to this size go out in one `write` with their header.
const SMALL_WRITE: usize = 64 * 1024;

/// The name of the allocation context.
pub const ALLOCATION_CONTEXT: &str = "base:allocation";

/// The block status context of a qemu dirty bitmap.
pub fn bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// A socket to an NBD server.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
        let s = match endpoint {
            Endpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                // Requests are small and answered one at a time.
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Tcp(s)
            }
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Unix(s)
            }
        };
        Ok(s)
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one connection agreed with the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (0 unless `NBD_FLAG_HAS_FLAGS`).
    pub flags: u16,
    /// Minimum block size: requests are aligned to it.
    pub min_block: u32,
    /// Largest read or write sent: the server's maximum block size, at
    /// most 32 MiB, a multiple of `min_block`.
    pub max_payload: u32,
    /// Largest `NBD_CMD_WRITE_ZEROES` sent: the server's maximum block size
    /// (the spec binds write-zeroes requests to it too), or 1 GiB when it
    /// sets none; a multiple of `min_block`.
    pub max_zeroes: u32,
    /// Whether structured replies are on.
    pub structured: bool,
    /// Context id of `base:allocation` on this connection.
    pub allocation: Option<u32>,
    /// Context id of the dirty bitmap on this connection.
    pub bitmap: Option<u32>,
}

impl Negotiated {
    /// Whether another connection to the same export agreed on the same
    /// terms (context ids are per connection and may differ; of the
    /// transmission flags, those that change what the client sends).
    pub fn same_export(&self, other: &Negotiated) -> bool {
        const USED_FLAGS: u16 = wire::TFLAG_READ_ONLY
            | wire::TFLAG_SEND_FLUSH
            | wire::TFLAG_SEND_WRITE_ZEROES
            | wire::TFLAG_CAN_MULTI_CONN;
        self.size == other.size
            && self.flags & USED_FLAGS == other.flags & USED_FLAGS
            && self.structured == other.structured
            && self.allocation.is_some() == other.allocation.is_some()
            && self.bitmap.is_some() == other.bitmap.is_some()
            && self.min_block == other.min_block
            && self.max_payload == other.max_payload
            && self.max_zeroes == other.max_zeroes
    }
}

/// Which block status context a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`.
    Bitmap,
}

/// An open, negotiated connection.
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<Stream>,
    writer: Stream,
    next_cookie: u64,
    /// Reused buffer for chunk payloads other than read data.
    scratch: Vec<u8>,
    /// What the handshake agreed.
    pub info: Negotiated,
    /// The pool's name for this connection (to track which ones have
    /// writes not yet flushed); 0 until the pool sets it.
    pub id: u64,
}

/// Handshake errors of the pure handshake, before a URI is attached.
enum HandshakeError {
    Io(io::Error),
    Wire(WireError),
    Refused {
        option: &'static str,
        reply: u32,
        message: String,
    },
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Wire(WireError::Short {
                what: "handshake (server closed the connection)",
                got: 0,
                need: 1,
            })
        } else {
            HandshakeError::Io(e)
        }
    }
}

impl From<WireError> for HandshakeError {
    fn from(e: WireError) -> Self {
        HandshakeError::Wire(e)
    }
}

fn send_option(w: &mut impl Write, option: u32, payload: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    // Payloads are built here from names of at most 4096 bytes.
    msg.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    msg.extend_from_slice(payload);
    w.write_all(&msg)
}

fn read_option_reply(r: &mut impl Read, option: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
    let mut h = [0u8; wire::OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut h)?;
    let h = wire::parse_option_reply_header(&h, option)?;
    // Bounded by MAX_OPTION_PAYLOAD in parse_option_reply_header.
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload)?;
    Ok((h.reply, payload))
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The handshake over any byte stream; the caller attaches the URI.
fn handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    export: &str,
    bitmap: Option<&str>,
) -> Result<Negotiated, HandshakeError> {
    let mut greeting = [0u8; 18];
    r.read_exact(&mut greeting)?;
    let server_flags = wire::parse_greeting(&greeting)?;
    let no_zeroes = server_flags & wire::FLAG_NO_ZEROES != 0;
    let mut client_flags = wire::CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= wire::CLIENT_NO_ZEROES;
    }
    w.write_all(&client_flags.to_be_bytes())?;

    send_option(w, wire::OPT_STRUCTURED_REPLY, &[])?;
    let (reply, _) = read_option_reply(r, wire::OPT_STRUCTURED_REPLY)?;
    let structured = match reply {
        wire::REP_ACK => true,
        e if e & wire::REP_ERR_BIT != 0 => false,
        e => {
            return Err(WireError::UnexpectedOptionReply {
                option: wire::OPT_STRUCTURED_REPLY,
                reply: e,
            }
            .into())
        }
    };

    let (mut allocation, mut bitmap_id) = (None, None);
    if structured {
        let bitmap_name = bitmap.map(bitmap_context);
        let mut queries = vec![ALLOCATION_CONTEXT];
        queries.extend(bitmap_name.as_deref());
        let mut payload = Vec::new();
        push_str(&mut payload, export);
        payload.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in &queries {
            push_str(&mut payload, q);
        }
        send_option(w, wire::OPT_SET_META_CONTEXT, &payload)?;
        let mut replies = 0;
        loop {
            replies += 1;
            if replies > MAX_OPTION_REPLIES {
                return Err(WireError::TooLong {
                    what: "NBD_OPT_SET_META_CONTEXT reply count",
                    len: replies as u64,
                    max: MAX_OPTION_REPLIES as u64,
                }
                .into());
            }
            let (reply, payload) = read_option_reply(r, wire::OPT_SET_META_CONTEXT)?;
            match reply {
                wire::REP_META_CONTEXT => {
                    let (id, name) = wire::parse_meta_context(&payload)?;
                    if name == ALLOCATION_CONTEXT {
                        allocation = Some(id);
                    } else if bitmap_name.as_deref() == Some(name.as_str()) {
                        bitmap_id = Some(id);
                    } else {
                        return Err(WireError::UnrequestedContext(name).into());
                    }
                }
                wire::REP_ACK => break,
                e if e & wire::REP_ERR_BIT != 0 => {
                    // No block status: everything reads as data, and the
                    // bitmap is unavailable. Not fatal.
                    tracing::debug!(
                        reply = wire::option_error_name(e),
                        message = %wire::message_text(&payload),
                        "NBD server refused NBD_OPT_SET_META_CONTEXT"
                    );
                    allocation = None;
                    bitmap_id = None;
                    break;
                }
                e => {
                    return Err(WireError::UnexpectedOptionReply {
                        option: wire::OPT_SET_META_CONTEXT,
                        reply: e,
                    }
                    .into())
                }
            }
        }
    }

    let mut payload = Vec::new();
    push_str(&mut payload, export);
    payload.extend_from_slice(&2u16.to_be_bytes());
    payload.extend_from_slice(&wire::INFO_EXPORT.to_be_bytes());
    payload.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
    send_option(w, wire::OPT_GO, &payload)?;
    let (mut export_info, mut block) = (None, None);
    let mut replies = 0;
    loop {
        replies += 1;
        if replies > MAX_OPTION_REPLIES {
            return Err(WireError::TooLong {
                what: "NBD_OPT_GO reply count",
                len: replies as u64,
                max: MAX_OPTION_REPLIES as u64,
            }
            .into());
        }
        let (reply, payload) = read_option_reply(r, wire::OPT_GO)?;
        match reply {
            wire::REP_INFO => match wire::parse_info(&payload)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize { min, max, .. } => block = Some((min, max)),
                Info::Other(_) => {}
            },
            wire::REP_ACK => break,
            e if e == wire::REP_ERR_BIT | 1 => {
                // NBD_REP_ERR_UNSUP: a server from before NBD_OPT_GO.
                send_option(w, wire::OPT_EXPORT_NAME, export.as_bytes())?;
                let mut b = [0u8; 10 + 124];
                let n = if no_zeroes { 10 } else { b.len() };
                r.read_exact(&mut b[..n])?;
                export_info = Some(wire::parse_export_name_reply(&b[..10])?);
                break;
            }
            e if e & wire::REP_ERR_BIT != 0 => {
                return Err(HandshakeError::Refused {
                    option: "NBD_OPT_GO",
                    reply: e,
                    message: wire::message_text(&payload),
                })
            }
            e => {
                return Err(WireError::UnexpectedOptionReply {
                    option: wire::OPT_GO,
                    reply: e,
                }
                .into())
            }
        }
    }
    let (size, flags) = export_info.ok_or(WireError::NoExportInfo)?;
    let flags = if flags & wire::TFLAG_HAS_FLAGS != 0 {
        flags
    } else {
        0
    };
    let (min_block, server_max) = block.unwrap_or((1, wire::BLOCK_SIZE_UNLIMITED));
    // parse_info checked min <= max and that max is a multiple of min or
    // unlimited; rounding a cap of at least min down to a multiple of min
    // (a power of two up to 64 KiB) keeps it > 0.
    let max_payload = server_max.min(wire::DEFAULT_MAX_PAYLOAD) / min_block * min_block;
    let max_zeroes = server_max.min(wire::DEFAULT_MAX_ZEROES) / min_block * min_block;
    if i64::try_from(size).is_err() {
        return Err(WireError::TooLong {
            what: "export size",
            len: size,
            max: i64::MAX as u64,
        }
        .into());
    }
    Ok(Negotiated {
        size,
        flags,
        min_block,
        max_payload,
        max_zeroes,
        structured,
        allocation,
        bitmap: bitmap_id,
    })
}

impl Conn {
    /// Connects and negotiates; errors name `uri`.
    pub fn open(uri: &str, target: &Target, bitmap: Option<&str>) -> Result<Conn, NbdError> {
        let stream = Stream::connect(&target.endpoint).map_err(|source| NbdError::Connect {
            uri: uri.to_owned(),
            cause: source,
        })?;
        let writer = stream.try_clone().map_err(|source| NbdError::Connect {
            uri: uri.to_owned(),
            cause: source,
        })?;
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        let mut w = writer;
        let info = match handshake(&mut reader, &mut w, &target.export, bitmap) {
            Ok(info) => info,
            Err(e) => {
                w.shutdown();
                return Err(match e {
                    HandshakeError::Io(source) => NbdError::Io {
                        uri: uri.to_owned(),
                        cause: source,
                    },
                    HandshakeError::Wire(source) => NbdError::Protocol {
                        uri: uri.to_owned(),
                        cause: source,
                    },
                    HandshakeError::Refused {
                        option,
                        reply,
                        message,
                    } => NbdError::OptionRefused {
                        uri: uri.to_owned(),
                        option,
                        export: target.export.clone(),
                        reply: wire::option_error_name(reply),
                        message,
                    },
                });
            }
        };
        Ok(Conn {
            reader,
            writer: w,
            next_cookie: 1,
            scratch: Vec::new(),
            info,
            id: 0,
        })
    }

    fn send(&mut self, kind: u16, offset: u64, len: u32) -> Result<u64, ReplyError> {
        self.send_with_data(kind, offset, len, &[])
    }

    /// Sends a request header followed by `data` (only `NBD_CMD_WRITE` has
    /// any). Command flags stay 0: no REQ_ONE (all extents are welcome), no
    /// DF (fragmented reads are reassembled), no NO_HOLE, no FUA.
    fn send_with_data(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, ReplyError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let header = wire::encode_request(kind, cookie, offset, len);
        if data.is_empty() {
            self.writer.write_all(&header).map_err(ReplyError::Io)?;
        } else if data.len() <= SMALL_WRITE {
            // One segment for header and data.
            let mut msg = Vec::with_capacity(header.len() + data.len());
            msg.extend_from_slice(&header);
            msg.extend_from_slice(data);
            self.writer.write_all(&msg).map_err(ReplyError::Io)?;
        } else {
            self.writer.write_all(&header).map_err(ReplyError::Io)?;
            self.writer.write_all(data).map_err(ReplyError::Io)?;
        }
        Ok(cookie)
    }

    /// A command whose reply carries no data, and its reply.
    fn no_data_command(
        &mut self,
        command: wire::Command,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<(), ReplyError> {
        let cookie = self.send_with_data(command.kind(), offset, len, data)?;
        reply::receive_write_reply(
            &mut self.reader,
            cookie,
            command,
            offset,
            len,
            self.info.structured,
            &mut self.scratch,
        )
    }

    /// Writes `data` at `offset` (`NBD_CMD_WRITE`). The caller keeps the
    /// request within the export, aligned to `min_block`, at most
    /// `max_payload` and not empty, and only sends it to a writable export.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ReplyError> {
        let len = u32::try_from(data.len()).map_err(|_| {
            ReplyError::Wire(WireError::TooLong {
                what: "write request",
                len: data.len() as u64,
                max: u32::MAX.into(),
            })
        })?;
        self.no_data_command(wire::Command::Write, offset, len, data)
    }

    /// Zeroes `[offset, offset + len)` (`NBD_CMD_WRITE_ZEROES`, holes
    /// allowed). The caller keeps the request within the export, aligned to
    /// `min_block`, at most `max_zeroes` and not empty, and only sends it
    /// when the export has `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ReplyError> {
        self.no_data_command(wire::Command::WriteZeroes, offset, len, &[])
    }

    /// `NBD_CMD_FLUSH`: every write this server has replied to on this
    /// connection (with multi-conn: on any connection) reaches permanent
    /// storage before the reply. Only for exports with
    /// `NBD_FLAG_SEND_FLUSH`.
    pub fn flush(&mut self) -> Result<(), ReplyError> {
        self.no_data_command(wire::Command::Flush, 0, 0, &[])
    }

    /// Reads `buf.len()` bytes at `offset`. The caller keeps the request
    /// within the export, aligned to `min_block` and at most `max_payload`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ReplyError> {
        let len = u32::try_from(buf.len()).map_err(|_| {
            ReplyError::Wire(WireError::TooLong {
                what: "read request",
                len: buf.len() as u64,
                max: u32::MAX.into(),
            })
        })?;
        let cookie = self.send(wire::CMD_READ, offset, len)?;
        reply::receive_read(
            &mut self.reader,
            cookie,
            offset,
            buf,
            self.info.structured,
            &mut self.scratch,
        )
    }

    /// Block status of `context` for `[offset, offset + len)` (within the
    /// export). The extents are contiguous from `offset` and may cover less
    /// than asked. `None` when the context was not negotiated.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        context: Context,
    ) -> Result<Option<Vec<Extent>>, ReplyError> {
        let want = match context {
            Context::Allocation => self.info.allocation,
            Context::Bitmap => self.info.bitmap,
        };
        let Some(want) = want else {
            return Ok(None);
        };
        let contexts: Vec<u32> = self
            .info
            .allocation
            .into_iter()
            .chain(self.info.bitmap)
            .collect();
        let cookie = self.send(wire::CMD_BLOCK_STATUS, offset, len)?;
        reply::receive_block_status(
            &mut self.reader,
            cookie,
            offset,
            len,
            &contexts,
            want,
            &mut self.scratch,
        )
        .map(Some)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Best effort: a broken connection simply closes.
        let _ = self.send(wire::CMD_DISC, 0, 0);
        self.writer.shutdown();
    }
}
