//! What the kernel says about a protected block device: its whole disk (the
//! key the program files writes under), where it starts in that disk, its
//! size and the disk's diskseq, all read from sysfs.
//!
//! `stat(device).st_rdev` names `/sys/dev/block/MAJ:MIN`. A partition's
//! directory has a `partition` file and `start` (in sectors); its whole
//! disk is the parent directory. `size` is in 512-byte sectors whatever the
//! logical block size. `diskseq` (kernel 5.15 and later) is the disk's
//! sequence number, which changes when another medium appears behind the
//! same device (a loop device attached to another file).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::error::{io_err, TrackerError};

/// The kernel's `MINORBITS`: a `dev_t` inside the kernel is
/// `major << 20 | minor`.
const MINOR_BITS: u32 = 20;

/// A protected block device and its whole disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// The path the device was given as.
    pub path: PathBuf,
    /// The device's `(major, minor)`.
    pub dev: (u32, u32),
    /// The whole disk's kernel name (`loop3`).
    pub disk_name: String,
    /// The whole disk's `(major, first minor)`.
    pub disk_dev: (u32, u32),
    /// First sector of the device in its disk (0 for a whole disk).
    pub start_sector: u64,
    /// Sectors in the device.
    pub sectors: u64,
    /// Sectors in the whole disk.
    pub disk_sectors: u64,
    /// The disk's diskseq (0 when the kernel has none).
    pub diskseq: u64,
}

impl BlockDevice {
    /// Resolves `path` through `/sys/dev/block`.
    pub fn resolve(path: &Path) -> Result<BlockDevice, TrackerError> {
        let meta = fs::metadata(path).map_err(io_err("stat", path))?;
        if !meta.file_type().is_block_device() {
            return Err(TrackerError::NotABlockDevice {
                device: path.to_path_buf(),
            });
        }
        let rdev = meta.rdev();
        let dev = (libc::major(rdev), libc::minor(rdev));
        let link = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
        let dir = fs::canonicalize(&link).map_err(io_err("resolve", &link))?;
        let (disk_dir, start_sector) = if dir.join("partition").exists() {
            let start = read_u64(path, &dir.join("start"))?;
            let parent = dir.parent().ok_or_else(|| TrackerError::Sysfs {
                device: path.to_path_buf(),
                file: dir.clone(),
                reason: "a partition without a parent disk".into(),
            })?;
            (parent.to_path_buf(), start)
        } else {
            (dir.clone(), 0)
        };
        let sectors = read_u64(path, &dir.join("size"))?;
        let disk_sectors = read_u64(path, &disk_dir.join("size"))?;
        let disk_dev = read_dev(path, &disk_dir.join("dev"))?;
        let diskseq = read_diskseq(path, &disk_dir)?;
        let disk_name = disk_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let fits = matches!(start_sector.checked_add(sectors), Some(end) if end <= disk_sectors);
        if !fits {
            return Err(TrackerError::Sysfs {
                device: path.to_path_buf(),
                file: dir.join("start"),
                reason: format!(
                    "partition [{start_sector}, +{sectors}) lies outside its disk of {disk_sectors} sectors"
                ),
            });
        }
        Ok(BlockDevice {
            path: path.to_path_buf(),
            dev,
            disk_name,
            disk_dev,
            start_sector,
            sectors,
            disk_sectors,
            diskseq,
        })
    }

    /// The whole disk's `dev_t` in the kernel's encoding: the program's key.
    pub fn disk_key(&self) -> u32 {
        kernel_dev(self.disk_dev)
    }

    /// The device's own `dev_t` in the kernel's encoding.
    pub fn device_key(&self) -> u32 {
        kernel_dev(self.dev)
    }

    /// The disk's diskseq now (`None` when the disk is gone).
    pub fn current_diskseq(&self) -> Option<u64> {
        let dir = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            self.disk_dev.0, self.disk_dev.1
        ));
        read_diskseq(&self.path, &dir).ok()
    }
}

/// `major << 20 | minor`, the kernel's `MKDEV`. Majors fit 12 bits and
/// minors 20 (the kernel's own limits), so nothing is lost.
pub fn kernel_dev((major, minor): (u32, u32)) -> u32 {
    (major << MINOR_BITS) | (minor & ((1 << MINOR_BITS) - 1))
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Result<String, TrackerError> {
    let path = Path::new("/proc/sys/kernel/random/boot_id");
    let s = fs::read_to_string(path).map_err(io_err("read", path))?;
    Ok(s.trim().to_string())
}

fn read_trimmed(device: &Path, file: &Path) -> Result<String, TrackerError> {
    let s = fs::read_to_string(file).map_err(io_err("read", file))?;
    if s.len() > 64 {
        return Err(TrackerError::Sysfs {
            device: device.to_path_buf(),
            file: file.to_path_buf(),
            reason: format!("{} bytes where a number was expected", s.len()),
        });
    }
    Ok(s.trim().to_string())
}

fn read_u64(device: &Path, file: &Path) -> Result<u64, TrackerError> {
    let s = read_trimmed(device, file)?;
    s.parse().map_err(|_| TrackerError::Sysfs {
        device: device.to_path_buf(),
        file: file.to_path_buf(),
        reason: format!("{s:?} is not a number"),
    })
}

/// `0` when the kernel has no diskseq (before 5.15).
fn read_diskseq(device: &Path, disk_dir: &Path) -> Result<u64, TrackerError> {
    let file = disk_dir.join("diskseq");
    if !disk_dir.exists() {
        return Err(TrackerError::Sysfs {
            device: device.to_path_buf(),
            file,
            reason: "the disk is gone".into(),
        });
    }
    if !file.exists() {
        return Ok(0);
    }
    read_u64(device, &file)
}

fn read_dev(device: &Path, file: &Path) -> Result<(u32, u32), TrackerError> {
    let s = read_trimmed(device, file)?;
    parse_dev(&s).ok_or_else(|| TrackerError::Sysfs {
        device: device.to_path_buf(),
        file: file.to_path_buf(),
        reason: format!("{s:?} is not MAJOR:MINOR"),
    })
}

/// Parses sysfs's `MAJOR:MINOR`, within the kernel's limits.
pub fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    let (major, minor) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
    (major < (1 << (32 - MINOR_BITS)) && minor < (1 << MINOR_BITS)).then_some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_use_the_kernel_encoding() {
        assert_eq!(kernel_dev((7, 3)), (7 << 20) | 3);
        assert_eq!(kernel_dev((259, 65536)), (259 << 20) | 65536);
        assert_eq!(parse_dev("7:3"), Some((7, 3)));
        assert_eq!(parse_dev("4096:0"), None);
        assert_eq!(parse_dev("7:1048576"), None);
        assert_eq!(parse_dev("7"), None);
        assert_eq!(parse_dev("a:b"), None);
    }

    #[test]
    fn a_regular_file_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            BlockDevice::resolve(f.path()),
            Err(TrackerError::NotABlockDevice { .. })
        ));
    }

    #[test]
    fn boot_id_is_read() {
        let id = boot_id().unwrap();
        assert_eq!(id.len(), 36, "{id}");
    }
}
