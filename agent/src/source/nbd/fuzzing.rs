//! The body of the `nbd_reply` fuzz target (`fuzz/fuzz_targets/nbd_reply.rs`),
//! kept here so that a stable unit test replays the committed corpus
//! (`fuzz/corpus/nbd_reply/`) through exactly the same code.
//!
//! Input layout: byte 0 selects what the rest is fed to, and its bits
//! choose variants. With bit 3 clear:
//!
//! | `b0 % 4` | rest of the input |
//! | --- | --- |
//! | 0 | option replies to `NBD_OPT_GO` or `NBD_OPT_SET_META_CONTEXT` (bit 2), then greeting parsing |
//! | 1 | u16 offset, u16 length - 1, then a read reply to cookie 1 (structured if bit 2) |
//! | 2 | u16 offset, u16 length - 1, then a block status reply to cookie 1 for contexts 1 and 2, wanting 1 or 2 (bit 2) |
//! | 3 | structured chunks parsed back to back, for a read of 4096 bytes or block status (bit 2) |
//!
//! With bit 3 set: u16 offset, u16 length - 1, then the reply to cookie 1
//! of a command whose reply carries no data, structured if bit 2 is set;
//! `b0 % 4` picks the command: 0 and 3 `NBD_CMD_WRITE`, 1
//! `NBD_CMD_WRITE_ZEROES`, 2 `NBD_CMD_FLUSH` (see [`write_command`]).
//!
//! Besides "no panic", successful results are checked: read replies fill
//! exactly the buffer, block status extents are non-empty, contiguous from
//! the request's offset and inside the request; a server error to a write
//! names an offset only inside the request, and none to a flush.

use super::reply::{receive_block_status, receive_read, receive_write_reply, ReplyError};
use super::wire::{self, Command};

/// The command a selector byte with bit 3 set stands for.
pub fn write_command(sel: u8) -> Command {
    match sel % 4 {
        1 => Command::WriteZeroes,
        2 => Command::Flush,
        _ => Command::Write,
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

/// Runs one fuzz input; panics only if a checked property fails.
pub fn check_reply_bytes(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let variant = sel & 4 != 0;
    if sel & 8 != 0 {
        check_write_reply(write_command(sel), rest, variant);
        return;
    }
    match sel % 4 {
        0 => check_option_replies(rest, variant),
        1 => {
            let offset = u64::from(u16_at(rest, 0));
            let len = usize::from(u16_at(rest, 2)) + 1;
            let mut buf = vec![0xeeu8; len];
            let mut input = rest.get(4..).unwrap_or(&[]);
            let mut scratch = Vec::new();
            let r = receive_read(&mut input, 1, offset, &mut buf, variant, &mut scratch);
            assert_eq!(buf.len(), len);
            if r.is_ok() {
                assert!(scratch.len() <= wire::MAX_ERROR_PAYLOAD as usize);
            }
        }
        2 => {
            let offset = u64::from(u16_at(rest, 0));
            let len = u32::from(u16_at(rest, 2)) + 1;
            let want = if variant { 2 } else { 1 };
            let mut input = rest.get(4..).unwrap_or(&[]);
            let mut scratch = Vec::new();
            if let Ok(extents) =
                receive_block_status(&mut input, 1, offset, len, &[1, 2], want, &mut scratch)
            {
                assert!(!extents.is_empty());
                let mut at = offset;
                for e in &extents {
                    assert_eq!(e.start, at, "extents not contiguous");
                    assert!(e.end > e.start, "empty extent");
                    assert!(e.end <= offset + u64::from(len), "extent past the request");
                    at = e.end;
                }
            }
        }
        _ => {
            let command = if variant {
                Command::BlockStatus
            } else {
                Command::Read { len: 4096 }
            };
            let mut b = rest;
            while let Ok((h, chunk, used)) = wire::parse_structured_chunk(b, command) {
                assert!(used >= wire::CHUNK_HEADER_LEN && used <= b.len());
                assert_eq!(used - wire::CHUNK_HEADER_LEN, h.len as usize);
                if let wire::Chunk::BlockStatus { descriptors, .. } = chunk {
                    if let Ok(ext) = wire::parse_descriptors(0, 1 << 20, descriptors) {
                        assert!(ext.iter().all(|e| e.end > e.start && e.end <= 1 << 20));
                    }
                }
                b = &b[used..];
            }
        }
    }
}

fn check_write_reply(command: Command, rest: &[u8], structured: bool) {
    let offset = u64::from(u16_at(rest, 0));
    let len = u32::from(u16_at(rest, 2)) + 1;
    let (offset, len) = match command {
        Command::Flush => (0, 0),
        _ => (offset, len),
    };
    let mut input = rest.get(4..).unwrap_or(&[]);
    let mut scratch = Vec::new();
    let r = receive_write_reply(
        &mut input,
        1,
        command,
        offset,
        len,
        structured,
        &mut scratch,
    );
    assert!(scratch.len() <= wire::MAX_ERROR_PAYLOAD as usize);
    if let Err(ReplyError::Server {
        offset: Some(at), ..
    }) = r
    {
        assert!(command != Command::Flush, "error offset kept for a flush");
        assert!(
            at >= offset && at < offset + u64::from(len),
            "error offset {at} outside the request"
        );
    }
}

fn check_option_replies(mut b: &[u8], meta: bool) {
    let option = if meta {
        wire::OPT_SET_META_CONTEXT
    } else {
        wire::OPT_GO
    };
    let _ = wire::parse_greeting(b);
    while let Ok(h) = wire::parse_option_reply_header(b, option) {
        assert!(h.len <= wire::MAX_OPTION_PAYLOAD);
        let end = wire::OPTION_REPLY_HEADER_LEN + h.len as usize;
        let Some(payload) = b.get(wire::OPTION_REPLY_HEADER_LEN..end) else {
            return;
        };
        match h.reply {
            wire::REP_INFO => {
                if let Ok(wire::Info::BlockSize {
                    min,
                    preferred,
                    max,
                }) = wire::parse_info(payload)
                {
                    assert!(min.is_power_of_two() && preferred >= min && max >= min);
                }
            }
            wire::REP_META_CONTEXT => {
                if let Ok((_, name)) = wire::parse_meta_context(payload) {
                    assert!(name.len() <= 3 * 4096);
                }
            }
            _ => {
                let _ = wire::option_error_name(h.reply);
                let _ = wire::message_text(payload);
            }
        }
        b = &b[end..];
    }
}
