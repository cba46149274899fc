//! Reflink snapshots of protected image files (XFS, btrfs).
//!
//! For a raw image FILE (a VM's disk on a hypervisor host), a crash-consistent
//! point needs no freeze: `FICLONE` makes, in one atomic step, a second file
//! sharing the image's extents, which the reader then reads at leisure while
//! the image keeps changing (copy-on-write keeps the clone as it was).
//!
//! [`ReflinkSnapshot::create`] clones `<dir>/<name>` into
//! `<dir>/.<name>.tideline-snap-<16 hex digits>`: hidden, in the same
//! directory (a clone cannot cross filesystems), created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600, so it never replaces or follows
//! anything. The handle holds an exclusive `flock` on the clone while it
//! lives, and removes the clone when dropped. A symbolic link to the image is
//! resolved first: the clone goes beside the real file.
//!
//! Filesystems without reflinks answer `FICLONE` with `EOPNOTSUPP` (ext4),
//! `ENOTTY`, `EINVAL`, `EXDEV`, `ETXTBSY` (the image is a swap file or being
//! executed), ...: that is [`SnapshotError::NotSupported`], naming the file
//! and the filesystem type, and the caller falls back to another kind of
//! point.
//!
//! An agent that crashed leaves its clones behind (they hold the image's old
//! extents, using space as the image diverges). [`remove_stale_clones`]
//! removes the clones of one image that no live handle holds (a held `flock`
//! marks a clone in use), and nothing else: only regular files whose names
//! are exactly `.<name>.tideline-snap-<16 hex digits>`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::mounts;

/// What follows `.<name>` in a clone's file name, before the random part.
pub const CLONE_MARKER: &str = ".tideline-snap-";
/// The number of hex digits of a clone name's random part.
const RANDOM_DIGITS: usize = 16;

/// Why a snapshot could not be made or cleaned up. Every variant names the
/// file it is about.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The filesystem holding the image has no reflinks (or refuses this
    /// file).
    #[error("{} is on {fs_type}, which cannot reflink it: {cause}", .file.display())]
    NotSupported {
        /// The image.
        file: PathBuf,
        /// The filesystem type holding it (`unknown` if it could not be told).
        fs_type: String,
        /// What `FICLONE` said.
        cause: io::Error,
    },
    /// The image cannot be opened or examined.
    #[error("image {}: {cause}", .file.display())]
    Image {
        /// The image.
        file: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// The image is not a regular file.
    #[error("image {} is not a regular file", .file.display())]
    NotARegularFile {
        /// The image.
        file: PathBuf,
    },
    /// The clone file cannot be created.
    #[error("cannot create snapshot file {}: {cause}", .clone.display())]
    Create {
        /// The clone's path.
        clone: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// `FICLONE` failed for another reason (`ENOSPC`, `EIO`, ...).
    #[error("cannot reflink {} to {}: {cause}", .file.display(), .clone.display())]
    Clone {
        /// The image.
        file: PathBuf,
        /// The clone's path.
        clone: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// The image's directory cannot be listed.
    #[error("cannot list {} for stale snapshots: {cause}", .dir.display())]
    List {
        /// The directory.
        dir: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// A stale clone cannot be removed.
    #[error("cannot remove stale snapshot {}: {cause}", .clone.display())]
    Remove {
        /// The clone's path.
        clone: PathBuf,
        /// The error.
        cause: io::Error,
    },
}

/// A reflink clone of an image file, removed when dropped.
#[derive(Debug)]
pub struct ReflinkSnapshot {
    image: PathBuf,
    path: PathBuf,
    /// Open for the lifetime of the handle: holds the `flock` that marks the
    /// clone in use.
    file: File,
}

/// The errors of `FICLONE` that mean "this filesystem or file cannot".
fn means_not_supported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::ENOTTY
                | libc::EINVAL
                | libc::EXDEV
                | libc::ETXTBSY
                | libc::ENOSYS
                | libc::EPERM
        )
    )
}

fn split(image: &Path) -> Result<(PathBuf, OsString), SnapshotError> {
    let real = std::fs::canonicalize(image).map_err(|source| SnapshotError::Image {
        file: image.to_owned(),
        cause: source,
    })?;
    match (real.parent(), real.file_name()) {
        (Some(dir), Some(name)) => Ok((dir.to_owned(), name.to_owned())),
        _ => Err(SnapshotError::NotARegularFile {
            file: image.to_owned(),
        }),
    }
}

fn clone_prefix(name: &OsStr) -> Vec<u8> {
    let mut p = b".".to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(CLONE_MARKER.as_bytes());
    p
}

/// Whether `candidate` is the name of a clone of the image called `name`.
pub fn is_clone_name(name: &OsStr, candidate: &OsStr) -> bool {
    candidate
        .as_bytes()
        .strip_prefix(clone_prefix(name).as_slice())
        .is_some_and(|r| r.len() == RANDOM_DIGITS && r.iter().all(u8::is_ascii_hexdigit))
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system call on an open fd.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl ReflinkSnapshot {
    /// Clones `image` into a hidden file beside it.
    pub fn create(image: &Path) -> Result<Self, SnapshotError> {
        let (dir, name) = split(image)?;
        let real = dir.join(&name);
        // O_NONBLOCK: opening a FIFO by mistake must not wait for a writer.
        let src = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&real)
            .map_err(|source| SnapshotError::Image {
                file: image.to_owned(),
                cause: source,
            })?;
        let md = src.metadata().map_err(|source| SnapshotError::Image {
            file: image.to_owned(),
            cause: source,
        })?;
        if !md.is_file() {
            return Err(SnapshotError::NotARegularFile {
                file: image.to_owned(),
            });
        }
        let mut clone_name = clone_prefix(&name);
        clone_name.extend_from_slice(format!("{:016x}", rand::random::<u64>()).as_bytes());
        let path = dir.join(OsStr::from_bytes(&clone_name));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| SnapshotError::Create {
                clone: path.clone(),
                cause: source,
            })?;
        let cleanup = |e| {
            let _ = std::fs::remove_file(&path);
            e
        };
        // The umask may have narrowed 0600 further, never widened it; make
        // it exactly 0600.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| flock(&file, libc::LOCK_EX | libc::LOCK_NB))
            .map_err(|source| {
                cleanup(SnapshotError::Create {
                    clone: path.clone(),
                    cause: source,
                })
            })?;
        // SAFETY: FICLONE takes the source fd as its argument; both fds are
        // open for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
        if rc != 0 {
            let source = io::Error::last_os_error();
            let err = if means_not_supported(&source) {
                SnapshotError::NotSupported {
                    file: image.to_owned(),
                    fs_type: mounts::filesystem_holding(&real)
                        .map_or_else(|_| "unknown".to_owned(), |m| m.fs_type),
                    cause: source,
                }
            } else {
                SnapshotError::Clone {
                    file: image.to_owned(),
                    clone: path.clone(),
                    cause: source,
                }
            };
            return Err(cleanup(err));
        }
        Ok(ReflinkSnapshot {
            image: real,
            path,
            file,
        })
    }

    /// The clone, for the reader to open.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The clone, open read-write (the reader may use it directly).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The image it is a clone of (symbolic links resolved).
    pub fn image(&self) -> &Path {
        &self.image
    }
}

impl Drop for ReflinkSnapshot {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(clone = %self.path.display(), error = %e, "cannot remove snapshot");
        }
    }
}

/// Removes the clones of `image` that no live [`ReflinkSnapshot`] holds
/// (left by an agent that crashed); returns the paths removed.
pub fn remove_stale_clones(image: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let (dir, name) = split(image)?;
    let entries = std::fs::read_dir(&dir).map_err(|source| SnapshotError::List {
        dir: dir.clone(),
        cause: source,
    })?;
    let mut removed = Vec::new();
    for e in entries {
        let e = e.map_err(|source| SnapshotError::List {
            dir: dir.clone(),
            cause: source,
        })?;
        if !is_clone_name(&name, &e.file_name()) {
            continue;
        }
        let path = e.path();
        // Regular files only (file_type does not follow symbolic links).
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            continue; // a live handle holds it
        }
        std::fs::remove_file(&path).map_err(|source| SnapshotError::Remove {
            clone: path.clone(),
            cause: source,
        })?;
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_names_are_recognised_exactly() {
        let n = OsStr::new("vm disk.raw");
        assert!(is_clone_name(
            n,
            OsStr::new(".vm disk.raw.tideline-snap-0123456789abcdef")
        ));
        for other in [
            "vm disk.raw",
            ".vm disk.raw.tideline-snap-0123456789abcde",
            ".vm disk.raw.tideline-snap-0123456789abcdef0",
            ".vm disk.raw.tideline-snap-0123456789abcdeg",
            ".other.raw.tideline-snap-0123456789abcdef",
            "vm disk.raw.tideline-snap-0123456789abcdef",
            ".vm disk.raw.tideline-snap-",
        ] {
            assert!(!is_clone_name(n, OsStr::new(other)), "{other}");
        }
    }

    #[test]
    fn a_directory_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        std::fs::create_dir(&sub).unwrap();
        match ReflinkSnapshot::create(&sub) {
            Err(e @ SnapshotError::NotARegularFile { .. }) => {
                assert!(e.to_string().contains("/d"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        match ReflinkSnapshot::create(&dir.path().join("missing.raw")) {
            Err(e @ SnapshotError::Image { .. }) => {
                assert!(e.to_string().contains("missing.raw"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
