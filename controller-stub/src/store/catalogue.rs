//! The digest catalogue: which chunks the store holds and where.
//!
//! Deduplication, `has_chunk` and every read go through this map from
//! digest to [`ChunkLoc`]. It lives in memory and is rebuilt on open from
//! the packs' `.idx` sidecars (or by scanning a pack that was never sealed).
//!
//! Known limit: the catalogue grows with the number of distinct chunks
//! (about 100 bytes each: 1 TiB of unique 64 KiB blocks is 16 Mi entries,
//! roughly 1.6 GiB). Everything else in the store is bounded regardless of
//! disk size; a larger store would keep this map on disk (a sorted table
//! per pack, or an embedded key-value store).

use std::collections::HashMap;
use std::path::Path;

use tideline_protocol::Digest;

use super::error::StoreError;
use super::fsutil;
use super::pack::{self, ChunkLoc};

/// Every chunk of the store, by digest.
#[derive(Default)]
pub(crate) struct Catalogue {
    chunks: HashMap<Digest, ChunkLoc>,
    /// Sum of the record lengths of every catalogued chunk.
    stored_bytes: u64,
}

impl Catalogue {
    /// Where chunk `digest` lies, if the store holds it.
    pub fn get(&self, digest: &Digest) -> Option<ChunkLoc> {
        self.chunks.get(digest).copied()
    }

    /// Whether the store holds chunk `digest`.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.chunks.contains_key(digest)
    }

    /// Records that `digest` lies at `loc`; a digest already present keeps
    /// its first location (a duplicate record is dead weight, not an error).
    pub fn insert(&mut self, digest: Digest, loc: ChunkLoc) {
        if let std::collections::hash_map::Entry::Vacant(v) = self.chunks.entry(digest) {
            v.insert(loc);
            self.stored_bytes += loc.record_len();
        }
    }

    /// Number of chunks.
    pub fn len(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Bytes of pack space taken by the catalogued chunks.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// Rebuilds the catalogue from the packs in `dir`: a pack with a valid
    /// `.idx` is taken from it, any other pack is scanned, cut after its
    /// last whole record and sealed. Returns the catalogue and the id the
    /// next pack should get (one past the highest seen, so a pack that may
    /// have been torn is never appended to).
    pub fn load(dir: &Path) -> Result<(Catalogue, u32), StoreError> {
        let mut cat = Catalogue::default();
        let mut next_id = 0u32;
        for (name, is_dir) in fsutil::list_dir(dir)? {
            if is_dir {
                continue;
            }
            if name.ends_with(".tmp") {
                // An `.idx` that was being written; it is redone below.
                fsutil::remove_if_exists(&dir.join(&name))?;
                continue;
            }
            let Some(id) = pack::parse_pack_name(&name) else {
                continue;
            };
            next_id = next_id.max(id.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                path: dir.join(&name),
                what: "pack id space exhausted".into(),
            })?);
            let path = pack::pack_path(dir, id);
            let len = std::fs::metadata(&path)
                .map_err(super::error::io_err(&path))?
                .len();
            let entries = match pack::read_idx(dir, id, len)? {
                Some(Ok(entries)) => entries,
                Some(Err(why)) => {
                    tracing::warn!(pack = %path.display(), "ignoring its idx ({why}), rescanning");
                    pack::recover_pack(dir, id)?
                }
                None => pack::recover_pack(dir, id)?,
            };
            for (d, loc) in entries {
                cat.insert(d, loc);
            }
        }
        Ok((cat, next_id))
    }
}
