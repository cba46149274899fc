//! What can go wrong with kernel write tracking: [`TrackerError`] when an
//! operation fails, [`Discontinuity`] when the tracked set cannot be trusted
//! to hold every write since a registration.

use std::path::PathBuf;

use super::layout::MapCause;

/// Why a write tracker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// eBPF write tracking cannot work on this machine (no BTF, no
    /// privilege, no bpf file system, a kernel that refuses the program).
    /// The agent falls back to hash scans.
    #[error("kernel write tracking is unavailable: {reason}")]
    Unavailable {
        /// What is missing, in words an administrator can act on.
        reason: String,
    },
    /// The pin directory cannot be used as given.
    #[error("pin directory {}: {reason}", path.display())]
    InvalidPinDir {
        /// The directory.
        path: PathBuf,
        /// Why not.
        reason: &'static str,
    },
    /// The path is not a block device.
    #[error("{} is not a block device", device.display())]
    NotABlockDevice {
        /// The path given.
        device: PathBuf,
    },
    /// A file about the device or the pins could not be read or changed.
    #[error("cannot {op} {}: {cause}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file, directory or device.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A sysfs file of the device holds something unexpected.
    #[error("{}: unexpected content in {}: {reason}", device.display(), file.display())]
    Sysfs {
        /// The protected device.
        device: PathBuf,
        /// The sysfs file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tracking granularity asked for is not usable.
    #[error("{}: block size {block_size} is not a power of two between 512 and {max}", device.display())]
    InvalidBlockSize {
        /// The protected device.
        device: PathBuf,
        /// The block size asked for.
        block_size: u32,
        /// The largest block size accepted.
        max: u32,
    },
    /// The disk is too large for one bitmap map at the granularity needed.
    #[error("{}: a bitmap of {chunks} chunks does not fit in one BPF array", device.display())]
    DiskTooLarge {
        /// The protected device.
        device: PathBuf,
        /// Chunks the disk would need.
        chunks: u64,
    },
    /// Every registration slot of the disk's map is taken by another
    /// partition.
    #[error("{}: the disk {disk} already has {slots} tracked partitions", device.display())]
    TooManyRegistrations {
        /// The protected device.
        device: PathBuf,
        /// The whole disk.
        disk: String,
        /// Slots in a disk map.
        slots: usize,
    },
    /// A bpf() operation failed.
    #[error("cannot {op} {object}: {cause}")]
    Bpf {
        /// What was being done.
        op: &'static str,
        /// The map, program, link or pin path.
        object: String,
        /// The error libbpf reported.
        cause: libbpf_rs::Error,
    },
    /// The handle's map is no longer the one the kernel program writes to
    /// (the disk was untracked, the pins were removed, or another
    /// registration replaced the map): call [`reset`](super::TrackedDisk::reset).
    #[error("{}: tracking handle is stale: {reason}", device.display())]
    Stale {
        /// The protected device.
        device: PathBuf,
        /// Why.
        reason: Discontinuity,
    },
}

/// Why the tracked set may miss writes made since a registration. Each
/// variant means the agent must read the device in full (hash scan) before
/// it can rely on the tracker again, and call
/// [`reset`](super::TrackedDisk::reset).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Discontinuity {
    /// The machine rebooted: kernel maps do not survive a boot.
    #[error("the machine rebooted since the registration (boot id {then}, now {now})")]
    Rebooted {
        /// Boot id of the registration.
        then: String,
        /// Boot id now.
        now: String,
    },
    /// The kernel's sequence number of the disk changed: another medium is
    /// behind the same device (a loop device attached to another file, a
    /// disk swapped), or the disk is gone.
    #[error("the disk was replaced since the registration (diskseq {then}, now {})",
        now.map_or_else(|| "unreadable".to_string(), |n| n.to_string()))]
    DiskReplaced {
        /// diskseq of the registration.
        then: u64,
        /// diskseq now (`None`: the disk is gone).
        now: Option<u64>,
    },
    /// The tracking program is not attached through this handle's pins now
    /// (a pin was removed), so writes may be passing untracked. Open the
    /// tracker again ([`WriteTracker::open`](super::WriteTracker::open)),
    /// then track and reset.
    #[error("the write tracker is not attached: {what}")]
    NotAttached {
        /// What is missing.
        what: String,
    },
    /// The disk's map is no longer the one the program writes to: the disk
    /// was untracked, or its map was replaced under this handle.
    #[error("the disk's tracking map was removed or replaced")]
    MapReplaced,
    /// The disk's map was created after the registration (so the writes
    /// before its creation are not in it).
    #[error("the disk's tracking map was recreated since the registration: {cause}")]
    MapRecreated {
        /// Why the present map was created.
        cause: MapCause,
    },
    /// The registration was started over ([`reset`](super::TrackedDisk::reset),
    /// or a registration of an overlapping range took its place).
    #[error("registration {then:#018x} was replaced by {now:#018x}")]
    Reregistered {
        /// Id of the registration asked about.
        then: u64,
        /// Id of the present one.
        now: u64,
    },
    /// The device is now tracked at another block size.
    #[error("the block size changed from {then} to {now}")]
    BlockSizeChanged {
        /// Block size of the registration.
        then: u32,
        /// Block size now.
        now: u32,
    },
    /// Writes happened that the bitmap could not record (a range longer
    /// than one event may set, past the end of the map, or without a
    /// position such as a passthrough command or a zone reset).
    #[error("{count} write event(s) overflowed the bitmap")]
    Overflow {
        /// Overflows since the registration.
        count: u64,
    },
    /// The program was found detached (its links unpinned) and attached
    /// again: writes in between were not seen.
    #[error("tracking was detached {count} time(s) since the registration")]
    TrackingGap {
        /// Gaps since the registration.
        count: u64,
    },
    /// Continuity could not be checked (a file that says which boot or
    /// which disk this is could not be read).
    #[error("continuity cannot be checked: {reason}")]
    Unverifiable {
        /// What failed.
        reason: String,
    },
}

pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> TrackerError {
    let path = path.into();
    move |source| TrackerError::Io {
        op,
        path,
        cause: source,
    }
}

pub(crate) fn bpf_err(
    op: &'static str,
    object: impl std::fmt::Display,
) -> impl FnOnce(libbpf_rs::Error) -> TrackerError {
    let object = object.to_string();
    move |source| TrackerError::Bpf {
        op,
        object,
        cause: source,
    }
}
