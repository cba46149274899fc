//! Raw disks: image files and block devices read directly.
//!
//! This is the source for a physical host's disks (`/dev/sda`, LVM volumes)
//! and for raw image files. It is opened read-only and read with `pread`, so
//! the scan's reader threads share one descriptor without a cursor. For
//! image files, `SEEK_DATA`/`SEEK_HOLE` tell the scan where the holes are so
//! it skips them without reading; block devices report everything as data.
//!
//! A full scan reads the whole disk once and should not evict the protected
//! machine's working set from the page cache. Two ways to avoid it:
//! * [`ReadMode::Direct`] (`[sync] direct_io`): the disk is opened with
//!   `O_DIRECT`, reads go from the device into the caller's buffer and never
//!   enter the page cache. `O_DIRECT` wants the buffer address, the offset
//!   and the length aligned to the logical block size; aligned reads (the
//!   scan pipeline's [`AlignedBuf`](super::aligned::AlignedBuf) batches)
//!   go straight through, any other read (the tail of a disk whose size is
//!   not a multiple of 4096, an extent boundary inside a block) reads the
//!   aligned superset into an aligned bounce buffer and copies the part
//!   asked for. A file system that refuses `O_DIRECT` (`EINVAL` at open or
//!   on the first read: tmpfs before Linux 6.6, some FUSE file systems)
//!   gets buffered reads and a warning.
//! * In buffered mode, after a batch is hashed,
//!   `posix_fadvise(POSIX_FADV_DONTNEED)` drops it from the page cache
//!   (`[sync] drop_page_cache`): after the fact, and it also drops pages the
//!   workload had cached itself.
//!
//! Failback opens the same kind of disk for writing
//! ([`RawDisk::open_writable`]): block devices with `O_EXCL`, which the
//! kernel refuses while the device is mounted or held by another exclusive
//! user, so that a mounted target is found before anything is written.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};

use super::aligned::{is_direct_aligned, AlignedBuf, DIRECT_ALIGN};
use super::{DiskSource, SourceError};

/// How a [`RawDisk`] is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Through the page cache (`pread` on a plain descriptor).
    #[default]
    Buffered,
    /// `O_DIRECT`: around the page cache, falling back to buffered reads
    /// where the file system refuses it.
    Direct,
}

// BLKGETSIZE64 is _IOR(0x12, 114, size_t) in <linux/fs.h> although the
// kernel writes a u64: the request code must use size_t's width, the
// argument is a u64 on every architecture.
nix::ioctl_read_bad!(
    blkgetsize64,
    nix::request_code_read!(0x12, 114, std::mem::size_of::<libc::size_t>()),
    u64
);

/// A raw image file or block device, opened read-only.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    name: String,
    size: u64,
    block_device: bool,
    /// Opened with `O_DIRECT`: reads must be aligned (see the module doc).
    direct: bool,
}

impl RawDisk {
    /// Opens `path` read-only. A regular file's size comes from its
    /// metadata, a block device's from the `BLKGETSIZE64` ioctl; any other
    /// kind of file is refused.
    pub fn open(path: &Path) -> Result<RawDisk, SourceError> {
        let file = File::open(path).map_err(|source| SourceError::Open {
            path: path.to_path_buf(),
            cause: source,
        })?;
        RawDisk::from_file(path, file)
    }

    /// Opens `path` read-only in `mode`. In [`ReadMode::Direct`], a file
    /// system that refuses `O_DIRECT` (at open, or on a first aligned read)
    /// gets a buffered descriptor and a warning; [`RawDisk::is_direct`] says
    /// which one the disk has.
    pub fn open_with(path: &Path, mode: ReadMode) -> Result<RawDisk, SourceError> {
        use std::os::unix::fs::OpenOptionsExt;
        if mode == ReadMode::Buffered {
            return RawDisk::open(path);
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    disk = %path.display(),
                    "file system refuses O_DIRECT; reading through the page cache"
                );
                return RawDisk::open(path);
            }
            Err(source) => {
                return Err(SourceError::Open {
                    path: path.to_path_buf(),
                    cause: source,
                })
            }
        };
        let mut disk = RawDisk::from_file(path, file)?;
        disk.direct = true;
        // Some file systems accept the flag at open and refuse the reads.
        if disk.size >= DIRECT_ALIGN as u64 {
            let mut probe = AlignedBuf::zeroed(DIRECT_ALIGN);
            if let Err(e) = disk.file.read_at(&mut probe, 0) {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    tracing::warn!(
                        disk = %path.display(),
                        "file system refuses O_DIRECT reads; reading through the page cache"
                    );
                    return RawDisk::open(path);
                }
            }
        }
        Ok(disk)
    }

    /// Whether reads bypass the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Opens `path` for reading and writing (a failback target). A block
    /// device is opened with `O_EXCL` unless `shared`: the open then fails
    /// with `EBUSY` while the device is mounted, part of an LVM, RAID or
    /// device-mapper stack, or used as swap.
    pub fn open_writable(path: &Path, shared: bool) -> Result<RawDisk, SourceError> {
        use std::os::unix::fs::OpenOptionsExt;
        let is_block = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true);
        if is_block && !shared {
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(path).map_err(|source| SourceError::Open {
            path: path.to_path_buf(),
            cause: source,
        })?;
        RawDisk::from_file(path, file)
    }

    fn from_file(path: &Path, file: File) -> Result<RawDisk, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_path_buf(),
            cause: source,
        };
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let (size, block_device) = if ft.is_file() {
            (meta.len(), false)
        } else if ft.is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: the descriptor is open for the duration of the call and
            // `size` is a valid u64 the kernel writes the device size into.
            unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(|e| {
                SourceError::Size {
                    path: path.to_path_buf(),
                    cause: e.into(),
                }
            })?;
            (size, true)
        } else {
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else {
                "special file"
            };
            return Err(SourceError::NotADisk {
                path: path.to_path_buf(),
                kind,
            });
        };
        Ok(RawDisk {
            file,
            name: path.display().to_string(),
            size,
            block_device,
            direct: false,
        })
    }

    /// `O_DIRECT` read of `buf.len()` bytes at `offset`, which the caller
    /// has checked lie within the disk. Aligned requests are read in place;
    /// others through an aligned bounce buffer covering the aligned superset
    /// (which may end past the end of the disk: the kernel then returns
    /// fewer bytes, never fewer than were asked for).
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if is_direct_aligned(buf.as_ptr(), offset, buf.len()) {
            return self.file.read_exact_at(buf, offset);
        }
        let align = DIRECT_ALIGN as u64;
        let start = offset - offset % align;
        let end = offset + buf.len() as u64;
        let aligned_end = end.div_ceil(align) * align;
        // Bounded by the caller's buffer plus two alignment units.
        let mut bounce = AlignedBuf::zeroed((aligned_end - start) as usize);
        let need = (end - start) as usize;
        let mut got = 0;
        while got < need {
            match self.file.read_at(&mut bounce[got..], start + got as u64) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// A second descriptor of the same file, for reading and writing
    /// around the page cache (`O_DIRECT`, opened through `/proc/self/fd` so
    /// it is the same inode even if the path changed); `None` where the file
    /// system refuses `O_DIRECT`. Failback writes and re-reads through it.
    /// Its reads accept any alignment (see the module doc); its writes must
    /// be aligned.
    pub fn reopen_direct(&self) -> Option<RawDisk> {
        use std::os::unix::fs::OpenOptionsExt;
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(proc_path)
            .ok()?;
        let mut disk = RawDisk::from_file(Path::new(&self.name), file).ok()?;
        disk.direct = true;
        // Some file systems accept the flag at open and refuse the I/O.
        if disk.size >= DIRECT_ALIGN as u64 {
            let mut probe = AlignedBuf::zeroed(DIRECT_ALIGN);
            disk.file.read_at(&mut probe, 0).ok()?;
        }
        Some(disk)
    }

    /// Whether this is a block device (rather than an image file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The open file (for metadata and writes by failback).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl DiskSource for RawDisk {
    fn describe(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        let len = buf.len();
        let short = || SourceError::ShortRead {
            disk: self.name.clone(),
            offset,
            len,
            size: self.size,
        };
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => {}
            _ => return Err(short()),
        }
        let read = if self.direct {
            self.read_direct(buf, offset)
        } else {
            self.file.read_exact_at(buf, offset)
        };
        match read {
            Ok(()) => Ok(()),
            // The file shrank since it was opened.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(short()),
            Err(source) => Err(SourceError::Read {
                disk: self.name.clone(),
                offset,
                cause: source,
            }),
        }
    }

    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
        if offset >= self.size {
            return Ok(None);
        }
        if self.block_device {
            return Ok(Some((offset, self.size)));
        }
        let fd = self.file.as_raw_fd();
        let err = |e: Errno| SourceError::Extents {
            disk: self.name.clone(),
            offset,
            cause: e.into(),
        };
        // The size bound above keeps `offset` within the file, and file sizes
        // fit in off_t.
        let start = match lseek(fd, offset as libc::off_t, Whence::SeekData) {
            Ok(start) => start as u64,
            // No data at or after offset.
            Err(Errno::ENXIO) => return Ok(None),
            // The filesystem cannot tell: everything may be data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(Some((offset, self.size))),
            Err(e) => return Err(err(e)),
        };
        if start >= self.size {
            // Data appended after open is not part of this disk.
            return Ok(None);
        }
        let end = match lseek(fd, start as libc::off_t, Whence::SeekHole) {
            Ok(end) => (end as u64).min(self.size),
            // Truncated between the two calls: the rest reads as a short read.
            Err(Errno::ENXIO) => self.size,
            Err(e) => return Err(err(e)),
        };
        Ok(Some((start, end.max(start + 1).min(self.size))))
    }

    fn done_with(&self, offset: u64, len: u64) {
        if self.direct {
            return; // nothing of it entered the page cache
        }
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // Only a hint: failure costs page cache, never correctness.
        let _ = posix_fadvise(
            self.file.as_raw_fd(),
            off,
            len,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::process::Command;

    const MIB: u64 = 1024 * 1024;

    fn extents(disk: &RawDisk) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut off = 0;
        while let Some((start, end)) = disk.next_data(off).unwrap() {
            assert!(start >= off && end > start && end <= disk.size());
            out.push((start, end));
            off = end;
        }
        out
    }

    /// Whether `dir` is on tmpfs (always cached; refused O_DIRECT before
    /// Linux 6.6).
    fn on_tmpfs(dir: &Path) -> bool {
        nix::sys::statfs::statfs(dir)
            .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
            .unwrap_or(false)
    }

    /// A file of `len` bytes of a pattern no two pages share.
    fn patterned(dir: &Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = dir.join("disk.img");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    #[test]
    fn direct_reads_match_the_file_at_any_alignment_and_at_the_tail() {
        // On a disk-backed file system: /tmp may be tmpfs.
        let Some(base) = [std::env::temp_dir(), "/var/tmp".into()]
            .into_iter()
            .find(|d| d.is_dir() && !on_tmpfs(d))
        else {
            eprintln!("no disk-backed temporary directory; nothing to check");
            return;
        };
        let dir = tempfile::tempdir_in(base).unwrap();
        let len = 5 * 4096 + 123;
        let (path, data) = patterned(dir.path(), len);
        let disk = RawDisk::open_with(&path, ReadMode::Direct).unwrap();
        if !on_tmpfs(dir.path()) {
            assert!(
                disk.is_direct(),
                "a disk-backed file system refused O_DIRECT"
            );
        }
        assert_eq!(disk.size(), len as u64);
        let cases = [
            (0, 4096),        // aligned: in place
            (4096, 2 * 4096), // aligned
            (100, 5000),      // unaligned start and length
            (8192, 17),       // short
            (4 * 4096, 4219), // the partial last page
            (len as u64 - 1, 1),
            (0, len), // everything
        ];
        for (offset, n) in cases {
            let want = &data[offset as usize..offset as usize + n];
            let mut aligned = AlignedBuf::zeroed(n);
            disk.read_exact_at(&mut aligned, offset).unwrap();
            assert_eq!(&aligned[..], want, "aligned buffer, {n} bytes at {offset}");
            // A buffer at an odd address takes the bounce path.
            let mut odd = vec![0u8; n + 1];
            disk.read_exact_at(&mut odd[1..], offset).unwrap();
            assert_eq!(&odd[1..], want, "odd buffer, {n} bytes at {offset}");
        }
        let mut past = AlignedBuf::zeroed(4096);
        assert!(matches!(
            disk.read_exact_at(&mut past, 5 * 4096),
            Err(SourceError::ShortRead { .. })
        ));
    }

    #[test]
    fn direct_mode_reads_correctly_on_tmpfs() {
        // tmpfs refused O_DIRECT before Linux 6.6 (the fallback path) and
        // accepts it since; either way the bytes must be right.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() || !on_tmpfs(shm) {
            eprintln!("no tmpfs at /dev/shm; nothing to check");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let (path, data) = patterned(dir.path(), 3 * 4096 + 5);
        let disk = RawDisk::open_with(&path, ReadMode::Direct).unwrap();
        let mut buf = vec![0u8; data.len()];
        disk.read_exact_at(&mut buf, 1).unwrap_err();
        disk.read_exact_at(&mut buf[1..], 1).unwrap();
        assert_eq!(&buf[1..], &data[1..]);
    }

    #[test]
    fn sparse_file_extents_cover_data_and_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(8 * MIB).unwrap();
        let written = [(0, 4096), (3 * MIB, 64 * 1024), (8 * MIB - 4096, 4096)];
        for (off, len) in written {
            f.write_all_at(&vec![0xa5; len as usize], off).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);

        let disk = RawDisk::open(&path).unwrap();
        assert_eq!(disk.size(), 8 * MIB);
        assert!(!disk.is_block_device());
        let ext = extents(&disk);
        for (off, len) in written {
            assert!(
                ext.iter().any(|&(s, e)| s <= off && off + len <= e),
                "{off}+{len} not covered by {ext:?}"
            );
        }
        for hole in [(MIB, 2 * MIB), (5 * MIB, 6 * MIB)] {
            assert!(
                !ext.iter().any(|&(s, e)| s <= hole.0 && hole.1 <= e),
                "hole {hole:?} covered by {ext:?}"
            );
        }
        assert_eq!(disk.next_data(8 * MIB).unwrap(), None);

        let mut buf = [0u8; 8];
        disk.read_exact_at(&mut buf, 3 * MIB).unwrap();
        assert_eq!(buf, [0xa5; 8]);
        disk.read_exact_at(&mut buf, MIB).unwrap();
        assert_eq!(buf, [0; 8]);
        disk.done_with(0, 8 * MIB);
    }

    #[test]
    fn trailing_hole_is_reported_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tail.img");
        let f = File::create(&path).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        f.set_len(4 * MIB).unwrap();
        drop(f);
        let disk = RawDisk::open(&path).unwrap();
        let (start, end) = disk.next_data(0).unwrap().unwrap();
        assert_eq!(start, 0);
        assert!((4096..4 * MIB).contains(&end), "{end}");
        assert_eq!(disk.next_data(2 * MIB).unwrap(), None);
    }

    #[test]
    fn read_past_end_names_disk_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.img");
        std::fs::write(&path, [7u8; 1000]).unwrap();
        let disk = RawDisk::open(&path).unwrap();
        let mut buf = [0u8; 100];
        disk.read_exact_at(&mut buf, 900).unwrap();
        let err = disk.read_exact_at(&mut buf, 950).unwrap_err();
        assert!(matches!(err, SourceError::ShortRead { offset: 950, .. }));
        let msg = err.to_string();
        assert!(msg.contains("small.img") && msg.contains("950"), "{msg}");
        assert!(disk.read_exact_at(&mut buf, u64::MAX - 10).is_err());
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = RawDisk::open(dir.path()).unwrap_err();
        assert!(matches!(
            err,
            SourceError::NotADisk {
                kind: "directory",
                ..
            }
        ));
        let missing = dir.path().join("missing.img");
        let err = RawDisk::open(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.img"), "{err}");
        let err = RawDisk::open(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(
            err,
            SourceError::NotADisk {
                kind: "character device",
                ..
            }
        ));
    }

    /// Detaches the loop device when dropped, whatever the test's outcome.
    struct LoopDevice(String);

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup")
                .arg("--detach")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn loop_device_size_and_contents() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loop devices need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loop.img");
        let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let out = match Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(&path)
            .output()
        {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                eprintln!(
                    "skipped: losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return;
            }
            Err(e) => {
                eprintln!("skipped: no losetup: {e}");
                return;
            }
        };
        let device = LoopDevice(String::from_utf8_lossy(&out.stdout).trim().to_string());

        let disk = RawDisk::open(Path::new(&device.0)).unwrap();
        assert!(disk.is_block_device());
        assert_eq!(disk.size(), 16 * MIB);
        assert_eq!(disk.describe(), device.0);
        assert_eq!(disk.next_data(MIB).unwrap(), Some((MIB, 16 * MIB)));
        assert_eq!(disk.next_data(16 * MIB).unwrap(), None);
        let mut buf = vec![0u8; MIB as usize];
        for off in [0, 7 * MIB, 15 * MIB] {
            disk.read_exact_at(&mut buf, off).unwrap();
            assert!(buf == data[off as usize..(off + MIB) as usize], "at {off}");
        }
        assert!(disk.read_exact_at(&mut buf, 15 * MIB + 1).is_err());
    }
}
