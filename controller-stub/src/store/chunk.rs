//! Turning a stored or received payload back into block bytes, and proving
//! they are the bytes the digest names.
//!
//! Every chunk goes through [`decode_verified`] twice in its life: when the
//! agent sends it (before it is stored) and whenever it is read back (export,
//! verify, reading an index page). Decoding is bounded: a zstd payload is
//! decompressed into a buffer of exactly the announced length and refused if
//! it would produce more.

use std::borrow::Cow;

use tideline_protocol::limits::MAX_BLOCK_SIZE;
use tideline_protocol::{Digest, Encoding};

use super::error::StoreError;

/// Largest decoded chunk: one maximal block (index pages are 4 KiB).
pub(crate) const MAX_RAW_LEN: u32 = MAX_BLOCK_SIZE;

/// Decodes `payload` (encoded with `encoding`, `raw_len` bytes once decoded)
/// and checks that the result hashes to `digest`.
pub(crate) fn decode_verified<'p>(
    digest: &Digest,
    encoding: Encoding,
    raw_len: u32,
    payload: &'p [u8],
) -> Result<Cow<'p, [u8]>, StoreError> {
    let bytes = decode(digest, encoding, raw_len, payload)?;
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(StoreError::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    Ok(bytes)
}

/// Decodes `payload` into exactly `raw_len` bytes.
fn decode<'p>(
    digest: &Digest,
    encoding: Encoding,
    raw_len: u32,
    payload: &'p [u8],
) -> Result<Cow<'p, [u8]>, StoreError> {
    let fail = |reason: String| StoreError::Decode {
        digest: *digest,
        reason,
    };
    if raw_len == 0 || raw_len > MAX_RAW_LEN {
        return Err(fail(format!(
            "raw length {raw_len} outside 1..={MAX_RAW_LEN}"
        )));
    }
    match encoding {
        Encoding::Zero => Err(fail("zero blocks are not stored".into())),
        Encoding::Raw => {
            if payload.len() != raw_len as usize {
                return Err(fail(format!(
                    "raw payload is {} bytes, announced {raw_len}",
                    payload.len()
                )));
            }
            Ok(Cow::Borrowed(payload))
        }
        Encoding::Zstd => {
            // The capacity caps the output: a frame that would decompress to
            // more than raw_len bytes is an error, not an allocation.
            let out = zstd::bulk::decompress(payload, raw_len as usize)
                .map_err(|e| fail(format!("zstd: {e}")))?;
            if out.len() != raw_len as usize {
                return Err(fail(format!(
                    "zstd payload decompressed to {} bytes, announced {raw_len}",
                    out.len()
                )));
            }
            Ok(Cow::Owned(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_zstd_decode_and_verify() {
        let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&block);
        let got = decode_verified(&d, Encoding::Raw, 4096, &block).unwrap();
        assert_eq!(&*got, &block[..]);
        let z = zstd::bulk::compress(&block, 3).unwrap();
        let got = decode_verified(&d, Encoding::Zstd, 4096, &z).unwrap();
        assert_eq!(&*got, &block[..]);
    }

    #[test]
    fn zstd_bomb_is_refused() {
        let big = vec![0u8; 1 << 20];
        let z = zstd::bulk::compress(&big, 3).unwrap();
        let d = Digest::of(&big[..4096]);
        let err = decode_verified(&d, Encoding::Zstd, 4096, &z).unwrap_err();
        assert!(matches!(err, StoreError::Decode { .. }), "{err}");
    }

    #[test]
    fn short_zstd_output_is_refused() {
        let small = vec![7u8; 1000];
        let z = zstd::bulk::compress(&small, 3).unwrap();
        let err = decode_verified(&Digest::of(&small), Encoding::Zstd, 4096, &z).unwrap_err();
        assert!(matches!(err, StoreError::Decode { .. }), "{err}");
    }

    #[test]
    fn wrong_digest_and_zero_encoding_are_refused() {
        let block = vec![1u8; 4096];
        let err = decode_verified(&Digest::of(b"other"), Encoding::Raw, 4096, &block).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        let err = decode_verified(&Digest::of(&block), Encoding::Zero, 4096, &[]).unwrap_err();
        assert!(matches!(err, StoreError::Decode { .. }));
        let err = decode_verified(&Digest::of(&block), Encoding::Raw, 4000, &block).unwrap_err();
        assert!(matches!(err, StoreError::Decode { .. }));
    }
}
