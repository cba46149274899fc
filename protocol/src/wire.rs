//! Bounded primitive encoding: little-endian integers, length-prefixed
//! strings and byte runs. Every read checks the remaining length first, so a
//! decoder never panics and never allocates more than the frame it reads.

use crate::digest::Digest;
use crate::limits::{valid_id, MAX_TEXT_LEN};

/// Why a message body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ended before field `field` was complete.
    #[error("message truncated while reading {field}")]
    Truncated {
        /// Name of the field being read.
        field: &'static str,
    },
    /// The body has bytes left after the last field.
    #[error("{0} unexpected trailing bytes after the message")]
    TrailingBytes(usize),
    /// A length or count is larger than the protocol allows.
    #[error("{field} is {value}, above the limit of {limit}")]
    TooLarge {
        /// Name of the field.
        field: &'static str,
        /// The value read.
        value: u64,
        /// The largest value accepted.
        limit: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    BadUtf8 {
        /// Name of the field.
        field: &'static str,
    },
    /// An id does not follow the id rules (see `limits::valid_id`).
    #[error("{field} {value:?} is not a valid id")]
    BadId {
        /// Name of the field.
        field: &'static str,
        /// The offending value (lossy).
        value: String,
    },
    /// A field holds a value outside its domain.
    #[error("{field} has invalid value {value}")]
    BadValue {
        /// Name of the field.
        field: &'static str,
        /// The value read.
        value: u64,
    },
}

/// Appends encoded fields to a buffer.
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// A writer appending to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a digest.
    pub fn digest(&mut self, d: &Digest) {
        self.out.extend_from_slice(&d.0);
    }
    /// Appends a u16 length and the string's bytes. Callers keep strings
    /// within the limits; longer ones are cut at a character boundary.
    pub fn str(&mut self, s: &str) {
        let mut end = s.len().min(MAX_TEXT_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.out.extend_from_slice(&s.as_bytes()[..end]);
    }
    /// Appends raw bytes with no length prefix.
    pub fn bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }
}

/// Reads fields from a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Reads a byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    /// Reads a u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    /// Reads a u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Reads a u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// Reads a digest.
    pub fn digest(&mut self, field: &'static str) -> Result<Digest, DecodeError> {
        let b = self.take(32, field)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(b);
        Ok(Digest(a))
    }
    /// Reads a boolean byte (0 or 1).
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadValue {
                field,
                value: u64::from(v),
            }),
        }
    }
    /// Reads a length-prefixed string of at most `limit` bytes.
    pub fn str(&mut self, field: &'static str, limit: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > limit {
            return Err(DecodeError::TooLarge {
                field,
                value: len as u64,
                limit: limit as u64,
            });
        }
        let b = self.take(len, field)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8 { field })
    }
    /// Reads an id (disk or agent), checked against the id rules.
    pub fn id(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let s = self.str(field, crate::limits::MAX_ID_LEN)?;
        if !valid_id(&s) {
            return Err(DecodeError::BadId { field, value: s });
        }
        Ok(s)
    }
    /// Reads a count and checks it against `limit` and against the bytes
    /// left, given that each item needs at least `min_item_len` bytes.
    pub fn count(
        &mut self,
        field: &'static str,
        limit: usize,
        min_item_len: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n > limit {
            return Err(DecodeError::TooLarge {
                field,
                value: n as u64,
                limit: limit as u64,
            });
        }
        if n.saturating_mul(min_item_len) > self.buf.len() {
            return Err(DecodeError::Truncated { field });
        }
        Ok(n)
    }
    /// Everything left in the body.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// Fails unless every byte has been read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}
