//! One whole disk's map (layout.rs): creating it, finding the one the
//! program writes to, installing it in the outer map, registering ranges.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;

use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use super::bitmap::{word_masks, Span};
use super::device::BlockDevice;
use super::error::{bpf_err, TrackerError};
use super::layout::{self, MapCause, WordMap, SLOTS};
use super::program::{map_id, remove_pin, PinDir};

/// A disk map, mapped.
pub struct DiskMap {
    handle: MapHandle,
    /// The kernel's id of the map (what the outer map returns for the key).
    pub kernel_id: u32,
    /// The words.
    pub words: WordMap,
    /// The whole disk's kernel dev_t.
    pub key: u32,
    /// Chunk = `512 << shift` bytes.
    pub shift: u32,
}

/// What the outer map holds for a disk.
pub enum Found {
    /// Nothing.
    Absent,
    /// A map this agent cannot use (why).
    Unusable(String),
    /// A valid map.
    Usable(DiskMap),
}

/// The kernel id of the disk map installed for `key`, if any.
pub fn installed_id(outer: &MapHandle, key: u32) -> Result<Option<u32>, TrackerError> {
    let value = outer
        .lookup(&key.to_ne_bytes(), MapFlags::ANY)
        .map_err(bpf_err(
            "look up",
            format!("disk {key:#x} in the outer map"),
        ))?;
    Ok(value.and_then(|v| {
        <[u8; 4]>::try_from(v.as_slice())
            .ok()
            .map(u32::from_ne_bytes)
    }))
}

impl DiskMap {
    /// The map the program writes for `key`, through its pin or, failing
    /// that, its id (which needs CAP_SYS_ADMIN).
    pub fn find(outer: &MapHandle, pins: &PinDir, key: u32) -> Result<Found, TrackerError> {
        let Some(id) = installed_id(outer, key)? else {
            return Ok(Found::Absent);
        };
        let pin = pins.disk(key);
        let by_pin = MapHandle::from_pinned_path(&pin)
            .ok()
            .filter(|m| m.info().is_ok_and(|i| i.info.id == id));
        let handle = match by_pin {
            Some(h) => h,
            None => match MapHandle::from_map_id(id) {
                Ok(h) => h,
                Err(e) => {
                    return Ok(Found::Unusable(format!(
                        "its pin {} is missing and map id {id} cannot be opened ({e})",
                        pin.display()
                    )))
                }
            },
        };
        match DiskMap::adopt(handle, key, id) {
            Ok(m) => Ok(Found::Usable(m)),
            Err(reason) => Ok(Found::Unusable(reason)),
        }
    }

    fn adopt(handle: MapHandle, key: u32, kernel_id: u32) -> Result<DiskMap, String> {
        if handle.map_type() != MapType::Array || handle.key_size() != 4 || handle.value_size() != 8
        {
            return Err(format!(
                "it is a {:?} map with {}-byte keys and {}-byte values",
                handle.map_type(),
                handle.key_size(),
                handle.value_size()
            ));
        }
        let words = WordMap::map(handle.as_fd(), handle.max_entries() as usize)
            .map_err(|e| format!("it cannot be mapped ({e})"))?;
        let (shift, _) = words.validate()?;
        Ok(DiskMap {
            handle,
            kernel_id,
            words,
            key,
            shift,
        })
    }

    /// Creates the map of `device`'s whole disk with chunks of
    /// `512 << shift` bytes; it is not installed yet.
    pub fn create(
        device: &BlockDevice,
        shift: u32,
        cause: MapCause,
    ) -> Result<DiskMap, TrackerError> {
        let chunks = device.disk_sectors.div_ceil(1 << shift).max(1);
        let entries = layout::map_entries(chunks);
        let entries = u32::try_from(entries).map_err(|_| TrackerError::DiskTooLarge {
            device: device.path.clone(),
            chunks,
        })?;
        let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: libbpf_rs::libbpf_sys::BPF_F_MMAPABLE
                | libbpf_rs::libbpf_sys::BPF_F_INNER_MAP,
            ..Default::default()
        };
        let name = format!("tl_{}_{}", device.disk_dev.0, device.disk_dev.1);
        let name = &name[..name.len().min(15)];
        let what = || format!("the tracking map of {}", device.disk_name);
        let handle = MapHandle::create(MapType::Array, Some(name), 4, 8, entries, &opts).map_err(
            |e| match e.kind() {
                libbpf_rs::ErrorKind::PermissionDenied => TrackerError::Unavailable {
                    reason: format!(
                        "cannot create {} ({e}): the agent needs root or CAP_BPF",
                        what()
                    ),
                },
                _ => bpf_err("create", what())(e),
            },
        )?;
        let kernel_id = map_id(&handle, device.path.as_path())?;
        let words =
            WordMap::map(handle.as_fd(), entries as usize).map_err(|source| TrackerError::Io {
                op: "map into memory",
                path: device.path.clone(),
                cause: source,
            })?;
        let h = words.header();
        h.version.store(layout::FORMAT_VERSION, Ordering::Relaxed);
        h.map_id.store(nonzero_random(), Ordering::Relaxed);
        h.shift.store(u64::from(shift), Ordering::Relaxed);
        h.chunks.store(chunks, Ordering::Relaxed);
        h.diskseq.store(device.diskseq, Ordering::Relaxed);
        h.disk_sectors.store(device.disk_sectors, Ordering::Relaxed);
        h.cause.store(cause.to_word(), Ordering::Relaxed);
        h.magic.store(layout::MAGIC, Ordering::Release);
        Ok(DiskMap {
            handle,
            kernel_id,
            words,
            key: device.disk_key(),
            shift,
        })
    }

    /// Makes this the map the program writes for its disk, and pins it.
    pub fn install(&mut self, outer: &MapHandle, pins: &PinDir) -> Result<(), TrackerError> {
        let fd = self.handle.as_fd();
        let raw = fd.as_raw_fd() as u32;
        outer
            .update(&self.key.to_ne_bytes(), &raw.to_ne_bytes(), MapFlags::ANY)
            .map_err(bpf_err(
                "install",
                format!("disk {:#x} in the outer map", self.key),
            ))?;
        self.ensure_pinned(pins)
    }

    /// Pins the map as `disk-<maj>-<min>`, replacing a stale pin.
    pub fn ensure_pinned(&mut self, pins: &PinDir) -> Result<(), TrackerError> {
        let pin = pins.disk(self.key);
        let current = MapHandle::from_pinned_path(&pin)
            .ok()
            .is_some_and(|m| m.info().is_ok_and(|i| i.info.id == self.kernel_id));
        if !current {
            remove_pin(&pin)?;
            self.handle
                .pin(&pin)
                .map_err(bpf_err("pin", pin.display()))?;
        }
        Ok(())
    }

    /// The slot holding a live registration of exactly `span`.
    pub fn find_slot(&self, span: &Span) -> Option<(usize, u64)> {
        let h = self.words.header();
        h.slots.iter().enumerate().find_map(|(i, s)| {
            let id = s.reg_id.load(Ordering::Acquire);
            (id != 0
                && s.start_sector.load(Ordering::Relaxed) == span.start_sector
                && s.sectors.load(Ordering::Relaxed) == span.sectors
                && s.block_size.load(Ordering::Relaxed) == u64::from(span.block_size))
            .then_some((i, id))
        })
    }

    /// Starts a registration of `span` (the device `dev`): ends every
    /// registration overlapping it, clears its bits, records the counters'
    /// baselines and gives it a new id, last. Returns `(slot, id)`.
    pub fn register(
        &self,
        device: &BlockDevice,
        span: &Span,
    ) -> Result<(usize, u64), TrackerError> {
        let h = self.words.header();
        for s in &h.slots {
            let id = s.reg_id.load(Ordering::Acquire);
            if id != 0
                && span.overlaps(
                    s.start_sector.load(Ordering::Relaxed),
                    s.sectors.load(Ordering::Relaxed),
                )
            {
                tracing::info!(device = %device.path.display(), registration = format_args!("{id:#018x}"),
                    "an overlapping registration of the disk ends");
                s.reg_id.store(0, Ordering::Release);
            }
        }
        let slot = h
            .slots
            .iter()
            .position(|s| s.reg_id.load(Ordering::Acquire) == 0)
            .ok_or_else(|| TrackerError::TooManyRegistrations {
                device: device.path.clone(),
                disk: device.disk_name.clone(),
                slots: SLOTS,
            })?;
        let s = &h.slots[slot];
        s.start_sector.store(span.start_sector, Ordering::Relaxed);
        s.sectors.store(span.sectors, Ordering::Relaxed);
        s.block_size
            .store(u64::from(span.block_size), Ordering::Relaxed);
        s.dev
            .store(u64::from(device.device_key()), Ordering::Relaxed);
        s.overflows_at
            .store(h.overflows.load(Ordering::Acquire), Ordering::Relaxed);
        s.gaps_at
            .store(h.gaps.load(Ordering::Acquire), Ordering::Relaxed);
        let (live, pending) = self.words.bitmaps();
        let (first, end) = span.chunk_range();
        for (w, mask) in word_masks(first, end) {
            live[w].fetch_and(!mask, Ordering::AcqRel);
            pending[w].fetch_and(!mask, Ordering::AcqRel);
        }
        let id = nonzero_random();
        s.reg_id.store(id, Ordering::Release);
        Ok((slot, id))
    }
}

fn nonzero_random() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}
