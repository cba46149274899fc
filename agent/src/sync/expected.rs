//! What the controller already holds for each block: the base point's
//! digests, carried to the disk's current geometry.
//!
//! During a scan the agent compares every block's digest with this view and
//! sends only the blocks that differ. The view never modifies the block map:
//! the map advances only after the controller commits.

use std::collections::HashMap;
use std::sync::Arc;
use tideline_protocol::resize::carried_entry;
use tideline_protocol::{Digest, Geometry, ZeroDigests};

use crate::tracking::BlockMap;

/// The digests a new point starts from, before this session's changes.
#[derive(Clone)]
pub struct ExpectedIndex {
    map: Option<Arc<BlockMap>>,
    old_count: u64,
    zero: ZeroDigests,
    geometry: Geometry,
    /// Digests earlier rounds of this session sent (they replace the
    /// base's), for the blocks a later round looks at.
    sent: Option<Arc<HashMap<u64, Digest>>>,
}

impl ExpectedIndex {
    /// No base point: the controller starts from an all-zero disk.
    pub fn zero(geometry: Geometry) -> Self {
        ExpectedIndex {
            map: None,
            old_count: 0,
            zero: ZeroDigests::new(geometry.disk_size, geometry.block_size),
            geometry,
            sent: None,
        }
    }

    /// This view with the digests earlier rounds sent laid over it.
    pub fn with_sent(mut self, sent: Arc<HashMap<u64, Digest>>) -> Self {
        self.sent = Some(sent);
        self
    }

    /// The base point held in `map`, carried to `geometry`.
    pub fn from_map(map: Arc<BlockMap>, geometry: Geometry) -> Self {
        let old_count = map.geometry().block_count;
        ExpectedIndex {
            map: Some(map),
            old_count,
            zero: ZeroDigests::new(geometry.disk_size, geometry.block_size),
            geometry,
            sent: None,
        }
    }

    /// The geometry of the new point.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Zero digests of the new geometry.
    pub fn zero_digests(&self) -> &ZeroDigests {
        &self.zero
    }

    /// Digest the controller holds for `block`: what an earlier round of
    /// this session sent, else the base's.
    pub fn get(&self, block: u64) -> Digest {
        if let Some(d) = self.sent.as_ref().and_then(|s| s.get(&block)) {
            return *d;
        }
        match &self.map {
            None => self.zero.for_block(block),
            Some(map) => carried_entry(block, self.old_count, &self.zero, |i| map.get(i)),
        }
    }
}
