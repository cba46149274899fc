//! GELF chunking: splitting one (possibly compressed) GELF payload into UDP
//! datagrams, and the reverse, reassembly.
//!
//! Wire format of a chunk (GELF 1.1, all integers single bytes):
//!
//! ```text
//! 0      2              10    11    12
//! +------+--------------+-----+-----+-----------------------+
//! | 1e 0f| message id   | seq | cnt | slice of the payload  |
//! +------+--------------+-----+-----+-----------------------+
//! ```
//!
//! `seq` counts from 0 to `cnt - 1`; `cnt` is at most 128. A payload that fits
//! in one datagram is sent as is, without a header. Compression (gzip or zlib)
//! applies to the whole payload before it is chunked, so a receiver
//! reassembles first and decompresses second; the payload's first bytes tell
//! which: `1f 8b` is gzip, `78 xx` is zlib, `{` is plain JSON.
//!
//! This file is pure: no sockets, no clock. [`chunk`] is what the sender
//! uses; [`Reassembler`] is what a receiver (our tests) uses.

use std::collections::{HashMap, VecDeque};
use std::io::Read;

use super::GelfError;

/// First two bytes of every chunked datagram.
pub const CHUNK_MAGIC: [u8; 2] = [0x1e, 0x0f];
/// Bytes of header in front of every chunk's slice of the payload.
pub const CHUNK_HEADER_LEN: usize = 12;
/// GELF 1.1: a receiver discards a message announced with more chunks.
pub const MAX_CHUNKS: usize = 128;

/// Splits `payload` into datagrams of at most `chunk_size` bytes, header
/// included.
///
/// A payload of at most `chunk_size` bytes comes back as a single datagram
/// with no chunk header. Fails when `chunk_size` leaves no room after the
/// header, or when the payload would need more than [`MAX_CHUNKS`] chunks
/// (GELF receivers drop such messages, so sending them would only waste
/// bandwidth).
pub fn chunk(
    payload: &[u8],
    message_id: [u8; 8],
    chunk_size: usize,
) -> Result<Vec<Vec<u8>>, GelfError> {
    if chunk_size <= CHUNK_HEADER_LEN {
        return Err(GelfError::ChunkSizeTooSmall { chunk_size });
    }
    if payload.len() <= chunk_size {
        return Ok(vec![payload.to_vec()]);
    }
    let slice_len = chunk_size - CHUNK_HEADER_LEN;
    let count = payload.len().div_ceil(slice_len);
    if count > MAX_CHUNKS {
        return Err(GelfError::TooManyChunks {
            payload_len: payload.len(),
            chunk_size,
            chunks: count,
        });
    }
    let datagrams = payload
        .chunks(slice_len)
        .enumerate()
        .map(|(seq, slice)| {
            let mut datagram = Vec::with_capacity(CHUNK_HEADER_LEN + slice.len());
            datagram.extend_from_slice(&CHUNK_MAGIC);
            datagram.extend_from_slice(&message_id);
            // Both fit in a byte: count <= MAX_CHUNKS (128) was checked above.
            datagram.push(seq as u8);
            datagram.push(count as u8);
            datagram.extend_from_slice(slice);
            datagram
        })
        .collect();
    Ok(datagrams)
}

/// Messages whose chunks are still being collected, at most; the oldest is
/// forgotten when another one starts. Bounds memory against a peer that
/// sends first chunks and never the rest.
const MAX_PENDING_MESSAGES: usize = 64;
/// Largest decompressed payload accepted (a compressed datagram could
/// otherwise expand without limit).
const MAX_DECOMPRESSED_LEN: u64 = 16 * 1024 * 1024;

/// Chunks received so far for one message id.
struct PartialMessage {
    count: usize,
    slices: Vec<Option<Vec<u8>>>,
    received: usize,
}

/// Receiver side of GELF over UDP: takes datagrams in any order, returns each
/// message's payload (decompressed) once all of its chunks are in.
#[derive(Default)]
pub struct Reassembler {
    pending: HashMap<[u8; 8], PartialMessage>,
    /// Message ids in the order they started, for eviction.
    order: VecDeque<[u8; 8]>,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of messages with chunks still missing.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Feeds one datagram. Returns the decompressed payload when this
    /// datagram completes a message (or is a whole message by itself), and
    /// `None` when chunks are still missing or the datagram is malformed
    /// (bad header, sequence number out of range, count that disagrees with
    /// earlier chunks, payload that fails to decompress).
    pub fn push(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
        if !datagram.starts_with(&CHUNK_MAGIC) {
            return decompress(datagram);
        }
        if datagram.len() < CHUNK_HEADER_LEN {
            return None;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&datagram[2..10]);
        let seq = usize::from(datagram[10]);
        let count = usize::from(datagram[11]);
        if count == 0 || count > MAX_CHUNKS || seq >= count {
            return None;
        }
        let slice = &datagram[CHUNK_HEADER_LEN..];

        if !self.pending.contains_key(&id) {
            if self.order.len() >= MAX_PENDING_MESSAGES {
                if let Some(oldest) = self.order.pop_front() {
                    self.pending.remove(&oldest);
                }
            }
            self.order.push_back(id);
            self.pending.insert(
                id,
                PartialMessage {
                    count,
                    slices: vec![None; count],
                    received: 0,
                },
            );
        }
        // Present: inserted just above when it was missing.
        let partial = self.pending.get_mut(&id)?;
        if partial.count != count {
            // Two senders reusing an id, or corruption: neither can be trusted.
            self.forget(&id);
            return None;
        }
        if partial.slices[seq].is_none() {
            partial.slices[seq] = Some(slice.to_vec());
            partial.received += 1;
        }
        if partial.received < partial.count {
            return None;
        }
        let partial = self.forget(&id)?;
        let payload: Vec<u8> = partial.slices.into_iter().flatten().flatten().collect();
        decompress(&payload)
    }

    fn forget(&mut self, id: &[u8; 8]) -> Option<PartialMessage> {
        self.order.retain(|pending| pending != id);
        self.pending.remove(id)
    }
}

/// Undoes whichever compression the payload's first bytes announce.
fn decompress(payload: &[u8]) -> Option<Vec<u8>> {
    match payload {
        [0x1f, 0x8b, ..] => read_bounded(flate2::read::GzDecoder::new(payload)),
        // zlib: CM = 8 (deflate) in the low nibble and a header checksum
        // (RFC 1950); plain JSON starts with '{' and never matches.
        [cmf, flg, ..]
            if cmf & 0x0f == 8 && (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 == 0 =>
        {
            read_bounded(flate2::read::ZlibDecoder::new(payload))
        }
        _ => Some(payload.to_vec()),
    }
}

fn read_bounded(decoder: impl Read) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut limited = decoder.take(MAX_DECOMPRESSED_LEN + 1);
    limited.read_to_end(&mut out).ok()?;
    if out.len() as u64 > MAX_DECOMPRESSED_LEN {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::seq::SliceRandom;
    use std::io::Write;

    const ID: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    #[test]
    fn small_payload_is_one_datagram_without_header() {
        let datagrams = chunk(b"{\"a\":1}", ID, 512).unwrap();
        assert_eq!(datagrams, vec![b"{\"a\":1}".to_vec()]);
    }

    #[test]
    fn payload_of_exactly_chunk_size_is_not_chunked() {
        let payload = vec![b'x'; 512];
        assert_eq!(chunk(&payload, ID, 512).unwrap(), vec![payload]);
    }

    #[test]
    fn chunks_carry_magic_id_sequence_and_count() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let datagrams = chunk(&payload, ID, 112).unwrap();
        // 100 payload bytes per chunk.
        assert_eq!(datagrams.len(), 10);
        for (seq, datagram) in datagrams.iter().enumerate() {
            assert!(datagram.len() <= 112);
            assert_eq!(&datagram[..2], &[0x1e, 0x0f]);
            assert_eq!(&datagram[2..10], &ID);
            assert_eq!(usize::from(datagram[10]), seq);
            assert_eq!(datagram[11], 10);
            assert_eq!(&datagram[12..], &payload[seq * 100..(seq + 1) * 100]);
        }
    }

    #[test]
    fn exactly_128_chunks_is_allowed_and_129_is_refused() {
        let slice = 100;
        let at_limit = vec![b'a'; slice * MAX_CHUNKS];
        assert_eq!(chunk(&at_limit, ID, slice + 12).unwrap().len(), 128);
        let over = vec![b'a'; slice * MAX_CHUNKS + 1];
        match chunk(&over, ID, slice + 12) {
            Err(GelfError::TooManyChunks { chunks, .. }) => assert_eq!(chunks, 129),
            other => panic!("expected TooManyChunks, got {other:?}"),
        }
    }

    #[test]
    fn chunk_size_must_leave_room_after_the_header() {
        assert!(matches!(
            chunk(b"xxxxxxxxxxxxxxxxxxxx", ID, 12),
            Err(GelfError::ChunkSizeTooSmall { chunk_size: 12 })
        ));
    }

    #[test]
    fn reassembler_rejects_malformed_chunks() {
        let mut reassembler = Reassembler::new();
        // Too short for a header.
        assert_eq!(reassembler.push(&[0x1e, 0x0f, 1, 2]), None);
        // Sequence number not below the count.
        let mut bad = vec![0x1e, 0x0f, 0, 0, 0, 0, 0, 0, 0, 9, 3, 3];
        bad.extend_from_slice(b"x");
        assert_eq!(reassembler.push(&bad), None);
        // Count above the GELF limit.
        let mut bad = vec![0x1e, 0x0f, 0, 0, 0, 0, 0, 0, 0, 9, 0, 129];
        bad.extend_from_slice(b"x");
        assert_eq!(reassembler.push(&bad), None);
        assert_eq!(reassembler.pending(), 0);
    }

    #[test]
    fn reassembler_forgets_a_message_whose_count_changes() {
        let mut reassembler = Reassembler::new();
        let mut first = vec![0x1e, 0x0f, 7, 7, 7, 7, 7, 7, 7, 7, 0, 2];
        first.extend_from_slice(b"{\"a\"");
        let mut second = vec![0x1e, 0x0f, 7, 7, 7, 7, 7, 7, 7, 7, 1, 3];
        second.extend_from_slice(b":1}");
        assert_eq!(reassembler.push(&first), None);
        assert_eq!(reassembler.push(&second), None);
        assert_eq!(reassembler.pending(), 0);
    }

    #[test]
    fn reassembler_bounds_pending_messages() {
        let mut reassembler = Reassembler::new();
        for i in 0..(MAX_PENDING_MESSAGES as u64 + 10) {
            let mut datagram = vec![0x1e, 0x0f];
            datagram.extend_from_slice(&i.to_be_bytes());
            datagram.extend_from_slice(&[0, 2, b'x']);
            assert_eq!(reassembler.push(&datagram), None);
        }
        assert_eq!(reassembler.pending(), MAX_PENDING_MESSAGES);
    }

    #[test]
    fn duplicate_chunks_do_not_complete_a_message() {
        let payload = vec![b'q'; 300];
        let datagrams = chunk(&payload, ID, 112).unwrap();
        let mut reassembler = Reassembler::new();
        assert_eq!(reassembler.push(&datagrams[0]), None);
        assert_eq!(reassembler.push(&datagrams[0]), None);
        assert_eq!(reassembler.push(&datagrams[1]), None);
        assert_eq!(reassembler.push(&datagrams[2]), Some(payload));
    }

    #[test]
    fn reassembler_decompresses_gzip_and_zlib() {
        let json = br#"{"version":"1.1","short_message":"hello"}"#.repeat(50);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&json).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(&json).unwrap();
        let zl = zl.finish().unwrap();

        let mut reassembler = Reassembler::new();
        assert_eq!(reassembler.push(&gz).as_deref(), Some(&json[..]));
        assert_eq!(reassembler.push(&zl).as_deref(), Some(&json[..]));
        for datagram in chunk(&zl, ID, 20).unwrap() {
            if let Some(out) = reassembler.push(&datagram) {
                assert_eq!(out, json);
                return;
            }
        }
        panic!("chunked zlib payload never completed");
    }

    proptest! {
        #[test]
        fn chunk_shuffle_reassemble_round_trips(
            // JSON-like first byte so the reassembler does not take it for
            // a compressed payload.
            body in proptest::collection::vec(any::<u8>(), 0..20_000),
            chunk_size in 13usize..3000,
            id in any::<[u8; 8]>(),
            seed in any::<u64>(),
        ) {
            let mut payload = vec![b'{'];
            payload.extend_from_slice(&body);
            match chunk(&payload, id, chunk_size) {
                Ok(mut datagrams) => {
                    prop_assert!(datagrams.len() <= MAX_CHUNKS);
                    prop_assert!(datagrams.iter().all(|d| d.len() <= chunk_size));
                    use rand::SeedableRng;
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    datagrams.shuffle(&mut rng);
                    let mut reassembler = Reassembler::new();
                    let last = datagrams.len() - 1;
                    for (i, datagram) in datagrams.iter().enumerate() {
                        let out = reassembler.push(datagram);
                        if i < last {
                            prop_assert_eq!(out, None);
                        } else {
                            prop_assert_eq!(out.as_deref(), Some(&payload[..]));
                        }
                    }
                    prop_assert_eq!(reassembler.pending(), 0);
                }
                Err(GelfError::TooManyChunks { chunks, .. }) => {
                    prop_assert!(chunks > MAX_CHUNKS);
                    prop_assert!(payload.len() > (chunk_size - CHUNK_HEADER_LEN) * MAX_CHUNKS);
                }
                Err(other) => prop_assert!(false, "unexpected error {other:?}"),
            }
        }
    }
}
