//! Building a new recovery point: `Store::begin_point`, then
//! `PointBuilder::record` for every changed block, then `commit`.
//!
//! The new point's index is the base point's index carried to the new
//! geometry (`tideline_protocol::resize`) and overlaid with the recorded
//! blocks. `commit` walks it page by page: a page without records whose
//! span the resize left unchanged reuses the base page digest without
//! reading it, so a point costs the pages its changes touch plus the top
//! index (32 bytes per 128 blocks), not the disk size. Only when the root
//! matches the agent's does anything become visible, in the order described
//! in `point.rs` and `mod.rs`.

use std::fs;
use std::time::{SystemTime, UNIX_EPOCH};

use tideline_protocol::digest::page_digest;
use tideline_protocol::resize::{can_carry, carried_entry};
use tideline_protocol::{
    Digest, Encoding, Geometry, IndexRootHasher, PointConsistency, Position, ZeroDigests,
    PAGE_BLOCKS,
};

use super::error::{io_err, StoreError};
use super::index_file::{self, IndexReader, IndexWriter};
use super::point::{point_name, ConsistencyInfo, Manifest, PointInfo, INDEX, MANIFEST};
use super::staging::{LogParams, Record, StagingLog};
use super::{check_id, fsutil, lock, PointId, Store};

/// A point being built by one session. At most one builder exists per
/// point; dropping it keeps the staging log so that a later `begin_point`
/// with the same parameters resumes.
pub struct PointBuilder<'a> {
    store: &'a Store,
    /// Held until the builder is gone; releases the point for another session.
    _slot: BuildSlot<'a>,
    agent: String,
    disk: String,
    point: PointId,
    base: Option<PointInfo>,
    geometry: Geometry,
    zero: ZeroDigests,
    log: StagingLog,
}

impl Store {
    /// Starts (or resumes) building point `point` of `agent`/`disk` on top
    /// of `base`. Refuses an id that is already committed or being built,
    /// a base that does not exist or cannot be carried to the new geometry,
    /// and a geometry the store does not accept.
    pub fn begin_point(
        &self,
        agent: &str,
        disk: &str,
        point: PointId,
        base: Option<PointId>,
        disk_size: u64,
        block_size: u32,
    ) -> Result<PointBuilder<'_>, StoreError> {
        check_id(agent)?;
        check_id(disk)?;
        self.check_writable()?;
        if !index_file::valid_geometry(disk_size, block_size) {
            return Err(StoreError::InvalidGeometry {
                disk_size,
                block_size,
            });
        }
        let geometry = Geometry::new(disk_size, block_size);
        let exists = || StoreError::PointExists {
            agent: agent.to_string(),
            disk: disk.to_string(),
            point,
        };
        if base == Some(point) {
            return Err(exists());
        }
        let base = match base {
            Some(b) => {
                let info = self.point(agent, disk, b)?;
                if !can_carry(&info.geometry(), &geometry) {
                    return Err(StoreError::CannotCarry {
                        base: b,
                        base_block_size: info.block_size,
                        block_size,
                    });
                }
                Some(info)
            }
            None => None,
        };
        let key = (agent.to_string(), disk.to_string(), point);
        if !lock(&self.building).insert(key.clone()) {
            return Err(StoreError::PointBusy {
                agent: key.0,
                disk: key.1,
                point,
            });
        }
        // Released when dropped: on failure below, or with the builder.
        let slot = BuildSlot { store: self, key };
        let started = (|| {
            let point_dir = self.point_dir(agent, disk, point)?;
            if point_dir.exists() {
                return Err(exists());
            }
            fsutil::create_dir_durable(&self.root, &self.disk_dir(agent, disk)?)?;
            let staging = self.staging_dir().join(agent).join(disk);
            fsutil::create_dir_durable(&self.root, &staging)?;
            let params = LogParams {
                point,
                base: base.as_ref().map(|b| b.point),
                disk_size,
                block_size,
            };
            let zero = ZeroDigests::new(disk_size, block_size);
            let log = StagingLog::open(
                &staging.join(format!("{}.log", point_name(point))),
                params,
                |r| {
                    r.block < geometry.block_count
                        && self
                            .check_block_digest(&geometry, &zero, r.block, &r.digest)
                            .is_ok()
                },
            )?;
            Ok((zero, log))
        })();
        let (zero, log) = started.inspect_err(|e| self.note_full(e))?;
        Ok(PointBuilder {
            store: self,
            _slot: slot,
            agent: agent.to_string(),
            disk: disk.to_string(),
            point,
            base,
            geometry,
            zero,
            log,
        })
    }

    /// Checks that block `block` may have `digest`: a zero digest of the
    /// geometry, or a stored chunk of exactly the block's length.
    fn check_block_digest(
        &self,
        geometry: &Geometry,
        zero: &ZeroDigests,
        block: u64,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        if zero.is_zero(block, digest) {
            return Ok(());
        }
        let raw_len = self
            .chunk_raw_len(digest)
            .ok_or(StoreError::MissingChunk { digest: *digest })?;
        let expected = geometry.block_len(block);
        if raw_len != expected {
            return Err(StoreError::BlockLength {
                block,
                expected,
                actual: raw_len,
            });
        }
        Ok(())
    }

    /// Stores an index page unless it is present (pages are built here, so
    /// their digest is right by construction).
    fn put_page(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        // A page is at most 4 KiB: always within the record bounds.
        self.store_verified(digest, Encoding::Raw, bytes.len() as u32, bytes)?;
        Ok(())
    }

    /// The block digests of page `digest`, which must hold `blocks` entries.
    pub(crate) fn read_page(
        &self,
        digest: &Digest,
        blocks: u64,
    ) -> Result<Vec<Digest>, StoreError> {
        let bytes = self.read_chunk(digest)?;
        if bytes.len() as u64 != blocks * Digest::LEN as u64 {
            return Err(StoreError::Decode {
                digest: *digest,
                reason: format!(
                    "index page is {} bytes, expected {blocks} digests",
                    bytes.len()
                ),
            });
        }
        Ok(bytes
            .chunks_exact(Digest::LEN)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                Digest(d)
            })
            .collect())
    }
}

impl PointBuilder<'_> {
    /// Records that block `block` of the new point has `digest`. Blocks must
    /// come in strictly ascending order within a round and lie within the
    /// disk; a digest
    /// other than the block's zero digest must name a stored chunk of the
    /// block's length. Buffered: see [`Self::checkpoint`].
    pub fn record(&mut self, block: u64, digest: Digest) -> Result<(), StoreError> {
        if block >= self.geometry.block_count {
            return Err(StoreError::BlockOutOfRange {
                block,
                block_count: self.geometry.block_count,
            });
        }
        if let Some(last) = self.log.last() {
            if block <= last {
                return Err(StoreError::BlockOrder { block, last });
            }
        }
        self.store
            .check_block_digest(&self.geometry, &self.zero, block, &digest)?;
        self.log.append(&Record { block, digest })
    }

    /// Makes everything recorded so far, and every chunk put so far,
    /// durable: the packs first, then the staging log.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.store.sync()?;
        self.log.sync().inspect_err(|e| self.store.note_full(e))
    }

    /// Starts round `round` (the next one): its blocks replace the same
    /// blocks of earlier rounds.
    pub fn begin_round(&mut self, round: u32) -> Result<(), StoreError> {
        self.log.begin_round(round)
    }

    /// Forgets the records at and after `at` (a resumed session starts
    /// again from there).
    pub fn truncate_from(&mut self, at: Position) -> Result<(), StoreError> {
        self.log.truncate_from(at)
    }

    /// Number of block records, in every round.
    pub fn recorded(&self) -> u64 {
        self.log.count()
    }

    /// The position after the last block recorded (where a resumed session
    /// can continue).
    pub fn next_position(&self) -> Position {
        Position::new(self.log.round(), self.log.last().map_or(0, |l| l + 1))
    }

    /// The point's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Builds the new index, checks its root against `expected_root` and,
    /// if they agree, commits the point atomically and removes the staging
    /// log. On a mismatch ([`StoreError::IndexRootMismatch`]) nothing is
    /// committed and the staging log is kept (`truncate_from` position 0
    /// restarts). `consistency` is what the agent says of the point; it goes
    /// into the manifest as it is.
    pub fn commit(
        mut self,
        expected_root: &Digest,
        new_bytes: u64,
        consistency: &PointConsistency,
    ) -> Result<PointInfo, StoreError> {
        let disk_dir = self.store.disk_dir(&self.agent, &self.disk)?;
        let name = point_name(self.point);
        let final_dir = disk_dir.join(&name);
        if final_dir.exists() {
            return Err(StoreError::PointExists {
                agent: self.agent.clone(),
                disk: self.disk.clone(),
                point: self.point,
            });
        }
        let tmp_dir = disk_dir.join(format!("{name}.tmp"));
        fsutil::remove_if_exists(&tmp_dir)?;
        fs::create_dir(&tmp_dir).map_err(io_err(&tmp_dir))?;
        let written = self.write_point(&tmp_dir, expected_root, new_bytes, consistency);
        let info = match written {
            Ok(info) => info,
            Err(e) => {
                self.store.note_full(&e);
                if let Err(cleanup) = fsutil::remove_if_exists(&tmp_dir) {
                    tracing::warn!("cannot remove {}: {cleanup}", tmp_dir.display());
                }
                return Err(e);
            }
        };
        fs::rename(&tmp_dir, &final_dir).map_err(io_err(&final_dir))?;
        fsutil::fsync_dir(&disk_dir)?;
        // Committed. The log is no longer needed; failing to remove it is
        // only untidy (open removes logs of committed points).
        let PointBuilder { log, .. } = self;
        if let Err(e) = log.remove() {
            tracing::warn!("staging log not removed: {e}");
        }
        tracing::info!(
            agent = %info.agent,
            disk = %info.disk,
            point = info.point,
            changed_blocks = info.changed_blocks,
            consistency = %info.consistency.level,
            frozen_ms = info.consistency.frozen_ms,
            "recovery point committed"
        );
        Ok(info)
    }

    /// Writes `index` and `manifest.json` into `dir` once the root checks
    /// out; the chunks they reference are made durable first.
    fn write_point(
        &mut self,
        dir: &std::path::Path,
        expected_root: &Digest,
        new_bytes: u64,
        consistency: &PointConsistency,
    ) -> Result<PointInfo, StoreError> {
        let store = self.store;
        let new_count = self.geometry.block_count;
        let (mut base_index, old_count) = match &self.base {
            Some(b) => {
                let path = store
                    .point_dir(&self.agent, &self.disk, b.point)?
                    .join(INDEX);
                let mut r = IndexReader::open(&path)?;
                r.check_crc()?;
                let count = r.header().geometry.block_count;
                (Some(r), count)
            }
            None => (None, 0),
        };
        let mut writer = IndexWriter::create(&dir.join(INDEX), self.geometry)?;
        let mut hasher = IndexRootHasher::new();
        let zero = self.zero;
        let mut changed_blocks = 0u64;
        let mut records = self.log.merged()?;
        let mut pending = records.next_record()?;
        let mut entries: Vec<Digest> = Vec::with_capacity(PAGE_BLOCKS);
        let mut page_bytes: Vec<u8> = Vec::with_capacity(PAGE_BLOCKS * Digest::LEN);
        for page in 0..index_file::page_count(new_count) {
            let (first, end) = index_file::page_span(page, new_count);
            let base_page = match &mut base_index {
                Some(r) => r.next_page()?,
                None => None,
            };
            let touched = pending.is_some_and(|r| r.block < end);
            let base_span = index_file::page_span(page, old_count);
            let digest = match base_page {
                Some(pd) if !touched && base_span == (first, end) => {
                    // Same span, no change: the base page as it is.
                    if !store.has_chunk(&pd) {
                        return Err(StoreError::MissingChunk { digest: pd });
                    }
                    pd
                }
                _ => {
                    let base_entries = match base_page {
                        Some(pd) => store.read_page(&pd, base_span.1 - base_span.0)?,
                        None => Vec::new(),
                    };
                    entries.clear();
                    for i in first..end {
                        entries.push(carried_entry(i, old_count, &zero, |i| {
                            // i < old_count puts i in this base page, whose
                            // length read_page checked.
                            base_entries[(i - first) as usize]
                        }));
                    }
                    let mut last = None;
                    while let Some(r) = pending.filter(|r| r.block < end) {
                        // record() and the resume scan keep each round
                        // ascending, and the merge keeps the whole list so;
                        // re-checked since it is read from disk.
                        if r.block < first || last.is_some_and(|l| r.block <= l) {
                            return Err(StoreError::BlockOrder {
                                block: r.block,
                                last: last.unwrap_or(first),
                            });
                        }
                        entries[(r.block - first) as usize] = r.digest;
                        last = Some(r.block);
                        changed_blocks += 1;
                        pending = records.next_record()?;
                    }
                    page_bytes.clear();
                    for d in &entries {
                        page_bytes.extend_from_slice(&d.0);
                    }
                    let pd = page_digest(&entries);
                    store.put_page(&pd, &page_bytes)?;
                    pd
                }
            };
            hasher.push_page(&digest, (end - first) as usize);
            writer.push(&digest)?;
        }
        if let Some(r) = pending {
            return Err(StoreError::BlockOutOfRange {
                block: r.block,
                block_count: new_count,
            });
        }
        let root = hasher.finish();
        if root != *expected_root {
            return Err(StoreError::IndexRootMismatch {
                expected: *expected_root,
                actual: root,
            });
        }
        // Every chunk the index references is durable, and listed in its
        // pack's .idx, before the index is: no later recovery can lose it.
        store.sync_and_index()?;
        let header = writer.finish(&root)?;
        let info = PointInfo {
            agent: self.agent.clone(),
            disk: self.disk.clone(),
            point: self.point,
            base: self.base.as_ref().map(|b| b.point),
            disk_size: self.geometry.disk_size,
            block_size: self.geometry.block_size,
            block_count: new_count,
            root: root.to_hex(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            changed_blocks,
            new_bytes,
            consistency: ConsistencyInfo::from(consistency),
        };
        let manifest = Manifest {
            info: info.clone(),
            index_crc: header.crc,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Corrupt {
            path: dir.join(MANIFEST),
            what: format!("cannot serialise manifest: {e}"),
        })?;
        // write_atomic fsyncs `dir` after the rename of the manifest.
        fsutil::write_atomic(&dir.join(MANIFEST), &json)?;
        Ok(info)
    }

    /// Abandons the point: removes its staging log. Chunks already put stay
    /// in the packs (a later garbage collection reclaims them).
    pub fn abort(self) -> Result<(), StoreError> {
        let PointBuilder { log, .. } = self;
        log.remove()
    }
}

/// Marks a point as being built for as long as it lives.
struct BuildSlot<'a> {
    store: &'a Store,
    key: (String, String, PointId),
}

impl Drop for BuildSlot<'_> {
    fn drop(&mut self) {
        lock(&self.store.building).remove(&self.key);
    }
}
