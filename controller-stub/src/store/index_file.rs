//! The top level of a point's index: `points/<agent>/<disk>/<point>/index`.
//!
//! A point's index is the list of its block digests. It is stored in two
//! levels so that a new point costs what changed, not the disk size:
//!
//! * the block digests are cut into pages of `PAGE_BLOCKS` (128) digests;
//!   each page (its digests concatenated: 4 KiB, the last one shorter) is a
//!   chunk in the packs (encoding raw), deduplicated like any block and
//!   named by its digest (`page_digest`);
//! * this file lists the page digests: 32 bytes per 128 blocks.
//!
//! An entry equal to `ZeroDigests::for_block(i)` of the point's geometry
//! means block `i` is all zeros; such blocks are never stored.
//!
//! # Layout (integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"TDLIDX01"` |
//! | 8 | 4 | version, 1 |
//! | 12 | 8 | disk size in bytes |
//! | 20 | 4 | block size in bytes |
//! | 24 | 8 | block count (disk size / block size, rounded up) |
//! | 32 | 8 | page count (block count / 128, rounded up) |
//! | 40 | 32 | index root (`IndexRootHasher` over the block digests) |
//! | 72 | 4 | CRC32 of bytes 0..72 and of the page digests |
//! | 76 | 32 × pages | page digests, in block order |
//!
//! The file is written in the point's temporary directory (`<point>.tmp/`)
//! with a placeholder header, the page digests streamed after it, then the
//! real header, then fsync; it becomes visible only when that directory is
//! renamed to its final name after the manifest (see `point.rs`).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tideline_protocol::limits::{valid_block_size, MAX_DISK_SIZE};
use tideline_protocol::{Digest, Geometry, PAGE_BLOCKS};

use super::error::{io_err, StoreError};

const MAGIC: &[u8; 8] = b"TDLIDX01";
const VERSION: u32 = 1;
/// Length of the header, CRC included.
pub(crate) const HEADER_LEN: usize = 76;
/// Bytes of the header the CRC covers (everything before the CRC).
const CRC_COVERED: usize = 72;

/// Number of pages of an index of `block_count` blocks.
pub(crate) fn page_count(block_count: u64) -> u64 {
    block_count.div_ceil(PAGE_BLOCKS as u64)
}

/// The block range `[first, end)` of page `page` of an index of
/// `block_count` blocks.
pub(crate) fn page_span(page: u64, block_count: u64) -> (u64, u64) {
    let first = page * PAGE_BLOCKS as u64;
    (first, (first + PAGE_BLOCKS as u64).min(block_count))
}

/// Whether the store accepts this geometry.
pub(crate) fn valid_geometry(disk_size: u64, block_size: u32) -> bool {
    valid_block_size(block_size) && disk_size <= MAX_DISK_SIZE
}

/// The fixed fields of an index file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexHeader {
    /// Geometry of the point.
    pub geometry: Geometry,
    /// Number of page digests that follow the header.
    pub page_count: u64,
    /// Root over every block digest.
    pub root: Digest,
    /// CRC of the header and the page digests.
    pub crc: u32,
}

fn encode_fields(g: &Geometry, root: &Digest) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&g.disk_size.to_le_bytes());
    h[20..24].copy_from_slice(&g.block_size.to_le_bytes());
    h[24..32].copy_from_slice(&g.block_count.to_le_bytes());
    h[32..40].copy_from_slice(&page_count(g.block_count).to_le_bytes());
    h[40..72].copy_from_slice(&root.0);
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Writes an index file page digest by page digest.
pub(crate) struct IndexWriter {
    path: PathBuf,
    out: BufWriter<File>,
    geometry: Geometry,
    crc_pages: crc32fast::Hasher,
    pages: u64,
}

impl IndexWriter {
    /// Creates (or truncates) `path` for an index of geometry `geometry`.
    pub fn create(path: &Path, geometry: Geometry) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        // Placeholder, rewritten by `finish` once root and CRC are known.
        out.write_all(&[0u8; HEADER_LEN]).map_err(io_err(path))?;
        Ok(IndexWriter {
            path: path.to_path_buf(),
            out,
            geometry,
            crc_pages: crc32fast::Hasher::new(),
            pages: 0,
        })
    }

    /// Appends the digest of the next page.
    pub fn push(&mut self, page: &Digest) -> Result<(), StoreError> {
        self.out.write_all(&page.0).map_err(io_err(&self.path))?;
        self.crc_pages.update(&page.0);
        self.pages += 1;
        Ok(())
    }

    /// Writes the header with `root`, fsyncs, and returns the header.
    pub fn finish(self, root: &Digest) -> Result<IndexHeader, StoreError> {
        let path = self.path;
        let expected_pages = page_count(self.geometry.block_count);
        if self.pages != expected_pages {
            return Err(StoreError::Corrupt {
                path,
                what: format!(
                    "index being written has {} pages, its geometry needs {expected_pages}",
                    self.pages
                ),
            });
        }
        let mut h = encode_fields(&self.geometry, root);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..CRC_COVERED]);
        crc.combine(&self.crc_pages);
        let crc = crc.finalize();
        h[CRC_COVERED..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        file.write_all_at(&h, 0).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        Ok(IndexHeader {
            geometry: self.geometry,
            page_count: expected_pages,
            root: *root,
            crc,
        })
    }
}

/// Reads an index file: its header, then its page digests in order.
pub(crate) struct IndexReader {
    path: PathBuf,
    header: IndexHeader,
    input: BufReader<File>,
    next_page: u64,
}

impl IndexReader {
    /// Opens `path` and checks its header: magic, version, a geometry the
    /// store accepts, counts that follow from it and a file length that
    /// matches. The CRC is not checked here (see [`Self::check_crc`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotFound {
                    what: format!("index file {}", path.display()),
                }
            } else {
                io_err(path)(e)
            }
        })?;
        let corrupt = |what: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut h = [0u8; HEADER_LEN];
        file.read_exact(&mut h).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt("shorter than its header".into())
            } else {
                io_err(path)(e)
            }
        })?;
        if &h[0..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        if u32_at(&h, 8) != VERSION {
            return Err(corrupt(format!("unknown version {}", u32_at(&h, 8))));
        }
        let disk_size = u64_at(&h, 12);
        let block_size = u32_at(&h, 20);
        if !valid_geometry(disk_size, block_size) {
            return Err(corrupt(format!(
                "invalid geometry {disk_size} bytes / {block_size}-byte blocks"
            )));
        }
        let geometry = Geometry::new(disk_size, block_size);
        if u64_at(&h, 24) != geometry.block_count {
            return Err(corrupt("block count does not match the disk size".into()));
        }
        let pages = u64_at(&h, 32);
        if pages != page_count(geometry.block_count) {
            return Err(corrupt("page count does not match the block count".into()));
        }
        if len != HEADER_LEN as u64 + pages * Digest::LEN as u64 {
            return Err(corrupt(format!(
                "file is {len} bytes, its header announces {pages} pages"
            )));
        }
        let mut root = [0u8; 32];
        root.copy_from_slice(&h[40..72]);
        let header = IndexHeader {
            geometry,
            page_count: pages,
            root: Digest(root),
            crc: u32_at(&h, CRC_COVERED),
        };
        Ok(IndexReader {
            path: path.to_path_buf(),
            header,
            input: BufReader::with_capacity(1 << 16, file),
            next_page: 0,
        })
    }

    /// The header.
    pub fn header(&self) -> &IndexHeader {
        &self.header
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the whole file once (bounded memory) and checks its CRC, then
    /// rewinds to the first page digest.
    pub fn check_crc(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let mut file: &File = self.input.get_ref();
        file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        let mut crc = crc32fast::Hasher::new();
        let mut first = [0u8; HEADER_LEN];
        file.read_exact(&mut first).map_err(io_err(&path))?;
        crc.update(&first[..CRC_COVERED]);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf).map_err(io_err(&path))?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
        }
        // Reposition the buffered reader where it was.
        self.seek_page(self.next_page)?;
        if crc.finalize() != self.header.crc {
            return Err(StoreError::Corrupt {
                path,
                what: "index CRC mismatch".into(),
            });
        }
        Ok(())
    }

    /// Positions the reader so that the next page digest read is `page`.
    pub fn seek_page(&mut self, page: u64) -> Result<(), StoreError> {
        let at = HEADER_LEN as u64 + page.min(self.header.page_count) * Digest::LEN as u64;
        self.input
            .seek(SeekFrom::Start(at))
            .map_err(io_err(&self.path))?;
        self.next_page = page;
        Ok(())
    }

    /// The next page digest, or `None` after the last one.
    pub fn next_page(&mut self) -> Result<Option<Digest>, StoreError> {
        if self.next_page >= self.header.page_count {
            return Ok(None);
        }
        let mut d = [0u8; 32];
        self.input.read_exact(&mut d).map_err(io_err(&self.path))?;
        self.next_page += 1;
        Ok(Some(Digest(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, g: Geometry, pages: &[Digest], root: &Digest) -> IndexHeader {
        let mut w = IndexWriter::create(path, g).unwrap();
        for p in pages {
            w.push(p).unwrap();
        }
        w.finish(root).unwrap()
    }

    #[test]
    fn round_trip_and_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let g = Geometry::new(4096 * 300 + 10, 4096);
        let pages: Vec<Digest> = (0..3u8).map(|i| Digest::of(&[i])).collect();
        let root = Digest::of(b"root");
        let written = write(&path, g, &pages, &root);
        let mut r = IndexReader::open(&path).unwrap();
        assert_eq!(*r.header(), written);
        r.check_crc().unwrap();
        let mut got = Vec::new();
        while let Some(p) = r.next_page().unwrap() {
            got.push(p);
        }
        assert_eq!(got, pages);
        r.seek_page(2).unwrap();
        assert_eq!(r.next_page().unwrap(), Some(pages[2]));
    }

    #[test]
    fn flipped_byte_fails_crc_and_wrong_page_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let g = Geometry::new(4096 * 200, 4096);
        let pages = [Digest::of(b"a"), Digest::of(b"b")];
        write(&path, g, &pages, &Digest::of(b"r"));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], HEADER_LEN as u64 + 5).unwrap();
        let mut r = IndexReader::open(&path).unwrap();
        assert!(matches!(r.check_crc(), Err(StoreError::Corrupt { .. })));

        let short = dir.path().join("short");
        assert!(IndexWriter::create(&short, g)
            .unwrap()
            .finish(&Digest::default())
            .is_err());
        f.set_len(HEADER_LEN as u64 + 32).unwrap();
        assert!(matches!(
            IndexReader::open(&path),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
