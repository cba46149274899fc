//! The NBD wire format, as far as a read-only server speaks it: the fixed
//! newstyle handshake, option requests and replies, transmission requests,
//! simple and structured replies, and `base:allocation` block status.
//!
//! No I/O here: requests are parsed from byte slices the connection has
//! already read (every length bounded before it is used), replies are
//! encoded into `Vec<u8>`s the connection writes. The spec is the NBD
//! project's `doc/proto.md`; names follow it.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the other flags are valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server honours `NBD_CMD_FLAG_DF`.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see the same data.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option codes.
pub mod opt {
    /// Old way to pick an export; no reply, straight to transmission.
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and start transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One piece of information about an export.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Malformed or out of order.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is closing.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
}

/// `NBD_INFO_*` codes.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Minimum, preferred and maximum block size.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (refused: read-only).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Trim (refused: read-only).
    pub const TRIM: u16 = 4;
    /// Write zeroes (refused: read-only).
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status of the selected contexts.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize (refused: read-only).
    pub const RESIZE: u16 = 8;
}

/// Command flag: do not fragment the read.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one block status descriptor is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk types.
pub mod chunk {
    /// No payload (ends a reply).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error for the whole request.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// `base:allocation` status: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` status: reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// The only metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Error values carried in replies (Linux errno numbers, as the spec
/// requires).
pub mod errno {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error (a chunk failed verification).
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// Beyond the end of the export.
    pub const EOVERFLOW: u32 = 75;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Longest option payload read (names, queries): larger ones are refused
/// and the connection closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest read or block status range served (the de-facto NBD maximum).
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Longest name or query string inside an option.
pub const MAX_STRING_LEN: u32 = 4096;

/// Malformed option data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The data ended before a field.
    #[error("option data is truncated")]
    Truncated,
    /// A length inside the data is larger than allowed.
    #[error("string of {0} bytes in option data is too long")]
    TooLong(u32),
    /// Bytes left over after the last field.
    #[error("option data has trailing bytes")]
    Trailing,
}

/// A reader over option data with bounded fields.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.0.len() < n {
            return Err(OptionError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<String, OptionError> {
        let len = self.u32()?;
        if len > MAX_STRING_LEN {
            return Err(OptionError::TooLong(len));
        }
        Ok(String::from_utf8_lossy(self.take(len as usize)?).into_owned())
    }
    fn end(&self) -> Result<(), OptionError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(OptionError::Trailing)
        }
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// `NBD_INFO_*` items asked for.
    pub items: Vec<u16>,
}

impl InfoRequest {
    /// Parses option data.
    pub fn parse(data: &[u8]) -> Result<Self, OptionError> {
        let mut f = Fields(data);
        let name = f.string()?;
        let n = f.u16()?;
        let mut items = Vec::with_capacity(usize::from(n).min(data.len() / 2));
        for _ in 0..n {
            items.push(f.u16()?);
        }
        f.end()?;
        Ok(InfoRequest { name, items })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries (context names, or `namespace:` prefixes when listing).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses option data.
    pub fn parse(data: &[u8]) -> Result<Self, OptionError> {
        let mut f = Fields(data);
        let export = f.string()?;
        let n = f.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            // Every query takes at least its 4-byte length, so a bogus
            // count ends with `Truncated` before it allocates much.
            queries.push(f.string()?);
        }
        f.end()?;
        Ok(MetaContextRequest { export, queries })
    }

    /// Whether `base:allocation` answers this request: on `list`, an
    /// empty query list or a `base:` query matches all of `base:`; on
    /// `set` only the exact name does.
    pub fn wants_base_allocation(&self, list: bool) -> bool {
        if list && self.queries.is_empty() {
            return true;
        }
        self.queries
            .iter()
            .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
    }
}

/// A transmission request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;

/// A request header whose magic is wrong: the stream is out of step and
/// the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl Request {
    /// Parses a request header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, BadMagic> {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        let magic = u32_at(0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        })
    }
}

/// The server's greeting.
pub fn greeting() -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    v
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    // Every reply built here is small (names, info items, messages).
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_REP_SERVER` data: a name and a description.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// `NBD_REP_META_CONTEXT` data.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// What follows `NBD_OPT_EXPORT_NAME`: size and flags, then 124 zeros
/// unless the client set `NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// A simple reply header (data, if any, follows).
pub fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// A structured reply chunk header for `payload_len` bytes of payload.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, payload_len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&payload_len.to_be_bytes());
    v
}

/// `NBD_REPLY_TYPE_OFFSET_DATA` header and offset; `len` data bytes follow.
pub fn data_chunk_header(cookie: u64, done: bool, offset: u64, len: u32) -> Vec<u8> {
    let mut v = chunk_header(cookie, done_flag(done), chunk::OFFSET_DATA, 8 + len);
    v.extend_from_slice(&offset.to_be_bytes());
    v
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub fn hole_chunk(cookie: u64, done: bool, offset: u64, len: u32) -> Vec<u8> {
    let mut v = chunk_header(cookie, done_flag(done), chunk::OFFSET_HOLE, 12);
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// `NBD_REPLY_TYPE_ERROR_OFFSET` with a message (cut to 4 KiB).
pub fn error_offset_chunk(cookie: u64, done: bool, error: u32, msg: &str, offset: u64) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let len = 4 + 2 + msg.len() as u32 + 8;
    let mut v = chunk_header(cookie, done_flag(done), chunk::ERROR_OFFSET, len);
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v.extend_from_slice(&offset.to_be_bytes());
    v
}

/// `NBD_REPLY_TYPE_ERROR` with a message (cut to 4 KiB), as the final
/// chunk.
pub fn error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let len = 4 + 2 + msg.len() as u32;
    let mut v = chunk_header(cookie, REPLY_FLAG_DONE, chunk::ERROR, len);
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` for one context, as the final chunk.
/// `extents` are `(length, flags)`.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut v = chunk_header(cookie, REPLY_FLAG_DONE, chunk::BLOCK_STATUS, len);
    v.extend_from_slice(&context.to_be_bytes());
    for (length, flags) in extents {
        v.extend_from_slice(&length.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn info_request_parses_name_and_items() {
        let mut d = string("disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let r = InfoRequest::parse(&d).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.items, vec![3, 0]);
        assert_eq!(
            InfoRequest::parse(&d[..d.len() - 1]),
            Err(OptionError::Truncated)
        );
        d.push(0);
        assert_eq!(InfoRequest::parse(&d), Err(OptionError::Trailing));
    }

    #[test]
    fn option_strings_are_bounded() {
        let mut d = (MAX_STRING_LEN + 1).to_be_bytes().to_vec();
        d.extend_from_slice(&[b'a'; 16]);
        assert_eq!(
            InfoRequest::parse(&d),
            Err(OptionError::TooLong(MAX_STRING_LEN + 1))
        );
        // A huge query count with no data ends at the first missing query.
        let mut d = string("");
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(MetaContextRequest::parse(&d), Err(OptionError::Truncated));
    }

    #[test]
    fn meta_context_matching() {
        let mut d = string("");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&string("base:"));
        let r = MetaContextRequest::parse(&d).unwrap();
        assert!(r.wants_base_allocation(true));
        assert!(!r.wants_base_allocation(false));
        let none = MetaContextRequest {
            export: String::new(),
            queries: vec![],
        };
        assert!(none.wants_base_allocation(true));
        assert!(!none.wants_base_allocation(false));
        let other = MetaContextRequest {
            export: String::new(),
            queries: vec!["qemu:dirty-bitmap:x".into()],
        };
        assert!(!other.wants_base_allocation(true));
        let exact = MetaContextRequest {
            export: String::new(),
            queries: vec![BASE_ALLOCATION.into()],
        };
        assert!(exact.wants_base_allocation(false));
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_DF.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::BLOCK_STATUS.to_be_bytes());
        b[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        b[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes());
        b[24..28].copy_from_slice(&65536u32.to_be_bytes());
        let r = Request::parse(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_DF,
                kind: cmd::BLOCK_STATUS,
                cookie: 0x0102_0304_0506_0708,
                offset: 1 << 40,
                length: 65536,
            }
        );
        b[0] = 0;
        assert!(Request::parse(&b).is_err());
    }

    #[test]
    fn chunk_lengths_match_their_payloads() {
        let h = hole_chunk(7, true, 4096, 512);
        assert_eq!(h.len(), 20 + 12);
        assert_eq!(&h[16..20], &12u32.to_be_bytes());
        let e = error_offset_chunk(7, true, errno::EIO, "bad", 10);
        assert_eq!(e.len(), 20 + 4 + 2 + 3 + 8);
        assert_eq!(&e[16..20], &(17u32).to_be_bytes());
        let s = block_status_chunk(7, 1, &[(10, 0), (20, 3)]);
        assert_eq!(s.len(), 20 + 4 + 16);
        assert_eq!(&s[16..20], &20u32.to_be_bytes());
        let d = data_chunk_header(7, false, 0, 100);
        assert_eq!(&d[16..20], &108u32.to_be_bytes());
    }
}
