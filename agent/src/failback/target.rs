//! Failback targets: disks the agent writes recovery points into.
//!
//! A target is a [`DiskSource`] that can also be written: the pass reads it
//! (to describe it, and to re-read what it wrote) through the same code the
//! sync engine reads protected disks with. Raw image files and block
//! devices are written with `pwrite`; NBD exports (a `qemu-nbd`-served VMDK
//! or qcow2 standing in for a new VM's disk) with `NBD_CMD_WRITE`. VMDK
//! files are not written directly: their grain tables belong to whoever
//! serves them.

use std::os::unix::io::AsRawFd;
use std::path::Path;

use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};

use crate::source::aligned::is_direct_aligned;
use crate::source::{is_nbd_uri, DiskSource, NbdDisk, RawDisk, SourceError};

/// A disk a failback pass may write.
pub trait WritableDisk: DiskSource {
    /// Writes `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), SourceError>;

    /// Makes `[offset, offset + len)` read as zeros (a hole where the
    /// target can keep one).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), SourceError>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), SourceError>;

    /// After a flush: drop cached copies of `[offset, offset + len)` so that
    /// the verifying re-read comes from the target, not from memory.
    fn forget_cached(&self, _offset: u64, _len: u64) {}

    /// Starts writing `[offset, offset + len)` back to the device without
    /// waiting, so that the flush that follows has less left to do.
    fn start_writeback(&self, _offset: u64, _len: u64) {}

    /// `O_DIRECT` access to the same target (raw files and devices whose
    /// file system allows it); `None`: everything goes through this handle.
    fn direct(&self) -> Option<DirectIo> {
        None
    }

    /// Whether this target can tell if it is mounted or in use.
    fn is_block_device(&self) -> bool {
        false
    }
}

/// A raw target's second descriptor, opened with `O_DIRECT`: aligned
/// writes go from the caller's buffer to the device without a copy into
/// the page cache, and re-reads come from the device.
pub struct DirectIo(RawDisk);

impl DirectIo {
    /// Writes `buf` at `offset` around the page cache when the buffer's
    /// address, the offset and the length are aligned
    /// ([`is_direct_aligned`]); `Ok(false)` when not, or when the file
    /// system refuses the direct write (`EINVAL`), so that the caller
    /// writes through the page cache instead.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<bool, SourceError> {
        use std::os::unix::fs::FileExt;
        if !is_direct_aligned(buf.as_ptr(), offset, buf.len()) {
            return Ok(false);
        }
        match self.0.file().write_all_at(buf, offset) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(write_err(self.0.describe(), offset, e)),
        }
    }

    /// Reads from the device (any alignment: unaligned reads go through a
    /// bounce buffer).
    pub fn reader(&self) -> &dyn DiskSource {
        &self.0
    }
}

/// Opens the target at `location` for writing. `shared` lifts the
/// exclusive open of block devices (a forced pass into a device in use).
pub fn open_target(location: &Path, shared: bool) -> Result<Box<dyn WritableDisk>, SourceError> {
    let text = location.to_string_lossy();
    if is_nbd_uri(&text) {
        return Ok(Box::new(NbdDisk::connect_writable(&text)?));
    }
    Ok(Box::new(RawDisk::open_writable(location, shared)?))
}

fn write_err(disk: &str, offset: u64, source: std::io::Error) -> SourceError {
    SourceError::Write {
        disk: disk.to_owned(),
        offset,
        cause: source,
    }
}

// BLKZEROOUT is _IO(0x12, 127): zero a byte range [start, start + len) of a
// block device, letting the device use its fastest way.
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

impl WritableDisk for RawDisk {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), SourceError> {
        use std::os::unix::fs::FileExt;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size())
        {
            return Err(SourceError::ShortRead {
                disk: self.describe().to_owned(),
                offset,
                len: buf.len(),
                size: self.size(),
            });
        }
        self.file()
            .write_all_at(buf, offset)
            .map_err(|e| write_err(self.describe(), offset, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        let fd = self.file().as_raw_fd();
        if RawDisk::is_block_device(self) {
            let range = [offset, len];
            // SAFETY: the descriptor is open and `range` outlives the call.
            if unsafe { blkzeroout(fd, &range) }.is_ok() {
                return Ok(());
            }
        } else if let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) {
            // A hole reads as zeros and keeps the image sparse.
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if fallocate(fd, flags, off, l).is_ok() {
                return Ok(());
            }
        }
        // The file system or device cannot: write zeros.
        let zeros = vec![0u8; len.min(4 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), SourceError> {
        self.file()
            .sync_data()
            .map_err(|e| write_err(self.describe(), 0, e))
    }

    fn forget_cached(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // Clean pages (after the flush) are dropped; failure only means the
        // re-read may come from memory.
        let _ = posix_fadvise(
            self.file().as_raw_fd(),
            off,
            len,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor is open; the call only schedules writeback
        // of the range. Failure only means the flush does all the work.
        unsafe {
            libc::sync_file_range(
                self.file().as_raw_fd(),
                off,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn direct(&self) -> Option<DirectIo> {
        self.reopen_direct().map(DirectIo)
    }

    fn is_block_device(&self) -> bool {
        RawDisk::is_block_device(self)
    }
}

impl WritableDisk for NbdDisk {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), SourceError> {
        Ok(self.write_at(buf, offset)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        Ok(NbdDisk::write_zeroes(self, offset, len)?)
    }

    fn flush(&self) -> Result<(), SourceError> {
        Ok(NbdDisk::flush(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::AlignedBuf;

    #[test]
    fn direct_writes_take_aligned_runs_and_leave_the_rest_to_the_page_cache() {
        // tempfile's default directory may be a tmpfs that refuses O_DIRECT;
        // the working directory of `cargo test` is on a disk.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("t.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 * 1024)
            .unwrap();
        let disk = RawDisk::open_writable(&path, false).unwrap();
        let Some(direct) = WritableDisk::direct(&disk) else {
            eprintln!("this file system refuses O_DIRECT; nothing to test");
            return;
        };
        let mut buf = AlignedBuf::zeroed(8192);
        buf.fill(0x5a);
        assert!(direct.write_at(&buf, 4096).unwrap(), "aligned: written");
        assert!(!direct.write_at(&buf[..100], 4096).unwrap(), "short length");
        assert!(
            !direct.write_at(&buf[1..4097], 0).unwrap(),
            "unaligned address"
        );
        assert!(
            !direct.write_at(&buf[..4096], 100).unwrap(),
            "unaligned offset"
        );
        let mut back = vec![0u8; 3 * 4096];
        direct.reader().read_exact_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 0));
        assert!(back[4096..].iter().all(|&x| x == 0x5a));
    }
}
