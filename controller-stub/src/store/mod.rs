//! The controller's recovery-point store.
//!
//! Blocks arrive from a sync session (`put_block`), are decoded and
//! re-hashed, and are appended once per digest to pack files (`pack.rs`);
//! the in-memory catalogue (`catalogue.rs`) knows where each chunk lies. A
//! session then describes the new point block by block (`PointBuilder`,
//! `builder.rs`, with a staging log in `staging.rs` so that a dropped
//! session resumes), and `commit` writes the point's two-level index
//! (`index_file.rs`) and its manifest (`point.rs`) atomically. Points are
//! read back page by page, exported as raw images and verified in
//! `export.rs`.
//!
//! # Layout under the store root
//!
//! ```text
//! packs/<id:08x>.pack                         chunk records (pack.rs)
//! packs/<id:08x>.idx                          sidecar of a sealed pack (pack.rs)
//! points/<agent>/<disk>/<point:016x>/index    top index (index_file.rs)
//! points/<agent>/<disk>/<point:016x>/manifest.json   commit marker (point.rs)
//! staging/<agent>/<disk>/<point:016x>.log     blocks recorded so far (staging.rs)
//! ```
//!
//! # Crash safety
//!
//! A point is committed in this order: every chunk it references is fsynced
//! in its pack; the point is written as `<point>.tmp/` (index fsynced, then
//! `manifest.json` via temp file, fsync, rename, fsync of the directory);
//! the directory is renamed to its final name; the disk directory is
//! fsynced. A SIGKILL at any instant therefore leaves earlier points
//! untouched and the new one whole or absent; `open` removes `.tmp`
//! directories and point directories without a manifest, cuts torn pack
//! tails and seals the packs that were being written.
//!
//! # Known limits
//!
//! * The digest catalogue is in memory (see `catalogue.rs`): about 100
//!   bytes per distinct chunk.
//! * Building or verifying an index buffers its page digests for the root
//!   (`IndexRootHasher`): 32 bytes per 128 blocks, 4 MiB for a 1 TiB disk
//!   at 64 KiB blocks. Everything else is one page or one block at a time.
//! * Chunks no point references (an aborted or mismatched session) stay in
//!   the packs until a garbage collection (not written yet) sweeps them.
//! * Sealing a full pack (fsync of up to 1 GiB, then its `.idx`) happens
//!   under the pack lock, so puts wait for it once per GiB stored.
//! * Export and verify read one block at a time on the calling thread.
//!
//! # Concurrency
//!
//! `Store` is `Send + Sync`; its methods take `&self`. Pack appends and the
//! catalogue are behind one mutex; decoding and hashing happen outside it,
//! and reads take it only to look a digest up.

mod builder;
mod catalogue;
mod chunk;
mod error;
mod export;
mod export_vmdk;
mod fsutil;
mod index_file;
mod pack;
mod point;
mod staging;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tideline_protocol::limits::valid_id;
use tideline_protocol::{Digest, Encoding};

pub use builder::PointBuilder;
pub use error::StoreError;
pub use export::{ExportReport, VerifyReport};
pub use point::{ConsistencyInfo, PointInfo};

use catalogue::Catalogue;
use error::io_err;
use pack::{PackWriter, MAX_STORED_LEN};

/// Id of a recovery point, unique per (agent, disk).
pub type PointId = u64;

/// What `put_block` did with a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The block was new and has been appended to a pack.
    Stored {
        /// Bytes added to the pack (record header and payload).
        stored_bytes: u64,
    },
    /// A chunk with this digest was already stored; nothing was written.
    Deduplicated,
}

/// Size figures of the chunk store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Number of distinct chunks (blocks and index pages).
    pub chunks: u64,
    /// Bytes of pack space they take, record headers included.
    pub stored_bytes: u64,
}

/// Most pack files kept open for reading at once.
const MAX_OPEN_PACKS: usize = 64;
/// A read-only store becomes writable again once this much is free.
const MIN_FREE_BYTES: u64 = 64 << 20;

/// Whether the store takes new points, as the admin interface and the
/// metrics show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoreHealth {
    /// New points are taken.
    pub writable: bool,
    /// Why not.
    pub reason: Option<String>,
    /// Bytes free on the store's file system (for the unprivileged user).
    pub free_bytes: Option<u64>,
    /// Damaged records found in the middle of packs when it was opened.
    pub damaged_records: u64,
}

/// A damaged stretch of a pack, as the admin interface shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DamageReport {
    /// The pack file.
    pub pack: String,
    /// First damaged byte.
    pub start: u64,
    /// First byte of the next whole record.
    pub end: u64,
    /// What was wrong.
    pub why: String,
    /// The chunk the damaged record's header names, if it was readable.
    pub chunk: Option<String>,
}

/// The packs and the catalogue, guarded together so that a digest is in the
/// catalogue only once its record is in a pack.
struct PackState {
    catalogue: Catalogue,
    /// The pack being appended to; created on the first new chunk.
    writer: Option<PackWriter>,
    /// Id of the next pack to create.
    next_pack: u32,
    /// Size at which a pack is sealed ([`pack::PACK_TARGET_BYTES`]; smaller
    /// in tests).
    pack_target: u64,
}

/// The recovery-point store rooted at one directory.
pub struct Store {
    root: PathBuf,
    packs_dir: PathBuf,
    state: Mutex<PackState>,
    /// Why the store takes no new points (it ran out of space), if so.
    read_only: Mutex<Option<String>>,
    /// Damage found in the packs when the store was opened.
    damage: Vec<pack::Damage>,
    /// Pack files open for reading, by id.
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// Points that have a live `PointBuilder`.
    building: Mutex<HashSet<(String, String, PointId)>>,
}

/// Locks `m`, recovering the data of a poisoned lock: every guarded update
/// leaves the data consistent before anything that can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks that `id` is a valid agent or disk id.
fn check_id(id: &str) -> Result<(), StoreError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(StoreError::InvalidId(id.to_string()))
    }
}

/// A chunk as it lies in its pack.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    /// How the payload is encoded.
    pub encoding: Encoding,
    /// Length of the decoded block.
    pub raw_len: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`: loads the catalogue
    /// of every pack, recovers packs that were being written, removes
    /// incomplete points and stale staging logs.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        let root = root.to_path_buf();
        let packs_dir = root.join("packs");
        for sub in ["packs", "points", "staging"] {
            fsutil::create_dir_durable(&root, &root.join(sub))?;
        }
        let loaded = Catalogue::load(&packs_dir)?;
        let read_only = loaded.idx_deferred.then(|| {
            "no space left on its file system to index its packs; free space on it, then sync again".to_string()
        });
        let store = Store {
            root,
            packs_dir,
            state: Mutex::new(PackState {
                catalogue: loaded.catalogue,
                writer: None,
                next_pack: loaded.next_pack,
                pack_target: pack::PACK_TARGET_BYTES,
            }),
            read_only: Mutex::new(read_only),
            damage: loaded.damage,
            readers: Mutex::new(HashMap::new()),
            building: Mutex::new(HashSet::new()),
        };
        store.remove_incomplete_points()?;
        let stats = store.stats();
        tracing::info!(
            root = %store.root.display(),
            chunks = stats.chunks,
            stored_bytes = stats.stored_bytes,
            damaged_records = store.damage.len(),
            read_only = ?lock(&store.read_only),
            "store opened"
        );
        Ok(store)
    }

    /// Refuses new writes while the store is read-only. A store made
    /// read-only by a full file system becomes writable again by itself
    /// once there is room: the `.idx` files it could not write are written
    /// first (by reopening the catalogue's view of them).
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let Some(reason) = lock(&self.read_only).clone() else {
            return Ok(());
        };
        if fsutil::free_bytes(&self.root).is_some_and(|b| b >= MIN_FREE_BYTES) {
            // Rebuild the catalogue from the packs as an open would: the
            // pack being written when space ran out is scanned and indexed,
            // and never appended to again. (Lock order: state, then
            // read_only, as everywhere.)
            let mut st = lock(&self.state);
            st.writer = None;
            match Catalogue::load(&self.packs_dir) {
                Ok(l) if !l.idx_deferred => {
                    st.catalogue = l.catalogue;
                    st.next_pack = st.next_pack.max(l.next_pack);
                    *lock(&self.read_only) = None;
                    tracing::info!(root = %self.root.display(), "space is available again: the store takes new points");
                    return Ok(());
                }
                Ok(_) => {
                    tracing::warn!(root = %self.root.display(), "still no space for the packs' indexes")
                }
                Err(e) => tracing::warn!(error = %e, "store still cannot write its pack indexes"),
            }
        }
        Err(StoreError::ReadOnly {
            root: self.root.clone(),
            reason,
        })
    }

    /// Marks the store read-only because a write failed for lack of space.
    pub(crate) fn note_full(&self, e: &StoreError) {
        if e.is_no_space() {
            let mut ro = lock(&self.read_only);
            if ro.is_none() {
                tracing::error!(root = %self.root.display(), error = %e, "the store is full: new points are refused until space is freed; committed points are still served");
                *ro = Some(format!("{e}; free space on it, then sync again"));
            }
        }
    }

    /// Whether the store takes new points, why not, and the room left.
    pub fn health(&self) -> StoreHealth {
        let reason = lock(&self.read_only).clone();
        StoreHealth {
            writable: reason.is_none(),
            reason,
            free_bytes: fsutil::free_bytes(&self.root),
            damaged_records: self.damage.len() as u64,
        }
    }

    /// Damage found in the packs when the store was opened: stretches that
    /// hold no record that checks out, in the middle of a pack.
    pub fn damage(&self) -> Vec<DamageReport> {
        self.damage
            .iter()
            .map(|d| DamageReport {
                pack: d.pack.display().to_string(),
                start: d.start,
                end: d.end,
                why: d.why.clone(),
                chunk: d.digest.map(|d| d.to_hex()),
            })
            .collect()
    }

    /// Root directory of the store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Verifies a block (decodes its payload per `encoding`: zstd output is
    /// capped at `raw_len` and must be exactly `raw_len`; raw payloads must
    /// be `raw_len` long; zero blocks are refused, they are never stored),
    /// re-hashes it, and stores it unless its digest is already present.
    pub fn put_block(
        &self,
        digest: &Digest,
        encoding: Encoding,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<PutOutcome, StoreError> {
        if payload.len() > MAX_STORED_LEN as usize || payload.is_empty() {
            return Err(StoreError::Decode {
                digest: *digest,
                reason: format!("payload of {} bytes out of bounds", payload.len()),
            });
        }
        // CPU work outside the lock.
        chunk::decode_verified(digest, encoding, raw_len, payload)?;
        self.store_verified(digest, encoding, raw_len, payload)
    }

    /// Appends an already verified chunk unless its digest is present.
    fn store_verified(
        &self,
        digest: &Digest,
        encoding: Encoding,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<PutOutcome, StoreError> {
        self.append_verified(digest, encoding, raw_len, payload)
            .inspect_err(|e| self.note_full(e))
    }

    /// [`Store::store_verified`] before a full file system is noted.
    fn append_verified(
        &self,
        digest: &Digest,
        encoding: Encoding,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<PutOutcome, StoreError> {
        let mut st = lock(&self.state);
        if st.catalogue.contains(digest) {
            return Ok(PutOutcome::Deduplicated);
        }
        // A chunk already held is still deduplicated; only a new one needs
        // room. (Lock order: state, then read_only.)
        if let Some(reason) = lock(&self.read_only).clone() {
            return Err(StoreError::ReadOnly {
                root: self.root.clone(),
                reason,
            });
        }
        if st
            .writer
            .as_ref()
            .is_some_and(|w| w.is_full_for(payload.len(), st.pack_target))
        {
            if let Some(full) = st.writer.take() {
                let id = full.id();
                full.seal(&self.packs_dir)?;
                tracing::debug!(pack = id, "pack sealed");
            }
        }
        let writer = match &mut st.writer {
            Some(w) => w,
            None => {
                let id = st.next_pack;
                let w = PackWriter::create(&self.packs_dir, id)?;
                st.next_pack = id.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                    path: self.packs_dir.clone(),
                    what: "pack id space exhausted".into(),
                })?;
                st.writer.insert(w)
            }
        };
        let loc = writer.append(digest, encoding, raw_len, payload)?;
        st.catalogue.insert(*digest, loc);
        Ok(PutOutcome::Stored {
            stored_bytes: loc.record_len(),
        })
    }

    /// Whether the store holds a chunk with this digest.
    pub fn has_chunk(&self, digest: &Digest) -> bool {
        lock(&self.state).catalogue.contains(digest)
    }

    /// Makes every chunk put so far durable (fsync of the current pack).
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        let r = match &mut st.writer {
            Some(w) => w.sync(),
            None => Ok(()),
        };
        if let Err(e) = &r {
            // After a failed fsync the pack's unsynced pages are in doubt:
            // it is never appended to again (the next open scans it).
            st.writer = None;
            self.note_full(e);
        }
        r
    }

    /// Makes every chunk put so far durable and lists the pack being
    /// written in its `.idx`, so that every chunk a point about to be
    /// committed references is indexed: a later scan of the pack never
    /// decides what a committed point holds.
    pub fn sync_and_index(&self) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        let r = match &mut st.writer {
            Some(w) => w.index(&self.packs_dir),
            None => Ok(()),
        };
        if let Err(e) = &r {
            // After a failed fsync the pack's unsynced pages are in doubt:
            // it is never appended to again (the next open scans it).
            st.writer = None;
            self.note_full(e);
        }
        r
    }

    /// Number of chunks and bytes held in packs.
    pub fn stats(&self) -> StoreStats {
        let st = lock(&self.state);
        StoreStats {
            chunks: st.catalogue.len(),
            stored_bytes: st.catalogue.stored_bytes(),
        }
    }

    /// The decoded bytes of chunk `digest`, read from its pack, CRC checked,
    /// decoded and re-hashed.
    pub(crate) fn read_chunk(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let loc = lock(&self.state)
            .catalogue
            .get(digest)
            .ok_or(StoreError::MissingChunk { digest: *digest })?;
        let file = self.pack_reader(loc.pack)?;
        let path = pack::pack_path(&self.packs_dir, loc.pack);
        let payload = pack::read_record(&file, &path, digest, &loc)?;
        let bytes = chunk::decode_verified(digest, loc.encoding, loc.raw_len, &payload)?;
        Ok(bytes.into_owned())
    }

    /// Chunk `digest` as stored: its encoding, decoded length and payload
    /// (record CRC checked, payload not decoded). Failback sends chunks
    /// like this, without recompressing; the agent decodes and checks the
    /// digest before it writes.
    pub fn read_stored(&self, digest: &Digest) -> Result<StoredChunk, StoreError> {
        let loc = lock(&self.state)
            .catalogue
            .get(digest)
            .ok_or(StoreError::MissingChunk { digest: *digest })?;
        let file = self.pack_reader(loc.pack)?;
        let path = pack::pack_path(&self.packs_dir, loc.pack);
        let payload = pack::read_record(&file, &path, digest, &loc)?;
        Ok(StoredChunk {
            encoding: loc.encoding,
            raw_len: loc.raw_len,
            payload,
        })
    }

    /// Seals packs at `bytes` instead of 1 GiB, to exercise rotation.
    #[cfg(test)]
    pub(crate) fn set_pack_target(&self, bytes: u64) {
        lock(&self.state).pack_target = bytes;
    }

    /// Decoded length of chunk `digest`, if the store holds it.
    pub(crate) fn chunk_raw_len(&self, digest: &Digest) -> Option<u32> {
        lock(&self.state).catalogue.get(digest).map(|l| l.raw_len)
    }

    /// An open handle on pack `id`, from a small cache.
    fn pack_reader(&self, id: u32) -> Result<Arc<File>, StoreError> {
        if let Some(f) = lock(&self.readers).get(&id) {
            return Ok(Arc::clone(f));
        }
        let path = pack::pack_path(&self.packs_dir, id);
        let f = Arc::new(File::open(&path).map_err(io_err(&path))?);
        let mut readers = lock(&self.readers);
        if readers.len() >= MAX_OPEN_PACKS {
            readers.clear();
        }
        readers.insert(id, Arc::clone(&f));
        Ok(f)
    }
}

#[cfg(test)]
mod tests;
