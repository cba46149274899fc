//! Block digests and the index root that both ends compute.
//!
//! Every block of a disk is identified by the BLAKE3 digest of its
//! uncompressed bytes. A disk's *index* is the ordered list of its block
//! digests; its *root* condenses that list so that the agent and the
//! controller can agree on a whole point with one 32-byte comparison before
//! the controller commits it.
//!
//! The root is a two-level hash that mirrors how the controller stores an
//! index (see `docs/architecture.md`):
//!
//! * the digests are cut into pages of [`PAGE_BLOCKS`] entries (the last page
//!   may be shorter); a page's digest is BLAKE3 of its entries concatenated;
//! * the root is BLAKE3 of `"tideline-index-v1"`, the block count as u64
//!   little-endian, and the page digests concatenated.

use std::fmt;

/// Number of block digests in one index page (4 KiB of digests).
pub const PAGE_BLOCKS: usize = 128;

/// Domain separation prefix of the index root.
const ROOT_CONTEXT: &[u8] = b"tideline-index-v1";

/// A BLAKE3 digest of a block, a page or an index.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Length of a digest in bytes.
    pub const LEN: usize = 32;

    /// Digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Digest of a block of `len` zero bytes.
    pub fn of_zeros(len: usize) -> Self {
        const CHUNK: [u8; 16 * 1024] = [0u8; 16 * 1024];
        let mut hasher = blake3::Hasher::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK.len());
            hasher.update(&CHUNK[..n]);
            left -= n;
        }
        Digest(*hasher.finalize().as_bytes())
    }

    /// Lower-case hexadecimal form.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses the lower- or upper-case hexadecimal form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Digests of the all-zero block for one disk geometry: the full block and
/// the (possibly shorter) tail block, computed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroDigests {
    full: Digest,
    tail: Digest,
    block_count: u64,
}

impl ZeroDigests {
    /// Zero digests for a disk of `disk_size` bytes cut into `block_size`
    /// blocks.
    pub fn new(disk_size: u64, block_size: u32) -> Self {
        let g = Geometry::new(disk_size, block_size);
        let full = Digest::of_zeros(block_size as usize);
        let tail_len = if g.block_count == 0 {
            block_size as usize
        } else {
            g.block_len(g.block_count - 1) as usize
        };
        let tail = if tail_len == block_size as usize {
            full
        } else {
            Digest::of_zeros(tail_len)
        };
        ZeroDigests {
            full,
            tail,
            block_count: g.block_count,
        }
    }

    /// Digest of block `index` when it holds only zeros.
    pub fn for_block(&self, index: u64) -> Digest {
        if index + 1 == self.block_count {
            self.tail
        } else {
            self.full
        }
    }

    /// Whether `digest` is the zero digest of block `index`.
    pub fn is_zero(&self, index: u64, digest: &Digest) -> bool {
        self.for_block(index) == *digest
    }
}

/// How a disk of a given size is cut into blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Number of blocks: the size divided by the block size, rounded up.
    pub block_count: u64,
}

impl Geometry {
    /// Geometry of a disk of `disk_size` bytes with `block_size` blocks.
    /// `block_size` must be non-zero (callers validate it with
    /// [`crate::limits::valid_block_size`]).
    pub fn new(disk_size: u64, block_size: u32) -> Self {
        let bs = u64::from(block_size.max(1));
        Geometry {
            disk_size,
            block_size,
            block_count: disk_size.div_ceil(bs),
        }
    }

    /// Byte offset of block `index`.
    pub fn offset(&self, index: u64) -> u64 {
        index * u64::from(self.block_size)
    }

    /// Length in bytes of block `index` (the last block may be short).
    pub fn block_len(&self, index: u64) -> u32 {
        let start = self.offset(index);
        let end = (start + u64::from(self.block_size)).min(self.disk_size);
        end.saturating_sub(start) as u32
    }
}

/// Computes an index root from block digests fed in block order.
///
/// The page digests are buffered until [`IndexRootHasher::finish`] because
/// the block count leads the hashed input: 32 bytes per 128 blocks, 4 MiB
/// for a 1 TiB disk at 64 KiB blocks.
#[derive(Clone)]
pub struct IndexRootHasher {
    page: blake3::Hasher,
    in_page: usize,
    root: blake3::Hasher,
    count: u64,
    pages: Vec<u8>,
}

impl Default for IndexRootHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl IndexRootHasher {
    /// A hasher with no blocks yet.
    pub fn new() -> Self {
        IndexRootHasher {
            page: blake3::Hasher::new(),
            in_page: 0,
            root: blake3::Hasher::new(),
            count: 0,
            pages: Vec::new(),
        }
    }

    /// Adds the digest of the next block.
    pub fn push(&mut self, digest: &Digest) {
        self.page.update(&digest.0);
        self.in_page += 1;
        self.count += 1;
        if self.in_page == PAGE_BLOCKS {
            self.close_page();
        }
    }

    /// Adds the digest of a whole page directly (its `blocks` entries must
    /// all be in it, and the hasher must be at a page boundary).
    pub fn push_page(&mut self, page_digest: &Digest, blocks: usize) {
        debug_assert_eq!(self.in_page, 0, "push_page off a page boundary");
        self.pages.extend_from_slice(&page_digest.0);
        self.count += blocks as u64;
    }

    fn close_page(&mut self) {
        let d = self.page.finalize();
        self.pages.extend_from_slice(d.as_bytes());
        self.page = blake3::Hasher::new();
        self.in_page = 0;
    }

    /// Number of block digests pushed so far.
    pub fn block_count(&self) -> u64 {
        self.count
    }

    /// The root over every digest pushed.
    pub fn finish(mut self) -> Digest {
        if self.in_page > 0 {
            let d = self.page.finalize();
            self.pages.extend_from_slice(d.as_bytes());
        }
        self.root.update(ROOT_CONTEXT);
        self.root.update(&self.count.to_le_bytes());
        self.root.update(&self.pages);
        Digest(*self.root.finalize().as_bytes())
    }
}

/// The digest of one page of block digests (its entries concatenated).
pub fn page_digest(entries: &[Digest]) -> Digest {
    let mut h = blake3::Hasher::new();
    for d in entries {
        h.update(&d.0);
    }
    Digest(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_digest_matches_hash_of_zeros() {
        assert_eq!(Digest::of_zeros(65536), Digest::of(&vec![0u8; 65536]));
        assert_eq!(Digest::of_zeros(0), Digest::of(&[]));
    }

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"tideline");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }

    #[test]
    fn root_by_pages_equals_root_by_blocks() {
        let digests: Vec<Digest> = (0..300u32).map(|i| Digest::of(&i.to_le_bytes())).collect();
        let mut a = IndexRootHasher::new();
        for d in &digests {
            a.push(d);
        }
        let mut b = IndexRootHasher::new();
        b.push_page(&page_digest(&digests[..128]), 128);
        b.push_page(&page_digest(&digests[128..256]), 128);
        for d in &digests[256..] {
            b.push(d);
        }
        assert_eq!(a.finish(), b.finish());
    }

    #[test]
    fn root_depends_on_count_and_order() {
        let x = Digest::of(b"x");
        let y = Digest::of(b"y");
        let mut a = IndexRootHasher::new();
        a.push(&x);
        a.push(&y);
        let mut b = IndexRootHasher::new();
        b.push(&y);
        b.push(&x);
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn geometry_tail_block() {
        let g = Geometry::new(65536 * 3 + 100, 65536);
        assert_eq!(g.block_count, 4);
        assert_eq!(g.block_len(3), 100);
        assert_eq!(g.block_len(0), 65536);
        let z = ZeroDigests::new(g.disk_size, g.block_size);
        assert_eq!(z.for_block(3), Digest::of_zeros(100));
        assert_eq!(z.for_block(1), Digest::of_zeros(65536));
    }
}
