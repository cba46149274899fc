//! Checks run by the fuzz targets, kept in a library so that the stable test
//! `protocol/tests/fuzz_corpus.rs` can replay the committed corpus through
//! exactly the same code (it includes this file with `#[path]`).
//!
//! Nothing here may depend on anything but `tideline-protocol` and `std`.

use tideline_protocol::frame::{
    begin_frame, finish_frame, parse_frame, FrameBuffer, FrameError, RawFrame, HEADER_LEN,
    TRAILER_LEN,
};
use tideline_protocol::limits::MAX_BODY_LEN;
use tideline_protocol::message::{Message, MessageError};

/// The whole fuzz body for `frame_decoder`; must not panic for any input.
///
/// The input is checked three ways, because a CRC stops almost every
/// mutation of a valid frame at the checksum:
///
/// * as a byte stream, exactly as given ([`check_frame_stream`]);
/// * as the same stream with every checksum recomputed
///   ([`with_checksums_fixed`]), so that mutated bodies reach the message
///   decoder;
/// * as one bare body: the first byte is the kind, the rest the body.
pub fn check_input(data: &[u8]) {
    check_frame_stream(data);
    let fixed = with_checksums_fixed(data);
    if fixed != data {
        check_frame_stream(&fixed);
    }
    if let Some((&kind, body)) = data.split_first() {
        if let Ok(msg) = Message::decode(RawFrame { kind, body }) {
            let mut original = Vec::with_capacity(body.len() + HEADER_LEN + TRAILER_LEN);
            let start = begin_frame(&mut original, kind);
            original.extend_from_slice(body);
            finish_frame(&mut original, start);
            check_round_trip(&msg, &original);
        }
    }
}

/// A copy of `data` in which each whole frame that a header delimits (up to
/// the first bad length or the end) carries a correct CRC-32.
pub fn with_checksums_fixed(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut at = 0;
    while out.len() - at >= HEADER_LEN {
        let len = u32::from_le_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
        if len > MAX_BODY_LEN {
            break;
        }
        let crc_at = at + HEADER_LEN + len as usize;
        let end = crc_at + TRAILER_LEN;
        if end > out.len() {
            break;
        }
        let crc = crc32(&out[at..crc_at]);
        out[crc_at..end].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
    out
}

/// CRC-32 (IEEE, reflected, as in zlib), bitwise: this crate must not add
/// dependencies beyond the protocol crate (see the module comment).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// What came off a byte stream: one entry per whole frame (a message, or the
/// reason its body did not decode), then the frame error that stopped the
/// stream, if one did.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamOutcome {
    /// Per frame, in order.
    pub frames: Vec<Result<Message, MessageError>>,
    /// The frame-level error that ends the stream (it cannot be resynchronised).
    pub stopped_by: Option<FrameError>,
    /// Bytes left over that do not (yet) form a whole frame; meaningful only
    /// when `stopped_by` is `None`.
    pub pending: usize,
}

/// Checks one byte stream:
///
/// 1. Decodes `data` frame by frame from one contiguous buffer (the
///    reference).
/// 2. Feeds `data` to a [`FrameBuffer`] in pieces whose sizes are derived
///    from the input, and asserts the outcome is identical: framing must
///    not depend on how the socket splits the bytes.
/// 3. For every decoded message: its encoding is byte-for-byte the frame it
///    came from (the codec is canonical), and decoding that again gives the
///    same message.
pub fn check_frame_stream(data: &[u8]) {
    let reference = decode_contiguous(data);
    let chunked = decode_in_pieces(data);
    assert_eq!(
        reference, chunked,
        "piecewise decoding differs from contiguous decoding"
    );

    let mut at = 0;
    for frame_result in &reference.frames {
        // Every entry in `frames` is a whole frame that parsed; find it
        // again to compare bytes.
        let Ok(Some((_, used))) = parse_frame(&data[at..]) else {
            panic!("reference frame at offset {at} no longer parses");
        };
        let original = &data[at..at + used];
        at += used;
        if let Ok(msg) = frame_result {
            check_round_trip(msg, original);
        }
    }
}

/// Asserts that `msg`, decoded from `original`, re-encodes to `original`
/// and decodes back to itself.
pub fn check_round_trip(msg: &Message, original: &[u8]) {
    let encoded = msg.to_frame();
    let Ok(Some((frame, used))) = parse_frame(&encoded) else {
        panic!("{} re-encoded into an unparsable frame", msg.name());
    };
    assert_eq!(
        used,
        encoded.len(),
        "{} re-encoded into trailing bytes",
        msg.name()
    );
    assert_eq!(
        frame.body.len() + HEADER_LEN + TRAILER_LEN,
        encoded.len(),
        "frame length bookkeeping"
    );
    let again = Message::decode(frame);
    assert_eq!(again.as_ref(), Ok(msg), "decode(encode(m)) != m");
    assert_eq!(
        encoded,
        original,
        "{} re-encoded differently from the frame it was decoded from",
        msg.name()
    );
}

/// Decodes `data` with [`parse_frame`] over one contiguous buffer.
pub fn decode_contiguous(data: &[u8]) -> StreamOutcome {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        match parse_frame(&data[at..]) {
            Ok(Some((raw, used))) => {
                frames.push(Message::decode(raw));
                at += used;
            }
            Ok(None) => {
                return StreamOutcome {
                    frames,
                    stopped_by: None,
                    pending: data.len() - at,
                }
            }
            Err(e) => {
                return StreamOutcome {
                    frames,
                    stopped_by: Some(e),
                    pending: 0,
                }
            }
        }
    }
}

/// Decodes `data` through a [`FrameBuffer`], as a socket reader would, in
/// pieces whose sizes come from a generator seeded by the input itself.
pub fn decode_in_pieces(data: &[u8]) -> StreamOutcome {
    let mut sizes = PieceSizes::seeded_by(data);
    let mut buffer = FrameBuffer::new();
    let mut frames = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = sizes.next_size().min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        buffer.extend(piece);
        loop {
            match buffer.next_frame() {
                Ok(Some(raw)) => frames.push(Message::decode(raw)),
                Ok(None) => break,
                Err(e) => {
                    return StreamOutcome {
                        frames,
                        stopped_by: Some(e),
                        pending: 0,
                    }
                }
            }
        }
    }
    StreamOutcome {
        frames,
        stopped_by: None,
        pending: buffer.pending(),
    }
}

/// Read sizes a socket might return: mostly small, sometimes a page or more.
struct PieceSizes {
    state: u64,
}

impl PieceSizes {
    fn seeded_by(data: &[u8]) -> Self {
        // FNV-1a over the input: the fuzzer steers the split by mutating the
        // bytes, and a corpus file always replays with the same split.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        PieceSizes { state: h | 1 }
    }

    fn next_size(&mut self) -> usize {
        // xorshift64
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let r = self.state;
        match r % 8 {
            0 => 1,
            1..=4 => 1 + (r >> 8) as usize % 16,
            5 | 6 => 1 + (r >> 8) as usize % 512,
            _ => 1 + (r >> 8) as usize % 8192,
        }
    }
}
