//! What an admin asks for: write these points into these targets of one
//! failback agent.

use serde::{Deserialize, Serialize};
use tideline_protocol::message::{FailbackTarget, StartFailback, TargetInfo};
use tideline_protocol::Geometry;

use super::sender::SlotSource;
use super::status::TargetProgress;
use crate::store::{PointId, Store};

/// One target of a pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRequest {
    /// Target id on the failback agent.
    pub target: String,
    /// Agent whose replica is written (the recovery site's machine).
    pub from_agent: String,
    /// Its disk.
    pub disk: String,
    /// The point; default: the latest.
    #[serde(default)]
    pub point: Option<PointId>,
    /// Write even if the target looks in use.
    #[serde(default)]
    pub force: bool,
    /// Read the target to describe it even if the last pass's map could.
    #[serde(default)]
    pub rescan: bool,
}

/// A failback pass request, as the admin API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailbackRequest {
    /// The targets.
    pub targets: Vec<TargetRequest>,
}

/// A request resolved against the store and the agent's inventory.
pub struct Resolved {
    /// The message for the agent.
    pub start: StartFailback,
    /// What the sender reads.
    pub sources: Vec<SlotSource>,
    /// Initial progress rows.
    pub progress: Vec<TargetProgress>,
}

impl FailbackRequest {
    /// Resolves points and checks sizes; every problem at once, each naming
    /// the target.
    pub fn resolve(
        &self,
        store: &Store,
        offered: &[TargetInfo],
        session: u64,
        pass: u32,
    ) -> Result<Resolved, String> {
        if self.targets.is_empty() {
            return Err("a failback pass needs at least one target".into());
        }
        let mut problems = Vec::new();
        let mut start = StartFailback {
            session,
            pass,
            targets: Vec::new(),
        };
        let mut sources = Vec::new();
        let mut progress = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].iter().any(|o| o.target == t.target) {
                problems.push(format!("target {:?} named twice", t.target));
                continue;
            }
            let info = match t.point {
                Some(p) => store.point(&t.from_agent, &t.disk, p).map(Some),
                None => store.latest_point(&t.from_agent, &t.disk),
            };
            let info = match info {
                Ok(Some(i)) => i,
                Ok(None) => {
                    problems.push(format!(
                        "target {:?}: {}/{} has no recovery point",
                        t.target, t.from_agent, t.disk
                    ));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("target {:?}: {e}", t.target));
                    continue;
                }
            };
            let Some(root) = info.root_digest() else {
                problems.push(format!(
                    "target {:?}: point {} of {}/{} has no valid root",
                    t.target, info.point, t.from_agent, t.disk
                ));
                continue;
            };
            match offered.iter().find(|o| o.id == t.target) {
                None => problems.push(format!(
                    "target {:?} is not offered by the failback agent (configured targets: {})",
                    t.target,
                    offered
                        .iter()
                        .map(|o| o.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Some(o) if o.size < info.disk_size => problems.push(format!(
                    "target {:?} is {} bytes, smaller than point {} of {}/{} ({} bytes)",
                    t.target, o.size, info.point, t.from_agent, t.disk, info.disk_size
                )),
                Some(_) => {}
            }
            let geometry = Geometry::new(info.disk_size, info.block_size);
            start.targets.push(FailbackTarget {
                target: t.target.clone(),
                source: format!("{}/{}", t.from_agent, t.disk),
                point: info.point,
                disk_size: info.disk_size,
                block_size: info.block_size,
                root,
                force: t.force,
                rescan: t.rescan,
            });
            sources.push(SlotSource {
                agent: t.from_agent.clone(),
                disk: t.disk.clone(),
                point: info.point,
                geometry,
            });
            progress.push(TargetProgress {
                target: t.target.clone(),
                source_agent: t.from_agent.clone(),
                disk: t.disk.clone(),
                point: info.point,
                block_count: geometry.block_count,
                described_by: None,
                compared_blocks: 0,
                differing_blocks: 0,
                sent_blocks: 0,
                sent_bytes: 0,
                sent_raw_bytes: 0,
                written_blocks: 0,
                verified_blocks: 0,
                verified: false,
            });
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Resolved {
            start,
            sources,
            progress,
        })
    }
}
