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

    /// Rebuilds the catalogue from the packs in `dir`: the chunks a pack's
    /// `.idx` lists are taken from it, and whatever no valid `.idx` covers
    /// is scanned (`pack::recover_pack`: damage skipped and reported, a torn
    /// tail cut, the `.idx` rewritten). Returns the catalogue, the id the
    /// next pack should get (one past the highest seen, so a pack that may
    /// have been torn is never appended to), and what the scans found.
    pub fn load(dir: &Path) -> Result<Loaded, StoreError> {
        let mut cat = Catalogue::default();
        let mut next_id = 0u32;
        let mut damage = Vec::new();
        let mut idx_deferred = false;
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
                Some(Ok((covered, entries))) if covered == len => entries,
                Some(Ok((covered, entries))) => {
                    let r = pack::recover_pack(dir, id, covered, entries)?;
                    damage.extend(r.damage);
                    idx_deferred |= r.idx_deferred;
                    r.entries
                }
                Some(Err(why)) => {
                    tracing::warn!(pack = %path.display(), "ignoring its idx ({why}), rescanning");
                    let r = pack::recover_pack(dir, id, 0, Vec::new())?;
                    damage.extend(r.damage);
                    idx_deferred |= r.idx_deferred;
                    r.entries
                }
                None => {
                    let r = pack::recover_pack(dir, id, 0, Vec::new())?;
                    damage.extend(r.damage);
                    idx_deferred |= r.idx_deferred;
                    r.entries
                }
            };
            for (d, loc) in entries {
                cat.insert(d, loc);
            }
        }
        Ok(Loaded {
            catalogue: cat,
            next_pack: next_id,
            damage,
            idx_deferred,
        })
    }
}

/// What [`Catalogue::load`] found.
pub(crate) struct Loaded {
    /// The catalogue.
    pub catalogue: Catalogue,
    /// Id of the next pack to create.
    pub next_pack: u32,
    /// Damaged records found in the middle of packs (skipped).
    pub damage: Vec<pack::Damage>,
    /// Whether some `.idx` could not be written for lack of space.
    pub idx_deferred: bool,
}
