//! Hosted sparse extents: `monolithicSparse`, `twoGbMaxExtentSparse` and
//! `streamOptimized` (compressed grains).
//!
//! # On-disk format (little-endian)
//!
//! Sector 0 is the `SparseExtentHeader` (512 bytes). Fields used:
//!
//! | offset | type | field | use |
//! | --- | --- | --- | --- |
//! | 0 | u32 | magicNumber | `0x564d444b`, the bytes `KDMV` |
//! | 4 | u32 | version | 1, 2 or 3 |
//! | 8 | u32 | flags | bit 2: a grain table entry of 1 is a zeroed grain; bit 16: compressed grains; bit 17: markers |
//! | 12 | u64 | capacity | extent size in sectors (≤ [`MAX_CAPACITY`]) |
//! | 20 | u64 | grainSize | sectors per grain: a power of two ≤ [`MAX_GRAIN_SECTORS`] |
//! | 28 | u64 | descriptorOffset | sector of the embedded descriptor (0: none) |
//! | 36 | u64 | descriptorSize | its length in sectors |
//! | 44 | u32 | numGTEsPerGT | must be 512 |
//! | 56 | u64 | gdOffset | sector of the grain directory; `0xFFFFFFFFFFFFFFFF` (GD_AT_END): read the footer |
//! | 77 | u16 | compressAlgorithm | 0 none, 1 deflate (required when bit 16 is set) |
//!
//! The redundant grain directory (`rgdOffset`) and `overHead` are not used.
//!
//! The grain directory holds `ceil(ceil(capacity / grainSize) / 512)` u32
//! entries: the sector of each grain table, 0 when the table is absent (all
//! its grains unallocated). A grain table holds 512 u32 entries: the sector
//! of each grain; 0 is unallocated (reads as zeros: delta disks, which
//! would read their parent instead, are refused), 1 with flag bit 2 is a
//! zeroed grain. Every table and the directory must lie inside the file and
//! overlap neither each other, the header nor the embedded descriptor;
//! every uncompressed grain must lie inside the file and overlap none of
//! that metadata. All tables are read at open and kept in memory: their
//! total size is bounded by the file's size (not by a fixed cap, so that
//! any capacity up to [`MAX_CAPACITY`] opens), and an all-zero table is
//! kept as absent.
//!
//! Compressed grains (`streamOptimized`) start at their table entry's sector
//! with a grain marker: `lba: u64` (the grain's first disk sector, checked),
//! `size: u32` (bytes of compressed data, at most [`max_compressed`]), then
//! a zlib (RFC 1950) stream that must inflate to exactly one grain, or, for
//! the grain that holds the end of the extent, to exactly the bytes up to
//! the end (qemu writes the last partial grain so).
//!
//! When `gdOffset` is GD_AT_END (VMware stream exports), the last 1536 bytes
//! of the file are the footer: a marker sector (`val`, `size` = 0,
//! `type` u32 at byte 12 = 3, FOOTER), a copy of the header carrying the
//! real `gdOffset`, and an end-of-stream marker sector. The footer header is
//! used in place of the first. Other markers (grain table, grain directory,
//! end of stream) are not walked: the tables say where everything is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flate2::{Decompress, FlushDecompress, Status};

use super::{Backing, VmdkError};

/// `KDMV` as a little-endian u32.
pub(super) const MAGIC: u32 = 0x564d_444b;
/// `gdOffset` meaning "the grain directory is found through the footer".
const GD_AT_END: u64 = u64::MAX;
/// Grain table entries per table (fixed by the format).
const GTES_PER_GT: u64 = 512;
/// Largest grain accepted, in sectors (1 MiB; VMware and qemu use 64 KiB).
pub(super) const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest disk or extent accepted, in bytes (VMDK's limit is 62 TiB).
pub(super) const MAX_CAPACITY: u64 = 64 << 40;
/// Largest embedded descriptor read, in bytes.
const MAX_EMBEDDED_DESCRIPTOR: u64 = 1 << 20;

const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const COMPRESS_DEFLATE: u16 = 1;
const MARKER_FOOTER: u32 = 3;
/// Grain marker: lba u64, size u32.
const GRAIN_MARKER_LEN: u64 = 12;
/// Decompressed grains kept per extent (reader threads reading parts of the
/// same few grains).
const CACHE_GRAINS: usize = 4;

/// Largest compressed size accepted for a grain of `grain` bytes: zlib's
/// worst case (stored blocks) is a few bytes per 16 KiB, so a quarter more
/// plus 4 KiB is generous and still bounds the allocation.
pub(super) fn max_compressed(grain: u64) -> u64 {
    grain + grain / 4 + 4096
}

/// The header fields this reader uses.
#[derive(Debug, Clone, Copy)]
struct Header {
    flags: u32,
    capacity: u64,
    grain_sectors: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    gd_offset: u64,
    compressed: bool,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Parses and bounds one 512-byte header sector.
fn parse_header(b: &[u8; 512]) -> Result<Header, String> {
    if u32_at(b, 0) != MAGIC {
        return Err("no KDMV magic in the sparse header".into());
    }
    let version = u32_at(b, 4);
    if !(1..=3).contains(&version) {
        return Err(format!("unsupported sparse header version {version}"));
    }
    let flags = u32_at(b, 8);
    let capacity = u64_at(b, 12);
    let grain_sectors = u64_at(b, 20);
    let gtes = u32_at(b, 44);
    let algorithm = u16::from_le_bytes([b[77], b[78]]);
    if capacity == 0 || capacity > MAX_CAPACITY / 512 {
        return Err(format!(
            "capacity of {capacity} sectors is outside 1..={}",
            MAX_CAPACITY / 512
        ));
    }
    if !grain_sectors.is_power_of_two() || grain_sectors > MAX_GRAIN_SECTORS {
        return Err(format!(
            "grain size of {grain_sectors} sectors is not a power of two up to {MAX_GRAIN_SECTORS}"
        ));
    }
    if u64::from(gtes) != GTES_PER_GT {
        return Err(format!("numGTEsPerGT is {gtes}, not {GTES_PER_GT}"));
    }
    let compressed = match (flags & FLAG_COMPRESSED != 0, algorithm) {
        (_, COMPRESS_DEFLATE) => true,
        (false, 0) => false,
        (true, 0) => return Err("compressed-grains flag without a compression algorithm".into()),
        (_, other) => return Err(format!("unknown compression algorithm {other}")),
    };
    Ok(Header {
        flags,
        capacity,
        grain_sectors,
        descriptor_offset: u64_at(b, 28),
        descriptor_size: u64_at(b, 36),
        gd_offset: u64_at(b, 56),
        compressed,
    })
}

/// A byte range of the file holding metadata.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    what: &'static str,
}

/// An opened sparse extent: grain tables in memory, grains read on demand.
pub(super) struct SparseExtent {
    file: Backing,
    path: PathBuf,
    file_len: u64,
    /// Extent size in bytes (header capacity).
    capacity: u64,
    /// Grain size in bytes.
    grain: u64,
    compressed: bool,
    zero_grain_entries: bool,
    /// One entry per grain directory entry: the table's 512 grain sectors,
    /// or `None` where the directory has no table.
    tables: Vec<Option<Box<[u32]>>>,
    /// Last few inflated grains: (grain index, bytes).
    cache: Mutex<Vec<(u64, Arc<[u8]>)>>,
}

/// Where a grain's bytes are.
enum Grain {
    /// Unallocated or zeroed: reads as zeros.
    Zero,
    /// Stored at this byte offset of the file.
    At(u64),
}

impl SparseExtent {
    /// Opens the sparse extent in `file` (whose first bytes are `KDMV`).
    /// Returns the extent and its embedded descriptor, if it has one.
    pub(super) fn open(
        file: Backing,
        path: &Path,
    ) -> Result<(SparseExtent, Option<Vec<u8>>), VmdkError> {
        let corrupt = |defect: String| VmdkError::Corrupt {
            path: path.to_owned(),
            defect,
        };
        let file_len = file.len(path)?;
        let mut sector = [0u8; 512];
        if file_len < 512 {
            return Err(corrupt(format!(
                "file is {file_len} bytes, shorter than the 512-byte sparse header"
            )));
        }
        file.read_exact_at(path, &mut sector, 0)?;
        let first = parse_header(&sector).map_err(corrupt)?;
        let mut regions = vec![Region {
            start: 0,
            end: 512,
            what: "header",
        }];
        let header = if first.gd_offset == GD_AT_END {
            if file_len < 2048 {
                return Err(corrupt(format!(
                    "grain directory is at the end but the file ({file_len} bytes) has no room for a footer"
                )));
            }
            let footer_at = file_len - 1536;
            file.read_exact_at(path, &mut sector, footer_at)?;
            if u32_at(&sector, 8) != 0 || u32_at(&sector, 12) != MARKER_FOOTER {
                return Err(corrupt(format!(
                    "grain directory is at the end but there is no footer marker at byte {footer_at}"
                )));
            }
            file.read_exact_at(path, &mut sector, footer_at + 512)?;
            let footer = parse_header(&sector).map_err(|d| corrupt(format!("footer: {d}")))?;
            if footer.gd_offset == GD_AT_END {
                return Err(corrupt(
                    "footer also says the grain directory is at the end".into(),
                ));
            }
            regions.push(Region {
                start: footer_at,
                end: file_len,
                what: "footer",
            });
            footer
        } else {
            first
        };

        let capacity = header.capacity * 512;
        let grain = header.grain_sectors * 512;
        let grains = capacity.div_ceil(grain);
        let gd_entries = grains.div_ceil(GTES_PER_GT);
        // No fixed cap on the tables: the directory and every table must
        // lie inside the file without overlapping (checked below, before
        // anything is allocated for them), which bounds them by the file's
        // real size whatever capacity the header declares.
        let region_in_file = |start_sector: u64, len: u64, what: &'static str| {
            let start = start_sector
                .checked_mul(512)
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= file_len))
                .ok_or_else(|| {
                    corrupt(format!(
                        "{what} at sector {start_sector} ({len} bytes) lies outside the file ({file_len} bytes)"
                    ))
                })?;
            Ok::<Region, VmdkError>(Region {
                start,
                end: start + len,
                what,
            })
        };

        let mut descriptor = None;
        if header.descriptor_offset != 0 && header.descriptor_size != 0 {
            let len = header
                .descriptor_size
                .checked_mul(512)
                .filter(|&l| l <= MAX_EMBEDDED_DESCRIPTOR)
                .ok_or_else(|| {
                    corrupt(format!(
                        "embedded descriptor of {} sectors is larger than {MAX_EMBEDDED_DESCRIPTOR} bytes",
                        header.descriptor_size
                    ))
                })?;
            let r = region_in_file(header.descriptor_offset, len, "embedded descriptor")?;
            // `len` is at most 1 MiB and inside the file.
            let mut text = vec![0u8; len as usize];
            file.read_exact_at(path, &mut text, r.start)?;
            regions.push(r);
            descriptor = Some(text);
        }

        let gd = region_in_file(header.gd_offset, gd_entries * 4, "grain directory")?;
        // Inside the file, so at most its size.
        let mut gd_bytes = vec![0u8; (gd_entries * 4) as usize];
        file.read_exact_at(path, &mut gd_bytes, gd.start)?;
        regions.push(gd);
        let mut table_sectors = Vec::with_capacity(gd_entries as usize);
        for e in gd_bytes.chunks_exact(4) {
            let gt = u32_at(e, 0);
            if gt != 0 {
                regions.push(region_in_file(
                    u64::from(gt),
                    GTES_PER_GT * 4,
                    "grain table",
                )?);
            }
            table_sectors.push(gt);
        }
        regions.sort_by_key(|r| (r.start, r.end));
        for w in regions.windows(2) {
            if w[1].start < w[0].end {
                return Err(corrupt(format!(
                    "{} at byte {} overlaps {} at byte {}",
                    w[1].what, w[1].start, w[0].what, w[0].start
                )));
            }
        }

        // Tables do not overlap and lie inside the file, so together they
        // take at most the file's size in memory.
        let mut tables = Vec::with_capacity(table_sectors.len());
        let mut buf = vec![0u8; (GTES_PER_GT * 4) as usize];
        for gt in table_sectors {
            if gt == 0 {
                tables.push(None);
                continue;
            }
            file.read_exact_at(path, &mut buf, u64::from(gt) * 512)?;
            if buf.iter().all(|&b| b == 0) {
                // qemu writes every table, empty or not: an empty one is
                // kept as absent, so memory follows the allocated grains.
                tables.push(None);
                continue;
            }
            let table: Box<[u32]> = buf.chunks_exact(4).map(|e| u32_at(e, 0)).collect();
            tables.push(Some(table));
        }

        let extent = SparseExtent {
            file,
            path: path.to_owned(),
            file_len,
            capacity,
            grain,
            compressed: header.compressed,
            zero_grain_entries: header.flags & FLAG_ZERO_GRAIN != 0,
            tables,
            cache: Mutex::new(Vec::new()),
        };
        extent.check_grains(&regions)?;
        Ok((extent, descriptor))
    }

    /// Checks every allocated grain against the file's size and metadata.
    fn check_grains(&self, regions: &[Region]) -> Result<(), VmdkError> {
        let grains = self.capacity.div_ceil(self.grain);
        for index in 0..grains {
            let Grain::At(start) = self.grain(index) else {
                continue;
            };
            let len = if self.compressed {
                GRAIN_MARKER_LEN
            } else {
                self.grain_len(index)
            };
            let end = start + len;
            if end > self.file_len {
                return Err(VmdkError::Corrupt {
                    path: self.path.clone(),
                    defect: format!(
                        "grain {index} at byte {start} ({len} bytes) lies outside the file ({} bytes)",
                        self.file_len
                    ),
                });
            }
            // Regions are sorted and disjoint: the last one starting before
            // `end` is the only one that can overlap.
            let i = regions.partition_point(|r| r.start < end);
            if let Some(r) = i.checked_sub(1).map(|i| regions[i]) {
                if r.end > start {
                    return Err(VmdkError::Corrupt {
                        path: self.path.clone(),
                        defect: format!(
                            "grain {index} at byte {start} overlaps the {} at byte {}",
                            r.what, r.start
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Size of the extent in bytes (header capacity).
    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of grain `index` inside the extent (the last may be short).
    fn grain_len(&self, index: u64) -> u64 {
        self.grain.min(self.capacity - index * self.grain)
    }

    fn grain(&self, index: u64) -> Grain {
        let (dir, entry) = (index / GTES_PER_GT, index % GTES_PER_GT);
        let Some(Some(table)) = self.tables.get(dir as usize) else {
            return Grain::Zero;
        };
        match table[entry as usize] {
            0 => Grain::Zero,
            1 if self.zero_grain_entries => Grain::Zero,
            sector => Grain::At(u64::from(sector) * 512),
        }
    }

    /// Fills `buf` with the extent's bytes at `offset`; the caller keeps
    /// the range inside [`Self::capacity`]. `disk_base` is the extent's
    /// offset in the disk, for error messages.
    pub(super) fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        disk_base: u64,
    ) -> Result<(), VmdkError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let index = at / self.grain;
            let within = at % self.grain;
            let n = ((self.grain - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.grain(index) {
                Grain::Zero => out.fill(0),
                Grain::At(start) if !self.compressed => {
                    self.file.read_exact_at(&self.path, out, start + within)?;
                }
                Grain::At(start) => {
                    let len = self.grain_len(index);
                    if within == 0 && n as u64 == len {
                        // A whole grain: inflate in place, no cache.
                        self.inflate(index, start, out, disk_base)?;
                    } else {
                        let bytes = self.cached_grain(index, start, disk_base)?;
                        out.copy_from_slice(&bytes[within as usize..within as usize + n]);
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn cached_grain(&self, index: u64, start: u64, disk_base: u64) -> Result<Arc<[u8]>, VmdkError> {
        // A poisoned cache only means another reader panicked mid-update of
        // a list of complete entries: the entries are still whole.
        let hit = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, b)| b.clone())
        };
        if let Some(bytes) = hit {
            return Ok(bytes);
        }
        // grain_len is at most MAX_GRAIN_SECTORS * 512.
        let mut bytes = vec![0u8; self.grain_len(index) as usize];
        self.inflate(index, start, &mut bytes, disk_base)?;
        let bytes: Arc<[u8]> = bytes.into();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(i, _)| *i != index);
        if cache.len() >= CACHE_GRAINS {
            cache.remove(0);
        }
        cache.push((index, bytes.clone()));
        Ok(bytes)
    }

    /// Reads the compressed grain at byte `start` of the file and inflates
    /// it into `out` (exactly the grain's bytes inside the extent).
    fn inflate(
        &self,
        index: u64,
        start: u64,
        out: &mut [u8],
        disk_base: u64,
    ) -> Result<(), VmdkError> {
        let bad = |defect: String| VmdkError::Grain {
            path: self.path.clone(),
            offset: disk_base + index * self.grain,
            defect,
        };
        let mut marker = [0u8; GRAIN_MARKER_LEN as usize];
        self.file.read_exact_at(&self.path, &mut marker, start)?;
        let lba = u64_at(&marker, 0);
        let size = u64::from(u32_at(&marker, 8));
        let expected_lba = index * self.grain / 512;
        if lba != expected_lba {
            return Err(bad(format!(
                "grain marker at byte {start} says sector {lba}, the grain table says {expected_lba}"
            )));
        }
        let max = max_compressed(self.grain);
        if size == 0 || size > max {
            return Err(bad(format!(
                "compressed size {size} at byte {start} is outside 1..={max}"
            )));
        }
        let data_at = start + GRAIN_MARKER_LEN;
        if data_at + size > self.file_len {
            return Err(bad(format!(
                "{size} compressed bytes at byte {data_at} run past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        // `size` is bounded by max_compressed above.
        let mut input = vec![0u8; size as usize];
        self.file.read_exact_at(&self.path, &mut input, data_at)?;

        let full = self.grain as usize;
        if out.len() == full {
            let produced =
                inflate_into(&input, out).map_err(|d| bad(format!("{d} (byte {data_at})")))?;
            if produced != full as u64 {
                return Err(bad(format!(
                    "compressed data at byte {data_at} inflates to {produced} bytes, not one grain ({full})"
                )));
            }
            return Ok(());
        }
        // The last grain may have been written whole or cut at the end of
        // the extent; inflate into a whole grain to accept both.
        let mut whole = vec![0u8; full];
        let produced =
            inflate_into(&input, &mut whole).map_err(|d| bad(format!("{d} (byte {data_at})")))?;
        let short = out.len() as u64;
        if produced != short && produced != full as u64 {
            return Err(bad(format!(
                "compressed data at byte {data_at} inflates to {produced} bytes, not {short} or {full}"
            )));
        }
        out.copy_from_slice(&whole[..out.len()]);
        Ok(())
    }

    /// The next run `[start, end)` of allocated grains at or after
    /// `offset` (extent-relative), clipped to the capacity.
    pub(super) fn next_data(&self, offset: u64) -> Option<(u64, u64)> {
        let grains = self.capacity.div_ceil(self.grain);
        let mut index = offset / self.grain;
        // Find the first allocated grain, skipping absent tables whole.
        loop {
            if index >= grains {
                return None;
            }
            let dir = (index / GTES_PER_GT) as usize;
            if matches!(self.tables.get(dir), Some(None) | None) {
                index = (dir as u64 + 1) * GTES_PER_GT;
                continue;
            }
            if matches!(self.grain(index), Grain::At(_)) {
                break;
            }
            index += 1;
        }
        let first = index;
        while index < grains && matches!(self.grain(index), Grain::At(_)) {
            index += 1;
        }
        let start = (first * self.grain).max(offset);
        let end = (index * self.grain).min(self.capacity);
        Some((start, end))
    }

    /// The span of file bytes holding the allocated grains of extent bytes
    /// `[from, to)`, for page-cache hints (compressed grains are taken to
    /// be at most a grain long: a hint need not be exact).
    pub(super) fn file_span(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let grains = self.capacity.div_ceil(self.grain);
        let mut span: Option<(u64, u64)> = None;
        for index in from / self.grain..to.div_ceil(self.grain).min(grains) {
            if let Grain::At(start) = self.grain(index) {
                let end = (start + self.grain).min(self.file_len);
                span = Some(match span {
                    None => (start, end),
                    Some((a, b)) => (a.min(start), b.max(end)),
                });
            }
        }
        span
    }

    /// The extent's file, for page-cache hints.
    pub(super) fn file(&self) -> &Backing {
        &self.file
    }
}

/// Inflates one zlib stream into `out`; returns the bytes produced. The
/// stream must end within `out`.
fn inflate_into(input: &[u8], out: &mut [u8]) -> Result<u64, String> {
    let mut z = Decompress::new(true);
    let status = z
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| format!("compressed data does not inflate: {e}"))?;
    let produced = z.total_out();
    match status {
        Status::StreamEnd => Ok(produced),
        _ if produced == out.len() as u64 => Err(format!(
            "compressed data inflates to more than one grain ({} bytes)",
            out.len()
        )),
        _ => Err("compressed data ends before its zlib stream does".into()),
    }
}
