//! Which mounted filesystems live on the protected disks, and which mounted
//! filesystem holds a protected image file.
//!
//! A consistency group is every filesystem that resides on the group's
//! protected block devices; the freeze ([`super::guard`]) must cover all of
//! them, each exactly once. [`filesystems_on`] finds them:
//!
//! 1. Each protected path (`/dev/loop3`, `/dev/sda`, `/dev/sda2`, ...) must be
//!    a block device; its `st_rdev` is its device number.
//! 2. The devices "on" it are, in `/sys/class/block`: the device itself; if it
//!    is a whole disk, its partitions (sub-directories with a `partition`
//!    file); and, recursively, every holder (`holders/*`: device-mapper, md,
//!    ... stacked on any device already found) and the holders' partitions.
//!    A partition given alone brings neither its disk nor its siblings.
//! 3. A mount (a line of `/proc/self/mountinfo`) is on the protected disks if
//!    its `major:minor` field is one of those devices, or its mount source
//!    resolves (`stat`) to one of them. The source matters for btrfs, which
//!    reports an anonymous `0:N` device in the `major:minor` field. For btrfs
//!    the members listed in `/sys/fs/btrfs/<uuid>/devices/` count too, so a
//!    filesystem spanning several devices is found from any of them.
//! 4. Mounts are deduplicated by superblock (the `major:minor` field, which is
//!    the same for bind mounts and for every btrfs subvolume mount of one
//!    filesystem): a superblock is frozen once, through one mount point. The
//!    mount chosen is one not hidden under another mount at the same path,
//!    then one that shows the filesystem's own root, then the shortest mount
//!    point, then the lowest mount id.
//!
//! [`filesystem_holding`] answers, for a protected image FILE, which mount
//! holds it: `statx(STATX_MNT_ID)` names the mount exactly (btrfs's
//! per-subvolume `st_dev` matches no mountinfo line); on kernels without it
//! (before 5.8) `st_dev` is matched against the `major:minor` field.
//!
//! Every [`MountedFs`] carries the mount id it was found under, so the guard
//! can refuse to freeze a path that is no longer that mount (an unmounted
//! mount point is a directory of the filesystem below, often the root).
//!
//! Errors name the device or file they are about.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Where sysfs is mounted.
pub const SYSFS: &str = "/sys";
/// The largest mountinfo read (container hosts have many thousand mounts;
/// a line is well under 4 KiB).
const MAX_MOUNTINFO: u64 = 64 << 20;
/// The most block devices followed below one protected device (partitions and
/// holders): a bound against a malformed or cyclic sysfs.
const MAX_STACK: usize = 4096;

/// A device number, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNum {
    /// The major number (the driver).
    pub major: u32,
    /// The minor number (the device of that driver).
    pub minor: u32,
}

impl DevNum {
    /// Splits a kernel `dev_t`.
    pub fn from_dev_t(dev: u64) -> Self {
        DevNum {
            major: libc::major(dev),
            minor: libc::minor(dev),
        }
    }

    /// Parses `"major:minor"` (mountinfo, sysfs `dev` files).
    pub fn parse(s: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(s).ok()?.trim();
        let (a, b) = s.split_once(':')?;
        Some(DevNum {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    }
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of `/proc/self/mountinfo`, with escapes (`\040`) undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfoEntry {
    /// Field 1: the mount id (unique while the mount exists).
    pub mount_id: u64,
    /// Field 2: the id of the parent mount.
    pub parent_id: u64,
    /// Field 3: `st_dev` of the superblock (anonymous `0:N` for btrfs).
    pub dev: DevNum,
    /// Field 4: the directory of the filesystem shown at the mount point.
    pub root: PathBuf,
    /// Field 5: the mount point.
    pub mount_point: PathBuf,
    /// The filesystem type (after the `-` separator).
    pub fs_type: String,
    /// The mount source (`/dev/loop3p1`, `none`, ...).
    pub source: PathBuf,
}

/// A mounted filesystem found on a protected disk or holding an image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedFs {
    /// Where it is mounted (the mount chosen for its superblock).
    pub mount_point: PathBuf,
    /// The mount source as the kernel reports it (`/dev/loop3p1`).
    pub device: PathBuf,
    /// The filesystem type (`ext4`, `xfs`, `btrfs`, ...).
    pub fs_type: String,
    /// Whether this is the root filesystem (`/`) of this mount namespace.
    pub is_root: bool,
    /// The mount id of `mount_point` when it was found; the guard checks it
    /// before freezing.
    pub mount_id: u64,
    /// The superblock's device number from mountinfo (dedup key).
    pub superblock: DevNum,
}

impl MountedFs {
    fn from_entry(e: &MountInfoEntry) -> Self {
        MountedFs {
            mount_point: e.mount_point.clone(),
            device: e.source.clone(),
            fs_type: e.fs_type.clone(),
            is_root: e.mount_point == Path::new("/"),
            mount_id: e.mount_id,
            superblock: e.dev,
        }
    }
}

/// Why the filesystems of a device or file could not be found.
#[derive(Debug, thiserror::Error)]
pub enum MountsError {
    /// A kernel table (mountinfo, sysfs) could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// A mountinfo line is not in the kernel's format.
    #[error("{path} line {line}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A protected device cannot be examined.
    #[error("protected device {device}: {cause}")]
    Device {
        /// The device path.
        device: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// A protected device path is not a block device.
    #[error("protected device {device} is not a block device")]
    NotABlockDevice {
        /// The path.
        device: PathBuf,
    },
    /// A protected device has no entry in sysfs.
    #[error("protected device {device} ({dev}) is not listed in {sysfs}/class/block")]
    NotInSysfs {
        /// The path.
        device: PathBuf,
        /// Its device number.
        dev: DevNum,
        /// The sysfs root searched.
        sysfs: PathBuf,
    },
    /// More devices are stacked below one protected device than followed.
    #[error("more than {max} block devices stacked on protected device {device}")]
    StackTooDeep {
        /// The protected device.
        device: PathBuf,
        /// The bound.
        max: usize,
    },
    /// An image file cannot be examined.
    #[error("image file {file}: {cause}")]
    File {
        /// The file.
        file: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// No mount listed in mountinfo holds the file (or mount point).
    #[error("no mount in {MOUNTINFO} holds {file} (mount id {mount_id:?}, device {dev})")]
    NoMountHolds {
        /// The file.
        file: PathBuf,
        /// Its mount id, where the kernel told it.
        mount_id: Option<u64>,
        /// Its `st_dev`.
        dev: DevNum,
    },
    /// The path is not where a filesystem is mounted.
    #[error("{path} is not a mount point (it is inside the mount at {mounted_at})")]
    NotAMountPoint {
        /// The path asked about.
        path: PathBuf,
        /// The mount point that holds it.
        mounted_at: PathBuf,
    },
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash, and any other `\ooo`).
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let d = &field[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (d[0] - b'0') as u32 * 64 + (d[1] - b'0') as u32 * 8 + (d[2] - b'0') as u32;
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Escapes the bytes the kernel escapes in mountinfo (space, tab, newline,
/// backslash) as `\ooo`, so a path fits in one space-separated field. The
/// guard protocol uses this for mount points. `unescape(escape(p)) == p`.
pub fn escape(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\' | b'\r') {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

fn os(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

/// Parses the text of a mountinfo file. `path` only names the file in errors.
pub fn parse_mountinfo(text: &[u8], path: &Path) -> Result<Vec<MountInfoEntry>, MountsError> {
    let mut out = Vec::new();
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let err = |what| MountsError::Parse {
            path: path.to_owned(),
            line: n + 1,
            what,
        };
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.len() < 10 {
            return Err(err("fewer than 10 fields"));
        }
        let num = |f: &[u8]| {
            std::str::from_utf8(f)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
        };
        let mount_id = num(fields[0]).ok_or_else(|| err("mount id is not a number"))?;
        let parent_id = num(fields[1]).ok_or_else(|| err("parent id is not a number"))?;
        let dev = DevNum::parse(fields[2]).ok_or_else(|| err("major:minor is malformed"))?;
        // Optional fields (shared:N, master:N, ...) run from field 7 up to a
        // lone "-".
        let sep = fields[6..]
            .iter()
            .position(|f| *f == b"-")
            .map(|p| p + 6)
            .ok_or_else(|| err("no \"-\" separator after the optional fields"))?;
        if fields.len() < sep + 3 {
            return Err(err("fewer than 3 fields after the \"-\" separator"));
        }
        let fs_type = String::from_utf8(unescape(fields[sep + 1]))
            .map_err(|_| err("filesystem type is not UTF-8"))?;
        out.push(MountInfoEntry {
            mount_id,
            parent_id,
            dev,
            root: os(unescape(fields[3])),
            mount_point: os(unescape(fields[4])),
            fs_type,
            source: os(unescape(fields[sep + 2])),
        });
    }
    Ok(out)
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read_mountinfo() -> Result<Vec<MountInfoEntry>, MountsError> {
    let path = Path::new(MOUNTINFO);
    let read = |source| MountsError::Read {
        path: path.to_owned(),
        cause: source,
    };
    let mut text = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_MOUNTINFO)
        .read_to_end(&mut text)
        .map_err(read)?;
    parse_mountinfo(&text, path)
}

/// The block-device tree in sysfs (`<root>/class/block`, `<root>/fs/btrfs`).
/// The root is a parameter so tests can build a fake tree.
#[derive(Debug, Clone)]
pub struct SysBlock {
    root: PathBuf,
}

impl SysBlock {
    /// The tree under `root` (normally [`SYSFS`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SysBlock { root: root.into() }
    }

    fn class_block(&self) -> PathBuf {
        self.root.join("class/block")
    }

    fn dev_of(&self, name: &OsStr) -> Option<DevNum> {
        let text = std::fs::read(self.class_block().join(name).join("dev")).ok()?;
        DevNum::parse(&text)
    }

    /// The kernel name (`loop3`, `sda2`, `dm-0`) of a device number.
    pub fn name_of(&self, dev: DevNum) -> Result<Option<OsString>, MountsError> {
        let dir = self.class_block();
        let entries = std::fs::read_dir(&dir).map_err(|source| MountsError::Read {
            path: dir.clone(),
            cause: source,
        })?;
        for e in entries.flatten() {
            if self.dev_of(&e.file_name()) == Some(dev) {
                return Ok(Some(e.file_name()));
            }
        }
        Ok(None)
    }

    fn names_in(&self, dir: PathBuf) -> Vec<OsString> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut v: Vec<OsString> = entries.flatten().map(|e| e.file_name()).collect();
        v.sort();
        v
    }

    fn partitions(&self, name: &OsStr) -> Vec<OsString> {
        let dir = self.class_block().join(name);
        self.names_in(dir.clone())
            .into_iter()
            .filter(|p| dir.join(p).join("partition").is_file())
            .collect()
    }

    fn holders(&self, name: &OsStr) -> Vec<OsString> {
        self.names_in(self.class_block().join(name).join("holders"))
    }

    /// Every device on `dev`: itself, its partitions, and recursively its
    /// holders and theirs. `device` names the protected path in errors.
    pub fn devices_on(&self, dev: DevNum, device: &Path) -> Result<BTreeSet<DevNum>, MountsError> {
        let name = self.name_of(dev)?.ok_or_else(|| MountsError::NotInSysfs {
            device: device.to_owned(),
            dev,
            sysfs: self.root.clone(),
        })?;
        let mut found = BTreeSet::from([dev]);
        let mut seen = BTreeSet::from([name.clone()]);
        let mut todo = vec![name];
        while let Some(n) = todo.pop() {
            for next in self.partitions(&n).into_iter().chain(self.holders(&n)) {
                if seen.insert(next.clone()) {
                    if seen.len() > MAX_STACK {
                        return Err(MountsError::StackTooDeep {
                            device: device.to_owned(),
                            max: MAX_STACK,
                        });
                    }
                    if let Some(d) = self.dev_of(&next) {
                        found.insert(d);
                    }
                    todo.push(next);
                }
            }
        }
        Ok(found)
    }

    /// The member devices of the btrfs filesystem that has `dev` as a
    /// member (`<root>/fs/btrfs/<uuid>/devices/<name>`), or nothing.
    pub fn btrfs_members(&self, dev: DevNum) -> Vec<DevNum> {
        let Ok(Some(name)) = self.name_of(dev) else {
            return Vec::new();
        };
        for fs in self.names_in(self.root.join("fs/btrfs")) {
            let members = self.names_in(self.root.join("fs/btrfs").join(&fs).join("devices"));
            if members.contains(&name) {
                return members.iter().filter_map(|m| self.dev_of(m)).collect();
            }
        }
        Vec::new()
    }
}

/// `st_rdev` of `path` if it is a block device.
fn block_dev_of(path: &Path) -> Option<DevNum> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    md.file_type()
        .is_block_device()
        .then(|| DevNum::from_dev_t(md.rdev()))
}

/// Chooses, among the mounts, those on `on` (device numbers), one per
/// superblock, sorted by mount point. `resolve` maps a mount source to its
/// block device; pure apart from `sys` and `resolve`, for tests.
pub fn select_on(
    entries: &[MountInfoEntry],
    on: &BTreeSet<DevNum>,
    sys: &SysBlock,
    resolve: &dyn Fn(&Path) -> Option<DevNum>,
) -> Vec<MountedFs> {
    let mut by_sb: BTreeMap<DevNum, Vec<&MountInfoEntry>> = BTreeMap::new();
    for e in entries {
        let mut candidates = Vec::new();
        if e.dev.major != 0 {
            candidates.push(e.dev);
        }
        if e.source.is_absolute() {
            if let Some(d) = resolve(&e.source) {
                candidates.push(d);
                if e.fs_type == "btrfs" {
                    candidates.extend(sys.btrfs_members(d));
                }
            }
        }
        if candidates.iter().any(|d| on.contains(d)) {
            by_sb.entry(e.dev).or_default().push(e);
        }
    }
    let hidden = |e: &MountInfoEntry| {
        entries
            .iter()
            .any(|o| o.parent_id == e.mount_id && o.mount_point == e.mount_point)
    };
    let mut out: Vec<MountedFs> = by_sb
        .values()
        .filter_map(|mounts| {
            mounts
                .iter()
                .min_by_key(|e| {
                    (
                        hidden(e),
                        e.root != Path::new("/"),
                        e.mount_point.as_os_str().len(),
                        e.mount_id,
                    )
                })
                .map(|e| MountedFs::from_entry(e))
        })
        .collect();
    out.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    out
}

/// Every mounted filesystem residing on the protected block devices (whole
/// disks or partitions), one per superblock, sorted by mount point.
pub fn filesystems_on<P: AsRef<Path>>(devices: &[P]) -> Result<Vec<MountedFs>, MountsError> {
    let sys = SysBlock::new(SYSFS);
    let mut on = BTreeSet::new();
    for device in devices {
        let device = device.as_ref();
        let md = std::fs::metadata(device).map_err(|source| MountsError::Device {
            device: device.to_owned(),
            cause: source,
        })?;
        if !md.file_type().is_block_device() {
            return Err(MountsError::NotABlockDevice {
                device: device.to_owned(),
            });
        }
        use std::os::unix::fs::MetadataExt;
        on.extend(sys.devices_on(DevNum::from_dev_t(md.rdev()), device)?);
    }
    let entries = read_mountinfo()?;
    Ok(select_on(&entries, &on, &sys, &block_dev_of))
}

/// What `statx` says about where a file lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MountOf {
    /// The mount id, on kernels that report it (5.8 and later).
    pub mount_id: Option<u64>,
    /// `st_dev`.
    pub dev: DevNum,
}

fn statx_raw(dirfd: libc::c_int, path: &CString, flags: libc::c_int) -> io::Result<MountOf> {
    // SAFETY: statx only writes into `buf`, which is a plain C struct for
    // which all-zero bytes are a valid value; `path` is NUL-terminated.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statx(dirfd, path.as_ptr(), flags, libc::STATX_MNT_ID, &mut buf) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(MountOf {
        mount_id: (buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id),
        dev: DevNum {
            major: buf.stx_dev_major,
            minor: buf.stx_dev_minor,
        },
    })
}

/// The mount of `path` (symbolic links followed).
pub(crate) fn mount_of_path(path: &Path) -> io::Result<MountOf> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    statx_raw(libc::AT_FDCWD, &c, 0)
}

/// The mount of an open file.
pub(crate) fn mount_of_fd(fd: BorrowedFd<'_>) -> io::Result<MountOf> {
    statx_raw(fd.as_raw_fd(), &CString::default(), libc::AT_EMPTY_PATH)
}

fn entry_for<'a>(
    entries: &'a [MountInfoEntry],
    of: MountOf,
    path: &Path,
) -> Option<&'a MountInfoEntry> {
    match of.mount_id {
        Some(id) => entries.iter().find(|e| e.mount_id == id),
        None => {
            // Without mount ids: the longest mount point on the same device
            // that is a prefix of the canonical path.
            let canon = std::fs::canonicalize(path).ok()?;
            entries
                .iter()
                .filter(|e| e.dev == of.dev && canon.starts_with(&e.mount_point))
                .max_by_key(|e| e.mount_point.as_os_str().len())
        }
    }
}

/// The mounted filesystem that holds the image file `file`, with its type.
pub fn filesystem_holding(file: &Path) -> Result<MountedFs, MountsError> {
    let of = mount_of_path(file).map_err(|source| MountsError::File {
        file: file.to_owned(),
        cause: source,
    })?;
    let entries = read_mountinfo()?;
    entry_for(&entries, of, file)
        .map(MountedFs::from_entry)
        .ok_or_else(|| MountsError::NoMountHolds {
            file: file.to_owned(),
            mount_id: of.mount_id,
            dev: of.dev,
        })
}

/// The filesystem mounted exactly at `mount_point` (for diagnostics and the
/// guard's test mode, where an operator names mount points directly).
pub fn mounted_at(mount_point: &Path) -> Result<MountedFs, MountsError> {
    let fs = filesystem_holding(mount_point)?;
    let canon = std::fs::canonicalize(mount_point).map_err(|source| MountsError::File {
        file: mount_point.to_owned(),
        cause: source,
    })?;
    if canon != fs.mount_point {
        return Err(MountsError::NotAMountPoint {
            path: mount_point.to_owned(),
            mounted_at: fs.mount_point,
        });
    }
    Ok(fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
47 27 7:1 / /srv/my\\040images rw,relatime shared:5 master:2 - xfs /dev/loop1 rw,inode64
48 27 0:41 / /mnt/pool rw,relatime - btrfs /dev/loop0 rw,subvolid=5,subvol=/
51 27 0:41 /sv /mnt/sv rw,relatime - btrfs /dev/loop0 rw,subvolid=256,subvol=/sv
50 27 7:1 / /mnt/bind rw,relatime - xfs /dev/loop1 rw
52 27 259:0 / /data rw - ext4 /dev/loop3p1 rw
53 27 259:1 / /data/with\\011tab\\134and\\012nl rw - ext4 /dev/loop3p2 rw
60 27 0:50 / /tmp rw - tmpfs tmpfs rw
";

    fn sample() -> Vec<MountInfoEntry> {
        parse_mountinfo(SAMPLE.as_bytes(), Path::new("sample")).unwrap()
    }

    #[test]
    fn parses_fields_optional_fields_and_escapes() {
        let m = sample();
        assert_eq!(m.len(), 9);
        assert_eq!(m[1].mount_id, 27);
        assert_eq!(m[1].parent_id, 1);
        assert_eq!(
            m[1].dev,
            DevNum {
                major: 253,
                minor: 0
            }
        );
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[1].source, Path::new("/dev/mapper/vg-root"));
        assert_eq!(m[2].mount_point, Path::new("/srv/my images"));
        assert_eq!(m[2].fs_type, "xfs");
        assert_eq!(m[4].root, Path::new("/sv"));
        assert_eq!(
            m[4].dev,
            DevNum {
                major: 0,
                minor: 41
            }
        );
        assert_eq!(m[7].mount_point, Path::new("/data/with\ttab\\and\nnl"));
    }

    #[test]
    fn malformed_lines_are_named_by_number() {
        for (text, what) in [
            ("1 2 3:4 / /x rw - ext4\n", "fewer than 10 fields"),
            (
                "x 2 3:4 / /x rw a b - ext4 /dev/x rw\n",
                "mount id is not a number",
            ),
            (
                "1 2 34 / /x rw - ext4 /dev/x rw b c\n",
                "major:minor is malformed",
            ),
            (
                "1 2 3:4 / /x rw a b c d e f\n",
                "no \"-\" separator after the optional fields",
            ),
            (
                "1 2 3:4 / /x rw a b c d e -\n",
                "fewer than 3 fields after the \"-\" separator",
            ),
        ] {
            let text = format!("22 27 0:21 / /proc rw,relatime - proc proc rw\n{text}");
            match parse_mountinfo(text.as_bytes(), Path::new("mi")) {
                Err(MountsError::Parse {
                    line,
                    what: w,
                    path,
                }) => {
                    assert_eq!((line, w, path.as_path()), (2, what, Path::new("mi")));
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn escape_and_unescape_are_inverse() {
        for p in [
            &b"/plain"[..],
            b"/a b",
            b"/t\tn\nb\\s",
            b"\\040 literal",
            b"/\xff\x01",
        ] {
            assert_eq!(unescape(&escape(p)), p, "{p:?}");
            assert!(!escape(p).contains(&b' '));
            assert!(!escape(p).contains(&b'\n'));
        }
        // A backslash not followed by three octal digits stays as it is.
        assert_eq!(unescape(b"a\\9b\\04"), b"a\\9b\\04");
        assert_eq!(unescape(b"\\777"), b"\\777");
    }

    /// A fake sysfs: `(name, dev, parent disk or None, holders)`.
    fn fake_sys(devs: &[(&str, &str, Option<&str>, &[&str])]) -> (tempfile::TempDir, SysBlock) {
        let dir = tempfile::tempdir().unwrap();
        let cb = dir.path().join("class/block");
        std::fs::create_dir_all(&cb).unwrap();
        for (name, dev, parent, holders) in devs {
            // Real sysfs: class/block/<part> is a link to the partition's
            // directory inside its disk's directory.
            let real = match parent {
                Some(p) => dir.path().join("devices").join(p).join(name),
                None => dir.path().join("devices").join(name),
            };
            std::fs::create_dir_all(real.join("holders")).unwrap();
            std::fs::write(real.join("dev"), format!("{dev}\n")).unwrap();
            if parent.is_some() {
                std::fs::write(real.join("partition"), "1\n").unwrap();
            }
            for h in *holders {
                std::fs::write(real.join("holders").join(h), "").unwrap();
            }
            std::os::unix::fs::symlink(&real, cb.join(name)).unwrap();
        }
        let sys = SysBlock::new(dir.path());
        (dir, sys)
    }

    fn d(major: u32, minor: u32) -> DevNum {
        DevNum { major, minor }
    }

    #[test]
    fn a_disk_brings_its_partitions_and_stacked_holders() {
        let (_dir, sys) = fake_sys(&[
            ("sda", "8:0", None, &[]),
            ("sda1", "8:1", Some("sda"), &[]),
            ("sda2", "8:2", Some("sda"), &["dm-0"]),
            ("dm-0", "253:0", None, &["dm-1"]),
            ("dm-1", "253:1", None, &[]),
            ("sdb", "8:16", None, &["md0"]),
            ("md0", "9:0", None, &[]),
        ]);
        let whole = sys.devices_on(d(8, 0), Path::new("/dev/sda")).unwrap();
        assert_eq!(
            whole,
            BTreeSet::from([d(8, 0), d(8, 1), d(8, 2), d(253, 0), d(253, 1)])
        );
        let part = sys.devices_on(d(8, 1), Path::new("/dev/sda1")).unwrap();
        assert_eq!(part, BTreeSet::from([d(8, 1)]));
        let part2 = sys.devices_on(d(8, 2), Path::new("/dev/sda2")).unwrap();
        assert_eq!(part2, BTreeSet::from([d(8, 2), d(253, 0), d(253, 1)]));
        match sys.devices_on(d(8, 99), Path::new("/dev/gone")) {
            Err(e @ MountsError::NotInSysfs { .. }) => {
                assert!(e.to_string().contains("/dev/gone"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_holder_cycle_terminates() {
        let (_dir, sys) = fake_sys(&[
            ("dm-0", "253:0", None, &["dm-1"]),
            ("dm-1", "253:1", None, &["dm-0"]),
        ]);
        let on = sys.devices_on(d(253, 0), Path::new("/dev/dm-0")).unwrap();
        assert_eq!(on, BTreeSet::from([d(253, 0), d(253, 1)]));
    }

    fn resolve_sample(p: &Path) -> Option<DevNum> {
        match p.to_str()? {
            "/dev/loop0" => Some(d(7, 0)),
            "/dev/loop1" => Some(d(7, 1)),
            "/dev/loop3p1" => Some(d(259, 0)),
            "/dev/loop3p2" => Some(d(259, 1)),
            "/dev/mapper/vg-root" => Some(d(253, 0)),
            _ => None,
        }
    }

    #[test]
    fn btrfs_is_found_by_its_source_and_deduplicated_by_superblock() {
        let (_dir, sys) = fake_sys(&[("loop0", "7:0", None, &[])]);
        let got = select_on(&sample(), &BTreeSet::from([d(7, 0)]), &sys, &resolve_sample);
        assert_eq!(got.len(), 1, "{got:?}");
        // The mount showing the filesystem's root wins over the subvolume.
        assert_eq!(got[0].mount_point, Path::new("/mnt/pool"));
        assert_eq!(got[0].fs_type, "btrfs");
        assert_eq!(got[0].device, Path::new("/dev/loop0"));
        assert_eq!(got[0].superblock, d(0, 41));
        assert!(!got[0].is_root);
    }

    #[test]
    fn a_bind_mount_is_frozen_once_through_the_shorter_mount_point() {
        let (_dir, sys) = fake_sys(&[("loop1", "7:1", None, &[])]);
        let got = select_on(&sample(), &BTreeSet::from([d(7, 1)]), &sys, &resolve_sample);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].mount_point, Path::new("/mnt/bind"));
        assert_eq!(got[0].mount_id, 50);
    }

    #[test]
    fn a_hidden_mount_is_not_chosen() {
        let text = "\
1 0 8:1 / / rw - ext4 /dev/sda1 rw
10 1 8:2 / /a rw - ext4 /dev/sda2 rw
11 10 0:60 / /a rw - tmpfs tmpfs rw
12 1 8:2 / /longer/path rw - ext4 /dev/sda2 rw
";
        let entries = parse_mountinfo(text.as_bytes(), Path::new("t")).unwrap();
        let (_dir, sys) = fake_sys(&[]);
        let got = select_on(&entries, &BTreeSet::from([d(8, 2)]), &sys, &|_| None);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].mount_point, Path::new("/longer/path"));
    }

    #[test]
    fn root_and_partitions_are_matched_by_major_minor() {
        let (_dir, sys) = fake_sys(&[]);
        let on = BTreeSet::from([d(253, 0), d(259, 0), d(259, 1)]);
        let got = select_on(&sample(), &on, &sys, &|_| None);
        let points: Vec<_> = got.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/"),
                PathBuf::from("/data"),
                PathBuf::from("/data/with\ttab\\and\nnl")
            ]
        );
        assert!(got[0].is_root);
        assert!(!got[1].is_root);
    }

    #[test]
    fn a_multi_device_btrfs_is_found_from_any_member() {
        let (dir, sys) = fake_sys(&[("loop0", "7:0", None, &[]), ("loop5", "7:5", None, &[])]);
        let devs = dir.path().join("fs/btrfs/0b1c/devices");
        std::fs::create_dir_all(&devs).unwrap();
        std::fs::write(devs.join("loop0"), "").unwrap();
        std::fs::write(devs.join("loop5"), "").unwrap();
        // Mounted from loop0; only loop5 is protected.
        let got = select_on(&sample(), &BTreeSet::from([d(7, 5)]), &sys, &resolve_sample);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].superblock, d(0, 41));
    }

    #[test]
    fn unrelated_devices_match_nothing() {
        let (_dir, sys) = fake_sys(&[]);
        let got = select_on(&sample(), &BTreeSet::from([d(8, 0)]), &sys, &resolve_sample);
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn the_file_holding_mount_is_found_by_mount_id() {
        let m = sample();
        let e = entry_for(
            &m,
            MountOf {
                mount_id: Some(51),
                dev: d(0, 43),
            },
            Path::new("/mnt/sv/disk.img"),
        )
        .unwrap();
        assert_eq!(e.mount_point, Path::new("/mnt/sv"));
    }

    #[test]
    fn this_process_sees_its_root_filesystem() {
        let root = mounted_at(Path::new("/")).unwrap();
        assert!(root.is_root);
        let held = filesystem_holding(Path::new("/proc/self/mountinfo")).unwrap();
        assert_eq!(held.fs_type, "proc");
        match mounted_at(Path::new("/proc/self")) {
            Err(e @ MountsError::NotAMountPoint { .. }) => {
                assert!(e.to_string().contains("/proc"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        match filesystems_on(&["/proc/self/mountinfo"]) {
            Err(e @ MountsError::NotABlockDevice { .. }) => {
                assert!(e.to_string().contains("/proc/self/mountinfo"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
