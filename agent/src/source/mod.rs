//! Disk sources: everything the sync engine reads a protected disk from.
//!
//! The data path starts here. A scan asks a [`DiskSource`] where data may be
//! ([`DiskSource::next_data`], so holes of sparse images are skipped without
//! reading them), reads those extents in large batches with
//! [`DiskSource::read_exact_at`] from several threads, hashes every block and
//! compares it with the block map (`tracking`). Once a batch is hashed, the
//! engine tells the source with [`DiskSource::done_with`] so that a scan of a
//! whole disk does not push the machine's working set out of the page cache.
//!
//! Implementations: [`raw::RawDisk`] (raw image files and block devices),
//! [`vmdk::VmdkDisk`] (VMDK exports, every layout ESXi and OVA exports use),
//! and [`nbd::NbdDisk`] (NBD exports, with block status). [`open`] picks one
//! from the disk's configured location.

use std::path::{Path, PathBuf};

pub mod aligned;
pub mod nbd;
pub mod raw;
pub mod vmdk;

pub use aligned::AlignedBuf;
pub use nbd::NbdDisk;
pub use raw::{RawDisk, ReadMode};
pub use vmdk::VmdkDisk;

/// Whether a configured disk location is an NBD URI rather than a path.
pub fn is_nbd_uri(location: &str) -> bool {
    location.starts_with("nbd://") || location.starts_with("nbd+unix://")
}

/// Opens the disk at `location`: an `nbd://` or `nbd+unix://` URI, a
/// `.vmdk` file, or else a raw image file or block device.
pub fn open(location: &Path) -> Result<Box<dyn DiskSource>, SourceError> {
    open_with(location, ReadMode::Buffered)
}

/// [`open`], with raw files and block devices read in `mode` (`O_DIRECT`
/// or through the page cache); NBD and VMDK sources ignore it.
pub fn open_with(location: &Path, mode: ReadMode) -> Result<Box<dyn DiskSource>, SourceError> {
    let text = location.to_string_lossy();
    if is_nbd_uri(&text) {
        return Ok(Box::new(NbdDisk::connect(&text)?));
    }
    let is_vmdk = location
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"));
    if is_vmdk {
        return Ok(Box::new(VmdkDisk::open(location)?));
    }
    Ok(Box::new(RawDisk::open_with(location, mode)?))
}

/// A readable disk of fixed size.
///
/// Implementations are shared between reader threads: every method takes
/// `&self` and reads at explicit offsets (no shared cursor).
pub trait DiskSource: Send + Sync {
    /// Path or URI of the disk, for error messages and logs.
    fn describe(&self) -> &str;

    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`. Reading past the end of the
    /// disk is an error that names the disk and the offset.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError>;

    /// The next extent `[start, end)` at or after `offset` that may hold
    /// data; `None` when only holes remain. Sources that cannot tell return
    /// `Some((offset, size))`.
    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError>;

    /// Hint that `[offset, offset + len)` will not be read again (page
    /// cache). Default: no-op.
    fn done_with(&self, _offset: u64, _len: u64) {}
}

/// Why a disk could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The disk could not be opened or inspected.
    #[error("cannot open disk {}: {cause}", path.display())]
    Open {
        /// The disk's path.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{} is a {kind}, not a disk image or block device", path.display())]
    NotADisk {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The size of a block device could not be read.
    #[error("cannot get the size of block device {}: {cause}", path.display())]
    Size {
        /// The device.
        path: PathBuf,
        /// The ioctl's error.
        cause: std::io::Error,
    },
    /// A read failed.
    #[error("read error on disk {disk} at offset {offset}: {cause}")]
    Read {
        /// The disk.
        disk: String,
        /// Byte offset of the read.
        offset: u64,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A read reached past the end of the disk, or the disk shrank under it.
    #[error(
        "short read on disk {disk} at offset {offset}: {len} bytes requested, disk size {size}"
    )]
    ShortRead {
        /// The disk.
        disk: String,
        /// Byte offset of the read.
        offset: u64,
        /// Bytes requested.
        len: usize,
        /// Size of the disk when opened.
        size: u64,
    },
    /// A write failed (failback targets).
    #[error("write error on disk {disk} at offset {offset}: {cause}")]
    Write {
        /// The disk.
        disk: String,
        /// Byte offset of the write.
        offset: u64,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A VMDK file or its descriptor is unusable (the message names the file
    /// and the defect).
    #[error(transparent)]
    Vmdk(#[from] vmdk::VmdkError),
    /// An NBD export could not be reached or misbehaved.
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    /// Finding data extents (SEEK_DATA / SEEK_HOLE) failed.
    #[error("cannot find data extents of disk {disk} at offset {offset}: {cause}")]
    Extents {
        /// The disk.
        disk: String,
        /// Byte offset of the query.
        offset: u64,
        /// The underlying error.
        cause: std::io::Error,
    },
}
