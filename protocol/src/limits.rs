//! Bounds on everything that is read from the wire.
//!
//! Each constant is the largest value a decoder accepts; anything larger is
//! a typed error before any allocation is made from it.

/// Smallest accepted block size (4 KiB).
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
/// Largest accepted block size (4 MiB).
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
/// Default block size (64 KiB); the choice is explained in `docs/architecture.md`, the measurements are in `docs/benchmarks.md`.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Largest frame body: one maximal block plus its header fields.
pub const MAX_BODY_LEN: u32 = MAX_BLOCK_SIZE + 4096;
/// Largest disk count in one inventory or session.
pub const MAX_DISKS: usize = 256;
/// Largest length of a disk id or an agent id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Largest length of a free-text string (error messages, versions).
pub const MAX_TEXT_LEN: usize = 1024;
/// Largest number of digests in one `IndexChunk` message (512 KiB).
pub const MAX_INDEX_CHUNK: usize = 16 * 1024;
/// Largest disk size accepted (1 PiB); a bound, not a promise.
pub const MAX_DISK_SIZE: u64 = 1 << 50;
/// Rounds of one slot in one session: round numbers are below this. The
/// agent stops pre-copying long before (`[consistency] precopy_rounds`).
pub const MAX_ROUNDS: u32 = 64;

/// Whether `block_size` is a power of two within the accepted range.
pub fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
}

/// Whether `id` is a valid disk or agent id: 1 to [`MAX_ID_LEN`] bytes of
/// ASCII letters, digits, `.`, `_` and `-`, not starting with `.`.
///
/// The controller uses ids as directory names, so this also keeps them safe
/// as paths.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}
