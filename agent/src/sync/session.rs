//! The agent's side of one sync session: which blocks the controller
//! already has, what was sent, and how the block map advances.
//!
//! For each slot of a `StartSync` the agent decides whether its block map
//! can vouch for the controller's base point (same point id, same root, not
//! half-updated). If not, it asks for the base index and rebuilds the map
//! from it, verified against the base root, so that it sends only what the
//! controller lacks. Every block sent is recorded in the disk's change log;
//! the log is made durable before each checkpoint, sealed with the new index
//! root before `DiskEnd`, and applied to the map only on `Committed`.

use std::path::Path;
use std::sync::Arc;

use tideline_protocol::message::{Committed, DiskEnd, IndexChunk, ReadyDisk, StartSync, SyncReady};
use tideline_protocol::{
    Consistency, Digest, Geometry, IndexRootHasher, PointConsistency, Position, Requirement,
};
use tracing::{info, warn};

use super::changes::{trust_bitmap, trust_cbt, CbtList, ChangeRecord};
use super::expected::ExpectedIndex;
use super::method::{self, DiskMethod, SessionRecord, SESSION_RECORD_FILE};
use super::pipeline::ScanJob;
use crate::config::{AgentConfig, DiskSection};
use crate::source::{DiskSource, NbdDisk, SourceError};
use crate::tracking::{BlockMap, BlockMapWriter, ChangeLog, DiskState, TrackingError};

/// Why a session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The controller named a disk that is not in the configuration.
    #[error("disk {0:?} is not configured on this agent")]
    UnknownDisk(String),
    /// The disk could not be opened or read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The block map or change log could not be used.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// The kernel write tracker failed on a disk it tracks.
    #[error(transparent)]
    Tracker(#[from] crate::tracking::writes::TrackerError),
    /// The controller asked to resume, but the change log of the interrupted
    /// session is gone or belongs to another session.
    #[error("disk {disk}: cannot resume session {session} at {resume_from}: {why}")]
    CannotResume {
        /// Disk id.
        disk: String,
        /// Session id.
        session: u64,
        /// Requested position.
        resume_from: Position,
        /// Why not.
        why: String,
    },
    /// The disk's points cannot reach its `min_consistency`.
    #[error("disk {disk}: its points must be at least {required}-consistent, but the best this agent can do is {best}: {why}")]
    BelowRequirement {
        /// Disk id.
        disk: String,
        /// `min_consistency`.
        required: Requirement,
        /// The best level reachable.
        best: Consistency,
        /// Why.
        why: String,
    },
    /// A message does not fit the session.
    #[error("disk {disk}: {why}")]
    Inconsistent {
        /// Disk id.
        disk: String,
        /// What is wrong.
        why: String,
    },
}

/// How the expected index of a slot becomes known.
enum Base {
    /// Known.
    Ready(ExpectedIndex),
    /// Being received from the controller.
    Downloading(BlockMapWriter),
    /// Between the two (a download that failed).
    Unknown,
}

/// One disk of the session.
struct DiskJob {
    id: String,
    source: Arc<dyn DiskSource>,
    geometry: Geometry,
    state: DiskState,
    expected: Base,
    /// The session's change log; taken when the point is committed.
    log: Option<ChangeLog>,
    /// Where the first scan of this session starts.
    resume_from: Position,
    /// Extents a trusted change source names (None: scan everything).
    only: Option<Arc<Vec<(u64, u64)>>>,
    /// What to record about the change source once the point is committed.
    next_record: ChangeRecord,
    /// How the point is made consistent.
    method: DiskMethod,
    /// Whether the first round hash-scans (else the tracker names the
    /// blocks).
    first_round_hashed: bool,
    /// The next round must copy everything outstanding since the base (a
    /// resumed session lost the sets of its earlier rounds).
    catch_up: bool,
    /// Consistency group.
    group: String,
    /// `min_consistency`.
    required: Requirement,
}

/// A sync session in progress on the agent.
pub struct AgentSession {
    session: u64,
    jobs: Vec<DiskJob>,
}

impl AgentSession {
    /// Opens the disks of a `StartSync`, decides how each point is made
    /// consistent, checks the block maps against the base points, and
    /// returns the `SyncReady` answer.
    pub fn prepare(
        req: &StartSync,
        cfg: &AgentConfig,
    ) -> Result<(AgentSession, SyncReady), SessionError> {
        let mut jobs = Vec::with_capacity(req.disks.len());
        let mut ready = Vec::with_capacity(req.disks.len());
        for d in &req.disks {
            let dcfg = cfg
                .disks
                .iter()
                .find(|c| c.id == d.id)
                .ok_or_else(|| SessionError::UnknownDisk(d.id.clone()))?;
            let job = prepare_disk(req.session, d, dcfg, cfg)?;
            ready.push(ReadyDisk {
                disk_size: job.geometry.disk_size,
                block_size: job.geometry.block_size,
                needs_index: matches!(job.expected, Base::Downloading(_)),
            });
            jobs.push(job);
        }
        Ok((
            AgentSession {
                session: req.session,
                jobs,
            },
            SyncReady {
                session: req.session,
                disks: ready,
            },
        ))
    }

    /// Session id.
    pub fn id(&self) -> u64 {
        self.session
    }

    /// Number of slots.
    pub fn slots(&self) -> u16 {
        self.jobs.len() as u16
    }

    /// Disk id of a slot.
    pub fn disk_id(&self, slot: u16) -> &str {
        self.jobs
            .get(usize::from(slot))
            .map(|j| j.id.as_str())
            .unwrap_or("?")
    }

    /// Geometry of a slot.
    pub fn geometry(&self, slot: u16) -> Option<Geometry> {
        self.jobs.get(usize::from(slot)).map(|j| j.geometry)
    }

    fn job(&mut self, slot: u16) -> Result<&mut DiskJob, SessionError> {
        self.jobs
            .get_mut(usize::from(slot))
            .ok_or_else(|| SessionError::Inconsistent {
                disk: "?".into(),
                why: format!("no slot {slot}"),
            })
    }

    fn job_ref(&self, slot: u16) -> Result<&DiskJob, SessionError> {
        self.jobs
            .get(usize::from(slot))
            .ok_or_else(|| SessionError::Inconsistent {
                disk: "?".into(),
                why: format!("no slot {slot}"),
            })
    }

    /// How a slot's point is made consistent.
    pub fn method(&self, slot: u16) -> Option<&DiskMethod> {
        self.jobs.get(usize::from(slot)).map(|j| &j.method)
    }

    /// The slot's source.
    pub fn source(&self, slot: u16) -> Option<Arc<dyn DiskSource>> {
        self.jobs.get(usize::from(slot)).map(|j| j.source.clone())
    }

    /// The slot's consistency group.
    pub fn group(&self, slot: u16) -> &str {
        self.jobs
            .get(usize::from(slot))
            .map_or("machine", |j| j.group.as_str())
    }

    /// The slot's `min_consistency`.
    pub fn required(&self, slot: u16) -> Requirement {
        self.jobs
            .get(usize::from(slot))
            .map_or(Requirement::None, |j| j.required)
    }

    /// The point the slot builds.
    pub fn point(&self, slot: u16) -> u64 {
        self.jobs
            .get(usize::from(slot))
            .and_then(|j| j.log.as_ref())
            .map_or(0, |l| l.point())
    }

    /// Where the slot's first scan starts (not 0 when resuming).
    pub fn resume_from(&self, slot: u16) -> Position {
        self.jobs
            .get(usize::from(slot))
            .map_or(Position::default(), |j| j.resume_from)
    }

    /// Whether the slot's base is known, so that it can be scanned.
    pub fn base_ready(&self, slot: u16) -> bool {
        matches!(
            self.jobs.get(usize::from(slot)).map(|j| &j.expected),
            Some(Base::Ready(_))
        )
    }

    /// Whether the slot's first round hash-scans the disk.
    pub fn first_round_hashed(&self, slot: u16) -> bool {
        self.jobs
            .get(usize::from(slot))
            .is_some_and(|j| j.first_round_hashed)
    }

    /// Whether the slot's next round must copy everything outstanding, and
    /// clears the flag.
    pub fn take_catch_up(&mut self, slot: u16) -> bool {
        self.jobs
            .get_mut(usize::from(slot))
            .is_some_and(|j| std::mem::take(&mut j.catch_up))
    }

    /// Writes part of a base index into the map being rebuilt.
    pub fn on_index_chunk(&mut self, chunk: &IndexChunk) -> Result<(), SessionError> {
        let job = self.job(chunk.slot)?;
        match &mut job.expected {
            Base::Downloading(w) => Ok(w.write_range(chunk.first_block, &chunk.digests)?),
            _ => Err(SessionError::Inconsistent {
                disk: job.id.clone(),
                why: "index data for a disk that did not ask for it".into(),
            }),
        }
    }

    /// Completes a rebuilt map; it replaces the old one only if its entries
    /// hash to the base root.
    pub fn on_index_complete(&mut self, slot: u16) -> Result<(), SessionError> {
        let job = self.job(slot)?;
        let Base::Downloading(w) = std::mem::replace(&mut job.expected, Base::Unknown) else {
            return Err(SessionError::Inconsistent {
                disk: job.id.clone(),
                why: "index end for a disk that did not ask for it".into(),
            });
        };
        let map = w.finish()?;
        info!(disk = %job.id, point = ?map.point(), "block map rebuilt from the controller's index");
        job.expected = Base::Ready(ExpectedIndex::from_map(Arc::new(map), job.geometry));
        Ok(())
    }

    /// A scan of one round of a slot: `source` (the disk, or a frozen copy
    /// or clone of it), from `from_block`, reading only `only` (byte
    /// extents; `None`: the whole disk). In a round after the first, the
    /// expected digests include what earlier rounds sent.
    pub fn scan_job(
        &self,
        slot: u16,
        cfg: &AgentConfig,
        source: Arc<dyn DiskSource>,
        from_block: u64,
        only: Option<Arc<Vec<(u64, u64)>>>,
    ) -> Result<ScanJob, SessionError> {
        let job = self.job_ref(slot)?;
        let Base::Ready(base) = &job.expected else {
            return Err(SessionError::Inconsistent {
                disk: job.id.clone(),
                why: "scan before the base index is known".into(),
            });
        };
        let log = job.log.as_ref().ok_or_else(|| SessionError::Inconsistent {
            disk: job.id.clone(),
            why: "the disk's point is already committed".into(),
        })?;
        let mut expected = base.clone();
        if log.round() > 0 {
            let bs = u64::from(job.geometry.block_size);
            let ranges: Vec<(u64, u64)> = match &only {
                Some(o) => o.iter().map(|&(s, e)| (s / bs, e.div_ceil(bs))).collect(),
                None => vec![(0, job.geometry.block_count)],
            };
            expected = expected.with_sent(Arc::new(log.sent_in(&ranges)?));
        }
        Ok(ScanJob {
            source,
            expected,
            from_block,
            compression_level: cfg.sync.compression_level,
            workers: cfg.sync.worker_count(),
            batch_bytes: cfg.sync.batch_bytes,
            drop_page_cache: cfg.sync.drop_page_cache,
            only,
            priority: cfg.sync.scan_priority(),
        })
    }

    /// The extents a trusted change source (CBT, dirty bitmap) names for
    /// the first round, if one vouches for the base point.
    pub fn change_source_extents(&self, slot: u16) -> Option<Arc<Vec<(u64, u64)>>> {
        self.jobs
            .get(usize::from(slot))
            .and_then(|j| j.only.clone())
    }

    fn log(&mut self, slot: u16) -> Result<&mut ChangeLog, SessionError> {
        let job = self.job(slot)?;
        let id = job.id.clone();
        job.log.as_mut().ok_or(SessionError::Inconsistent {
            disk: id,
            why: "the disk's point is already committed".into(),
        })
    }

    /// Starts the slot's next round in its change log; returns its number.
    pub fn begin_round(&mut self, slot: u16) -> Result<u32, SessionError> {
        let log = self.log(slot)?;
        let round = log.round() + 1;
        log.begin_round(round)?;
        Ok(round)
    }

    /// The slot's current round.
    pub fn round(&self, slot: u16) -> u32 {
        self.jobs
            .get(usize::from(slot))
            .and_then(|j| j.log.as_ref())
            .map_or(0, |l| l.round())
    }

    /// Records a block that was sent.
    pub fn record_sent(
        &mut self,
        slot: u16,
        block: u64,
        digest: Digest,
    ) -> Result<(), SessionError> {
        Ok(self.log(slot)?.append(block, digest)?)
    }

    /// Makes every record durable (before a checkpoint is sent).
    pub fn sync_log(&mut self, slot: u16) -> Result<(), SessionError> {
        Ok(self.log(slot)?.sync()?)
    }

    /// Computes the new index root (base carried to the new geometry,
    /// overlaid with the change log's rounds), seals the log, and returns
    /// `DiskEnd` with the point's consistency.
    pub fn finish_slot(
        &mut self,
        slot: u16,
        consistency: PointConsistency,
    ) -> Result<DiskEnd, SessionError> {
        let job = self.job(slot)?;
        let Base::Ready(expected) = &job.expected else {
            return Err(SessionError::Inconsistent {
                disk: job.id.clone(),
                why: "finished a disk whose base is not known".into(),
            });
        };
        let expected = expected.clone();
        let block_count = job.geometry.block_count;
        let log = self.log(slot)?;
        let mut hasher = IndexRootHasher::new();
        let mut records = log.records().peekable();
        let mut sent = 0u64;
        for block in 0..block_count {
            let from_log = match records.peek() {
                Some(Ok((b, _))) if *b == block => true,
                Some(Err(_)) => {
                    if let Some(Err(e)) = records.next() {
                        return Err(e.into());
                    }
                    false
                }
                _ => false,
            };
            if from_log {
                if let Some(Ok((_, d))) = records.next() {
                    hasher.push(&d);
                    sent += 1;
                }
            } else {
                hasher.push(&expected.get(block));
            }
        }
        drop(records);
        let root = hasher.finish();
        log.seal(root)?;
        Ok(DiskEnd {
            slot,
            block_count,
            sent_blocks: sent,
            root,
            consistency,
        })
    }

    /// Advances the block map of a committed slot to the new point; the
    /// tracker's pending set (copied into this point) is forgotten, and the
    /// registration that vouches for everything after it is recorded.
    pub fn on_committed(&mut self, c: &Committed) -> Result<(), SessionError> {
        let sealed = self.log(c.slot)?.sealed_root();
        let job = self.job(c.slot)?;
        if sealed != Some(c.root) {
            return Err(SessionError::Inconsistent {
                disk: job.id.clone(),
                why: format!(
                    "controller committed point {} with root {} but the agent sealed {:?}",
                    c.point, c.root, sealed
                ),
            });
        }
        if let Some(log) = job.log.take() {
            advance_map(&job.state, &log)?;
            log.remove()?;
        }
        let tracking = job.method.tracked().map(|t| {
            t.disk.clear_pending();
            t.disk.registration()
        });
        let record = ChangeRecord {
            point: c.point,
            tracking,
            ..job.next_record.clone()
        };
        if let Err(e) = record.save(&job.state.dir) {
            warn!(disk = %job.id, error = %e, "cannot record the change source; the next sync will scan");
        }
        let _ = std::fs::remove_file(job.state.dir.join(SESSION_RECORD_FILE));
        info!(disk = %job.id, point = c.point, "block map advanced to committed point");
        Ok(())
    }
}

fn prepare_disk(
    session: u64,
    d: &tideline_protocol::message::SyncDisk,
    dcfg: &DiskSection,
    cfg: &AgentConfig,
) -> Result<DiskJob, SessionError> {
    let state_dir = &cfg.state.dir;
    let read_mode = cfg.sync.read_mode();
    let (source, bitmap_disk): (Arc<dyn DiskSource>, Option<Arc<NbdDisk>>) =
        match &dcfg.dirty_bitmap {
            Some(name) => {
                let disk = Arc::new(
                    NbdDisk::connect_with_bitmap(&dcfg.path.to_string_lossy(), Some(name))
                        .map_err(SourceError::from)?,
                );
                (disk.clone(), Some(disk))
            }
            None => (
                Arc::from(crate::source::open_with(&dcfg.path, read_mode)?),
                None,
            ),
        };
    let geometry = Geometry::new(source.size(), dcfg.block_size);
    let state = DiskState::prepare(state_dir, &d.id)?;
    let mut log = open_or_discard(ChangeLog::open(&state.change_log), &state.change_log)?;

    // A sealed log for the point the controller now names as base means the
    // controller committed it but the `Committed` message was lost: the
    // agent catches up without a rescan.
    if let (Some(b), Some(l)) = (&d.base, &log) {
        if l.point() == b.point && l.sealed_root() == Some(b.root) {
            match advance_map(&state, l) {
                Ok(()) => {
                    info!(disk = %d.id, point = b.point, "applied the change log of a commit whose acknowledgement was lost")
                }
                Err(e) => {
                    warn!(disk = %d.id, error = %e, "could not apply a pending change log; the base index will be fetched")
                }
            }
            log = None;
            let _ = std::fs::remove_file(&state.change_log);
        }
    }

    let map = open_or_discard(BlockMap::open(&state.block_map), &state.block_map)?;
    let expected = match &d.base {
        None => Base::Ready(ExpectedIndex::zero(geometry)),
        Some(b) => {
            let base_geometry = Geometry::new(b.disk_size, b.block_size);
            match map {
                Some(m)
                    if m.is_consistent()
                        && m.point() == Some(b.point)
                        && m.root() == Some(b.root)
                        && m.geometry() == base_geometry =>
                {
                    Base::Ready(ExpectedIndex::from_map(Arc::new(m), geometry))
                }
                other => {
                    let why = match &other {
                        None => "no block map".to_owned(),
                        Some(m) if !m.is_consistent() => {
                            "block map was being updated when the agent stopped".to_owned()
                        }
                        Some(m) => format!(
                            "block map is at point {:?}, controller's base is {}",
                            m.point(),
                            b.point
                        ),
                    };
                    info!(disk = %d.id, reason = %why, "block map cannot vouch for the base point; fetching the base index");
                    drop(other);
                    Base::Downloading(BlockMap::create_with(
                        &state.block_map,
                        base_geometry,
                        b.point,
                        b.root,
                    )?)
                }
            }
        }
    };

    let method = method::choose(cfg, dcfg)?;
    let required = dcfg.requirement();
    let hook = cfg
        .group(&dcfg.group)
        .is_some_and(|g| g.pre_freeze.is_some());
    if !method::can_meet(method.best(), hook, required) {
        return Err(SessionError::BelowRequirement {
            disk: d.id.clone(),
            required,
            best: method.best(),
            why: method
                .limitation()
                .unwrap_or_else(|| "it has no pre-freeze hook".to_string()),
        });
    }

    let resuming = d.resume_from > Position::default();
    let base_point = d.base.map(|b| b.point).unwrap_or(0);
    let log = match log {
        Some(mut l)
            if l.session() == session
                && l.point() == d.point
                && l.base_point() == base_point
                && l.geometry() == geometry =>
        {
            l.truncate_from(d.resume_from)?;
            l
        }
        _ if resuming => {
            return Err(cannot_resume(
                d,
                session,
                "the change log of the interrupted session is missing or belongs to another session or disk size",
            ))
        }
        _ => ChangeLog::create(&state.change_log, session, d.point, base_point, geometry)?,
    };
    let plan = consult_change_source(d, dcfg, geometry, &state, bitmap_disk.as_deref())?;
    let (first_round_hashed, catch_up) =
        plan_rounds(session, d, &method, &plan.record_at_base, &state, resuming)?;
    Ok(DiskJob {
        id: d.id.clone(),
        source,
        geometry,
        state,
        expected,
        log: Some(log),
        resume_from: d.resume_from,
        only: plan.only.map(Arc::new),
        next_record: plan.record,
        method,
        first_round_hashed,
        catch_up,
        group: dcfg.group.clone(),
        required,
    })
}

fn cannot_resume(
    d: &tideline_protocol::message::SyncDisk,
    session: u64,
    why: &str,
) -> SessionError {
    SessionError::CannotResume {
        disk: d.id.clone(),
        session,
        resume_from: d.resume_from,
        why: why.to_owned(),
    }
}

/// For a tracked disk: whether the first round hash-scans (tracking cannot
/// vouch for everything since the base point) and whether a resumed session
/// must catch up. A fresh session records what its rounds rely on; a
/// resumed one goes on only if tracking has been continuous since that
/// record, else the point restarts (`CannotResume`).
fn plan_rounds(
    session: u64,
    d: &tideline_protocol::message::SyncDisk,
    method: &DiskMethod,
    at_base: &Option<ChangeRecord>,
    state: &DiskState,
    resuming: bool,
) -> Result<(bool, bool), SessionError> {
    let tracked = match method {
        DiskMethod::Tracked(t) => t,
        DiskMethod::Reflink if resuming => {
            return Err(cannot_resume(
                d,
                session,
                "a reflink snapshot does not outlive its session; the point starts again",
            ))
        }
        _ if resuming && d.resume_from.round > 0 => {
            return Err(cannot_resume(
                d,
                session,
                "this disk is copied in a single round",
            ))
        }
        _ => return Ok((true, false)),
    };
    if resuming {
        let record =
            SessionRecord::load(&state.dir).filter(|r| r.session == session && r.point == d.point);
        let Some(record) = record else {
            return Err(cannot_resume(
                d,
                session,
                "the session's tracking record is gone",
            ));
        };
        if let Err(why) = tracked.disk.continuous_since(&record.registration) {
            warn!(disk = %d.id, %why, "write tracking was interrupted during the session; the point starts again");
            return Err(cannot_resume(
                d,
                session,
                &format!("write tracking was interrupted during the session: {why}"),
            ));
        }
        info!(disk = %d.id, resume = %d.resume_from, "resuming with write tracking intact; the next round copies everything since the base");
        return Ok((record.first_round_hashed, true));
    }
    let since_base = match (at_base, d.base) {
        (
            Some(ChangeRecord {
                tracking: Some(r),
                point,
                ..
            }),
            Some(b),
        ) if *point == b.point => match tracked.disk.continuous_since(r) {
            Ok(()) => true,
            Err(why) => {
                info!(disk = %d.id, %why, "write tracking cannot vouch for the base point; hash scan");
                false
            }
        },
        (_, None) => false,
        _ => {
            info!(disk = %d.id, "no write tracking record at the base point; hash scan");
            false
        }
    };
    let registration = if since_base {
        info!(disk = %d.id, "write tracking vouches for the base point: only the blocks it names are read");
        tracked.disk.registration()
    } else {
        // Everything is read anyway: start tracking afresh, so the rounds
        // after this scan rely only on writes from now on.
        tracked.disk.reset()?
    };
    let record = SessionRecord {
        session,
        point: d.point,
        registration,
        first_round_hashed: !since_base,
    };
    record.save(&state.dir).map_err(|e| {
        SessionError::Tracking(TrackingError::Io {
            op: "write",
            path: state.dir.join(SESSION_RECORD_FILE),
            cause: e,
        })
    })?;
    Ok((!since_base, false))
}

/// Asks the disk's change source (CBT list or dirty bitmap), if any, which
/// extents may have changed since the base point, and whether it can vouch
/// for that; returns those extents (None: scan everything) and what to
/// record about the source once this point is committed.
fn consult_change_source(
    d: &tideline_protocol::message::SyncDisk,
    dcfg: &DiskSection,
    geometry: Geometry,
    state: &DiskState,
    bitmap_disk: Option<&NbdDisk>,
) -> Result<ChangePlan, SessionError> {
    let record = ChangeRecord::load(&state.dir);
    let mut next = ChangeRecord {
        point: d.point,
        cbt_change_id: None,
        bitmap: None,
        tracking: None,
    };
    // A change of size is a change no list describes: scan.
    let base = d
        .base
        .filter(|b| Geometry::new(b.disk_size, b.block_size) == geometry);
    let mut only = None;
    if let Some(path) = &dcfg.cbt_file {
        match CbtList::load(path, geometry.disk_size) {
            Ok(list) => {
                if let Some(b) = base {
                    if trust_cbt(&d.id, &list, record.as_ref(), b.point) {
                        only = Some(list.extents.clone());
                    }
                }
                next.cbt_change_id = Some(list.change_id);
            }
            Err(e) => warn!(disk = %d.id, error = %e, "CBT list unusable; hash scan"),
        }
    }
    if let (Some(name), Some(disk)) = (&dcfg.dirty_bitmap, bitmap_disk) {
        let offered = disk.has_bitmap();
        if let Some(b) = base {
            if trust_bitmap(&d.id, name, offered, record.as_ref(), b.point) {
                only = Some(
                    disk.dirty_extents(name, 0, geometry.disk_size)
                        .map_err(SourceError::from)?,
                );
            }
        }
        if offered {
            next.bitmap = Some(name.clone());
        }
    }
    Ok(ChangePlan {
        only,
        record: next,
        record_at_base: record,
    })
}

/// What a change source says for one sync.
struct ChangePlan {
    /// Extents that may have changed (None: scan everything).
    only: Option<Vec<(u64, u64)>>,
    /// What to record once the point is committed.
    record: ChangeRecord,
    /// The record as the last committed point left it.
    record_at_base: Option<ChangeRecord>,
}

/// Brings the block map from the log's base point to the log's point.
///
/// When the map holds the base in the same geometry, the log is applied in
/// place (crash-safe through the map's APPLYING flag). Otherwise (first
/// point, or the disk changed size) a new map is built from the carried base
/// and the log, and replaces the old one only if it hashes to the sealed
/// root.
fn advance_map(state: &DiskState, log: &ChangeLog) -> Result<(), SessionError> {
    let root = log
        .sealed_root()
        .ok_or_else(|| SessionError::Inconsistent {
            disk: state.dir.display().to_string(),
            why: "change log is not sealed".into(),
        })?;
    let geometry = log.geometry();
    let map = BlockMap::open(&state.block_map).ok().flatten();
    let base_point = (log.base_point() != 0).then_some(log.base_point());
    if let (Some(mut m), Some(b)) = (map, base_point) {
        let in_place = m.geometry() == geometry && (m.point() == Some(b) || !m.is_consistent());
        if in_place {
            m.apply(log)?;
            return Ok(());
        }
        // Fall through with the old map as the carried base.
        let expected = ExpectedIndex::from_map(Arc::new(m), geometry);
        return rebuild_map(state, &expected, log, root);
    }
    rebuild_map(state, &ExpectedIndex::zero(geometry), log, root)
}

fn rebuild_map(
    state: &DiskState,
    expected: &ExpectedIndex,
    log: &ChangeLog,
    root: Digest,
) -> Result<(), SessionError> {
    let geometry = log.geometry();
    let mut w = BlockMap::create_with(&state.block_map, geometry, log.point(), root)?;
    let mut records = log.records().peekable();
    let mut run = Vec::with_capacity(4096);
    let mut first = 0u64;
    for block in 0..geometry.block_count {
        let d = match records.peek() {
            Some(Ok((b, d))) if *b == block => {
                let d = *d;
                records.next();
                d
            }
            Some(Err(_)) => match records.next() {
                Some(Err(e)) => return Err(e.into()),
                _ => expected.get(block),
            },
            _ => expected.get(block),
        };
        run.push(d);
        if run.len() == 4096 {
            w.write_range(first, &run)?;
            first += run.len() as u64;
            run.clear();
        }
    }
    if !run.is_empty() {
        w.write_range(first, &run)?;
    }
    w.finish()?;
    Ok(())
}

/// A tracking file that is damaged is discarded (the controller's index
/// replaces it); one that cannot be read at all (permissions, I/O errors) is
/// an error, so that a passing fault never costs a rescan.
fn open_or_discard<T>(
    r: Result<Option<T>, TrackingError>,
    path: &Path,
) -> Result<Option<T>, TrackingError> {
    match r {
        Ok(v) => Ok(v),
        Err(e @ TrackingError::Io { .. }) => Err(e),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "discarding damaged tracking state; the controller's index will be used");
            let _ = std::fs::remove_file(path);
            Ok(None)
        }
    }
}
