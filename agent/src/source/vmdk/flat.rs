//! Flat extents: `monolithicFlat`, `twoGbMaxExtentFlat` and ESXi's `vmfs`
//! (`-flat.vmdk`) files.
//!
//! A flat extent is the disk's bytes as they are, from a sector offset of
//! its file (the descriptor's optional last field, 0 for the files qemu and
//! ESXi write). It is read with `pread` at raw-file speed; where data may be
//! comes from `SEEK_DATA`/`SEEK_HOLE` on the file, as for raw images.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::{Backing, VmdkError};

/// A range of a file read as one extent of the disk.
pub(super) struct FlatExtent {
    file: Backing,
    path: PathBuf,
    /// Byte offset of the extent in the file.
    base: u64,
    /// Length of the extent in bytes.
    len: u64,
}

impl FlatExtent {
    /// The `len` bytes at byte `base` of `file`, which must hold them all.
    /// `descriptor` is the file that placed it, for the error message.
    pub(super) fn new(
        file: Backing,
        path: &Path,
        base: u64,
        len: u64,
        descriptor: &Path,
    ) -> Result<FlatExtent, VmdkError> {
        let file_len = file.len(path)?;
        match base.checked_add(len) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(VmdkError::Corrupt {
                    path: path.to_owned(),
                    defect: format!(
                        "flat extent file is {file_len} bytes, the descriptor {} places {len} bytes at byte {base}",
                        descriptor.display()
                    ),
                });
            }
        }
        Ok(FlatExtent {
            file,
            path: path.to_owned(),
            base,
            len,
        })
    }

    /// Fills `buf` from extent-relative `offset` (kept inside by the caller).
    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), VmdkError> {
        self.file.read_exact_at(&self.path, buf, self.base + offset)
    }

    /// The next range at or after extent-relative `offset` that may hold
    /// data, from the file's own holes.
    pub(super) fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, VmdkError> {
        if offset >= self.len {
            return Ok(None);
        }
        let Backing::File(file) = &self.file else {
            return Ok(Some((offset, self.len)));
        };
        let fd = file.as_raw_fd();
        let at = self.base + offset;
        let err = |e: Errno| VmdkError::Read {
            path: self.path.clone(),
            offset: at,
            cause: e.into(),
        };
        // Offsets are inside the file, whose size fits in off_t.
        let start = match lseek(fd, at as libc::off_t, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => return Ok(None),
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(Some((offset, self.len))),
            Err(e) => return Err(err(e)),
        };
        if start >= self.base + self.len {
            return Ok(None);
        }
        let end = match lseek(fd, start as libc::off_t, Whence::SeekHole) {
            Ok(e) => (e as u64).min(self.base + self.len),
            Err(Errno::ENXIO) => self.base + self.len,
            Err(e) => return Err(err(e)),
        };
        let (start, end) = (start - self.base, end - self.base);
        Ok(Some((start, end.max(start + 1).min(self.len))))
    }

    /// The file and the extent's byte offset in it, for page-cache hints.
    pub(super) fn file_range(&self) -> (&Backing, u64) {
        (&self.file, self.base)
    }
}
