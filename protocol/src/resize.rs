//! The rule both ends apply when a disk's size differs from its base point.
//!
//! When a disk grows or shrinks between points, the agent's block map and the
//! controller's base index are carried to the new geometry the same way, so
//! that the two ends keep agreeing on which blocks must be sent:
//!
//! * entries `0 .. min(old, new)` are kept as they are;
//! * entries past the old end are set to the zero digest of the new geometry.
//!
//! A kept entry for a block whose length changed (the old tail block, or the
//! new tail of a shrunk disk) then no longer matches what the agent reads, so
//! that block is sent again. A change of block size cannot be carried over:
//! the controller then syncs as if there were no base point.

use crate::digest::{Digest, Geometry, ZeroDigests};

/// The digest of block `index` of the new geometry, given the base entry
/// `base_entry(index)` for the blocks the base index covers.
pub fn carried_entry(
    index: u64,
    old_block_count: u64,
    new_zero: &ZeroDigests,
    base_entry: impl FnOnce(u64) -> Digest,
) -> Digest {
    if index < old_block_count {
        base_entry(index)
    } else {
        new_zero.for_block(index)
    }
}

/// Whether a base of geometry `old` can be carried to `new` at all.
pub fn can_carry(old: &Geometry, new: &Geometry) -> bool {
    old.block_size == new.block_size
}
