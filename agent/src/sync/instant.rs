//! The instant of a point: hooks, the freeze, the last read, the thaw.
//!
//! When the pre-copy rounds have left little to copy, the session's disks
//! are captured at one instant, on a thread of its own so the connection
//! keeps answering heartbeats:
//!
//! 1. each group's **pre-freeze hook** (flush and lock the application);
//! 2. **freeze** every filesystem on the tracked disks, through the thaw
//!    guard process, which thaws by itself at `max_frozen` whatever happens
//!    to the agent (`consistency::guard`);
//! 3. **take** what the tracker recorded since the last round and **read**
//!    it into memory (`frozen_copy::capture`), within the time and memory
//!    the freeze allows; **clone** image files (`FICLONE`), so they share
//!    the instant;
//! 4. **thaw**, and only then log, hash, compress and send;
//! 5. each group's **post-thaw hook** (unlock the application), whatever
//!    happened before.
//!
//! Nothing here writes to a file while the filesystems are frozen: the
//! state directory may live on one of them. A failed attempt (the freeze
//! refused, the remainder too large or too slow to read, the guard's
//! deadline first) hands the extents it took back to the caller, which
//! copies them live in another round before trying again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::consistency::hooks::{self, FreezeSummary, Hook, HookContext, HookDisk, HookPhase};
use crate::consistency::{freeze, FreezeRequest, MountedFs, ReflinkSnapshot};
use crate::source::DiskSource;
use crate::sync::changes::merge;
use crate::sync::frozen_copy::{capture, FrozenCopy};
use crate::tracking::writes::TrackedDisk;

/// A tracked disk whose filesystems are frozen for the last copy.
pub struct FrozenSlot {
    /// Slot in the session.
    pub slot: u16,
    /// The tracker's handle.
    pub disk: Arc<TrackedDisk>,
    /// Where its blocks are read from.
    pub source: Arc<dyn DiskSource>,
    /// Extents taken in an earlier attempt and not read yet.
    pub carry: Vec<(u64, u64)>,
}

/// An image file read from a reflink clone.
pub struct CloneSlot {
    /// Slot in the session.
    pub slot: u16,
    /// The image.
    pub image: PathBuf,
}

/// A consistency group's hooks and what they are told.
pub struct GroupHooks {
    /// Group id.
    pub group: String,
    /// Its disks in this session.
    pub disks: Vec<HookDisk>,
    /// The point id the hooks are told (the group's first disk's).
    pub point: u64,
    /// Run before the freeze.
    pub pre_freeze: Option<Hook>,
    /// Run after the thaw.
    pub post_thaw: Option<Hook>,
}

/// One attempt at the instant.
pub struct InstantPlan {
    /// Session id, for the hooks.
    pub session: u64,
    /// Tracked disks to freeze and read.
    pub frozen: Vec<FrozenSlot>,
    /// Image files to clone.
    pub clones: Vec<CloneSlot>,
    /// Every filesystem to freeze.
    pub filesystems: Vec<MountedFs>,
    /// Hooks of the groups involved.
    pub hooks: Vec<GroupHooks>,
    /// `[consistency] max_frozen_ms`.
    pub max_frozen: Duration,
    /// `[consistency] freeze_memory`.
    pub memory_limit: u64,
    /// The agent binary, to start the thaw guard from.
    pub guard_exe: PathBuf,
}

/// A frozen slot's last copy, or (the attempt failed) the extents it took,
/// to copy live in the next round.
pub type LastCopy = Result<FrozenCopy, Vec<(u64, u64)>>;

/// Where an attempt's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstantTiming {
    /// `syncfs` passes before freezing.
    pub sync: Duration,
    /// The `FIFREEZE` calls.
    pub freeze: Duration,
    /// Taking and reading the remainder while frozen.
    pub read: Duration,
    /// Bytes read while frozen.
    pub read_bytes: u64,
}

/// What an attempt achieved.
pub struct InstantOutcome {
    /// Per frozen slot, its last copy.
    pub frozen: Vec<(u16, LastCopy)>,
    /// Per image: its clone, or why there is none.
    pub clones: Vec<(u16, Result<ReflinkSnapshot, String>)>,
    /// How long the filesystems were frozen.
    pub frozen_for: Option<Duration>,
    /// Where the time went: the `syncfs` passes before the freeze (nothing
    /// frozen yet), the `FIFREEZE` calls (writers already wait), and the
    /// read of the remainder while frozen, with its size.
    pub timing: InstantTiming,
    /// Per group: whether its pre-freeze hook ran and succeeded (only then
    /// can its points be application-consistent).
    pub hooks_ok: BTreeMap<String, bool>,
    /// What happened to each group's hooks, for its points' notes.
    pub group_notes: BTreeMap<String, Vec<String>>,
    /// Why the attempt failed, if it did.
    pub failure: Option<String>,
}

impl InstantOutcome {
    fn new(plan: &InstantPlan) -> InstantOutcome {
        InstantOutcome {
            frozen: Vec::new(),
            clones: Vec::new(),
            frozen_for: None,
            timing: InstantTiming::default(),
            hooks_ok: plan
                .hooks
                .iter()
                .map(|g| (g.group.clone(), false))
                .collect(),
            group_notes: BTreeMap::new(),
            failure: None,
        }
    }
}

/// Runs one attempt. Blocking: call it from a thread of its own.
pub fn run(plan: InstantPlan) -> InstantOutcome {
    let mut out = InstantOutcome::new(&plan);
    let context = |g: &GroupHooks, phase, freeze| HookContext {
        phase,
        point: g.point,
        session: plan.session.to_string(),
        group: g.group.clone(),
        disks: g.disks.clone(),
        freeze,
    };
    for g in &plan.hooks {
        if let Some(h) = &g.pre_freeze {
            let r = hooks::run(h, &context(g, HookPhase::PreFreeze, None));
            out.hooks_ok.insert(g.group.clone(), r.succeeded());
            if !r.succeeded() {
                out.group_notes
                    .entry(g.group.clone())
                    .or_default()
                    .push(r.to_string());
            }
        }
    }
    let summary = capture_instant(&plan, &mut out);
    for g in &plan.hooks {
        if let Some(h) = &g.post_thaw {
            let r = hooks::run(h, &context(g, HookPhase::PostThaw, Some(summary)));
            if !r.succeeded() {
                out.group_notes
                    .entry(g.group.clone())
                    .or_default()
                    .push(r.to_string());
            }
        }
    }
    out
}

/// Steps 2 to 4: freeze, take, read, clone, thaw.
fn capture_instant(plan: &InstantPlan, out: &mut InstantOutcome) -> FreezeSummary {
    let frozen = if plan.filesystems.is_empty() {
        None
    } else {
        let req = FreezeRequest {
            filesystems: plan.filesystems.clone(),
            max_frozen: plan.max_frozen,
        };
        match freeze(&req, &plan.guard_exe) {
            Ok(f) => Some(f),
            Err(e) => {
                out.failure = Some(format!("freeze failed: {e}"));
                out.frozen = plan
                    .frozen
                    .iter()
                    .map(|s| (s.slot, Err(s.carry.clone())))
                    .collect();
                return FreezeSummary::Failed;
            }
        }
    };
    if let Some(f) = &frozen {
        out.timing.sync = f.sync_took();
        out.timing.freeze = f.freeze_took();
    }
    let reading = Instant::now();
    // Leave a quarter of the bound (at least 50 ms) for the thaw.
    let margin = (plan.max_frozen / 4).max(Duration::from_millis(50));
    let read_by = frozen.as_ref().map_or_else(
        || Instant::now() + plan.max_frozen,
        |f| {
            f.deadline()
                .checked_sub(margin)
                .unwrap_or_else(Instant::now)
        },
    );

    // Take every slot first, then read: the takes are what the instant is.
    let mut taken = Vec::with_capacity(plan.frozen.len());
    for s in &plan.frozen {
        let mut extents = s.carry.clone();
        match s.disk.take(false) {
            Ok(d) => extents.extend(d.extents),
            Err(e) => {
                if out.failure.is_none() {
                    out.failure = Some(format!(
                        "cannot take the tracked writes of {}: {e}",
                        s.disk.device().display()
                    ));
                }
            }
        }
        taken.push(merge(extents));
    }
    let mut memory_left = plan.memory_limit;
    let mut copies: Vec<Option<FrozenCopy>> = Vec::with_capacity(taken.len());
    for (s, extents) in plan.frozen.iter().zip(&taken) {
        if out.failure.is_some() {
            copies.push(None);
            continue;
        }
        match capture(&*s.source, extents, memory_left, read_by) {
            Ok(c) => {
                memory_left -= c.bytes();
                out.timing.read_bytes += c.bytes();
                copies.push(Some(c));
            }
            Err(e) => {
                out.failure = Some(format!("{}: {e}", s.source.describe()));
                copies.push(None);
            }
        }
    }
    out.timing.read = reading.elapsed();
    let mut clones = Vec::with_capacity(plan.clones.len());
    for c in &plan.clones {
        clones.push((
            c.slot,
            ReflinkSnapshot::create(&c.image).map_err(|e| e.to_string()),
        ));
    }
    let summary = match frozen {
        None => FreezeSummary::None,
        Some(f) => match f.thaw() {
            Ok(report) => {
                out.frozen_for = Some(report.frozen_for);
                if !report.trustworthy() {
                    if out.failure.is_none() {
                        out.failure = Some(format!(
                            "the filesystems did not stay frozen until the last read (thawed by {}{})",
                            report.cause,
                            if report.thawed_by_others.is_empty() {
                                String::new()
                            } else {
                                format!("; thawed by someone else: {:?}", report.thawed_by_others)
                            }
                        ));
                    }
                    FreezeSummary::Deadline
                } else {
                    FreezeSummary::Ok
                }
            }
            Err(e) => {
                if out.failure.is_none() {
                    out.failure = Some(format!("thaw failed: {e}"));
                }
                FreezeSummary::Failed
            }
        },
    };
    let failed = out.failure.is_some();
    for ((s, extents), copy) in plan.frozen.iter().zip(taken).zip(copies) {
        out.frozen.push((
            s.slot,
            match copy {
                Some(c) if !failed => Ok(c),
                _ => Err(extents),
            },
        ));
    }
    // Clones made in a failed attempt do not share an instant with the
    // others: they are dropped (and removed) and made again next time.
    out.clones = if failed && !plan.filesystems.is_empty() {
        clones
            .into_iter()
            .map(|(slot, _)| (slot, Err("the freeze attempt failed".to_string())))
            .collect()
    } else {
        clones
    };
    summary
}
