//! Runs one sync session: which disk is read next, in which round, and when
//! the instant is taken.
//!
//! ```text
//!  First      each slot's first copy (round 0): a hash scan, the blocks the
//!             write tracker names, or a change source's extents; disks read
//!             live (exports, files without reflinks) end here
//!  PreCopy    flush the filesystems (syncfs: dirty pages reach the tracker now,
//!             not during the freeze), take what the tracker recorded
//!             meanwhile; while it is more than a freeze can read in a tenth of
//!             its bound, copy it live in another round (at most
//!             `precopy_rounds`); tracked disks with nothing to freeze end here
//!  Instant    hooks, freeze, take and read the rest into memory, clone image
//!             files, thaw, hooks (`instant.rs`, on a thread of its own); a
//!             failed attempt forces another live round, then retries
//!             (`freeze_attempts`)
//!  Final      send the captured copies and clones as each slot's last round,
//!             then `DiskEnd` with the level the slot reached
//! ```
//!
//! Slots are scanned one at a time through the pipeline (`pipeline.rs`);
//! every round of a slot goes out as a protocol round, so a block copied
//! twice is replaced, never duplicated, on the controller.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tideline_protocol::message::{Committed, ErrorCode, IndexChunk, StartSync, SyncReady};
use tideline_protocol::session::agent::AgentLink;
use tideline_protocol::{Consistency, PointConsistency};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::changes::merge;
use super::frozen_copy::FrozenCopy;
use super::instant::{self, CloneSlot, FrozenSlot, GroupHooks, InstantOutcome, InstantPlan};
use super::method::DiskMethod;
use super::pipeline::{Scan, ScanError, ScanItem, ScanStats};
use super::session::{AgentSession, SessionError};
use crate::config::AgentConfig;
use crate::consistency::hooks::{Hook, HookDisk};
use crate::consistency::{MountedFs, ReflinkSnapshot};
use crate::source::{DiskSource, RawDisk};

/// Read speed assumed for a freeze before any tracked round was measured.
const ASSUMED_READ_BYTES_PER_SEC: f64 = 200.0 * 1024.0 * 1024.0;
/// Below this, a remainder is always small enough to freeze for.
const MIN_FREEZE_BYTES: u64 = 1 << 20;
/// The remainder read while frozen may take one part in this many of
/// `max_frozen_ms`.
const FREEZE_READ_SHARE: f64 = 10.0;

/// Why a session cannot go on, with the code for the controller.
#[derive(Debug)]
pub struct RunError {
    /// Error code.
    pub code: ErrorCode,
    /// What went wrong, naming the disk.
    pub message: String,
    /// The disk concerned, if one.
    pub disk: Option<String>,
}

impl RunError {
    fn session(disk: &str, e: SessionError) -> RunError {
        RunError {
            code: error_code(&e),
            message: e.to_string(),
            disk: Some(disk.to_owned()),
        }
    }

    fn protocol(disk: &str, e: impl std::fmt::Display) -> RunError {
        RunError {
            code: ErrorCode::Internal,
            message: format!("disk {disk}: {e}"),
            disk: Some(disk.to_owned()),
        }
    }
}

/// The error code a session error maps to.
pub fn error_code(e: &SessionError) -> ErrorCode {
    match e {
        SessionError::UnknownDisk(_) => ErrorCode::UnknownDisk,
        SessionError::Source(_) => ErrorCode::DiskUnreadable,
        SessionError::CannotResume { .. } => ErrorCode::SessionAborted,
        SessionError::BelowRequirement { .. } => ErrorCode::SessionAborted,
        SessionError::Tracking(_)
        | SessionError::Tracker(_)
        | SessionError::Inconsistent { .. } => ErrorCode::Internal,
    }
}

/// The error code a failed scan maps to: a disk that cannot be read is the
/// disk's fault, the rest the agent's.
pub fn scan_error_code(e: &ScanError) -> ErrorCode {
    match e {
        ScanError::Source(_) => ErrorCode::DiskUnreadable,
        ScanError::Compressor { .. } | ScanError::Stopped { .. } => ErrorCode::Internal,
    }
}

/// What a slot's point turned out to be, for the status file and the log.
#[derive(Debug, Clone)]
pub struct SlotSummary {
    /// Disk id.
    pub disk: String,
    /// The point.
    pub point: u64,
    /// Its consistency.
    pub consistency: PointConsistency,
    /// Bytes read from the disk for this point, in every round.
    pub bytes_read: u64,
    /// How its changes were found and made consistent.
    pub method: &'static str,
}

/// Something the runner waits for.
pub enum RunEvent {
    /// An item of the running scan (`None`: the pipeline stopped).
    Scan(Option<ScanItem>),
    /// The instant attempt finished (`None`: its thread died).
    Instant(Option<InstantOutcome>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    First,
    PreCopy,
    Instant,
    Final,
}

/// Why a scan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    First,
    Live,
    /// A tracked disk's last live round (nothing to freeze, or every freeze
    /// failed and the point may be committed as `none`).
    LastLive,
    Final,
}

/// A round waiting to run: slot, why, and what to read (byte extents;
/// `None`: all of it).
type QueuedRound = (u16, Purpose, Option<Vec<(u64, u64)>>);

/// What a slot's last copy is read from.
enum FinalSource {
    Frozen(FrozenCopy),
    Clone(ReflinkSnapshot),
}

#[derive(Default)]
struct SlotRun {
    first_done: bool,
    ended: bool,
    /// Extents taken from the tracker and not read yet.
    carry: Vec<(u64, u64)>,
    final_source: Option<FinalSource>,
    bytes_read: u64,
    frozen_ms: Option<u32>,
    /// The level the slot reached, once known.
    level: Option<Consistency>,
    notes: Vec<String>,
}

/// Progress of the scan running now, for status lines and the watchdog.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The slot scanned.
    pub slot: u16,
    /// Its round.
    pub round: u32,
    /// When the scan started.
    pub started: Instant,
    /// When it last produced an item.
    pub last_item: Instant,
    /// Bytes scanned so far.
    pub bytes: u64,
    /// Next block to scan.
    pub next_block: u64,
    /// Blocks in the disk.
    pub block_count: u64,
}

/// One sync session being run.
pub struct SyncRun {
    cfg: Arc<AgentConfig>,
    session: AgentSession,
    slots: Vec<SlotRun>,
    stage: Stage,
    /// Live rounds of the pre-copy so far.
    precopy_rounds: u32,
    /// Failed instant attempts so far.
    attempts: u32,
    /// The next instant attempt must wait for another live round.
    force_live_round: bool,
    /// Slots queued for a round in this stage.
    queue: VecDeque<QueuedRound>,
    /// Whether the queued rounds are the last live ones before the instant.
    ready_for_instant: bool,
    scan: Option<(Scan, mpsc::Receiver<ScanItem>, Purpose)>,
    progress: Option<Progress>,
    since_checkpoint: (Instant, u64),
    instant: Option<oneshot::Receiver<InstantOutcome>>,
    /// Measured read speed of tracked rounds, bytes per second.
    read_speed: Option<f64>,
}

impl SyncRun {
    /// Prepares the session a `StartSync` asks for and returns its
    /// `SyncReady` answer.
    pub fn start(
        req: &StartSync,
        cfg: &Arc<AgentConfig>,
    ) -> Result<(SyncRun, SyncReady), SessionError> {
        let (session, ready) = AgentSession::prepare(req, cfg)?;
        let slots = (0..session.slots()).map(|_| SlotRun::default()).collect();
        for slot in 0..session.slots() {
            if let Some(m) = session.method(slot) {
                info!(
                    session = req.session,
                    disk = session.disk_id(slot),
                    method = m.name(),
                    best = %m.best(),
                    "consistency method"
                );
            }
        }
        Ok((
            SyncRun {
                cfg: cfg.clone(),
                session,
                slots,
                stage: Stage::First,
                precopy_rounds: 0,
                attempts: 0,
                force_live_round: false,
                queue: VecDeque::new(),
                ready_for_instant: false,
                scan: None,
                progress: None,
                since_checkpoint: (Instant::now(), 0),
                instant: None,
                read_speed: None,
            },
            ready,
        ))
    }

    /// Session id.
    pub fn id(&self) -> u64 {
        self.session.id()
    }

    /// Disk id of a slot.
    pub fn disk_id(&self, slot: u16) -> &str {
        self.session.disk_id(slot)
    }

    /// Geometry of a slot.
    pub fn geometry(&self, slot: u16) -> Option<tideline_protocol::Geometry> {
        self.session.geometry(slot)
    }

    /// The scan running now, if any.
    pub fn progress(&self) -> Option<&Progress> {
        self.progress.as_ref().filter(|_| self.scan.is_some())
    }

    /// Whether the instant is being captured (filesystems may be frozen).
    pub fn capturing(&self) -> bool {
        self.instant.is_some()
    }

    /// Part of a base index.
    pub fn on_index_chunk(&mut self, c: &IndexChunk) -> Result<(), SessionError> {
        self.session.on_index_chunk(c)
    }

    /// A base index is complete.
    pub fn on_index_complete(&mut self, slot: u16) -> Result<(), SessionError> {
        self.session.on_index_complete(slot)
    }

    /// A slot's point was committed.
    pub fn on_committed(&mut self, c: &Committed) -> Result<(), SessionError> {
        self.session.on_committed(c)
    }

    /// Makes the running slot's change log durable (on shutdown: the
    /// controller resumes from its last ack, and the log must hold at least
    /// that).
    pub fn sync_running_log(&mut self) {
        if let Some(p) = &self.progress {
            let _ = self.session.sync_log(p.slot);
        }
    }

    /// Waits for the next item of the running scan or the instant; never
    /// returns while neither runs.
    pub async fn next(&mut self) -> RunEvent {
        if let Some((_, rx, _)) = &mut self.scan {
            return RunEvent::Scan(rx.recv().await);
        }
        if let Some(rx) = &mut self.instant {
            return RunEvent::Instant(rx.await.ok());
        }
        std::future::pending().await
    }

    /// Acts on an event; returns the slots that ended (their `DiskEnd` was
    /// queued on `link`).
    pub fn handle(
        &mut self,
        ev: RunEvent,
        link: &mut AgentLink,
    ) -> Result<Vec<SlotSummary>, RunError> {
        let mut ended = Vec::new();
        match ev {
            RunEvent::Scan(item) => self.on_scan_item(item, link, &mut ended)?,
            RunEvent::Instant(outcome) => {
                self.instant = None;
                let outcome = outcome.ok_or_else(|| RunError {
                    code: ErrorCode::Internal,
                    message: "the freeze thread stopped without a result".into(),
                    disk: None,
                })?;
                self.on_instant(outcome)?;
            }
        }
        self.advance(link, &mut ended)?;
        Ok(ended)
    }

    /// Starts whatever can run next (after `SyncReady`, an index, or an
    /// event); returns the slots that ended on the way.
    pub fn kick(&mut self, link: &mut AgentLink) -> Result<Vec<SlotSummary>, RunError> {
        let mut ended = Vec::new();
        self.advance(link, &mut ended)?;
        Ok(ended)
    }

    fn advance(
        &mut self,
        link: &mut AgentLink,
        ended: &mut Vec<SlotSummary>,
    ) -> Result<(), RunError> {
        loop {
            if self.scan.is_some() || self.instant.is_some() || !link.streaming() {
                return Ok(());
            }
            if let Some((slot, purpose, only)) = self.queue.pop_front() {
                if purpose == Purpose::First {
                    // A slot read once, from the start (an image whose
                    // clone could not be made).
                    self.launch(slot, purpose, only, 0, None, link)?;
                } else {
                    self.start_round(slot, purpose, only, link)?;
                }
                continue;
            }
            match self.stage {
                Stage::First => {
                    let next = (0..self.session.slots()).find(|&s| {
                        let r = &self.slots[usize::from(s)];
                        !r.first_done && !r.ended && !self.is_reflink(s)
                    });
                    match next {
                        Some(slot) if self.session.base_ready(slot) => {
                            self.start_first(slot, link)?;
                        }
                        // Its base index is still on its way.
                        Some(_) => return Ok(()),
                        None => self.stage = Stage::PreCopy,
                    }
                }
                Stage::PreCopy => {
                    if self.ready_for_instant {
                        self.ready_for_instant = false;
                        self.stage = Stage::Instant;
                    } else {
                        self.plan_precopy(link, ended)?;
                    }
                }
                Stage::Instant => {
                    if !self.start_instant()? {
                        self.stage = Stage::Final;
                    }
                }
                Stage::Final => {
                    let next = (0..self.session.slots()).find(|&s| {
                        let r = &self.slots[usize::from(s)];
                        !r.ended && r.final_source.is_some()
                    });
                    match next {
                        Some(slot) => self.start_final(slot, link, ended)?,
                        None => {
                            if let Some(s) = (0..self.session.slots())
                                .find(|&s| !self.slots[usize::from(s)].ended)
                            {
                                return Err(RunError::protocol(
                                    self.session.disk_id(s),
                                    "the session has nothing left to do for it, but it has not ended",
                                ));
                            }
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn is_reflink(&self, slot: u16) -> bool {
        matches!(self.session.method(slot), Some(DiskMethod::Reflink))
    }

    fn freezes(&self, slot: u16) -> bool {
        self.session
            .method(slot)
            .and_then(DiskMethod::tracked)
            .is_some_and(|t| !t.filesystems.is_empty())
    }

    /// The first scan of a slot (or the round a resumed session was in).
    fn start_first(&mut self, slot: u16, link: &mut AgentLink) -> Result<(), RunError> {
        let disk = self.session.disk_id(slot).to_owned();
        let resume = self.session.resume_from(slot);
        let only = match self.session.method(slot) {
            Some(DiskMethod::Tracked(t))
                if !self.session.first_round_hashed(slot) || resume.round > 0 =>
            {
                // The tracker names the blocks: everything outstanding since
                // the base (or, resuming, since the session started).
                let taken = t
                    .disk
                    .take(true)
                    .map_err(|e| RunError::session(&disk, e.into()))?;
                Some(taken.extents)
            }
            _ => self
                .session
                .change_source_extents(slot)
                .map(|o| o.as_ref().clone()),
        };
        self.slots[usize::from(slot)].first_done = true;
        self.launch(slot, Purpose::First, only, resume.block, None, link)
    }

    /// A live round of a tracked slot (the round is opened here). A last
    /// live round also takes what was written since its extents were taken,
    /// so that it copies everything up to its start.
    fn start_round(
        &mut self,
        slot: u16,
        purpose: Purpose,
        mut only: Option<Vec<(u64, u64)>>,
        link: &mut AgentLink,
    ) -> Result<(), RunError> {
        if purpose == Purpose::LastLive {
            if let (Some(t), Some(extents)) = (
                self.session.method(slot).and_then(DiskMethod::tracked),
                only.as_mut(),
            ) {
                let disk = self.session.disk_id(slot);
                let d = t
                    .disk
                    .take(false)
                    .map_err(|e| RunError::session(disk, e.into()))?;
                extents.extend(d.extents);
                *extents = merge(std::mem::take(extents));
            }
        }
        self.open_round(slot, link)?;
        self.launch(slot, purpose, only, 0, None, link)
    }

    fn open_round(&mut self, slot: u16, link: &mut AgentLink) -> Result<u32, RunError> {
        let disk = self.session.disk_id(slot).to_owned();
        let round = self
            .session
            .begin_round(slot)
            .map_err(|e| RunError::session(&disk, e))?;
        let sent = link
            .send_round(slot)
            .map_err(|e| RunError::protocol(&disk, e))?;
        if sent != round {
            return Err(RunError::protocol(
                &disk,
                format!("the change log is in round {round}, the link in round {sent}"),
            ));
        }
        Ok(round)
    }

    fn launch(
        &mut self,
        slot: u16,
        purpose: Purpose,
        only: Option<Vec<(u64, u64)>>,
        from_block: u64,
        source: Option<Arc<dyn DiskSource>>,
        _link: &mut AgentLink,
    ) -> Result<(), RunError> {
        let disk = self.session.disk_id(slot).to_owned();
        let source = match source {
            Some(s) => s,
            None => self
                .session
                .source(slot)
                .ok_or_else(|| RunError::protocol(&disk, "no such slot"))?,
        };
        let job = self
            .session
            .scan_job(slot, &self.cfg, source, from_block, only.map(Arc::new))
            .map_err(|e| RunError::session(&disk, e))?;
        let round = self.session.round(slot);
        info!(
            disk = %disk,
            round,
            from_block,
            blocks = ?job.only.as_ref().map(|o| o.iter().map(|(s, e)| e - s).sum::<u64>() / u64::from(job.expected.geometry().block_size.max(1))),
            purpose = ?purpose,
            "scanning"
        );
        let block_count = job.expected.geometry().block_count;
        let (scan, rx) = Scan::start(job, 64);
        self.scan = Some((scan, rx, purpose));
        self.progress = Some(Progress {
            slot,
            round,
            started: Instant::now(),
            last_item: Instant::now(),
            bytes: 0,
            next_block: from_block,
            block_count,
        });
        self.since_checkpoint = (Instant::now(), 0);
        Ok(())
    }

    /// Decides, after a pass of live rounds, whether another pass is needed
    /// or the instant can be taken; queues the rounds.
    fn plan_precopy(
        &mut self,
        link: &mut AgentLink,
        ended: &mut Vec<SlotSummary>,
    ) -> Result<(), RunError> {
        let live: Vec<u16> = (0..self.session.slots())
            .filter(|&s| {
                !self.slots[usize::from(s)].ended
                    && self
                        .session
                        .method(s)
                        .and_then(DiskMethod::tracked)
                        .is_some()
            })
            .collect();
        let mut taken = Vec::with_capacity(live.len());
        for &slot in &live {
            let disk = self.session.disk_id(slot).to_owned();
            let catch_up = self.session.take_catch_up(slot);
            let t = self
                .session
                .method(slot)
                .and_then(DiskMethod::tracked)
                .ok_or_else(|| RunError::protocol(&disk, "not tracked"))?;
            let d = t
                .disk
                .take(catch_up)
                .map_err(|e| RunError::session(&disk, e.into()))?;
            let r = &mut self.slots[usize::from(slot)];
            let mut extents = std::mem::take(&mut r.carry);
            extents.extend(d.extents);
            taken.push((slot, merge(extents)));
        }
        let total: u64 = taken
            .iter()
            .flat_map(|(_, e)| e.iter().map(|(s, e)| e - s))
            .sum();
        let budget = self.freeze_budget();
        let exhausted = self.precopy_rounds >= self.cfg.consistency.precopy_rounds;
        let ready = (total <= budget || exhausted) && !self.force_live_round;
        if !ready || total > 0 {
            info!(
                session = self.id(),
                pass = self.precopy_rounds + 1,
                changed_bytes = total,
                freeze_budget_bytes = budget,
                ready,
                "pre-copy"
            );
        }
        self.force_live_round = false;
        if ready {
            for (slot, extents) in taken {
                if self.freezes(slot) {
                    self.slots[usize::from(slot)].carry = extents;
                } else if extents.is_empty() {
                    ended.push(self.end_slot(slot, link)?);
                } else {
                    self.queue
                        .push_back((slot, Purpose::LastLive, Some(extents)));
                }
            }
            self.ready_for_instant = true;
        } else {
            self.precopy_rounds += 1;
            for (slot, extents) in taken {
                if !extents.is_empty() {
                    self.queue.push_back((slot, Purpose::Live, Some(extents)));
                }
            }
        }
        Ok(())
    }

    /// Bytes a freeze can read in a tenth of its bound, at the speed the
    /// live rounds showed, within the memory allowed. The freeze also has to
    /// flush and thaw, and under load a live round is cheap: another round
    /// now is better than a longer freeze.
    fn freeze_budget(&self) -> u64 {
        let c = &self.cfg.consistency;
        let speed = self.read_speed.unwrap_or(ASSUMED_READ_BYTES_PER_SEC);
        let by_time = speed * (c.max_frozen_ms as f64 / 1000.0) / FREEZE_READ_SHARE;
        (by_time as u64)
            .min(c.freeze_memory_bytes())
            .max(MIN_FREEZE_BYTES)
    }

    /// Starts an instant attempt; false when no slot needs one.
    fn start_instant(&mut self) -> Result<bool, RunError> {
        let n = self.session.slots();
        let frozen_slots: Vec<u16> = (0..n)
            .filter(|&s| !self.slots[usize::from(s)].ended && self.freezes(s))
            .collect();
        let clone_slots: Vec<u16> = (0..n)
            .filter(|&s| !self.slots[usize::from(s)].ended && self.is_reflink(s))
            .collect();
        if frozen_slots.is_empty() && clone_slots.is_empty() {
            return Ok(false);
        }
        let mut filesystems: Vec<MountedFs> = Vec::new();
        let mut frozen = Vec::new();
        for &slot in &frozen_slots {
            let Some(t) = self.session.method(slot).and_then(DiskMethod::tracked) else {
                continue;
            };
            for fs in &t.filesystems {
                if !filesystems.iter().any(|f| f.superblock == fs.superblock) {
                    filesystems.push(fs.clone());
                }
            }
            frozen.push(FrozenSlot {
                slot,
                disk: t.disk.clone(),
                source: self
                    .session
                    .source(slot)
                    .ok_or_else(|| RunError::protocol(self.session.disk_id(slot), "no source"))?,
                carry: self.slots[usize::from(slot)].carry.clone(),
            });
        }
        let clones = clone_slots
            .iter()
            .map(|&slot| CloneSlot {
                slot,
                image: self.disk_path(slot),
            })
            .collect();
        let mut groups: BTreeMap<String, GroupHooks> = BTreeMap::new();
        for &slot in frozen_slots.iter().chain(&clone_slots) {
            let group = self.session.group(slot).to_owned();
            let section = self.cfg.group(&group);
            let hook = |p: &Option<PathBuf>| {
                p.as_ref().map(|path| Hook {
                    path: path.clone(),
                    timeout: Duration::from_secs(section.map_or(30, |g| g.hook_timeout_secs)),
                })
            };
            let entry = groups.entry(group.clone()).or_insert_with(|| GroupHooks {
                group: group.clone(),
                disks: Vec::new(),
                point: self.session.point(slot),
                pre_freeze: section.and_then(|g| hook(&g.pre_freeze)),
                post_thaw: section.and_then(|g| hook(&g.post_thaw)),
            });
            entry.disks.push(HookDisk {
                id: self.session.disk_id(slot).to_owned(),
                device: self.disk_path(slot),
            });
        }
        let plan = InstantPlan {
            session: self.id(),
            frozen,
            clones,
            filesystems,
            hooks: groups.into_values().collect(),
            max_frozen: Duration::from_millis(self.cfg.consistency.max_frozen_ms),
            memory_limit: self.cfg.consistency.freeze_memory_bytes(),
            guard_exe: PathBuf::from("/proc/self/exe"),
        };
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("tideline-freeze".into())
            .spawn(move || {
                let _ = tx.send(instant::run(plan));
            })
            .map_err(|e| RunError {
                code: ErrorCode::Internal,
                message: format!("cannot start the freeze thread: {e}"),
                disk: None,
            })?;
        self.instant = Some(rx);
        Ok(true)
    }

    fn disk_path(&self, slot: u16) -> PathBuf {
        let id = self.session.disk_id(slot);
        self.cfg
            .disks
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.path.clone())
            .unwrap_or_default()
    }

    fn on_instant(&mut self, out: InstantOutcome) -> Result<(), RunError> {
        let frozen_ms = out
            .frozen_for
            .map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32);
        for (group, notes) in &out.group_notes {
            for note in notes {
                warn!(session = self.id(), group = %group, "{note}");
            }
            for slot in 0..self.session.slots() {
                if self.session.group(slot) == group {
                    self.slots[usize::from(slot)]
                        .notes
                        .extend(notes.iter().cloned());
                }
            }
        }
        if let Some(why) = &out.failure {
            self.attempts += 1;
            warn!(
                session = self.id(),
                attempt = self.attempts,
                of = self.cfg.consistency.freeze_attempts,
                frozen_ms = ?frozen_ms,
                fifreeze_ms = out.timing.freeze.as_millis() as u64,
                read_ms = out.timing.read.as_millis() as u64,
                reason = %why,
                "instant not captured; copying live once more before the next attempt"
            );
            for (slot, r) in out.frozen {
                let s = &mut self.slots[usize::from(slot)];
                if let Err(extents) = r {
                    s.carry = extents;
                }
                s.notes.push(format!("attempt {}: {why}", self.attempts));
            }
            if self.attempts < self.cfg.consistency.freeze_attempts {
                self.force_live_round = true;
                self.stage = Stage::PreCopy;
                return Ok(());
            }
            return self.give_up(why);
        }
        info!(
            session = self.id(),
            frozen_ms = ?frozen_ms,
            syncfs_ms = out.timing.sync.as_millis() as u64,
            fifreeze_ms = out.timing.freeze.as_millis() as u64,
            read_ms = out.timing.read.as_millis() as u64,
            read_bytes = out.timing.read_bytes,
            slots = out.frozen.len(),
            clones = out.clones.len(),
            "instant captured"
        );
        for (slot, r) in out.frozen {
            let group = self.session.group(slot).to_owned();
            let app = out.hooks_ok.get(&group).copied().unwrap_or(false);
            let s = &mut self.slots[usize::from(slot)];
            match r {
                Ok(copy) => {
                    s.bytes_read += copy.bytes();
                    s.frozen_ms = frozen_ms;
                    s.level = Some(if app {
                        Consistency::Application
                    } else {
                        Consistency::CrashFrozen
                    });
                    s.final_source = Some(FinalSource::Frozen(copy));
                }
                Err(_) => {
                    return Err(RunError::protocol(
                        self.session.disk_id(slot),
                        "the instant succeeded without its copy",
                    ))
                }
            }
        }
        for (slot, r) in out.clones {
            let group = self.session.group(slot).to_owned();
            let app = out.hooks_ok.get(&group).copied().unwrap_or(false);
            let disk = self.session.disk_id(slot).to_owned();
            let s = &mut self.slots[usize::from(slot)];
            match r {
                Ok(clone) => {
                    s.level = Some(if app {
                        Consistency::Application
                    } else {
                        Consistency::CrashSnapshot
                    });
                    s.final_source = Some(FinalSource::Clone(clone));
                }
                Err(why) => {
                    // The filesystem refused the clone after all: read the
                    // file live, and say so.
                    warn!(disk = %disk, reason = %why, "no reflink snapshot; reading the image live");
                    s.level = Some(Consistency::None);
                    s.notes.push(format!("no reflink snapshot: {why}"));
                    self.queue.push_back((slot, Purpose::First, None));
                    s.first_done = true;
                }
            }
        }
        self.stage = Stage::Final;
        Ok(())
    }

    /// Every freeze attempt failed: commit the frozen slots as `none` after
    /// a last live round if the admin allows it, else fail the session.
    fn give_up(&mut self, why: &str) -> Result<(), RunError> {
        let slots: Vec<u16> = (0..self.session.slots())
            .filter(|&s| {
                !self.slots[usize::from(s)].ended && (self.freezes(s) || self.is_reflink(s))
            })
            .collect();
        let message = format!(
            "no consistent instant after {} attempts: {why}",
            self.attempts
        );
        let allowed = self.cfg.consistency.commit_unfrozen()
            && slots
                .iter()
                .all(|&s| Consistency::None.meets(self.session.required(s)));
        if !allowed {
            let disk = slots.first().map(|&s| self.session.disk_id(s).to_owned());
            return Err(RunError {
                code: ErrorCode::SessionAborted,
                message: format!(
                    "{}: {message}",
                    slots
                        .iter()
                        .map(|&s| format!("disk {}", self.session.disk_id(s)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                disk,
            });
        }
        warn!(session = self.id(), reason = %message, "committing the points as not consistent ([consistency] on_freeze_failure = \"commit\")");
        for slot in slots {
            let reflink = self.is_reflink(slot);
            let s = &mut self.slots[usize::from(slot)];
            s.level = Some(Consistency::None);
            s.notes.push(message.clone());
            let carry = std::mem::take(&mut s.carry);
            if reflink {
                s.first_done = true;
                self.queue.push_back((slot, Purpose::First, None));
            } else {
                self.queue.push_back((slot, Purpose::LastLive, Some(carry)));
            }
        }
        self.stage = Stage::Final;
        Ok(())
    }

    /// The last copy of a frozen or cloned slot.
    fn start_final(
        &mut self,
        slot: u16,
        link: &mut AgentLink,
        ended: &mut Vec<SlotSummary>,
    ) -> Result<(), RunError> {
        let disk = self.session.disk_id(slot).to_owned();
        let source = self.slots[usize::from(slot)].final_source.take();
        match source {
            Some(FinalSource::Frozen(copy)) => {
                if copy.bytes() == 0 {
                    // Nothing changed since the last live round: what it
                    // read is the disk at the instant.
                    ended.push(self.end_slot(slot, link)?);
                    return Ok(());
                }
                let only = copy.extents();
                self.open_round(slot, link)?;
                self.launch(
                    slot,
                    Purpose::Final,
                    Some(only),
                    0,
                    Some(Arc::new(copy)),
                    link,
                )
            }
            Some(FinalSource::Clone(clone)) => {
                let source = RawDisk::open_with(clone.path(), self.cfg.sync.read_mode())
                    .map_err(|e| RunError::session(&disk, e.into()))?;
                // The clone is removed when the scan is over: its source keeps
                // an open descriptor, and `clone` is dropped with the slot.
                let source: Arc<dyn DiskSource> = Arc::new(CloneSource {
                    disk: source,
                    _clone: clone,
                });
                let from = self.session.resume_from(slot).block;
                self.launch(slot, Purpose::Final, None, from, Some(source), link)
            }
            None => Err(RunError::protocol(&disk, "no last copy to send")),
        }
    }

    fn on_scan_item(
        &mut self,
        item: Option<ScanItem>,
        link: &mut AgentLink,
        ended: &mut Vec<SlotSummary>,
    ) -> Result<(), RunError> {
        let Some(p) = &mut self.progress else {
            return Ok(());
        };
        let slot = p.slot;
        let disk = self.session.disk_id(slot).to_owned();
        p.last_item = Instant::now();
        let session_err = |e: SessionError| RunError::session(&disk, e);
        match item {
            Some(ScanItem::Changed(c)) => {
                link.send_block(slot, c.block, c.encoding, c.raw_len, &c.digest, &c.payload)
                    .map_err(|e| RunError::protocol(&disk, e))?;
                self.session
                    .record_sent(slot, c.block, c.digest)
                    .map_err(session_err)?;
            }
            Some(ScanItem::Scanned { next_block, stats }) => {
                let scanned = stats.bytes_read + stats.bytes_in_holes;
                p.next_block = next_block;
                p.bytes = scanned;
                let due = scanned - self.since_checkpoint.1 >= self.cfg.sync.checkpoint_bytes
                    || self.since_checkpoint.0.elapsed() >= Duration::from_secs(5);
                if due {
                    self.session.sync_log(slot).map_err(session_err)?;
                    link.send_checkpoint(slot, next_block)
                        .map_err(|e| RunError::protocol(&disk, e))?;
                    self.since_checkpoint = (Instant::now(), scanned);
                }
            }
            Some(ScanItem::Finished(stats)) => {
                let purpose = self.scan.take().map(|(_, _, p)| p);
                self.progress = None;
                log_scan(&disk, &stats);
                self.on_scan_finished(slot, purpose, &stats, link, ended)?;
            }
            Some(ScanItem::Failed(e)) => {
                self.scan = None;
                self.progress = None;
                return Err(RunError {
                    code: scan_error_code(&e),
                    message: format!("disk {disk}: scan failed: {e}"),
                    disk: Some(disk),
                });
            }
            None => {
                self.scan = None;
                self.progress = None;
                return Err(RunError {
                    code: ErrorCode::Internal,
                    message: format!("disk {disk}: the scan pipeline stopped"),
                    disk: Some(disk),
                });
            }
        }
        Ok(())
    }

    fn on_scan_finished(
        &mut self,
        slot: u16,
        purpose: Option<Purpose>,
        stats: &ScanStats,
        link: &mut AgentLink,
        ended: &mut Vec<SlotSummary>,
    ) -> Result<(), RunError> {
        let tracked = self
            .session
            .method(slot)
            .and_then(DiskMethod::tracked)
            .is_some();
        let s = &mut self.slots[usize::from(slot)];
        if purpose != Some(Purpose::Final)
            || !matches!(self.session.method(slot), Some(DiskMethod::Tracked(_)))
        {
            // A frozen copy was counted when it was read.
            s.bytes_read += stats.bytes_read;
        }
        if tracked && purpose == Some(Purpose::Live) && stats.seconds > 0.0 && stats.bytes_read > 0
        {
            let speed = stats.bytes_read as f64 / stats.seconds;
            self.read_speed = Some(self.read_speed.map_or(speed, |s| (s + speed) / 2.0));
        }
        let end_now = match purpose {
            Some(Purpose::First) => !tracked,
            Some(Purpose::LastLive) | Some(Purpose::Final) => true,
            Some(Purpose::Live) | None => false,
        };
        if end_now {
            ended.push(self.end_slot(slot, link)?);
        }
        Ok(())
    }

    /// Ends a slot: its consistency, checked against `min_consistency`, in
    /// `DiskEnd`.
    fn end_slot(&mut self, slot: u16, link: &mut AgentLink) -> Result<SlotSummary, RunError> {
        let disk = self.session.disk_id(slot).to_owned();
        let method = self.session.method(slot);
        let method_name = method.map_or("?", DiskMethod::name);
        let s = &mut self.slots[usize::from(slot)];
        let level = s.level.unwrap_or(match method {
            Some(DiskMethod::Hypervisor) => Consistency::CrashHypervisor,
            _ => Consistency::None,
        });
        let mut notes = std::mem::take(&mut s.notes);
        if level == Consistency::None {
            if let Some(why) = method.and_then(DiskMethod::limitation) {
                notes.insert(0, why);
            }
        }
        let required = self.session.required(slot);
        if !level.meets(required) {
            return Err(RunError {
                code: ErrorCode::SessionAborted,
                message: format!(
                    "disk {disk}: the point is {level}, below the required {required}: {}",
                    notes.join("; ")
                ),
                disk: Some(disk),
            });
        }
        let consistency = PointConsistency {
            level,
            frozen_ms: s.frozen_ms.unwrap_or(0),
            rounds: self.session.round(slot) + 1,
            note: cut(&notes.join("; "), tideline_protocol::limits::MAX_TEXT_LEN),
        };
        s.ended = true;
        let bytes_read = s.bytes_read;
        let end = self
            .session
            .finish_slot(slot, consistency.clone())
            .map_err(|e| RunError::session(&disk, e))?;
        link.send_disk_end(end)
            .map_err(|e| RunError::protocol(&disk, e))?;
        info!(
            disk = %disk,
            point = self.session.point(slot),
            consistency = consistency.level.as_str(),
            frozen_ms = consistency.frozen_ms,
            rounds = consistency.rounds,
            bytes_read,
            method = method_name,
            note = %consistency.note,
            "disk copied"
        );
        Ok(SlotSummary {
            disk,
            point: self.session.point(slot),
            consistency,
            bytes_read,
            method: method_name,
        })
    }
}

/// A reflink clone read as a raw disk; the clone file is removed when the
/// last reader lets go of it.
struct CloneSource {
    disk: RawDisk,
    _clone: ReflinkSnapshot,
}

impl DiskSource for CloneSource {
    fn describe(&self) -> &str {
        self.disk.describe()
    }
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), crate::source::SourceError> {
        self.disk.read_exact_at(buf, offset)
    }
    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, crate::source::SourceError> {
        self.disk.next_data(offset)
    }
    fn done_with(&self, offset: u64, len: u64) {
        self.disk.done_with(offset, len)
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn log_scan(disk: &str, s: &ScanStats) {
    let mib = (s.bytes_read + s.bytes_in_holes) as f64 / (1024.0 * 1024.0);
    info!(
        disk,
        blocks = s.blocks,
        changed = s.changed_blocks,
        skipped_by_change_source = s.skipped_blocks,
        bytes_read = s.bytes_read,
        bytes_in_holes = s.bytes_in_holes,
        payload_bytes = s.payload_bytes,
        seconds = s.seconds,
        mib_per_s = if s.seconds > 0.0 {
            mib / s.seconds
        } else {
            0.0
        },
        "disk scanned"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_at_a_character_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("aé", 2), "a");
    }
}
