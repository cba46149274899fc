//! Chunk bitmap arithmetic, without I/O: the chunk size a registration
//! needs, where a partition's chunks are in its disk's bitmap, and how set
//! bits become the byte extents the sync engine copies.

/// Bytes in a sector, the unit of the block layer's positions.
pub const SECTOR: u64 = 512;

/// The shift (chunk = `512 << shift` bytes) a registration of a device
/// starting at `start_sector` of its disk, with blocks of `block_size`
/// bytes, needs: the largest power of two not above the block size that
/// divides the start offset, so that every chunk lies in one block of the
/// device. `block_size` must be at least 512.
pub fn needed_shift(start_sector: u64, block_size: u32) -> u32 {
    let block_shift = (u64::from(block_size) / SECTOR).max(1).ilog2();
    let start_shift = if start_sector == 0 {
        u32::MAX
    } else {
        start_sector.trailing_zeros()
    };
    block_shift.min(start_shift)
}

/// A registered range of a disk and how its bitmap bits map to bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First sector of the device in its disk.
    pub start_sector: u64,
    /// Sectors in the device.
    pub sectors: u64,
    /// The disk map's shift (chunk = `512 << shift` bytes).
    pub shift: u32,
    /// The registration's block size in bytes.
    pub block_size: u32,
}

impl Span {
    /// Bytes in the device.
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// Bytes in a chunk.
    pub fn chunk_bytes(&self) -> u64 {
        SECTOR << self.shift
    }

    /// The disk chunks `[first, end)` that hold the device's bytes.
    pub fn chunk_range(&self) -> (u64, u64) {
        let first = self.start_sector >> self.shift;
        let end = (self.start_sector + self.sectors).div_ceil(1 << self.shift);
        (first, end)
    }

    /// Whether two ranges share a sector.
    pub fn overlaps(&self, start_sector: u64, sectors: u64) -> bool {
        self.start_sector < start_sector + sectors
            && start_sector < self.start_sector + self.sectors
    }
}

/// The bitmap words covering chunks `[first, end)`, each with the mask of
/// the chunks of that range it holds, in ascending order.
pub fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let words = if end > first {
        (first / 64)..end.div_ceil(64)
    } else {
        0..0
    };
    words.map(move |w| {
        let lo = (w * 64).max(first) - w * 64;
        let hi = ((w + 1) * 64).min(end) - w * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w as usize, mask)
    })
}

/// Sorted, merged byte extents `[start, end)` within the protected device
/// (partition-relative), block aligned, clipped to the device size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyExtents {
    /// The extents, ascending, disjoint and not adjacent.
    pub extents: Vec<(u64, u64)>,
    /// Bytes the extents cover.
    pub bytes: u64,
}

impl DirtyExtents {
    /// Whether no byte is dirty.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The dirty blocks of `block_size` bytes (the registration's), by
    /// index.
    pub fn blocks(&self, block_size: u32) -> impl Iterator<Item = u64> + '_ {
        let bs = u64::from(block_size.max(1));
        self.extents
            .iter()
            .flat_map(move |&(s, e)| (s / bs)..e.div_ceil(bs))
    }
}

/// Builds [`DirtyExtents`] from bitmap words fed in ascending order.
pub struct ExtentBuilder {
    span: Span,
    run: Option<(u64, u64)>,
    out: DirtyExtents,
}

impl ExtentBuilder {
    /// A builder for the device `span`.
    pub fn new(span: Span) -> ExtentBuilder {
        ExtentBuilder {
            span,
            run: None,
            out: DirtyExtents::default(),
        }
    }

    /// Adds the set bits of bitmap word `word` (chunks `64 * word ..`),
    /// already masked to the device's chunks. Words must come in ascending
    /// order.
    pub fn push_word(&mut self, word: usize, mut bits: u64) {
        let base = word as u64 * 64;
        while bits != 0 {
            let lo = u64::from(bits.trailing_zeros());
            let ones = u64::from((bits >> lo).trailing_ones());
            let (a, b) = (base + lo, base + lo + ones);
            match self.run {
                Some((s, e)) if e == a => self.run = Some((s, b)),
                Some(run) => {
                    self.emit(run);
                    self.run = Some((a, b));
                }
                None => self.run = Some((a, b)),
            }
            bits = if lo + ones >= 64 {
                0
            } else {
                bits & !(((1u64 << ones) - 1) << lo)
            };
        }
    }

    /// Turns the chunk run `[a, b)` into a block-aligned, clipped extent.
    fn emit(&mut self, (a, b): (u64, u64)) {
        let chunk = self.span.chunk_bytes();
        let base = self.span.start_sector * SECTOR;
        let size = self.span.size();
        let bs = u64::from(self.span.block_size);
        let lo = (a * chunk).max(base) - base;
        let hi = (b * chunk).min(base + size).saturating_sub(base);
        if lo >= hi {
            return;
        }
        let lo = lo / bs * bs;
        let hi = (hi.div_ceil(bs) * bs).min(size);
        match self.out.extents.last_mut() {
            Some(last) if last.1 >= lo => {
                let grown = hi.max(last.1);
                self.out.bytes += grown - last.1;
                last.1 = grown;
            }
            _ => {
                self.out.extents.push((lo, hi));
                self.out.bytes += hi - lo;
            }
        }
    }

    /// The extents.
    pub fn finish(mut self) -> DirtyExtents {
        if let Some(run) = self.run.take() {
            self.emit(run);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shift_follows_block_size_and_partition_alignment() {
        // Whole disk: the block size.
        assert_eq!(needed_shift(0, 65536), 7);
        assert_eq!(needed_shift(0, 4096), 3);
        assert_eq!(needed_shift(0, 512), 0);
        // 1 MiB-aligned partition: the block size.
        assert_eq!(needed_shift(2048, 65536), 7);
        // A partition at 4 KiB + 1 MiB: 4 KiB chunks.
        assert_eq!(needed_shift(2048 + 8, 65536), 3);
        // An odd sector: 512-byte chunks.
        assert_eq!(needed_shift(63, 65536), 0);
        // Not a power of two: the power of two below.
        assert_eq!(needed_shift(0, 3 * 4096), 4);
    }

    #[test]
    fn chunk_range_covers_a_partition_that_ends_mid_chunk() {
        let s = Span {
            start_sector: 2048,
            sectors: 1000,
            shift: 3,
            block_size: 4096,
        };
        assert_eq!(s.chunk_range(), (256, 256 + 125));
        let s = Span { sectors: 1001, ..s };
        assert_eq!(s.chunk_range(), (256, 256 + 126));
        assert!(s.overlaps(3000, 100));
        assert!(!s.overlaps(2048 + 1001, 100));
        assert!(!s.overlaps(0, 2048));
    }

    #[test]
    fn word_masks_cover_exactly_the_range() {
        let m: Vec<_> = word_masks(3, 5).collect();
        assert_eq!(m, vec![(0, 0b11000)]);
        let m: Vec<_> = word_masks(60, 130).collect();
        assert_eq!(m, vec![(0, 0xf << 60), (1, u64::MAX), (2, 0b11)]);
        let m: Vec<_> = word_masks(64, 128).collect();
        assert_eq!(m, vec![(1, u64::MAX)]);
        assert_eq!(word_masks(7, 7).count(), 0);
    }

    #[test]
    fn partition_bits_become_partition_relative_block_extents() {
        // Partition at 1 MiB + 4 KiB, 10 MiB long, 64 KiB blocks, 4 KiB
        // chunks: chunk 258 is the partition's first 4 KiB.
        let span = Span {
            start_sector: 2048 + 8,
            sectors: 10 * 2048,
            shift: 3,
            block_size: 65536,
        };
        let mut b = ExtentBuilder::new(span);
        // Chunks 258 (block 0) and 258 + 17 (block 1).
        b.push_word(4, 1 << 2);
        b.push_word(4, 1 << 19);
        let e = b.finish();
        assert_eq!(e.extents, vec![(0, 131072)]);
        assert_eq!(e.bytes, 131072);
        assert_eq!(e.blocks(65536).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn the_last_block_is_clipped_to_the_device() {
        let span = Span {
            start_sector: 0,
            sectors: 9, // 4608 bytes: one 4 KiB block and a 512-byte one
            shift: 0,
            block_size: 4096,
        };
        let mut b = ExtentBuilder::new(span);
        b.push_word(0, 1 << 8);
        assert_eq!(b.finish().extents, vec![(4096, 4608)]);
    }

    /// Reference: the blocks touched by each set bit, one by one.
    fn naive(words: &[u64], span: Span) -> Vec<(u64, u64)> {
        let (first, end) = span.chunk_range();
        let mut blocks = std::collections::BTreeSet::new();
        let bs = u64::from(span.block_size);
        let base = span.start_sector * SECTOR;
        for c in first..end {
            let w = (c / 64) as usize;
            if w < words.len() && words[w] >> (c % 64) & 1 == 1 {
                let lo = (c * span.chunk_bytes()).max(base) - base;
                let hi = ((c + 1) * span.chunk_bytes()).min(base + span.size()) - base;
                for blk in lo / bs..hi.div_ceil(bs) {
                    blocks.insert(blk);
                }
            }
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for blk in blocks {
            let (lo, hi) = (blk * bs, ((blk + 1) * bs).min(span.size()));
            match out.last_mut() {
                Some(l) if l.1 == lo => l.1 = hi,
                _ => out.push((lo, hi)),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn extents_match_the_bits_one_by_one(
            words in proptest::collection::vec(
                prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()], 1..12),
            block_shift in 0u32..6,
            start_mult in 0u64..40,
            sectors_extra in 0u64..300,
        ) {
            let block_size = 512u32 << block_shift;
            let start_sector = start_mult * 3;
            let shift = needed_shift(start_sector, block_size);
            let covered = (words.len() as u64 * 64) << shift;
            let sectors = covered.saturating_sub(start_sector).min(200 + sectors_extra).max(1);
            let span = Span { start_sector, sectors, shift, block_size };
            let (first, end) = span.chunk_range();
            let mut b = ExtentBuilder::new(span);
            for (w, mask) in word_masks(first, end) {
                let bits = words.get(w).copied().unwrap_or(0) & mask;
                b.push_word(w, bits);
            }
            let got = b.finish();
            let want = naive(&words, span);
            prop_assert_eq!(&got.extents, &want);
            prop_assert_eq!(got.bytes, want.iter().map(|(s, e)| e - s).sum::<u64>());
            for w in got.extents.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "not merged: {:?}", w);
            }
            for &(s, e) in &got.extents {
                prop_assert!(s % u64::from(block_size) == 0 && (e % u64::from(block_size) == 0 || e == span.size()));
                prop_assert!(e <= span.size());
            }
        }
    }
}
