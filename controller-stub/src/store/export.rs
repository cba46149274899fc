//! Reading points back: walking an index, reading one block, exporting a
//! raw image, verifying a point end to end.
//!
//! Every read re-checks what it reads: the top index CRC, each page against
//! its digest, each block's record CRC, decoded bytes against the block
//! digest and decoded length against the point's geometry. Memory stays at
//! one page of digests and one block at a time.
//!
//! A raw export is written as `<dest>.partial` next to `dest`: sized with
//! `set_len` (so zero blocks stay holes on file systems with sparse files),
//! data blocks written at their offsets, fsynced, then renamed to `dest` and
//! the directory fsynced, so `dest` only ever holds a whole image.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;
use tideline_protocol::{Digest, Geometry, IndexRootHasher, ZeroDigests, PAGE_BLOCKS};

use super::error::{io_err, StoreError};
use super::index_file::{self, IndexReader};
use super::point::INDEX;
use super::{fsutil, PointId, Store};

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    /// Size of the image in bytes.
    pub bytes: u64,
    /// Blocks written with data.
    pub data_blocks: u64,
    /// Zero blocks, left as holes.
    pub zero_blocks: u64,
}

/// What `verify_point` checked and found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The point verified.
    pub point: PointId,
    /// Blocks covered by the pages that could be read.
    pub blocks: u64,
    /// Data blocks read back, decoded and re-hashed.
    pub data_blocks: u64,
    /// Zero blocks (nothing stored).
    pub zero_blocks: u64,
    /// Index pages read back and re-hashed.
    pub pages: u64,
    /// Every problem found, in block order.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether the point is whole and correct.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Most problems a report lists one by one (the rest are counted).
const MAX_PROBLEMS: usize = 1000;

impl Store {
    /// Opens the index of a committed point and checks it against its
    /// manifest (geometry, root, CRC).
    fn open_index(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
    ) -> Result<(IndexReader, Geometry), StoreError> {
        let manifest = self.manifest(agent, disk, point)?;
        let path = self.point_dir(agent, disk, point)?.join(INDEX);
        let reader = IndexReader::open(&path)?;
        let h = reader.header();
        let info = &manifest.info;
        if h.geometry != info.geometry()
            || Some(h.root) != info.root_digest()
            || h.crc != manifest.index_crc
        {
            return Err(StoreError::Corrupt {
                path,
                what: "index header does not match the manifest".into(),
            });
        }
        let g = h.geometry;
        Ok((reader, g))
    }

    /// Calls `f(first_block, digests)` page by page in block order, with
    /// bounded memory. Checks the top index CRC before the first call and
    /// each page against its digest; the root is recomputed as it goes and
    /// checked after the last page (an error then means the index was
    /// altered).
    // The callback type is the contract the session layer codes against.
    #[allow(clippy::type_complexity)]
    pub fn for_each_index_page(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
        f: &mut dyn FnMut(u64, &[Digest]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let (mut reader, g) = self.open_index(agent, disk, point)?;
        reader.check_crc()?;
        let mut hasher = IndexRootHasher::new();
        let mut page = 0u64;
        while let Some(pd) = reader.next_page()? {
            let (first, end) = index_file::page_span(page, g.block_count);
            let entries = self.read_page(&pd, end - first)?;
            hasher.push_page(&pd, entries.len());
            f(first, &entries)?;
            page += 1;
        }
        let root = hasher.finish();
        if root != reader.header().root {
            return Err(StoreError::IndexRootMismatch {
                expected: reader.header().root,
                actual: root,
            });
        }
        Ok(())
    }

    /// The decoded bytes of block `block` of a point (zeros for a zero
    /// block), digest and length verified. Reads one page digest from the
    /// top index, one page and one chunk; the page and the chunk are checked
    /// against their digests, the top index CRC is not (that would read the
    /// whole file).
    pub fn read_block(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
        block: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let (mut reader, g) = self.open_index(agent, disk, point)?;
        if block >= g.block_count {
            return Err(StoreError::BlockOutOfRange {
                block,
                block_count: g.block_count,
            });
        }
        let page = block / PAGE_BLOCKS as u64;
        reader.seek_page(page)?;
        let pd = reader.next_page()?.ok_or_else(|| StoreError::Corrupt {
            path: reader.path().to_path_buf(),
            what: format!("page {page} missing"),
        })?;
        let (first, end) = index_file::page_span(page, g.block_count);
        let entries = self.read_page(&pd, end - first)?;
        // first <= block < end, and read_page returned end - first entries.
        let digest = entries[(block - first) as usize];
        let zero = ZeroDigests::new(g.disk_size, g.block_size);
        if zero.is_zero(block, &digest) {
            return Ok(vec![0u8; g.block_len(block) as usize]);
        }
        self.read_block_chunk(&g, block, &digest)
    }

    /// Reads data block `block` (digest `digest`) and checks its length.
    pub(crate) fn read_block_chunk(
        &self,
        g: &Geometry,
        block: u64,
        digest: &Digest,
    ) -> Result<Vec<u8>, StoreError> {
        let bytes = self.read_chunk(digest)?;
        let expected = g.block_len(block);
        if bytes.len() != expected as usize {
            return Err(StoreError::BlockLength {
                block,
                expected,
                actual: bytes.len() as u32,
            });
        }
        Ok(bytes)
    }

    /// Writes the point as a sparse raw image at `dest` (see the module
    /// doc), verifying every chunk as it goes. `progress(done, total)` is
    /// called after every index page.
    pub fn export_raw(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
        dest: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ExportReport, StoreError> {
        let info = self.point(agent, disk, point)?;
        let g = info.geometry();
        let zero = ZeroDigests::new(g.disk_size, g.block_size);
        let partial = fsutil::with_suffix(dest, ".partial");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(io_err(&partial))?;
        let mut report = ExportReport {
            bytes: g.disk_size,
            data_blocks: 0,
            zero_blocks: 0,
        };
        let written = (|| {
            file.set_len(g.disk_size).map_err(io_err(&partial))?;
            self.for_each_index_page(agent, disk, point, &mut |first, entries| {
                for (i, d) in (first..).zip(entries) {
                    if zero.is_zero(i, d) {
                        report.zero_blocks += 1;
                        continue;
                    }
                    let bytes = self.read_block_chunk(&g, i, d)?;
                    file.write_all_at(&bytes, g.offset(i))
                        .map_err(io_err(&partial))?;
                    report.data_blocks += 1;
                }
                let end = first + entries.len() as u64;
                progress(
                    end.saturating_mul(u64::from(g.block_size)).min(g.disk_size),
                    g.disk_size,
                );
                Ok(())
            })?;
            file.sync_all().map_err(io_err(&partial))?;
            fs::rename(&partial, dest).map_err(io_err(dest))?;
            fsutil::fsync_dir(&fsutil::parent_of(dest))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        Ok(report)
    }

    /// Re-reads and re-hashes everything the point references: the top
    /// index (against its manifest and CRC), every page, every data block
    /// (decoded, hashed, length checked), and the root. Problems are
    /// collected rather than returned; `Err` only when the point itself
    /// cannot be found.
    pub fn verify_point(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            point,
            blocks: 0,
            data_blocks: 0,
            zero_blocks: 0,
            pages: 0,
            problems: Vec::new(),
        };
        let mut problems_total = 0usize;
        let mut problem = |report: &mut VerifyReport, p: String| {
            problems_total += 1;
            if report.problems.len() < MAX_PROBLEMS {
                report.problems.push(p);
            }
        };
        let (mut reader, g) = match self.open_index(agent, disk, point) {
            Ok(r) => r,
            Err(e @ StoreError::NotFound { .. }) | Err(e @ StoreError::InvalidId(_)) => {
                return Err(e)
            }
            Err(e) => {
                problem(&mut report, format!("index: {e}"));
                return Ok(report);
            }
        };
        if let Err(e) = reader.check_crc() {
            problem(&mut report, format!("index: {e}"));
        }
        let zero = ZeroDigests::new(g.disk_size, g.block_size);
        let mut hasher = IndexRootHasher::new();
        let mut page = 0u64;
        loop {
            let pd = match reader.next_page() {
                Ok(Some(pd)) => pd,
                Ok(None) => break,
                Err(e) => {
                    problem(&mut report, format!("index: {e}"));
                    break;
                }
            };
            let (first, end) = index_file::page_span(page, g.block_count);
            page += 1;
            hasher.push_page(&pd, (end - first) as usize);
            let entries = match self.read_page(&pd, end - first) {
                Ok(e) => e,
                Err(e) => {
                    problem(
                        &mut report,
                        format!("page {} (blocks {first}..{end}): {e}", page - 1),
                    );
                    continue;
                }
            };
            report.pages += 1;
            for (i, d) in (first..).zip(&entries) {
                report.blocks += 1;
                if zero.is_zero(i, d) {
                    report.zero_blocks += 1;
                    continue;
                }
                match self.read_block_chunk(&g, i, d) {
                    Ok(_) => report.data_blocks += 1,
                    Err(e) => problem(&mut report, format!("block {i}: {e}")),
                }
            }
        }
        if page == reader.header().page_count && hasher.finish() != reader.header().root {
            problem(&mut report, "index root does not match its pages".into());
        }
        if problems_total > report.problems.len() {
            let more = problems_total - report.problems.len();
            report
                .problems
                .push(format!("... and {more} more problems"));
        }
        Ok(report)
    }
}
