//! The handshake half of the wire format: the server greeting, option
//! replies and the export information they carry.
//!
//! # Greeting (fixed newstyle)
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

use super::{be16, be32, be64, message_text, need, WireError};

/// "NBDMAGIC": the first 8 bytes every server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle server greeting and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// What an oldstyle server sends instead of `IHAVEOPT`.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

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

/// Largest option reply payload accepted (no legitimate reply comes near).
pub const MAX_OPTION_PAYLOAD: u32 = 64 * 1024;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

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
        /// Largest request (`u32::MAX`: no inherent limit).
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
            // preferred size (or the minimum) and either a multiple of the
            // minimum or 0xffffffff ("no inherent limit").
            let valid = min.is_power_of_two()
                && min <= 64 * 1024
                && preferred.is_power_of_two()
                && preferred >= min
                && max >= min
                && (max & (min - 1) == 0 || max == super::BLOCK_SIZE_UNLIMITED);
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
