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
        let bytes = self.store.read_chunk(digest)?;
        let expected = self.geometry.block_len(block);
        if bytes.len() != expected as usize {
            return Err(StoreError::BlockLength {
                block,
                expected,
                actual: bytes.len() as u32,
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(blocks: &[bool], disk_size: u64, bs: u32) -> (tempdir::Dir, PointImage) {
        let dir = tempdir::Dir::new();
        let store = Arc::new(Store::open(&dir.0).unwrap());
        let g = Geometry::new(disk_size, bs);
        let zero = ZeroDigests::new(disk_size, bs);
        let digests = blocks
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

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "tideline-serve-image-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn segments_merge_zero_runs_and_split_data_blocks() {
        // Blocks: Z Z D D Z, 100-byte blocks, last one short (450 bytes).
        let (_d, img) = image(&[true, true, false, false, true], 450, 100);
        assert_eq!(
            img.segments(50, 400),
            vec![
                Segment {
                    offset: 50,
                    len: 150,
                    block: None
                },
                Segment {
                    offset: 200,
                    len: 100,
                    block: Some((2, 0))
                },
                Segment {
                    offset: 300,
                    len: 100,
                    block: Some((3, 0))
                },
                Segment {
                    offset: 400,
                    len: 50,
                    block: None
                },
            ]
        );
        assert_eq!(
            img.segments(250, 10),
            vec![Segment {
                offset: 250,
                len: 10,
                block: Some((2, 50))
            }]
        );
        assert_eq!(
            img.allocation(0, 450),
            vec![(200, true), (200, false), (50, true)]
        );
        assert_eq!(img.allocation(210, 100), vec![(100, false)]);
    }
}
