//! The word map of one tracked whole disk: the format the BPF program and
//! the agent share. This comment is the specification; the BPF side reads
//! its numbers from `agent/bpf/write_tracker.h` (a test below checks that
//! both agree).
//!
//! Each tracked whole disk has one `BPF_MAP_TYPE_ARRAY` with 4-byte keys
//! and 8-byte values (`u64` words), created by the agent with
//! `BPF_F_MMAPABLE | BPF_F_INNER_MAP`, installed in the outer hash of maps
//! under the disk's `dev_t` (kernel encoding, `major << 20 | minor`) and
//! pinned as `<pin_dir>/disk-<major>-<minor>`. The agent maps it into its
//! memory and works on the words with atomics; the program changes words
//! with `__sync_fetch_and_or` / `__sync_fetch_and_add`. Nothing is written to
//! a file: the map lives as long as a pin, a program or a mapping holds it,
//! that is until it is untracked, the pins are removed, or the machine
//! reboots.
//!
//! ```text
//! word         written by   meaning
//! 0            agent        MAGIC, "TLWRTRK" + 0x01 (little-endian u64)
//! 1            agent        FORMAT_VERSION (1)
//! 2            agent        map id: random, non-zero, chosen at creation
//! 3            agent        shift: a chunk is 512 << shift bytes (shift <= 22)
//! 4            agent        chunks: whole-disk chunks the bitmaps cover
//! 5            agent        diskseq of the disk at creation (0: unknown)
//! 6            program      write events: write-ish bios queued to the disk
//! 7            program      overflows: write events the bitmap could not record
//!                           (longer than MAX_WORDS_PER_EVENT words, past the
//!                           last chunk, or without a position)
//! 8            agent        gaps: times the program was found detached and
//!                           attached again while this map existed
//! 9            agent        disk size in 512-byte sectors at creation
//! 10           agent        cause: why the map was created (MapCause)
//! 11..16       -            reserved, 0
//! 16..256      agent        30 registration slots of 8 words (Slot)
//! 256..256+L   program      LIVE: bit c of word 256 + c / 64 (bit c % 64)
//!                           set = chunk c was written since the agent last
//!                           moved it to PENDING
//! 256+L..256+2L agent       PENDING: chunks taken from LIVE whose copy is not
//!                           committed yet
//! ```
//!
//! with `L = ceil(chunks / 64)` and `max_entries = 256 + 2L`. Chunk `c` covers
//! the whole disk's bytes `[c << (shift + 9), (c + 1) << (shift + 9))`.
//!
//! A slot (8 words) describes one registration, a range of the disk (the
//! whole disk or a partition) tracked at one block size:
//!
//! ```text
//! +0 registration id (0: slot free)   +4 overflows when registered
//! +1 first sector of the range        +5 gaps when registered
//! +2 sectors in the range             +6 dev_t of the device (kernel encoding)
//! +3 block size                       +7 reserved
//! ```
//!
//! The header and slot fields other than the counters are written before
//! the map is installed in the outer map, or under the pin directory's lock.
//! A slot is written with its id at 0 and given its id last, so a crash in
//! the middle leaves a free slot, never a registration that claims bits it
//! does not hold. There is no checksum: the words are never torn by a crash
//! (the kernel holds them), and each is validated when a map is adopted.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Word 0: "TLWRTRK" followed by the byte 0x01.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TLWRTRK\x01");
/// Word 1: the layout described here.
pub const FORMAT_VERSION: u64 = 1;
/// Words before the LIVE bitmap.
pub const HEADER_WORDS: usize = 256;
/// Registration slots in a header.
pub const SLOTS: usize = 30;
/// Largest shift (chunks of 2 GiB).
pub const MAX_SHIFT: u32 = 22;
/// Bitmap words one event may set; a longer range is an overflow. The
/// verifier walks the program's loop once per word, and refuses it past
/// about 4000 (too many pending branches), so 2048: one event covers up to
/// 131072 chunks, 512 MiB at 4 KiB chunks, 8 GiB at 64 KiB (more than one
/// request can hold: `nr_bytes` is 32 bits).
pub const MAX_WORDS_PER_EVENT: u64 = 2048;
/// Whole disks the outer map holds.
pub const MAX_DISKS: u32 = 1024;

/// The header words, as laid out in the map.
#[repr(C)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`FORMAT_VERSION`].
    pub version: AtomicU64,
    /// Random id of this map (non-zero).
    pub map_id: AtomicU64,
    /// A chunk is `512 << shift` bytes.
    pub shift: AtomicU64,
    /// Chunks covering the whole disk.
    pub chunks: AtomicU64,
    /// The disk's diskseq at creation (0: unknown).
    pub diskseq: AtomicU64,
    /// Write-ish bios queued to the disk (program).
    pub write_events: AtomicU64,
    /// Write events the bitmap could not record (program).
    pub overflows: AtomicU64,
    /// Times tracking was found detached and attached again (agent).
    pub gaps: AtomicU64,
    /// Disk size in sectors at creation.
    pub disk_sectors: AtomicU64,
    /// Why the map was created ([`MapCause`] as a number).
    pub cause: AtomicU64,
    reserved: [AtomicU64; 5],
    /// Registrations.
    pub slots: [Slot; SLOTS],
}

/// One registration slot.
#[repr(C)]
pub struct Slot {
    /// Registration id; 0 when the slot is free.
    pub reg_id: AtomicU64,
    /// First sector of the registered range (whole-disk numbering).
    pub start_sector: AtomicU64,
    /// Sectors in the range.
    pub sectors: AtomicU64,
    /// Block size of the registration.
    pub block_size: AtomicU64,
    /// The header's overflows when the registration began.
    pub overflows_at: AtomicU64,
    /// The header's gaps when the registration began.
    pub gaps_at: AtomicU64,
    /// The registered device's dev_t (kernel encoding), for diagnosis.
    pub dev: AtomicU64,
    reserved: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 8 * 8);
const _: () = assert!(std::mem::size_of::<Header>() == HEADER_WORDS * 8);

/// Why a disk's map was created: kept in the header so that a broken
/// continuity can say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MapCause {
    /// The disk had no map (first registration, or after the pins were
    /// removed).
    NewDisk,
    /// A registration needed a finer chunk than the map had (a partition
    /// whose start is not aligned to the previous chunk size, or a smaller
    /// block size).
    FinerGranularity,
    /// The disk's diskseq changed: another medium is behind the device.
    DiskChanged,
    /// The disk's size changed.
    DiskResized,
    /// The previous map was unreadable or of another format.
    Unusable,
}

impl MapCause {
    pub(crate) fn to_word(self) -> u64 {
        match self {
            MapCause::NewDisk => 1,
            MapCause::FinerGranularity => 2,
            MapCause::DiskChanged => 3,
            MapCause::DiskResized => 4,
            MapCause::Unusable => 5,
        }
    }

    pub(crate) fn from_word(word: u64) -> MapCause {
        match word {
            1 => MapCause::NewDisk,
            2 => MapCause::FinerGranularity,
            3 => MapCause::DiskChanged,
            4 => MapCause::DiskResized,
            _ => MapCause::Unusable,
        }
    }
}

impl std::fmt::Display for MapCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MapCause::NewDisk => "it was created anew (tracking was removed or never set up)",
            MapCause::FinerGranularity => "a registration needed a finer granularity",
            MapCause::DiskChanged => "another medium appeared behind the device (diskseq changed)",
            MapCause::DiskResized => "the disk's size changed",
            MapCause::Unusable => "the previous map was unreadable or of another format",
        })
    }
}

/// Bitmap words for `chunks` chunks.
pub fn bitmap_words(chunks: u64) -> u64 {
    chunks.div_ceil(64)
}

/// `max_entries` of a disk map with `chunks` chunks.
pub fn map_entries(chunks: u64) -> u64 {
    HEADER_WORDS as u64 + 2 * bitmap_words(chunks)
}

/// A disk map mapped into the agent's memory.
pub struct WordMap {
    ptr: NonNull<AtomicU64>,
    words: usize,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the
// pointer stays valid until Drop unmaps it.
unsafe impl Send for WordMap {}
// SAFETY: as above: &WordMap only hands out &AtomicU64.
unsafe impl Sync for WordMap {}

impl WordMap {
    /// Maps the `words` words of the BPF array `fd` (created with
    /// `BPF_F_MMAPABLE`; `words` is its `max_entries`).
    pub fn map(fd: BorrowedFd<'_>, words: usize) -> io::Result<WordMap> {
        if words < HEADER_WORDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("map has {words} words, fewer than the {HEADER_WORDS} of a header"),
            ));
        }
        let len = words
            .checked_mul(8)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "map too large"))?;
        // SAFETY: a fresh shared mapping of a BPF array fd; the kernel
        // checks the length against the map's size and fails otherwise.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned a null pointer"))?;
        Ok(WordMap { ptr, words, len })
    }

    fn all(&self) -> &[AtomicU64] {
        // SAFETY: `words` u64s are mapped at `ptr` (page aligned, so aligned
        // for AtomicU64) for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the map holds at least HEADER_WORDS words (checked in
        // `map`), Header is repr(C) of exactly that many AtomicU64.
        unsafe { &*self.ptr.as_ptr().cast::<Header>() }
    }

    /// Words in the map.
    pub fn words(&self) -> usize {
        self.words
    }

    /// The LIVE and PENDING bitmaps, `L` words each (the header must have
    /// been validated: `map_entries(chunks) == words`).
    pub fn bitmaps(&self) -> (&[AtomicU64], &[AtomicU64]) {
        let l = (self.words - HEADER_WORDS) / 2;
        let rest = &self.all()[HEADER_WORDS..];
        (&rest[..l], &rest[l..2 * l])
    }

    /// Checks that the header describes a map of this layout and size, and
    /// returns `(shift, chunks)`.
    pub fn validate(&self) -> Result<(u32, u64), String> {
        let h = self.header();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(format!("bad magic {magic:#018x}"));
        }
        let version = h.version.load(Ordering::Acquire);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this agent reads {FORMAT_VERSION}"
            ));
        }
        let shift = h.shift.load(Ordering::Acquire);
        if shift > u64::from(MAX_SHIFT) {
            return Err(format!("shift {shift} exceeds {MAX_SHIFT}"));
        }
        let chunks = h.chunks.load(Ordering::Acquire);
        if chunks == 0 || map_entries(chunks) != self.words as u64 {
            return Err(format!(
                "{chunks} chunks do not fit a map of {} words",
                self.words
            ));
        }
        Ok((shift as u32, chunks))
    }
}

impl Drop for WordMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`; no reference
        // into it outlives self.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// The `#define`s of write_tracker.h, by name.
    fn c_defines() -> std::collections::HashMap<String, u64> {
        include_str!("../../../bpf/write_tracker.h")
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == "#define").then_some(())?;
                let name = it.next()?.to_string();
                let value = it.next()?.parse().ok()?;
                Some((name, value))
            })
            .collect()
    }

    #[test]
    fn the_bpf_header_agrees_with_this_spec() {
        let c = c_defines();
        let word = |off: usize| (off / 8) as u64;
        let expect = [
            ("TL_HDR_MAGIC", word(offset_of!(Header, magic))),
            ("TL_HDR_VERSION", word(offset_of!(Header, version))),
            ("TL_HDR_MAP_ID", word(offset_of!(Header, map_id))),
            ("TL_HDR_SHIFT", word(offset_of!(Header, shift))),
            ("TL_HDR_CHUNKS", word(offset_of!(Header, chunks))),
            ("TL_HDR_DISKSEQ", word(offset_of!(Header, diskseq))),
            (
                "TL_HDR_WRITE_EVENTS",
                word(offset_of!(Header, write_events)),
            ),
            ("TL_HDR_OVERFLOWS", word(offset_of!(Header, overflows))),
            ("TL_HDR_GAPS", word(offset_of!(Header, gaps))),
            (
                "TL_HDR_DISK_SECTORS",
                word(offset_of!(Header, disk_sectors)),
            ),
            ("TL_HDR_CAUSE", word(offset_of!(Header, cause))),
            ("TL_HEADER_WORDS", HEADER_WORDS as u64),
            ("TL_MAX_SHIFT", u64::from(MAX_SHIFT)),
            ("TL_MAX_WORDS_PER_EVENT", MAX_WORDS_PER_EVENT),
            ("TL_MAX_DISKS", u64::from(MAX_DISKS)),
        ];
        for (name, value) in expect {
            assert_eq!(c.get(name), Some(&value), "{name} in write_tracker.h");
        }
        assert_eq!(offset_of!(Header, slots), 16 * 8);
    }

    #[test]
    fn causes_round_trip_and_unknown_words_mean_unusable() {
        for c in [
            MapCause::NewDisk,
            MapCause::FinerGranularity,
            MapCause::DiskChanged,
            MapCause::DiskResized,
            MapCause::Unusable,
        ] {
            assert_eq!(MapCause::from_word(c.to_word()), c);
        }
        assert_eq!(MapCause::from_word(0), MapCause::Unusable);
        assert_eq!(MapCause::from_word(77), MapCause::Unusable);
    }

    #[test]
    fn entries_hold_header_and_two_bitmaps() {
        assert_eq!(map_entries(1), 256 + 2);
        assert_eq!(map_entries(64), 256 + 2);
        assert_eq!(map_entries(65), 256 + 4);
        assert_eq!(bitmap_words(0), 0);
    }
}
