//! Kernel write tracking with eBPF: which blocks of the protected block
//! devices were written, so that a sync copies only those, and pre-copy
//! rounds can shrink what is left before a short file system freeze.
//!
//! Place in the data path: the sync engine asks a [`TrackedDisk`] whether
//! its set is complete since the registration it stored with the last
//! committed point ([`TrackedDisk::continuous_since`]); if so it copies
//! what [`TrackedDisk::take`] names instead of hashing the whole disk,
//! else it falls back to a hash scan and starts over with
//! [`TrackedDisk::reset`]. Nothing here is on disk: the bitmaps live in
//! kernel maps pinned in a bpf file system, and the engine keeps the
//! [`Registration`] in its own state.
//!
//! # Kernel side
//!
//! A BPF program in C (`agent/bpf/write_tracker.bpf.c`, built by
//! `agent/build.rs`) is attached to three BTF tracepoints of the block
//! layer. Each looks the whole disk up by its `dev_t` in an outer hash of
//! maps; an untracked disk costs one hash lookup per write. A write-ish
//! operation is any whose op has bit 0 set (the kernel's `op_is_write`:
//! write, discard, secure erase, write zeroes, zone append...). Partition
//! I/O reaches these hooks already remapped to whole-disk sectors, so a
//! disk has one bitmap whatever its partitions.
//!
//! - `block_rq_complete` (request-based devices: SCSI, NVMe, virtio, loop):
//!   marks `[rq->__sector, + nr_bytes)` when a request completes (fully or
//!   in part). Marking at completion closes the race where the agent clears
//!   a bit, reads the block, and only then an in-flight write lands: that
//!   write's completion sets the bit again. The BTF-typed tracepoint reads
//!   the op from `rq->cmd_flags`, so write-zeroes, which the classic
//!   tracepoint shows as a discard, is classified by the kernel's own code.
//!   It counts the disk's write events too.
//! - `block_bio_queue` (the only hook bio-based devices such as device
//!   mapper and md have): marks the bio's range when it enters the block
//!   layer, and counts write events. It returns at once for request-based
//!   disks (their queue has `mq_ops`), which `block_rq_complete` covers:
//!   marking them twice would double the tracker's cost per write.
//! - `block_bio_complete` (bios traced at queue time, when they end): for
//!   bio-based devices, the completion-time mark that `block_rq_complete`
//!   gives request-based ones; it marks what the bio still describes and
//!   skips a bio advanced to size 0. Request-based completions never reach
//!   it (`blk_update_request` clears the bio's trace flag: the request was
//!   traced).
//!
//! Marking twice would be harmless, only slower. Bio-based stacks (LVM, dm-crypt, md) are
//! designed for by the two bio hooks but are not tested: the test machine
//! has no device mapper. Until they are, an LVM volume should be tracked
//! through the disks under it, or not at all.
//!
//! Nothing is dropped silently: an event whose range needs more than
//! [`layout::MAX_WORDS_PER_EVENT`] bitmap words (a discard of gigabytes at
//! a fine granularity), that lies past the map's last chunk, or that has no
//! position (SCSI/NVMe passthrough writes, zone resets) increments the
//! disk's overflow counter, and [`TrackedDisk::continuous_since`] reports
//! it.
//!
//! # Maps and pins
//!
//! The per-disk map layout is specified in [`layout`]; the pins in
//! `program.rs`. The links are pinned, so the programs stay attached when
//! the agent stops: a new agent adopts the pins ([`WriteTracker::open`])
//! and sees every write made in between. If the maps are pinned but a link
//! is not (someone unpinned it: writes may have been missed), `open`
//! attaches the programs again and counts a gap in every disk map before
//! anything uses them.
//!
//! # Continuity
//!
//! A [`Registration`] names one tracked range at one block size: a random
//! id kept in the disk map's slot, the map's own random id, the boot id and
//! the disk's `diskseq`. A reboot, a recreated or replaced map, another
//! diskseq (another medium behind the device), a reset, another block size,
//! an overflow or a gap each break it, with a [`Discontinuity`] saying
//! which.
//!
//! # Privileges and kernels
//!
//! Root, or CAP_BPF + CAP_PERFMON (loading and attaching tracing programs)
//! and CAP_SYS_ADMIN (mounting bpffs, opening a disk map by id when its pin
//! is gone). Needs Linux 5.12 or later built with BTF
//! (`/sys/kernel/btf/vmlinux`): BTF tracepoints (5.5), per-map sizes of
//! inner maps (5.10), atomic OR in BPF (5.12). Older field layouts
//! (`request->rq_disk` before 5.17, `bio->bi_disk` before 5.12) are handled
//! by CO-RE. Without diskseq (before 5.15) a re-attached loop device is
//! not detected. Where any of this is missing, [`WriteTracker::open`]
//! returns [`TrackerError::Unavailable`] and the agent hash-scans.

use std::path::Path;
use std::sync::Arc;

use libbpf_rs::MapHandle;

mod bitmap;
mod device;
mod disk;
mod disk_map;
mod error;
pub mod layout;
mod program;

pub use bitmap::DirtyExtents;
pub use disk::{TrackedDisk, TrackerCounters};
pub use error::{Discontinuity, TrackerError};
pub use layout::MapCause;
pub use program::DEFAULT_PIN_DIR;

use bitmap::{needed_shift, Span};
use device::BlockDevice;
use disk::Binding;
use disk_map::{DiskMap, Found};
use program::{PinDir, PinLock};

/// Largest block size a registration may use (4 MiB, the protocol's).
pub const MAX_BLOCK_SIZE: u32 = tideline_protocol::limits::MAX_BLOCK_SIZE;

/// One tracked range's identity: the sync engine stores it with a
/// committed point and asks [`TrackedDisk::continuous_since`] about it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    /// `/proc/sys/kernel/random/boot_id` when registered.
    pub boot_id: String,
    /// Random id of the registration (in the disk map's slot).
    pub id: u64,
    /// Random id of the disk map holding it (in the map's header).
    pub map_id: u64,
    /// The whole disk's diskseq when registered (0: the kernel has none).
    pub diskseq: u64,
    /// The device path the registration was made with.
    pub device: String,
    /// Block size of the registration, in bytes.
    pub block_size: u32,
}

/// A handle on the loaded or adopted write tracker. Cheap to clone.
#[derive(Clone)]
pub struct WriteTracker {
    shared: Arc<Shared>,
}

struct Shared {
    pins: PinDir,
    outer: MapHandle,
    outer_id: u32,
}

impl std::fmt::Debug for WriteTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTracker")
            .field("pin_dir", &self.shared.pins.dir())
            .field("outer_id", &self.shared.outer_id)
            .finish()
    }
}

impl WriteTracker {
    /// Loads and attaches the program and pins it under `pin_dir`, or adopts
    /// what an earlier agent pinned there. [`TrackerError::Unavailable`]
    /// when eBPF cannot work here, with the reason.
    pub fn open(pin_dir: &Path) -> Result<WriteTracker, TrackerError> {
        program::route_libbpf_log();
        let btf = Path::new("/sys/kernel/btf/vmlinux");
        if !btf.exists() {
            return Err(TrackerError::Unavailable {
                reason: format!(
                    "the kernel has no BTF ({} is missing; it needs CONFIG_DEBUG_INFO_BTF)",
                    btf.display()
                ),
            });
        }
        check_pin_dir(pin_dir)?;
        program::ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => TrackerError::Unavailable {
                reason: format!("cannot create the pin directory {}: {e}", pin_dir.display()),
            },
            _ => error::io_err("create", pin_dir)(e),
        })?;
        let pins = PinDir::new(pin_dir);
        let _lock = PinLock::acquire(pin_dir)?;
        let outer = match program::open_outer(&pins) {
            Some(outer) => {
                let missing = program::missing_links(&pins);
                if !missing.is_empty() {
                    tracing::warn!(pin_dir = %pin_dir.display(), ?missing,
                        "write tracker links were unpinned: attaching again; every tracked disk's continuity is broken");
                    let outer = program::load_and_attach(&pins, Some(&outer))?;
                    mark_gaps(&outer, &pins)?;
                    outer
                } else {
                    tracing::debug!(pin_dir = %pin_dir.display(), "adopting the pinned write tracker");
                    outer
                }
            }
            None => {
                // Whatever else is here belongs to no outer map this agent
                // can use: links of another version, orphaned disk maps.
                program::remove_pins(pin_dir, &[])?;
                tracing::info!(pin_dir = %pin_dir.display(), "loading the write tracker");
                program::load_and_attach(&pins, None)?
            }
        };
        let outer_id = program::map_id(&outer, &pins.outer())?;
        Ok(WriteTracker {
            shared: Arc::new(Shared {
                pins,
                outer,
                outer_id,
            }),
        })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.shared.pins.dir()
    }

    /// Starts or resumes tracking of a protected block device (a whole disk
    /// or a partition, e.g. `/dev/loop3` or `/dev/loop3p2`), at `block_size`
    /// granularity in the device's own block numbering.
    ///
    /// Resumes the registration of the same range at the same block size if
    /// the disk's map has one; else starts a new one (ending any
    /// overlapping registration), from which on every write is tracked. The
    /// disk's map is created, or recreated when the disk changed (diskseq,
    /// size) or this registration needs a finer chunk than it has; a
    /// recreation breaks the continuity of the disk's other registrations.
    pub fn track(&self, device: &Path, block_size: u32) -> Result<TrackedDisk, TrackerError> {
        let dev = BlockDevice::resolve(device)?;
        check_block_size(&dev, block_size)?;
        let _lock = PinLock::acquire(self.pin_dir())?;
        let binding = self.bind(&dev, block_size, false)?;
        Ok(TrackedDisk::new(self.clone(), dev, block_size, binding))
    }

    /// Stops tracking the whole disk of `device` (all its partitions) and
    /// removes its pin. Handles on it become stale.
    pub fn untrack(&self, device: &Path) -> Result<(), TrackerError> {
        let dev = BlockDevice::resolve(device)?;
        let _lock = PinLock::acquire(self.pin_dir())?;
        use libbpf_rs::MapCore;
        if let Err(e) = self.shared.outer.delete(&dev.disk_key().to_ne_bytes()) {
            if e.kind() != libbpf_rs::ErrorKind::NotFound {
                return Err(error::bpf_err(
                    "remove",
                    format!("{} from the outer map", dev.disk_name),
                )(e));
            }
        }
        program::remove_pin(&self.shared.pins.disk(dev.disk_key()))
    }

    /// Detaches the program and removes every pin under `pin_dir`, then
    /// the directory. Handles still open see their tracking as detached.
    pub fn remove(pin_dir: &Path) -> Result<(), TrackerError> {
        if !pin_dir.exists() {
            return Ok(());
        }
        {
            let _lock = PinLock::acquire(pin_dir)?;
            program::remove_pins(pin_dir, &[])?;
        }
        std::fs::remove_dir(pin_dir).map_err(error::io_err(
            "remove (it holds pins that are not the tracker's)",
            pin_dir,
        ))
    }

    /// Whether the program is attached through this tracker's pins now.
    pub(crate) fn check_attached(&self) -> Result<(), Discontinuity> {
        let pins = &self.shared.pins;
        let outer = pins.outer();
        let same = MapHandle::from_pinned_path(&outer)
            .ok()
            .and_then(|m| program::map_id(&m, &outer).ok())
            .is_some_and(|id| id == self.shared.outer_id);
        if !same {
            return Err(Discontinuity::NotAttached {
                what: format!("{} is missing or is another map", outer.display()),
            });
        }
        if let Some(missing) = program::missing_links(pins).first() {
            return Err(Discontinuity::NotAttached {
                what: format!("{} is missing", missing.display()),
            });
        }
        Ok(())
    }

    pub(crate) fn outer(&self) -> &MapHandle {
        &self.shared.outer
    }

    /// Binds `dev` to its disk map, creating or recreating the map when
    /// needed, and resumes (unless `fresh`) or starts its registration.
    /// Called under the pin lock.
    pub(crate) fn bind(
        &self,
        dev: &BlockDevice,
        block_size: u32,
        fresh: bool,
    ) -> Result<Binding, TrackerError> {
        let pins = &self.shared.pins;
        let outer = &self.shared.outer;
        let key = dev.disk_key();
        let needed = needed_shift(dev.start_sector, block_size);
        let (mut map, created) = match DiskMap::find(outer, pins, key)? {
            Found::Usable(map) => {
                let h = map.words.header();
                use std::sync::atomic::Ordering::Acquire;
                let cause = if h.diskseq.load(Acquire) != dev.diskseq {
                    Some(MapCause::DiskChanged)
                } else if h.disk_sectors.load(Acquire) != dev.disk_sectors {
                    Some(MapCause::DiskResized)
                } else if h.chunks.load(Acquire) != dev.disk_sectors.div_ceil(1 << map.shift).max(1)
                {
                    // Every chunk of the disk must have its bit: the
                    // indexes of take() and reset() rely on it.
                    Some(MapCause::Unusable)
                } else if map.shift > needed {
                    Some(MapCause::FinerGranularity)
                } else {
                    None
                };
                match cause {
                    None => (map, false),
                    Some(cause) => {
                        // Keep what the disk's other partitions need.
                        let shift = if cause == MapCause::FinerGranularity {
                            needed.min(map.shift)
                        } else {
                            needed
                        };
                        tracing::info!(device = %dev.path.display(), disk = %dev.disk_name, %cause,
                            "recreating the disk's tracking map; its registrations start over");
                        (DiskMap::create(dev, shift, cause)?, true)
                    }
                }
            }
            Found::Unusable(reason) => {
                tracing::warn!(device = %dev.path.display(), disk = %dev.disk_name, %reason,
                    "the disk's tracking map is unusable; recreating it");
                (DiskMap::create(dev, needed, MapCause::Unusable)?, true)
            }
            Found::Absent => (DiskMap::create(dev, needed, MapCause::NewDisk)?, true),
        };
        let span = Span {
            start_sector: dev.start_sector,
            sectors: dev.sectors,
            shift: map.shift,
            block_size,
        };
        let resumed = if fresh { None } else { map.find_slot(&span) };
        let (slot, id) = match resumed {
            Some(found) => found,
            None => map.register(dev, &span)?,
        };
        if created {
            map.install(outer, pins)?;
        } else {
            map.ensure_pinned(pins)?;
        }
        let h = map.words.header();
        let registration = Registration {
            boot_id: device::boot_id()?,
            id,
            map_id: h.map_id.load(std::sync::atomic::Ordering::Acquire),
            diskseq: dev.diskseq,
            device: dev.path.display().to_string(),
            block_size,
        };
        tracing::debug!(device = %dev.path.display(), registration = format_args!("{id:#018x}"),
            resumed = resumed.is_some(), "tracking");
        Ok(Binding {
            map: Arc::new(map),
            slot,
            span,
            registration,
        })
    }
}

/// Refuses pin directories that bpffs or libbpf cannot take: a NUL byte
/// (libbpf-rs panics on one), or a dot in a directory still to be created
/// (bpffs reserves dotted names and refuses them with EPERM).
fn check_pin_dir(pin_dir: &Path) -> Result<(), TrackerError> {
    let invalid = |reason| TrackerError::InvalidPinDir {
        path: pin_dir.to_path_buf(),
        reason,
    };
    if pin_dir.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(invalid("it contains a NUL byte"));
    }
    if !pin_dir.is_absolute() {
        return Err(invalid("it must be an absolute path"));
    }
    for dir in pin_dir.ancestors().take_while(|d| !d.exists()) {
        if dir
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().contains(&b'.'))
        {
            return Err(invalid("bpffs refuses names with a dot"));
        }
    }
    Ok(())
}

fn check_block_size(dev: &BlockDevice, block_size: u32) -> Result<(), TrackerError> {
    if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(TrackerError::InvalidBlockSize {
            device: dev.path.clone(),
            block_size,
            max: MAX_BLOCK_SIZE,
        });
    }
    Ok(())
}

/// Counts a gap in every disk map of `outer`: the program was detached for
/// a while. A map that cannot be opened is removed from the outer map, so
/// the next `track` recreates it.
fn mark_gaps(outer: &MapHandle, pins: &PinDir) -> Result<(), TrackerError> {
    use libbpf_rs::MapCore;
    let keys: Vec<u32> = outer
        .keys()
        .filter_map(|k| {
            <[u8; 4]>::try_from(k.as_slice())
                .ok()
                .map(u32::from_ne_bytes)
        })
        .collect();
    for key in keys {
        match DiskMap::find(outer, pins, key)? {
            Found::Usable(map) => {
                map.words
                    .header()
                    .gaps
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            Found::Unusable(reason) => {
                tracing::warn!(disk = format_args!("{key:#x}"), %reason, "dropping an unusable disk map");
                let _ = outer.delete(&key.to_ne_bytes());
            }
            Found::Absent => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_bpffs_cannot_hold_are_refused() {
        assert!(check_pin_dir(Path::new("/sys/fs/bpf/tideline-unit-test-x")).is_ok());
        for bad in ["/sys/fs/bpf/tl.pins", "relative/pins", "/sys/fs/bpf/a\0b"] {
            assert!(
                matches!(
                    check_pin_dir(Path::new(bad)),
                    Err(TrackerError::InvalidPinDir { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
