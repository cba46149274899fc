//! Exporting a point as a streamOptimized VMDK: the compressed, sequential
//! sparse format that VMware puts in OVF/OVA packages and that ESXi, vCenter
//! and Workstation import (and `qemu-img` reads).
//!
//! The point is read exactly as [`Store::export_raw`] reads it: page by page
//! through [`Store::for_each_index_page`], zero blocks recognised by their
//! digest and never read, every data chunk decoded, re-hashed and its length
//! checked. The blocks are cut into (or gathered into) 64 KiB grains, since
//! the point's block size may be any power of two from 4 KiB to 4 MiB; each
//! grain that holds a non-zero byte is deflated and appended, all-zero
//! grains are left out (they read as zeros). The file is written front to
//! back, once, and is made atomic like a raw export: `<dest>.partial`,
//! fsync, rename to `dest`, fsync of the directory; the partial file is
//! removed when anything fails. Memory: one grain, its compressed form, one
//! grain table (2 KiB) and the grain directory (4 bytes per 32 MiB of disk:
//! 8 MiB at the 62 TiB limit).
//!
//! # File layout
//!
//! Integers are little-endian; offsets and sizes in the header, markers,
//! tables and directory count 512-byte sectors.
//!
//! ```text
//! sector 0         header, gdOffset = GD_AT_END (the footer has the real one)
//! sector 1..       embedded descriptor (text, zero padded)
//! sector 128..     grains, in disk order, each: grain marker + zlib stream,
//!                  zero padded to a sector boundary; after the grains of each
//!                  run of 512 grains: a GT marker and its grain table
//! then             GD marker and the grain directory
//! then             footer marker, footer (the header with gdOffset set)
//! last sector      end-of-stream marker
//! ```
//!
//! The header (`SparseExtentHeader`, 512 bytes; the footer is a copy):
//!
//! | offset | type | field | value written |
//! | --- | --- | --- | --- |
//! | 0 | u32 | magicNumber | `0x564d444b` (`KDMV`) |
//! | 4 | u32 | version | 3 |
//! | 8 | u32 | flags | `0x30001`: bit 0 valid newline test, bit 16 compressed grains, bit 17 markers |
//! | 12 | u64 | capacity | disk size in sectors, rounded up |
//! | 20 | u64 | grainSize | 128 (64 KiB) |
//! | 28 | u64 | descriptorOffset | 1 |
//! | 36 | u64 | descriptorSize | sectors the descriptor takes |
//! | 44 | u32 | numGTEsPerGT | 512 |
//! | 48 | u64 | rgdOffset | 0 (no redundant directory: flag bit 1 is clear) |
//! | 56 | u64 | gdOffset | `0xffffffffffffffff` (GD_AT_END) in the header, the directory's sector in the footer |
//! | 64 | u64 | overHead | 128: the first grain's sector, grain aligned as VMware writes it |
//! | 72 | u8 | uncleanShutdown | 0 |
//! | 73..77 | u8 × 4 | newline test | `\n`, ` `, `\r`, `\n` |
//! | 77 | u16 | compressAlgorithm | 1 (deflate) |
//! | 79 | | pad | zeros up to 512 |
//!
//! A grain marker is 12 bytes: `lba: u64` (the grain's first disk sector),
//! `size: u32` (bytes of zlib data, RFC 1950, that follow). Every grain
//! inflates to a whole 64 KiB, the last one too: the part past the end of
//! the disk is zeros (the format's grains are whole; a reader that expects
//! the short form of qemu takes the whole one as well).
//!
//! A metadata marker is one sector: `numSectors: u64` (sectors of metadata
//! that follow), `size: u32` = 0, `type: u32` (0 end of stream, 1 grain
//! table, 2 grain directory, 3 footer), zeros. A grain table is 512 u32
//! sector offsets of grains (0: not present, reads as zeros), written only
//! when one of its grains is present; the directory holds one u32 per table
//! (0: table absent). Those offsets are 32-bit, so the file itself cannot
//! pass 2 TiB; the disk cannot pass 62 TiB, VMware's limit for a virtual
//! disk.
//!
//! A disk whose size is not a multiple of 512 bytes is exported with its
//! capacity rounded up: the VMDK reads as the point followed by zeros up to
//! the next sector boundary.
//!
//! # Descriptor
//!
//! What VMware writes for a stream-optimized disk: a random `CID` (never
//! `ffffffff` or `fffffffe`, which mean "no parent" and "unset"), no parent,
//! one `RW <sectors> SPARSE "<file name>"` extent, and a disk database with
//! an `lsilogic` adapter, a SCSI geometry (255 heads, 63 sectors per track,
//! the cylinders that fit the capacity, at least 1), a random
//! `longContentID`, `virtualHWVersion` 4 (the oldest hardware version
//! VMware still imports into: the disk carries no newer feature), and
//! `toolsInstallType`/`toolsVersion` 0 (the controller does not know what
//! is installed in the guest).
//!
//! Grains are compressed at zlib level 1: a stored chunk is already
//! verified data and the export is one pass on one thread, so throughput
//! counts more than the last percents of ratio.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use flate2::{Compress, Compression, FlushCompress, Status};
use tideline_protocol::ZeroDigests;

use super::error::{io_err, StoreError};
use super::export::ExportReport;
use super::{fsutil, PointId, Store};

/// Bytes per sector.
const SECTOR: u64 = 512;
/// Sectors per grain (64 KiB, what VMware and qemu write).
const GRAIN_SECTORS: u64 = 128;
/// Bytes per grain.
const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
/// Grain table entries per table (fixed by the format).
const GTES_PER_GT: u64 = 512;
/// Sectors of one grain table.
const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR;
/// `KDMV` as a little-endian u32.
const MAGIC: u32 = 0x564d_444b;
/// Header version of stream-optimized extents.
const VERSION: u32 = 3;
/// Valid newline test, compressed grains, markers.
const FLAGS: u32 = 1 | (1 << 16) | (1 << 17);
/// `compressAlgorithm` for deflate (zlib streams).
const COMPRESS_DEFLATE: u16 = 1;
/// `gdOffset` meaning "the grain directory is found through the footer".
const GD_AT_END: u64 = u64::MAX;
/// Sector of the embedded descriptor.
const DESCRIPTOR_OFFSET: u64 = 1;
/// Sector of the first grain; the descriptor must end before it.
const OVERHEAD_SECTORS: u64 = GRAIN_SECTORS;
/// Largest disk exported, in bytes (VMware's 62 TiB virtual disk limit).
const MAX_CAPACITY_BYTES: u64 = 62 << 40;
/// Longest extent file name written into the descriptor, in characters.
const MAX_EXTENT_NAME: usize = 255;
/// Bytes of a grain marker before its compressed data.
const GRAIN_MARKER_LEN: usize = 12;
/// zlib level for grains (see the module doc).
const ZLIB_LEVEL: u32 = 1;

const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// Why a point cannot be written as a streamOptimized VMDK. Reported as the
/// source of a [`StoreError::Io`] on the destination file.
#[derive(Debug, thiserror::Error)]
enum VmdkLimit {
    /// The disk has no bytes; a VMDK of capacity 0 is refused by readers.
    #[error("an empty disk cannot be exported as a VMDK")]
    EmptyDisk,
    /// The disk is larger than a VMDK may be.
    #[error("a disk of {disk_size} bytes exceeds the VMDK limit of {MAX_CAPACITY_BYTES} bytes")]
    DiskTooLarge {
        /// The point's disk size in bytes.
        disk_size: u64,
    },
    /// The compressed file grew past what its 32-bit sector offsets address.
    #[error("the VMDK would pass 2 TiB, beyond what its 32-bit grain offsets address")]
    FileTooLarge,
    /// zlib failed to compress a grain.
    #[error("cannot compress grain {grain}: {reason}")]
    Compress {
        /// The grain number.
        grain: u64,
        /// What zlib said.
        reason: String,
    },
}

/// Wraps `limit` as an error on `path`.
fn limit_err(path: &Path, limit: VmdkLimit) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, limit),
    }
}

/// Capacity in sectors of a disk of `disk_size` bytes, bounded.
fn capacity_sectors(disk_size: u64) -> Result<u64, VmdkLimit> {
    if disk_size == 0 {
        return Err(VmdkLimit::EmptyDisk);
    }
    if disk_size > MAX_CAPACITY_BYTES {
        return Err(VmdkLimit::DiskTooLarge { disk_size });
    }
    Ok(disk_size.div_ceil(SECTOR))
}

/// The header fields that vary (see the module doc for the rest).
#[derive(Clone, Copy, Debug)]
struct SparseHeader {
    capacity: u64,
    descriptor_sectors: u64,
    gd_offset: u64,
}

impl SparseHeader {
    fn encode(&self) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&FLAGS.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
        b[28..36].copy_from_slice(&DESCRIPTOR_OFFSET.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&(GTES_PER_GT as u32).to_le_bytes());
        // 48..56 rgdOffset stays 0.
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&OVERHEAD_SECTORS.to_le_bytes());
        // 72 uncleanShutdown stays 0.
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&COMPRESS_DEFLATE.to_le_bytes());
        b
    }
}

/// One metadata marker sector (see the module doc).
fn marker(sectors: u64, kind: u32) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[0..8].copy_from_slice(&sectors.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// The name of `dest` as it may appear between the quotes of an extent
/// line: quotes, backslashes and control characters become `_`, at most
/// [`MAX_EXTENT_NAME`] characters.
fn extent_name(dest: &Path) -> String {
    let name: String = dest
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .take(MAX_EXTENT_NAME)
        .collect();
    if name.is_empty() {
        "disk.vmdk".to_string()
    } else {
        name
    }
}

/// A content id that means neither "no parent" nor "unset".
fn random_cid() -> u32 {
    loop {
        let cid: u32 = rand::random();
        if cid < 0xffff_fffe {
            return cid;
        }
    }
}

/// The embedded descriptor of a stream-optimized disk of `capacity` sectors
/// (see the module doc).
fn descriptor(capacity: u64, extent: &str) -> String {
    let cylinders = (capacity / (255 * 63)).max(1);
    let long_content_id: u128 = rand::random();
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\
         \n\
         # Extent description\n\
         RW {capacity} SPARSE \"{extent}\"\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.adapterType = \"lsilogic\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.longContentID = \"{long_content_id:032x}\"\n\
         ddb.toolsInstallType = \"0\"\n\
         ddb.toolsVersion = \"0\"\n\
         ddb.virtualHWVersion = \"4\"\n",
        cid = random_cid(),
    )
}

/// Deflates `input` into `out` as one zlib stream.
fn zlib_compress(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    z.reset();
    out.clear();
    // zlib's worst case (stored blocks) is 5 bytes per 16 KiB plus 6; one
    // reservation of an eighth more is enough, the loop covers the rest.
    out.reserve(input.len() + input.len() / 8 + 64);
    loop {
        let (before_in, before_out) = (z.total_in(), z.total_out());
        let rest = input.get(before_in as usize..).unwrap_or_default();
        match z.compress_vec(rest, out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => return Ok(()),
            Ok(Status::Ok | Status::BufError) => {
                let stalled = z.total_in() == before_in && z.total_out() == before_out;
                if stalled || out.len() > 2 * input.len() + 4096 {
                    return Err("the zlib stream does not end".into());
                }
                out.reserve(input.len() / 8 + 64);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Writes the extent front to back: grains handed over in ascending disk
/// order, tables after their grains, directory and footer at the end.
struct StreamWriter<'p> {
    out: BufWriter<File>,
    /// The file being written, for errors.
    path: &'p Path,
    /// Bytes written so far.
    pos: u64,
    header: SparseHeader,
    deflate: Compress,
    /// The grain being gathered, and its compressed form.
    grain: Vec<u8>,
    packed: Vec<u8>,
    /// Number of the grain in `grain`.
    grain_index: u64,
    /// Whether bytes were copied into `grain` since it was last cleared.
    grain_dirty: bool,
    /// Entries of the grain table of `table_index`.
    table: Vec<u32>,
    table_index: u64,
    /// Sector of each grain table, 0 for absent tables.
    directory: Vec<u32>,
}

impl<'p> StreamWriter<'p> {
    /// Writes the header and the descriptor and positions at the first
    /// grain.
    fn start(
        file: File,
        path: &'p Path,
        capacity: u64,
        descriptor: &str,
    ) -> Result<Self, StoreError> {
        let descriptor_sectors = (descriptor.len() as u64).div_ceil(SECTOR);
        // The descriptor is about 600 bytes plus a name bounded to 255
        // characters (1020 bytes of UTF-8): far below the 127 sectors
        // before the first grain.
        debug_assert!(DESCRIPTOR_OFFSET + descriptor_sectors <= OVERHEAD_SECTORS);
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let tables = grains.div_ceil(GTES_PER_GT);
        let header = SparseHeader {
            capacity,
            descriptor_sectors,
            gd_offset: GD_AT_END,
        };
        let mut w = StreamWriter {
            out: BufWriter::with_capacity(256 * 1024, file),
            path,
            pos: 0,
            header,
            deflate: Compress::new(Compression::new(ZLIB_LEVEL), true),
            grain: vec![0u8; GRAIN_BYTES as usize],
            packed: Vec::new(),
            grain_index: 0,
            grain_dirty: false,
            table: vec![0u32; GTES_PER_GT as usize],
            table_index: 0,
            // capacity <= 62 TiB / 512, so at most 2 Mi tables (8 MiB).
            directory: vec![0u32; tables as usize],
        };
        w.write(&header.encode())?;
        w.write(descriptor.as_bytes())?;
        w.pad_to(OVERHEAD_SECTORS * SECTOR)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.out.write_all(bytes).map_err(io_err(self.path))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes zeros up to offset `to`.
    fn pad_to(&mut self, to: u64) -> Result<(), StoreError> {
        const ZEROS: [u8; SECTOR as usize] = [0u8; SECTOR as usize];
        while self.pos < to {
            let n = (to - self.pos).min(SECTOR) as usize;
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }

    /// Zeros up to the next sector boundary.
    fn pad_sector(&mut self) -> Result<(), StoreError> {
        self.pad_to(self.pos.next_multiple_of(SECTOR))
    }

    /// The current (sector aligned) position as a table entry.
    fn sector_entry(&self) -> Result<u32, StoreError> {
        u32::try_from(self.pos / SECTOR).map_err(|_| limit_err(self.path, VmdkLimit::FileTooLarge))
    }

    /// Copies `data`, which lies at byte `offset` of the disk, into the
    /// grains it covers. Calls must come in ascending, non-overlapping
    /// order.
    fn put(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut off = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let within = (off % GRAIN_BYTES) as usize;
            self.move_to(off / GRAIN_BYTES)?;
            let n = (GRAIN_BYTES as usize - within).min(rest.len());
            self.grain[within..within + n].copy_from_slice(&rest[..n]);
            self.grain_dirty = true;
            off += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Makes grain `grain` the one being gathered, writing out the current
    /// grain, and its table when `grain` lies in another one.
    fn move_to(&mut self, grain: u64) -> Result<(), StoreError> {
        if grain == self.grain_index {
            return Ok(());
        }
        // Blocks arrive in ascending order (index pages are walked in block
        // order), so the writer only moves forward.
        debug_assert!(grain > self.grain_index);
        self.flush_grain()?;
        if grain / GTES_PER_GT != self.table_index {
            self.flush_table()?;
            self.table_index = grain / GTES_PER_GT;
        }
        self.grain_index = grain;
        Ok(())
    }

    /// Writes the gathered grain unless it is all zeros, and clears it.
    fn flush_grain(&mut self) -> Result<(), StoreError> {
        if !self.grain_dirty {
            return Ok(());
        }
        self.grain_dirty = false;
        if self.grain.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let grain = self.grain_index;
        zlib_compress(&mut self.deflate, &self.grain, &mut self.packed)
            .map_err(|reason| limit_err(self.path, VmdkLimit::Compress { grain, reason }))?;
        let entry = self.sector_entry()?;
        // `zlib_compress` bounds its output to twice a grain plus 4 KiB.
        let size = self.packed.len() as u32;
        let mut head = [0u8; GRAIN_MARKER_LEN];
        head[0..8].copy_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
        head[8..12].copy_from_slice(&size.to_le_bytes());
        self.write(&head)?;
        self.out
            .write_all(&self.packed)
            .map_err(io_err(self.path))?;
        self.pos += self.packed.len() as u64;
        self.pad_sector()?;
        self.table[(grain % GTES_PER_GT) as usize] = entry;
        self.grain.fill(0);
        Ok(())
    }

    /// Writes the current grain table unless none of its grains is present.
    fn flush_table(&mut self) -> Result<(), StoreError> {
        if self.table.iter().all(|&e| e == 0) {
            return Ok(());
        }
        self.write(&marker(GT_SECTORS, MARKER_GT))?;
        let entry = self.sector_entry()?;
        let mut bytes = Vec::with_capacity((GT_SECTORS * SECTOR) as usize);
        for e in &self.table {
            bytes.extend_from_slice(&e.to_le_bytes());
        }
        self.write(&bytes)?;
        // table_index < tables: grains lie below the capacity.
        self.directory[self.table_index as usize] = entry;
        self.table.fill(0);
        Ok(())
    }

    /// Writes what is pending, the directory, the footer and the
    /// end-of-stream marker; returns the file, flushed but not synced, and
    /// its length.
    fn finish(mut self) -> Result<(File, u64), StoreError> {
        self.flush_grain()?;
        self.flush_table()?;
        let gd_sectors = (self.directory.len() as u64 * 4).div_ceil(SECTOR);
        self.write(&marker(gd_sectors, MARKER_GD))?;
        let gd_offset = self.pos / SECTOR;
        let mut bytes = Vec::with_capacity((gd_sectors * SECTOR) as usize);
        for e in &self.directory {
            bytes.extend_from_slice(&e.to_le_bytes());
        }
        self.write(&bytes)?;
        self.pad_sector()?;
        self.write(&marker(1, MARKER_FOOTER))?;
        let footer = SparseHeader {
            gd_offset,
            ..self.header
        };
        self.write(&footer.encode())?;
        self.write(&marker(0, MARKER_EOS))?;
        let len = self.pos;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_err(self.path)(e.into_error()))?;
        Ok((file, len))
    }
}

impl Store {
    /// Writes the point as a streamOptimized VMDK at `dest` (see the module
    /// doc), verifying every chunk as it goes. `progress(done, total)` is
    /// called after every index page, in bytes of the disk. The report
    /// counts the point's blocks, as for a raw export; `bytes` is the disk
    /// size.
    pub fn export_vmdk(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
        dest: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ExportReport, StoreError> {
        let info = self.point(agent, disk, point)?;
        let g = info.geometry();
        let capacity = capacity_sectors(g.disk_size).map_err(|e| limit_err(dest, e))?;
        let descriptor = descriptor(capacity, &extent_name(dest));
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
            let mut w = StreamWriter::start(file, &partial, capacity, &descriptor)?;
            self.for_each_index_page(agent, disk, point, &mut |first, entries| {
                for (i, d) in (first..).zip(entries) {
                    if zero.is_zero(i, d) {
                        report.zero_blocks += 1;
                        continue;
                    }
                    let bytes = self.read_chunk(d)?;
                    let expected = g.block_len(i);
                    if bytes.len() != expected as usize {
                        return Err(StoreError::BlockLength {
                            block: i,
                            expected,
                            actual: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
                        });
                    }
                    w.put(g.offset(i), &bytes)?;
                    report.data_blocks += 1;
                }
                let end = first + entries.len() as u64;
                progress(
                    end.saturating_mul(u64::from(g.block_size)).min(g.disk_size),
                    g.disk_size,
                );
                Ok(())
            })?;
            let (file, _len) = w.finish()?;
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
}

#[cfg(test)]
mod tests {
    //! Points built the way a session builds them, exported both raw and as
    //! VMDK, and the two compared by qemu-img: an independent reader of the
    //! format, the one an operator would reach for. qemu-img must be
    //! installed.

    use std::path::PathBuf;
    use std::process::{Command, Output};

    use serde_json::Value;
    use tideline_protocol::{Digest, Encoding, IndexRootHasher};

    use super::*;

    const AGENT: &str = "agent-1";
    const DISK: &str = "disk-a";
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;

    /// Commits `img` as point `point`, cut into `bs`-byte blocks, sending
    /// only the non-zero blocks as a full sync does.
    fn commit(store: &Store, point: PointId, bs: u32, img: &[u8]) {
        let len = img.len() as u64;
        let mut b = store
            .begin_point(AGENT, DISK, point, None, len, bs)
            .unwrap();
        let zero = ZeroDigests::new(len, bs);
        let mut root = IndexRootHasher::new();
        for (i, block) in (0u64..).zip(img.chunks(bs as usize)) {
            let d = Digest::of(block);
            root.push(&d);
            if !zero.is_zero(i, &d) {
                store
                    .put_block(&d, Encoding::Raw, block.len() as u32, block)
                    .unwrap();
                b.record(i, d).unwrap();
            }
        }
        b.commit(&root.finish(), 0, &Default::default()).unwrap();
    }

    fn fill_random(buf: &mut [u8], seed: u64) {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for b in buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
    }

    /// 70 MiB and 3.5 KiB (a multiple of neither the grain nor a 4 KiB
    /// block): 1 MiB incompressible, 1 MiB of text, one grain with 4 KiB of
    /// data in it, zeros over the whole second grain table (32..64 MiB),
    /// 512 KiB of random bytes at 64.5 MiB, and random bytes over the last
    /// partial grain.
    fn mixed_image() -> Vec<u8> {
        let len = 70 * MIB + 3 * KIB + 512;
        let mut img = vec![0u8; len];
        fill_random(&mut img[..MIB], 1);
        let words = b"point block grain replica restore ";
        for (i, b) in img[MIB..2 * MIB].iter_mut().enumerate() {
            *b = words[i % words.len()];
        }
        fill_random(&mut img[2 * MIB + 4 * KIB..2 * MIB + 8 * KIB], 2);
        fill_random(&mut img[64 * MIB + 512 * KIB..65 * MIB], 3);
        fill_random(&mut img[len - 10_000..], 4);
        img
    }

    /// Grains of `img` that hold a non-zero byte.
    fn nonzero_grains(img: &[u8]) -> u64 {
        img.chunks(GRAIN_BYTES as usize)
            .filter(|g| g.iter().any(|&b| b != 0))
            .count() as u64
    }

    fn qemu_img(args: &[&str]) -> Output {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img must be installed for these tests")
    }

    fn text(o: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Asserts that qemu-img reads `vmdk` as the same disk as raw `raw`,
    /// finds nothing wrong with it, and sees a streamOptimized VMDK of
    /// `disk_size` rounded up to a sector. Returns the bytes qemu-img maps
    /// as data.
    fn assert_qemu_accepts(raw: &Path, vmdk: &Path, disk_size: u64) -> u64 {
        let (raw, vmdk) = (raw.to_str().unwrap(), vmdk.to_str().unwrap());
        let o = qemu_img(&["compare", "-f", "raw", "-F", "vmdk", raw, vmdk]);
        assert!(o.status.success(), "qemu-img compare: {}", text(&o));
        assert!(text(&o).contains("Images are identical"), "{}", text(&o));

        let o = qemu_img(&["check", "-f", "vmdk", vmdk]);
        assert!(o.status.success(), "qemu-img check: {}", text(&o));
        assert!(text(&o).contains("No errors were found"), "{}", text(&o));

        let o = qemu_img(&["info", "--output=json", "-f", "vmdk", vmdk]);
        assert!(o.status.success(), "qemu-img info: {}", text(&o));
        let info: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["format"], "vmdk", "{info}");
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(disk_size.next_multiple_of(SECTOR)),
            "{info}"
        );
        let data = &info["format-specific"]["data"];
        assert_eq!(data["create-type"], "streamOptimized", "{info}");
        assert_eq!(data["extents"][0]["compressed"], true, "{info}");
        assert_eq!(
            data["extents"][0]["cluster-size"].as_u64(),
            Some(GRAIN_BYTES),
            "{info}"
        );

        let o = qemu_img(&["map", "--output=json", "-f", "vmdk", vmdk]);
        assert!(o.status.success(), "qemu-img map: {}", text(&o));
        let map: Value = serde_json::from_slice(&o.stdout).unwrap();
        map.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// What qemu-img does not insist on but VMware's importer does: the
    /// header defers to the footer, the file ends in footer marker, footer,
    /// end-of-stream marker, the footer is the header plus the directory's
    /// offset, and the descriptor names the disk's capacity.
    fn assert_stream_layout(file: &[u8], capacity: u64) {
        let s = SECTOR as usize;
        assert_eq!(file.len() % s, 0);
        let (header, end) = (&file[..s], &file[file.len() - 3 * s..]);
        let (footer_marker, footer, eos) = (&end[..s], &end[s..2 * s], &end[2 * s..]);
        assert_eq!(&header[0..4], b"KDMV");
        assert_eq!(u32_at(header, 4), 3);
        assert_eq!(u32_at(header, 8), 0x0003_0001);
        assert_eq!(u64_at(header, 12), capacity);
        assert_eq!(u64_at(header, 20), 128);
        assert_eq!(u64_at(header, 56), GD_AT_END);
        assert_eq!(u16::from_le_bytes([header[77], header[78]]), 1);
        assert_eq!(u64_at(footer_marker, 0), 1);
        assert_eq!(u32_at(footer_marker, 12), MARKER_FOOTER);
        assert!(eos.iter().all(|&b| b == 0), "no end-of-stream marker");
        let gd = u64_at(footer, 56);
        assert!(gd > OVERHEAD_SECTORS && gd * SECTOR < file.len() as u64);
        assert_eq!(&footer[..56], &header[..56]);
        assert_eq!(&footer[64..], &header[64..]);
        let gd_marker = &file[(gd as usize - 1) * s..gd as usize * s];
        assert_eq!(u32_at(gd_marker, 12), MARKER_GD);
        let desc_sectors = u64_at(header, 36) as usize;
        let desc = String::from_utf8_lossy(&file[s..(1 + desc_sectors) * s]);
        assert!(desc.contains("createType=\"streamOptimized\""), "{desc}");
        assert!(
            desc.contains(&format!("RW {capacity} SPARSE \"disk.vmdk\"")),
            "{desc}"
        );
    }

    struct Exported {
        dir: tempfile::TempDir,
        report: ExportReport,
        last_progress: (u64, u64),
    }

    impl Exported {
        fn raw(&self) -> PathBuf {
            self.dir.path().join("disk.raw")
        }
        fn vmdk(&self) -> PathBuf {
            self.dir.path().join("disk.vmdk")
        }
    }

    fn export_both(store: &Store, point: PointId) -> Exported {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let vmdk = dir.path().join("disk.vmdk");
        store
            .export_raw(AGENT, DISK, point, &raw, &mut |_, _| {})
            .unwrap();
        let mut last_progress = (0, 0);
        let report = store
            .export_vmdk(AGENT, DISK, point, &vmdk, &mut |d, t| {
                last_progress = (d, t)
            })
            .unwrap();
        assert!(!dir.path().join("disk.vmdk.partial").exists());
        Exported {
            dir,
            report,
            last_progress,
        }
    }

    #[test]
    fn mixed_image_reads_back_identical_at_every_block_size() {
        let img = mixed_image();
        let len = img.len() as u64;
        let capacity = len.div_ceil(SECTOR);
        for (point, bs) in [(1, 4 * KIB), (2, 64 * KIB), (3, MIB)] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            commit(&store, point, bs as u32, &img);
            let e = export_both(&store, point);
            assert_eq!(std::fs::read(e.raw()).unwrap(), img, "raw export, bs {bs}");
            assert_eq!(e.last_progress, (len, len), "bs {bs}");
            let blocks = len.div_ceil(bs as u64);
            assert_eq!(e.report.bytes, len);
            assert_eq!(e.report.data_blocks + e.report.zero_blocks, blocks);

            let mapped = assert_qemu_accepts(&e.raw(), &e.vmdk(), len);
            // Exactly the grains holding data are present: all-zero grains,
            // also those inside a 1 MiB data block, are left out (the last
            // grain is mapped only up to the end of the disk).
            let grains = nonzero_grains(&img);
            assert_eq!(
                mapped,
                (grains - 1) * GRAIN_BYTES + len % GRAIN_BYTES,
                "bs {bs}"
            );

            let file = std::fs::read(e.vmdk()).unwrap();
            assert_stream_layout(&file, capacity);
            // The random bytes do not compress, the text and the zeros do.
            let random = (MIB + 4 * KIB + 512 * KIB + 10_000) as u64;
            assert!(
                (file.len() as u64) > random && (file.len() as u64) < random + 256 * KIB as u64,
                "bs {bs}: {} bytes",
                file.len()
            );
        }
    }

    #[test]
    fn all_zero_disk_holds_no_grain_and_no_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let img = vec![0u8; 64 * MIB + 512];
        commit(&store, 1, 64 * KIB as u32, &img);
        let e = export_both(&store, 1);
        assert_eq!(e.report.data_blocks, 0);
        assert_eq!(
            assert_qemu_accepts(&e.raw(), &e.vmdk(), img.len() as u64),
            0
        );
        // Header and descriptor up to the first grain, then only the GD
        // marker, the directory (3 tables: one sector), footer marker,
        // footer and end of stream.
        let file = std::fs::read(e.vmdk()).unwrap();
        assert_eq!(file.len() as u64, (OVERHEAD_SECTORS + 5) * SECTOR);
        assert_stream_layout(&file, img.len() as u64 / SECTOR);
        // The directory lists no table.
        let gd = u64_at(&file[file.len() - 2 * SECTOR as usize..], 56) as usize;
        let s = SECTOR as usize;
        assert!(file[gd * s..(gd + 1) * s].iter().all(|&b| b == 0));
    }

    #[test]
    fn size_not_a_multiple_of_a_sector_reads_as_zero_padded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut img = vec![0u8; MIB + 1000];
        fill_random(&mut img, 9);
        commit(&store, 1, 4 * KIB as u32, &img);
        let e = export_both(&store, 1);
        // qemu-img compares the common part and requires the VMDK's last 24
        // bytes, past the raw image's end, to read as zeros.
        assert_qemu_accepts(&e.raw(), &e.vmdk(), img.len() as u64);
        let file = std::fs::read(e.vmdk()).unwrap();
        assert_stream_layout(&file, (img.len() as u64).div_ceil(SECTOR));
    }

    #[test]
    fn failed_export_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut img = vec![0u8; 4 * MIB];
        fill_random(&mut img[3 * MIB..], 5);
        commit(&store, 1, 64 * KIB as u32, &img);
        // The chunks disappear under the store: the export fails on the
        // first data block, after the partial file was begun.
        for ent in std::fs::read_dir(dir.path().join("packs")).unwrap() {
            let p = ent.unwrap().path();
            if p.extension().is_some_and(|x| x == "pack") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("disk.vmdk");
        let err = store
            .export_vmdk(AGENT, DISK, 1, &dest, &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        assert!(!dest.exists());
        assert!(!out.path().join("disk.vmdk.partial").exists());
    }

    #[test]
    fn empty_disk_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit(&store, 1, 64 * KIB as u32, &[]);
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("disk.vmdk");
        let err = store
            .export_vmdk(AGENT, DISK, 1, &dest, &mut |_, _| {})
            .unwrap_err();
        assert!(err.to_string().contains("empty disk"), "{err}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn descriptor_names_are_quoted_safely_and_cids_are_valid() {
        assert_eq!(extent_name(Path::new("/x/a\"b\\c\n.vmdk")), "a_b_c_.vmdk");
        assert_eq!(extent_name(Path::new("/")), "disk.vmdk");
        assert_eq!(
            extent_name(Path::new(&"é".repeat(400))).chars().count(),
            MAX_EXTENT_NAME
        );
        let d = descriptor(2 * 255 * 63 + 7, &"é".repeat(MAX_EXTENT_NAME));
        assert!(DESCRIPTOR_OFFSET + (d.len() as u64).div_ceil(SECTOR) <= OVERHEAD_SECTORS);
        assert!(d.contains("ddb.geometry.cylinders = \"2\""), "{d}");
        assert!(descriptor(1, "x").contains("ddb.geometry.cylinders = \"1\""));
        let cid = d
            .lines()
            .find_map(|l| l.strip_prefix("CID="))
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .unwrap();
        assert!(cid < 0xffff_fffe);
    }

    #[test]
    fn sizes_past_the_vmdk_limits_are_refused() {
        assert!(matches!(capacity_sectors(0), Err(VmdkLimit::EmptyDisk)));
        assert_eq!(capacity_sectors(1).unwrap(), 1);
        assert_eq!(
            capacity_sectors(MAX_CAPACITY_BYTES).unwrap(),
            MAX_CAPACITY_BYTES / SECTOR
        );
        assert!(matches!(
            capacity_sectors(MAX_CAPACITY_BYTES + 1),
            Err(VmdkLimit::DiskTooLarge { .. })
        ));
    }
}
