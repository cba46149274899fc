//! A tracked device: its registration, and the moves of its bits between
//! LIVE (set by the program) and PENDING (taken, copy not yet committed).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use super::bitmap::{word_masks, DirtyExtents, ExtentBuilder, Span};
use super::device::{self, BlockDevice};
use super::disk_map::{installed_id, DiskMap};
use super::error::{Discontinuity, TrackerError};
use super::program::PinLock;
use super::{Registration, WriteTracker};

/// A device's place in its disk map.
pub(crate) struct Binding {
    pub map: Arc<DiskMap>,
    pub slot: usize,
    pub span: Span,
    pub registration: Registration,
}

/// Counters of the whole disk's map (shared by the disk's partitions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerCounters {
    /// Write-ish bios queued to the disk since its map was created.
    pub write_events: u64,
    /// Write events the bitmap could not record.
    pub overflows: u64,
    /// Times the program was found detached and attached again.
    pub gaps: u64,
}

/// One tracked device (whole disk or partition). `Send + Sync`; operations
/// on one handle are serialized.
pub struct TrackedDisk {
    tracker: WriteTracker,
    device: BlockDevice,
    block_size: u32,
    binding: Mutex<Binding>,
}

impl std::fmt::Debug for TrackedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedDisk")
            .field("device", &self.device.path)
            .field("block_size", &self.block_size)
            .finish()
    }
}

impl TrackedDisk {
    pub(crate) fn new(
        tracker: WriteTracker,
        device: BlockDevice,
        block_size: u32,
        binding: Binding,
    ) -> TrackedDisk {
        TrackedDisk {
            tracker,
            device,
            block_size,
            binding: Mutex::new(binding),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Binding> {
        // A panic while holding the lock leaves the binding whole (every
        // change to it is a single assignment), so a poisoned lock is used.
        self.binding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device path.
    pub fn device(&self) -> &Path {
        &self.device.path
    }

    /// The device's size in bytes (when it was tracked).
    pub fn size(&self) -> u64 {
        self.device.sectors * super::bitmap::SECTOR
    }

    /// The registration this handle works under.
    pub fn registration(&self) -> Registration {
        self.lock().registration.clone()
    }

    /// `Ok` if every write since `since` was registered is in this
    /// device's live ∪ pending sets; else why not.
    pub fn continuous_since(&self, since: &Registration) -> Result<(), Discontinuity> {
        let now_boot = device::boot_id().map_err(|e| Discontinuity::Unverifiable {
            reason: e.to_string(),
        })?;
        if since.boot_id != now_boot {
            return Err(Discontinuity::Rebooted {
                then: since.boot_id.clone(),
                now: now_boot,
            });
        }
        let now_seq = self.device.current_diskseq();
        if now_seq != Some(since.diskseq) {
            return Err(Discontinuity::DiskReplaced {
                then: since.diskseq,
                now: now_seq,
            });
        }
        self.tracker.check_attached()?;
        let b = self.lock();
        self.check_bound(&b)?;
        let h = b.map.words.header();
        let map_id = h.map_id.load(Ordering::Acquire);
        if since.map_id != map_id {
            return Err(Discontinuity::MapRecreated {
                cause: super::layout::MapCause::from_word(h.cause.load(Ordering::Acquire)),
            });
        }
        if since.id != b.registration.id {
            if since.block_size != b.registration.block_size {
                return Err(Discontinuity::BlockSizeChanged {
                    then: since.block_size,
                    now: b.registration.block_size,
                });
            }
            return Err(Discontinuity::Reregistered {
                then: since.id,
                now: b.registration.id,
            });
        }
        let slot = &h.slots[b.slot];
        let overflows = h
            .overflows
            .load(Ordering::Acquire)
            .saturating_sub(slot.overflows_at.load(Ordering::Acquire));
        if overflows > 0 {
            return Err(Discontinuity::Overflow { count: overflows });
        }
        let gaps = h
            .gaps
            .load(Ordering::Acquire)
            .saturating_sub(slot.gaps_at.load(Ordering::Acquire));
        if gaps > 0 {
            return Err(Discontinuity::TrackingGap { count: gaps });
        }
        Ok(())
    }

    /// Whether this handle's map is the one the program writes for the
    /// disk, and its slot still holds its registration.
    fn check_bound(&self, b: &Binding) -> Result<(), Discontinuity> {
        match installed_id(self.tracker.outer(), b.map.key) {
            Ok(Some(id)) if id == b.map.kernel_id => {}
            Ok(_) => return Err(Discontinuity::MapReplaced),
            Err(e) => {
                return Err(Discontinuity::Unverifiable {
                    reason: e.to_string(),
                })
            }
        }
        let now = b.map.words.header().slots[b.slot]
            .reg_id
            .load(Ordering::Acquire);
        if now != b.registration.id {
            return Err(Discontinuity::Reregistered {
                then: b.registration.id,
                now,
            });
        }
        Ok(())
    }

    fn stale(&self, reason: Discontinuity) -> TrackerError {
        TrackerError::Stale {
            device: self.device.path.clone(),
            reason,
        }
    }

    /// Starts over: a new registration, live and pending cleared for this
    /// device (not its neighbours). Writes from this instant on are
    /// tracked. Also rebinds a stale handle to the disk's present map.
    pub fn reset(&self) -> Result<Registration, TrackerError> {
        let dev = BlockDevice::resolve(&self.device.path)?;
        if (dev.start_sector, dev.sectors) != (self.device.start_sector, self.device.sectors) {
            tracing::warn!(device = %dev.path.display(),
                "the device moved or changed size since it was tracked; tracking its new extent");
        }
        // A tracker whose pins were replaced cannot register anything the
        // program sees: the caller must open the tracker again.
        self.tracker.check_attached().map_err(|r| self.stale(r))?;
        let _lock = PinLock::acquire(self.tracker.pin_dir())?;
        let binding = self.tracker.bind(&dev, self.block_size, true)?;
        let registration = binding.registration.clone();
        *self.lock() = binding;
        Ok(registration)
    }

    /// Moves the live bits into pending and returns the blocks they name
    /// (written since the previous take); with `with_pending`, returns
    /// pending ∪ those.
    ///
    /// Crash-safe: each bit is ORed into pending before it is cleared from
    /// live, and only the bits that were read are cleared (with `fetch_and`
    /// on this device's chunk range), so at every instant every set bit is
    /// in live or in pending, and a partition never clears a neighbour's
    /// bits.
    pub fn take(&self, with_pending: bool) -> Result<DirtyExtents, TrackerError> {
        self.tracker.check_attached().map_err(|r| self.stale(r))?;
        let b = self.lock();
        self.check_bound(&b).map_err(|r| self.stale(r))?;
        let (live, pending) = b.map.words.bitmaps();
        let (first, end) = b.span.chunk_range();
        let mut out = ExtentBuilder::new(b.span);
        // Indexes are in range: bind checked that the span lies in the disk
        // the map was made for, and the map has a bit for each chunk of it.
        for (w, mask) in word_masks(first, end) {
            let bits = live[w].load(Ordering::Acquire) & mask;
            if bits != 0 {
                pending[w].fetch_or(bits, Ordering::AcqRel);
                live[w].fetch_and(!bits, Ordering::AcqRel);
            }
            let named = if with_pending {
                pending[w].load(Ordering::Acquire) & mask
            } else {
                bits
            };
            out.push_word(w, named);
        }
        Ok(out.finish())
    }

    /// Bytes `take(true)` would name now, without changing anything. A
    /// stale handle answers the whole device (everything must be copied).
    pub fn dirty_bytes(&self) -> u64 {
        let b = self.lock();
        if self.check_bound(&b).is_err() {
            return b.span.size();
        }
        let (live, pending) = b.map.words.bitmaps();
        let (first, end) = b.span.chunk_range();
        let mut out = ExtentBuilder::new(b.span);
        for (w, mask) in word_masks(first, end) {
            let bits =
                (live[w].load(Ordering::Acquire) | pending[w].load(Ordering::Acquire)) & mask;
            out.push_word(w, bits);
        }
        out.finish().bytes
    }

    /// Forgets the pending set (after the point that copied it was
    /// committed). Does nothing on a stale handle.
    pub fn clear_pending(&self) {
        let b = self.lock();
        if let Err(reason) = self.check_bound(&b) {
            tracing::warn!(device = %self.device.path.display(), %reason, "not clearing pending bits of a stale handle");
            return;
        }
        let (_, pending) = b.map.words.bitmaps();
        let (first, end) = b.span.chunk_range();
        for (w, mask) in word_masks(first, end) {
            pending[w].fetch_and(!mask, Ordering::AcqRel);
        }
    }

    /// The whole disk map's counters.
    pub fn counters(&self) -> TrackerCounters {
        let b = self.lock();
        let h = b.map.words.header();
        TrackerCounters {
            write_events: h.write_events.load(Ordering::Acquire),
            overflows: h.overflows.load(Ordering::Acquire),
            gaps: h.gaps.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<super::TrackedDisk>();
        send_sync::<super::WriteTracker>();
    }
}
