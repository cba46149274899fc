//! A committed recovery point as a block device: its digest list, loaded
//! once per export, and reads that go through the store's verified chunk
//! path.
//!
//! Loading walks the point's index with [`Store::for_each_index_page`], so
//! the top index CRC, every page and the root are checked before the
//! export is offered. The digests then stay in memory for the export's
//! life: 32 bytes per block (8 MiB for a 16 GiB disk at 64 KiB blocks,
//! 512 MiB for 1 TiB). A data block is read with the store's `read_chunk`,
//! which checks the record CRC and re-hashes the decoded bytes against the
//! digest; a block that fails is an error for the read that touches it,
//! never bytes.

use std::sync::Arc;

use tideline_protocol::{Digest, Geometry, ZeroDigests};

use crate::store::{PointId, Store, StoreError};

/// A committed point, ready to be read at any offset.
pub struct PointImage {
    store: Arc<Store>,
    /// Agent id.
    pub agent: String,
    /// Disk id.
    pub disk: String,
    /// Point id.
    pub point: PointId,
    /// Size and block size.
    pub geometry: Geometry,
    digests: Vec<Digest>,
    zero: ZeroDigests,
}

/// A piece of a byte range that lies within one kind of storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset in the image.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
    /// The data block holding it (and the segment's offset into that
    /// block), or `None` for zeros (one or more zero blocks).
    pub block: Option<(u64, u32)>,
}

impl PointImage {
    /// Loads and checks the point's index (blocking: reads the index).
    pub fn load(
        store: Arc<Store>,
        agent: &str,
        disk: &str,
        point: PointId,
    ) -> Result<PointImage, StoreError> {
        let geometry = store.point(agent, disk, point)?.geometry();
        let mut digests = Vec::new();
        store.for_each_index_page(agent, disk, point, &mut |_, entries| {
            digests.extend_from_slice(entries);
            Ok(())
        })?;
        Ok(Self::from_digests(
            store, agent, disk, point, geometry, digests,
        ))
    }

    fn from_digests(
        store: Arc<Store>,
        agent: &str,
        disk: &str,
        point: PointId,
        geometry: Geometry,
        digests: Vec<Digest>,
    ) -> PointImage {
        PointImage {
            store,
            agent: agent.to_string(),
            disk: disk.to_string(),
            point,
            zero: ZeroDigests::new(geometry.disk_size, geometry.block_size),
            geometry,
            digests,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.disk_size
    }

    fn is_zero(&self, block: u64) -> bool {
        // Callers pass blocks below block_count, the length of `digests`
        // (for_each_index_page yields exactly block_count entries); a
        // missing entry reads as zeros rather than panicking.
        self.digests
            .get(block as usize)
            .is_none_or(|d| self.zero.is_zero(block, d))
    }

    /// Splits `[offset, offset + len)` (inside the image) into segments:
    /// runs of zero blocks merged, data blocks one segment each.
    pub fn segments(&self, offset: u64, len: u32) -> Vec<Segment> {
        let bs = u64::from(self.geometry.block_size.max(1));
        let end = (offset + u64::from(len)).min(self.size());
        let mut out: Vec<Segment> = Vec::new();
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let block_end = ((block + 1) * bs).min(end);
            let n = (block_end - at) as u32;
            if self.is_zero(block) {
                match out.last_mut() {
                    Some(last) if last.block.is_none() => last.len += n,
                    _ => out.push(Segment {
                        offset: at,
                        len: n,
                        block: None,
                    }),
                }
            } else {
                out.push(Segment {
                    offset: at,
                    len: n,
                    block: Some((block, (at - block * bs) as u32)),
                });
            }
            at = block_end;
        }
        out
    }

    /// `base:allocation` extents of `[offset, offset + len)`, as
    /// `(length, zero)` runs: zero blocks are holes that read as zeros.
    pub fn allocation(&self, offset: u64, len: u32) -> Vec<(u32, bool)> {
        let mut out: Vec<(u32, bool)> = Vec::new();
        for s in self.segments(offset, len) {
            let zero = s.block.is_none();
            match out.last_mut() {
                Some(last) if last.1 == zero => last.0 += s.len,
                _ => out.push((s.len, zero)),
            }
        }
        out
    }

    /// The decoded, verified bytes of data block `block` (blocking).
    pub fn read_block(&self, block: u64) -> Result<Vec<u8>, StoreError> {
        let digest = self
            .digests
            .get(block as usize)
            .ok_or(StoreError::BlockOutOfRange {
                block,
                block_count: self.geometry.block_count,
            })?;
        self.store.read_block_chunk(&self.geometry, block, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An image over an empty store whose block `i` is zero when
    /// `zeros[i]`.
    fn image(zeros: &[bool], disk_size: u64, bs: u32) -> (tempfile::TempDir, PointImage) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let g = Geometry::new(disk_size, bs);
        let zero = ZeroDigests::new(disk_size, bs);
        let digests = zeros
            .iter()
            .enumerate()
            .map(|(i, &z)| {
                if z {
                    zero.for_block(i as u64)
                } else {
                    Digest::of(&[i as u8 + 1])
                }
            })
            .collect();
        (
            dir,
            PointImage::from_digests(store, "a", "d", 1, g, digests),
        )
    }

    #[test]
    fn segments_merge_zero_runs_and_split_data_blocks() {
        // Blocks: Z Z D D Z, 100-byte blocks, last one short (450 bytes).
        let (_d, img) = image(&[true, true, false, false, true], 450, 100);
        let seg = |offset, len, block| Segment { offset, len, block };
        assert_eq!(
            img.segments(50, 400),
            vec![
                seg(50, 150, None),
                seg(200, 100, Some((2, 0))),
                seg(300, 100, Some((3, 0))),
                seg(400, 50, None),
            ]
        );
        assert_eq!(img.segments(250, 10), vec![seg(250, 10, Some((2, 50)))]);
        assert_eq!(
            img.allocation(0, 450),
            vec![(200, true), (200, false), (50, true)]
        );
        assert_eq!(img.allocation(210, 100), vec![(100, false)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Segments tile the range in order, a data segment lies inside
        /// its block, no two zero segments touch, and the allocation runs
        /// add up to the same length.
        #[test]
        fn segments_tile_the_range(
            zeros in proptest::collection::vec(any::<bool>(), 1..40),
            short in 0u64..100,
            start in 0u64..4000,
            len in 1u32..4000,
        ) {
            let size = zeros.len() as u64 * 100 - short.min(99);
            let (_d, img) = image(&zeros, size, 100);
            let offset = start % size;
            let len = len.min((size - offset) as u32);
            let segs = img.segments(offset, len);
            let mut at = offset;
            for (i, s) in segs.iter().enumerate() {
                prop_assert_eq!(s.offset, at);
                prop_assert!(s.len > 0);
                match s.block {
                    Some((b, within)) => {
                        prop_assert!(!zeros[b as usize]);
                        prop_assert_eq!(b * 100 + u64::from(within), s.offset);
                        prop_assert!(u64::from(within) + u64::from(s.len) <= u64::from(img.geometry.block_len(b)));
                    }
                    None => {
                        prop_assert!(i == 0 || segs[i - 1].block.is_some());
                        for b in s.offset / 100..=(s.offset + u64::from(s.len) - 1) / 100 {
                            prop_assert!(zeros[b as usize]);
                        }
                    }
                }
                at += u64::from(s.len);
            }
            prop_assert_eq!(at, offset + u64::from(len));
            let total: u64 = img.allocation(offset, len).iter().map(|r| u64::from(r.0)).sum();
            prop_assert_eq!(total, u64::from(len));
        }
    }
}
