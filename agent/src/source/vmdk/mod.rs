//! VMDK disks: VMware images read without VMware's or qemu's code.
//!
//! The agent runs privileged and reads files that come from elsewhere
//! (OVA exports, copied datastores), so this parser is our own, bounded and
//! fuzzed (`fuzz/fuzz_targets/vmdk_parser.rs`). [`VmdkDisk`] is a
//! [`DiskSource`]: the scan asks it where data is (allocated grains, or the
//! flat files' own data extents), then reads batches from several threads
//! with `pread`, never through a shared cursor.
//!
//! # What is read
//!
//! [`VmdkDisk::open`] looks at the first bytes of the file:
//!
//! * `KDMV`: a hosted sparse extent with its descriptor embedded
//!   (`monolithicSparse`, `streamOptimized`; see `sparse.rs` for the header,
//!   grain directory, grain tables, grain markers and footer). The extent is
//!   the whole disk; the embedded descriptor, when present, must name a
//!   single extent and pass the format checks below.
//! * `COWD`: an ESX snapshot delta (`vmfsSparse`): refused.
//! * anything else of at most [`MAX_DESCRIPTOR_FILE`] bytes: a text
//!   descriptor (grammar in `descriptor.rs`) naming extents, each covering
//!   the next sectors of the disk: `FLAT`/`VMFS` (`flat.rs`), `SPARSE`
//!   (`sparse.rs`) or `ZERO`. Extent files are relative paths in the
//!   descriptor's directory (absolute paths and `..` are refused: a
//!   descriptor must not make the agent replicate arbitrary files). A
//!   `SPARSE` extent's header capacity must cover its descriptor size; a flat
//!   file must hold its whole range.
//!
//! `createType` must be one of `monolithicSparse`, `streamOptimized`,
//! `monolithicFlat`, `twoGbMaxExtentSparse`, `twoGbMaxExtentFlat` or `vmfs`.
//! Snapshot deltas are refused with an error that names the file and the
//! format: `createType` `vmfsSparse` or `seSparse`, extents of type
//! `VMFSSPARSE` or `SESPARSE`, and any descriptor with a `parentCID` other
//! than `ffffffff` or a `parentFileNameHint` (its unallocated grains would
//! have to be read from the parent). Raw device maps and `NOACCESS` extents
//! are refused too. The disk's size (sum of its extents) is at most
//! 64 TiB (`sparse::MAX_CAPACITY`).

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

use super::{DiskSource, SourceError};

mod descriptor;
mod flat;
mod sparse;
#[cfg(test)]
mod tests;

use descriptor::{Descriptor, ExtentLine, ExtentType};
use flat::FlatExtent;
use sparse::SparseExtent;

/// Largest text descriptor file read (a 62 TiB twoGbMaxExtent disk's
/// descriptor, 31 744 extent lines, is about 1.5 MiB).
pub const MAX_DESCRIPTOR_FILE: u64 = 4 << 20;

/// Why a VMDK cannot be opened or read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    /// A file could not be opened or inspected.
    #[error("{}: cannot {op}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A read of a file failed or came up short (it shrank since open).
    #[error("{}: read error at byte {offset}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Byte offset in the file.
        offset: u64,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// The file has neither a sparse header nor a descriptor's size.
    #[error("{}: not a VMDK file: {reason}", path.display())]
    NotVmdk {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The descriptor text is malformed (line 0: the text as a whole).
    #[error("{}: broken VMDK descriptor, line {line}: {defect}", path.display())]
    Descriptor {
        /// The descriptor file (or sparse file embedding it).
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        defect: String,
    },
    /// A format this reader does not read (snapshot deltas, raw devices).
    #[error("{}: unsupported VMDK format {format}: {why}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The format, as the file names it.
        format: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// An extent file named by a descriptor cannot be opened.
    #[error("{}: extent file {} cannot be opened: {cause}", descriptor.display(), extent.display())]
    MissingExtent {
        /// The descriptor.
        descriptor: PathBuf,
        /// The extent file.
        extent: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A sparse or flat extent's structure is unusable: header fields out
    /// of bounds, tables outside the file or overlapping, a short file.
    #[error("{}: corrupt VMDK extent: {defect}", path.display())]
    Corrupt {
        /// The extent file.
        path: PathBuf,
        /// What is wrong.
        defect: String,
    },
    /// A compressed grain is unreadable (found when it is read).
    #[error("{}: bad grain at disk offset {offset}: {defect}", path.display())]
    Grain {
        /// The extent file.
        path: PathBuf,
        /// Disk byte offset of the grain.
        offset: u64,
        /// What is wrong.
        defect: String,
    },
}

/// Where an extent's bytes come from: a file, or memory (the fuzz target).
pub(crate) enum Backing {
    /// A file opened read-only.
    File(File),
    /// An image held in memory.
    Memory(Arc<[u8]>),
}

impl Backing {
    fn len(&self, path: &Path) -> Result<u64, VmdkError> {
        match self {
            Backing::File(f) => f
                .metadata()
                .map(|m| m.len())
                .map_err(|source| VmdkError::Io {
                    path: path.to_owned(),
                    op: "get the size",
                    cause: source,
                }),
            Backing::Memory(b) => Ok(b.len() as u64),
        }
    }

    fn read_exact_at(&self, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), VmdkError> {
        let result = match self {
            Backing::File(f) => f.read_exact_at(buf, offset),
            Backing::Memory(b) => usize::try_from(offset)
                .ok()
                .and_then(|o| Some(o..o.checked_add(buf.len())?))
                .and_then(|r| b.get(r))
                .map(|src| buf.copy_from_slice(src))
                .ok_or_else(|| ErrorKind::UnexpectedEof.into()),
        };
        result.map_err(|source| VmdkError::Read {
            path: path.to_owned(),
            offset,
            cause: source,
        })
    }
}

/// One extent's place in the disk.
struct Extent {
    /// Disk byte offset.
    start: u64,
    /// Length in bytes.
    len: u64,
    data: ExtentData,
}

enum ExtentData {
    Flat(FlatExtent),
    Sparse(SparseExtent),
    Zero,
}

/// An opened VMDK disk: its extents in disk order, grain tables in memory.
pub struct VmdkDisk {
    name: String,
    size: u64,
    extents: Vec<Extent>,
}

impl VmdkDisk {
    /// Opens a VMDK: a text descriptor (with its extent files beside it) or
    /// a sparse file with an embedded descriptor.
    pub fn open(path: &Path) -> Result<VmdkDisk, VmdkError> {
        let io = |op| {
            move |source| VmdkError::Io {
                path: path.to_owned(),
                op,
                cause: source,
            }
        };
        let file = File::open(path).map_err(io("open"))?;
        let meta = file.metadata().map_err(io("inspect"))?;
        if !meta.is_file() {
            return Err(VmdkError::NotVmdk {
                path: path.to_owned(),
                reason: "not a regular file".into(),
            });
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        Self::build(path, Backing::File(file), Some(&dir))
    }

    /// Parses a VMDK held in memory, as if read from a file called `name`.
    /// A descriptor's extent files cannot be opened this way (only `ZERO`
    /// extents); a sparse file with an embedded descriptor opens whole.
    /// This is the fuzz target's entry point.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<VmdkDisk, VmdkError> {
        Self::build(Path::new(name), Backing::Memory(bytes.into()), None)
    }

    fn build(path: &Path, file: Backing, dir: Option<&Path>) -> Result<VmdkDisk, VmdkError> {
        let len = file.len(path)?;
        let mut magic = [0u8; 4];
        if len >= 4 {
            file.read_exact_at(path, &mut magic, 0)?;
        }
        let name = path.display().to_string();
        if u32::from_le_bytes(magic) == sparse::MAGIC {
            return Self::monolithic_sparse(path, file, name);
        }
        if &magic == b"COWD" {
            return Err(VmdkError::Unsupported {
                path: path.to_owned(),
                format: "vmfsSparse (COWD)".into(),
                why: SNAPSHOT,
            });
        }
        if len > MAX_DESCRIPTOR_FILE {
            return Err(VmdkError::NotVmdk {
                path: path.to_owned(),
                reason: format!(
                    "{len} bytes without a sparse header, too large for a descriptor (a flat extent? open its descriptor)"
                ),
            });
        }
        // At most MAX_DESCRIPTOR_FILE.
        let mut text = vec![0u8; len as usize];
        file.read_exact_at(path, &mut text, 0)?;
        let desc = parse_descriptor(path, &text)?;
        check_format(path, &desc)?;
        let mut extents = Vec::with_capacity(desc.extents.len());
        let mut start = 0u64;
        for line in &desc.extents {
            let len = extent_len(path, line, start)?;
            let data = match line.kind {
                ExtentType::Zero => ExtentData::Zero,
                ExtentType::Flat | ExtentType::Vmfs => {
                    let (file, extent_path) = open_extent(path, dir, line)?;
                    let base =
                        line.offset
                            .checked_mul(512)
                            .ok_or_else(|| VmdkError::Descriptor {
                                path: path.to_owned(),
                                line: line.line,
                                defect: format!(
                                    "extent offset {} sectors is too large",
                                    line.offset
                                ),
                            })?;
                    ExtentData::Flat(FlatExtent::new(file, &extent_path, base, len, path)?)
                }
                ExtentType::Sparse => {
                    let (file, extent_path) = open_extent(path, dir, line)?;
                    let mut magic = [0u8; 4];
                    if file.len(&extent_path)? >= 4 {
                        file.read_exact_at(&extent_path, &mut magic, 0)?;
                    }
                    if u32::from_le_bytes(magic) != sparse::MAGIC {
                        return Err(VmdkError::Corrupt {
                            path: extent_path,
                            defect: format!(
                                "no KDMV sparse header, but line {} of {} says SPARSE",
                                line.line,
                                path.display()
                            ),
                        });
                    }
                    // The extent's own embedded descriptor, if any, is
                    // superseded by the one naming it.
                    let (sparse, _) = SparseExtent::open(file, &extent_path)?;
                    if sparse.capacity() < len {
                        return Err(VmdkError::Corrupt {
                            path: extent_path,
                            defect: format!(
                                "header capacity is {} bytes, the descriptor needs {len}",
                                sparse.capacity()
                            ),
                        });
                    }
                    ExtentData::Sparse(sparse)
                }
                // check_format refused every other type.
                other => {
                    return Err(VmdkError::Unsupported {
                        path: path.to_owned(),
                        format: other.keyword().into(),
                        why: "extent type not read",
                    })
                }
            };
            extents.push(Extent { start, len, data });
            start += len;
        }
        Ok(VmdkDisk {
            name,
            size: start,
            extents,
        })
    }

    /// A `KDMV` file opened directly: one sparse extent is the disk.
    fn monolithic_sparse(path: &Path, file: Backing, name: String) -> Result<VmdkDisk, VmdkError> {
        let (sparse, embedded) = SparseExtent::open(file, path)?;
        if let Some(text) = embedded {
            let desc = parse_descriptor(path, &text)?;
            check_format(path, &desc)?;
            if desc.extents.len() != 1 || desc.extents[0].kind != ExtentType::Sparse {
                return Err(VmdkError::Corrupt {
                    path: path.to_owned(),
                    defect: format!(
                        "embedded descriptor names {} extents, not this one sparse extent",
                        desc.extents.len()
                    ),
                });
            }
        }
        let size = sparse.capacity();
        Ok(VmdkDisk {
            name,
            size,
            extents: vec![Extent {
                start: 0,
                len: size,
                data: ExtentData::Sparse(sparse),
            }],
        })
    }

    /// Index of the extent holding disk byte `offset` (< size).
    fn extent_at(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.start + e.len <= offset)
    }
}

const SNAPSHOT: &str =
    "snapshot delta disks are not read; consolidate the snapshot or protect the base disk";

fn parse_descriptor(path: &Path, text: &[u8]) -> Result<Descriptor, VmdkError> {
    descriptor::parse(text).map_err(|d| VmdkError::Descriptor {
        path: path.to_owned(),
        line: d.line,
        defect: d.what,
    })
}

/// Refuses what this reader does not read (module docs).
fn check_format(path: &Path, desc: &Descriptor) -> Result<(), VmdkError> {
    let unsupported = |format: String, why| VmdkError::Unsupported {
        path: path.to_owned(),
        format,
        why,
    };
    let ct = desc.create_type.as_str();
    const READ: [&str; 6] = [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "vmfs",
    ];
    if ct.eq_ignore_ascii_case("vmfsSparse") || ct.eq_ignore_ascii_case("seSparse") {
        return Err(unsupported(ct.to_owned(), SNAPSHOT));
    }
    if !READ.iter().any(|r| r.eq_ignore_ascii_case(ct)) {
        return Err(unsupported(
            format!("createType={ct:?}"),
            "only monolithicSparse, streamOptimized, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat and vmfs are read",
        ));
    }
    if let Some(cid) = &desc.parent_cid {
        if !cid.eq_ignore_ascii_case("ffffffff") {
            return Err(unsupported(format!("{ct} with parentCID={cid}"), SNAPSHOT));
        }
    }
    if let Some(hint) = &desc.parent_hint {
        return Err(unsupported(
            format!("{ct} with parentFileNameHint={hint:?}"),
            SNAPSHOT,
        ));
    }
    for e in &desc.extents {
        let kind = e.kind.keyword();
        match e.kind {
            ExtentType::VmfsSparse | ExtentType::SeSparse => {
                return Err(unsupported(
                    format!("{kind} extent (line {})", e.line),
                    SNAPSHOT,
                ))
            }
            ExtentType::VmfsRdm | ExtentType::VmfsRaw => {
                return Err(unsupported(
                    format!("{kind} extent (line {})", e.line),
                    "raw device mappings are not read; protect the device itself",
                ))
            }
            _ if e.no_access => {
                return Err(unsupported(
                    format!("NOACCESS extent (line {})", e.line),
                    "an extent without access cannot be read",
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Bytes of an extent line, keeping the disk within MAX_CAPACITY.
fn extent_len(path: &Path, line: &ExtentLine, start: u64) -> Result<u64, VmdkError> {
    line.sectors
        .checked_mul(512)
        .and_then(|l| Some((l, start.checked_add(l)?)))
        .filter(|&(_, end)| end <= sparse::MAX_CAPACITY)
        .map(|(l, _)| l)
        .ok_or_else(|| VmdkError::Descriptor {
            path: path.to_owned(),
            line: line.line,
            defect: format!("extents add up to more than {} bytes", sparse::MAX_CAPACITY),
        })
}

/// Opens an extent line's file, relative to the descriptor's directory.
fn open_extent(
    descriptor: &Path,
    dir: Option<&Path>,
    line: &ExtentLine,
) -> Result<(Backing, PathBuf), VmdkError> {
    // Extent lines other than ZERO always carry a file (descriptor.rs).
    let name = Path::new(line.file.as_deref().unwrap_or_default());
    let inside = name
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(VmdkError::Descriptor {
            path: descriptor.to_owned(),
            line: line.line,
            defect: format!(
                "extent file {:?} is not a relative path inside the descriptor's directory",
                name
            ),
        });
    }
    let Some(dir) = dir else {
        return Err(VmdkError::MissingExtent {
            descriptor: descriptor.to_owned(),
            extent: name.to_owned(),
            cause: std::io::Error::new(
                ErrorKind::NotFound,
                "an in-memory descriptor has no extent files",
            ),
        });
    };
    let extent = dir.join(name);
    let missing = |source| VmdkError::MissingExtent {
        descriptor: descriptor.to_owned(),
        extent: extent.clone(),
        cause: source,
    };
    // A relative name can still leave the directory through a symbolic
    // link (`evil-flat.vmdk -> /etc/passwd`, or a linked subdirectory):
    // what it resolves to must be inside the descriptor's directory too.
    // The resolved path is opened without following a link in its last
    // component, so a link swapped in meanwhile is refused, not followed.
    let resolved = extent.canonicalize().map_err(missing)?;
    let root = dir.canonicalize().map_err(missing)?;
    if !resolved.starts_with(&root) {
        return Err(VmdkError::Descriptor {
            path: descriptor.to_owned(),
            line: line.line,
            defect: format!(
                "extent file {:?} leads to {} through a symbolic link, outside the descriptor's directory {}",
                name,
                resolved.display(),
                root.display()
            ),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&resolved)
        .map_err(missing)?;
    let meta = file.metadata().map_err(missing)?;
    if !meta.is_file() {
        return Err(VmdkError::Corrupt {
            path: extent,
            defect: "extent is not a regular file".into(),
        });
    }
    Ok((Backing::File(file), extent))
}

impl DiskSource for VmdkDisk {
    fn describe(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(SourceError::ShortRead {
                    disk: self.name.clone(),
                    offset,
                    len: buf.len(),
                    size: self.size,
                })
            }
        }
        let mut done = 0usize;
        let mut index = self.extent_at(offset);
        while done < buf.len() {
            let at = offset + done as u64;
            // The bounds check above keeps `at` inside the last extent.
            let Some(e) = self.extents.get(index) else {
                break;
            };
            let rel = at - e.start;
            let n = ((e.len - rel).min((buf.len() - done) as u64)) as usize;
            let out = &mut buf[done..done + n];
            match &e.data {
                ExtentData::Zero => out.fill(0),
                ExtentData::Flat(f) => f.read(out, rel)?,
                ExtentData::Sparse(s) => s.read(out, rel, e.start)?,
            }
            done += n;
            index += 1;
        }
        Ok(())
    }

    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
        if offset >= self.size {
            return Ok(None);
        }
        for e in &self.extents[self.extent_at(offset)..] {
            let rel = offset.saturating_sub(e.start);
            let found = match &e.data {
                ExtentData::Zero => None,
                ExtentData::Flat(f) => f.next_data(rel)?,
                ExtentData::Sparse(s) => s.next_data(rel),
            };
            if let Some((s, end)) = found {
                return Ok(Some((e.start + s, e.start + end.min(e.len))));
            }
        }
        Ok(None)
    }

    fn done_with(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        for e in &self.extents[self.extent_at(offset)..] {
            if e.start >= end {
                break;
            }
            let rel = offset.saturating_sub(e.start);
            let rel_end = (end - e.start).min(e.len);
            let (file, range) = match &e.data {
                ExtentData::Zero => continue,
                ExtentData::Flat(f) => {
                    let (file, base) = f.file_range();
                    (file, Some((base + rel, base + rel_end)))
                }
                ExtentData::Sparse(s) => (s.file(), s.file_span(rel, rel_end)),
            };
            let (Backing::File(file), Some((from, to))) = (file, range) else {
                continue;
            };
            let (Ok(off), Ok(n)) = (
                libc::off_t::try_from(from),
                libc::off_t::try_from(to - from),
            ) else {
                continue;
            };
            // Only a hint: failure costs page cache, never correctness.
            let _ = posix_fadvise(
                file.as_raw_fd(),
                off,
                n,
                PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Bytes of a disk read by [`check_untrusted_image`].
pub const FUZZ_READ_LIMIT: u64 = 16 << 20;

/// The whole body of the `vmdk_parser` fuzz target, also run on the
/// committed corpus by the unit tests: parses `data` as a VMDK file and, if
/// it opens, reads up to [`FUZZ_READ_LIMIT`] bytes of it whole and in
/// pieces and walks its data extents. Errors are fine; a panic, a read
/// outside the image or an inconsistent answer is a bug, and this function
/// panics on the latter so the fuzzer reports it.
pub fn check_untrusted_image(data: &[u8]) {
    let Ok(disk) = VmdkDisk::from_bytes("fuzz-input.vmdk", data.to_vec()) else {
        return;
    };
    let size = disk.size();
    let limit = size.min(FUZZ_READ_LIMIT);
    // `limit` is at most 16 MiB.
    let mut whole = vec![0u8; limit as usize];
    let chunk: usize = 1 << 20;
    let mut readable = Vec::new();
    for (i, part) in whole.chunks_mut(chunk).enumerate() {
        readable.push(disk.read_exact_at(part, (i * chunk) as u64).is_ok());
    }
    // Reads in odd pieces see the same bytes (exercises the grain cache).
    let mut piece = vec![0u8; 3 * 512 + 7];
    let mut at = 0u64;
    while at + piece.len() as u64 <= limit.min(2 << 20) {
        let ok = readable[at as usize / chunk] && readable[(at as usize + piece.len() - 1) / chunk];
        if disk.read_exact_at(&mut piece, at).is_ok() && ok {
            assert!(
                piece[..] == whole[at as usize..at as usize + piece.len()],
                "piece at {at}"
            );
        }
        at += piece.len() as u64;
    }
    // Data extents are ordered, inside the disk, and everything outside
    // them reads as zeros.
    let assert_zeros = |from: u64, to: u64| {
        let (from, to) = (from.min(limit) as usize, to.min(limit) as usize);
        for at in (from..to).step_by(4096) {
            let end = ((at / chunk + 1) * chunk).min(at + 4096).min(to);
            if readable[at / chunk] {
                assert!(whole[at..end].iter().all(|&b| b == 0), "hole at {at}");
            }
        }
    };
    let mut off = 0u64;
    let mut steps = 0;
    loop {
        match disk.next_data(off) {
            Ok(Some((start, end))) => {
                assert!(
                    start >= off && end > start && end <= size,
                    "{off}: {start}..{end}"
                );
                assert_zeros(off, start);
                off = end;
            }
            Ok(None) => {
                assert_zeros(off, size);
                break;
            }
            Err(_) => break,
        }
        steps += 1;
        if steps > 100_000 {
            break;
        }
    }
    let mut one = [0u8; 1];
    assert!(disk.read_exact_at(&mut one, size).is_err());
    assert!(disk.read_exact_at(&mut one, u64::MAX).is_err());
}
