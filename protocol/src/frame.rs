//! Frames: the unit every message travels in.
//!
//! ```text
//! offset  size  field
//! 0       4     body length N, u32 little-endian, at most limits::MAX_BODY_LEN
//! 4       1     message kind (see message::Kind)
//! 5       3     reserved, zero
//! 8       N     body
//! 8+N     4     CRC-32 (IEEE) of bytes 0 .. 8+N, u32 little-endian
//! ```
//!
//! The length is checked before anything is buffered beyond the header, so a
//! peer cannot make the decoder allocate more than one maximal frame.

use crate::limits::MAX_BODY_LEN;

/// Bytes before the body.
pub const HEADER_LEN: usize = 8;
/// Bytes after the body.
pub const TRAILER_LEN: usize = 4;

/// Why a frame could not be taken off the byte stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces a body longer than the protocol allows.
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY_LEN} bytes")]
    TooLong(u32),
    /// The reserved header bytes are not zero.
    #[error("frame header has non-zero reserved bytes")]
    Reserved,
    /// The CRC-32 does not match the frame's bytes.
    #[error("frame checksum mismatch (kind {kind:#04x}, {len} byte body): expected {expected:#010x}, computed {actual:#010x}")]
    Checksum {
        /// Message kind from the header.
        kind: u8,
        /// Body length from the header.
        len: u32,
        /// CRC carried by the frame.
        expected: u32,
        /// CRC computed over the frame.
        actual: u32,
    },
}

/// A frame whose checksum has been verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// Message kind byte.
    pub kind: u8,
    /// Message body.
    pub body: &'a [u8],
}

/// Begins a frame of `kind` in `out`; returns the offset to pass to
/// [`finish_frame`] once the body has been appended.
pub fn begin_frame(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind, 0, 0, 0]);
    start
}

/// Completes the frame begun at `start`: fills in the length and appends the
/// CRC. The body must respect [`MAX_BODY_LEN`] (encoders guarantee it).
pub fn finish_frame(out: &mut Vec<u8>, start: usize) {
    let body_len = (out.len() - start - HEADER_LEN) as u32;
    debug_assert!(
        body_len <= MAX_BODY_LEN,
        "encoder produced an oversized frame"
    );
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Parses one frame from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, or the
/// frame and the number of bytes it used.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(RawFrame<'_>, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > MAX_BODY_LEN {
        return Err(FrameError::TooLong(len));
    }
    if buf[5..8] != [0, 0, 0] {
        return Err(FrameError::Reserved);
    }
    let total = HEADER_LEN + len as usize + TRAILER_LEN;
    if buf.len() < total {
        return Ok(None);
    }
    let crc_at = HEADER_LEN + len as usize;
    let expected = u32::from_le_bytes([
        buf[crc_at],
        buf[crc_at + 1],
        buf[crc_at + 2],
        buf[crc_at + 3],
    ]);
    let actual = crc32fast::hash(&buf[..crc_at]);
    if expected != actual {
        return Err(FrameError::Checksum {
            kind: buf[4],
            len,
            expected,
            actual,
        });
    }
    Ok(Some((
        RawFrame {
            kind: buf[4],
            body: &buf[HEADER_LEN..crc_at],
        },
        total,
    )))
}

/// Accumulates bytes from a stream and yields whole frames.
///
/// Memory is bounded by one maximal frame plus one read's worth of bytes.
#[derive(Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 1 << 20 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one is buffered. After an error the stream
    /// cannot be resynchronised and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame<'_>>, FrameError> {
        match parse_frame(&self.buf[self.start..])? {
            None => Ok(None),
            Some((_, used)) => {
                let at = self.start;
                self.start += used;
                // Re-borrow the consumed range; parse_frame validated it.
                let frame = &self.buf[at..at + used];
                Ok(Some(RawFrame {
                    kind: frame[4],
                    body: &frame[HEADER_LEN..used - TRAILER_LEN],
                }))
            }
        }
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let s = begin_frame(&mut out, kind);
        out.extend_from_slice(body);
        finish_frame(&mut out, s);
        out
    }

    #[test]
    fn round_trip_and_partial_input() {
        let f = frame(7, b"hello");
        for cut in 0..f.len() {
            assert_eq!(parse_frame(&f[..cut]), Ok(None));
        }
        let (raw, used) = parse_frame(&f).unwrap().unwrap();
        assert_eq!((raw.kind, raw.body, used), (7, &b"hello"[..], f.len()));
    }

    #[test]
    fn corrupted_byte_is_detected() {
        let mut f = frame(7, b"hello");
        f[9] ^= 1;
        assert!(matches!(parse_frame(&f), Err(FrameError::Checksum { .. })));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut f = frame(7, b"");
        f[..4].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
        assert_eq!(
            parse_frame(&f[..8]),
            Err(FrameError::TooLong(MAX_BODY_LEN + 1))
        );
    }

    #[test]
    fn buffer_yields_frames_split_across_reads() {
        let mut bytes = frame(1, b"a");
        bytes.extend(frame(2, &[9u8; 1000]));
        let mut fb = FrameBuffer::new();
        let mut kinds = Vec::new();
        for chunk in bytes.chunks(7) {
            fb.extend(chunk);
            while let Some(f) = fb.next_frame().unwrap() {
                kinds.push((f.kind, f.body.len()));
            }
        }
        assert_eq!(kinds, vec![(1, 1), (2, 1000)]);
        assert_eq!(fb.pending(), 0);
    }
}
