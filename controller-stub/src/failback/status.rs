//! What the admin interface shows of a failback pass while it runs and
//! after it ended.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// State of a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PassState {
    /// Waiting for the agent to accept and describe its targets.
    Describing,
    /// Blocks are flowing.
    Writing,
    /// Every target holds its point, verified by root.
    Done,
    /// The pass failed or was cut off; the next pass resumes it.
    Failed,
}

/// One target of a pass.
#[derive(Debug, Clone, Serialize)]
pub struct TargetProgress {
    /// Target id on the failback agent.
    pub target: String,
    /// Agent whose point is written.
    pub source_agent: String,
    /// Disk of that agent.
    pub disk: String,
    /// Point written.
    pub point: u64,
    /// Blocks in the point.
    pub block_count: u64,
    /// How the agent described the target: "scanned" or "map".
    pub described_by: Option<String>,
    /// Blocks whose target digest has been compared with the point's.
    pub compared_blocks: u64,
    /// Blocks that differ and are (to be) sent.
    pub differing_blocks: u64,
    /// Blocks sent so far.
    pub sent_blocks: u64,
    /// Payload bytes sent (as stored, compressed).
    pub sent_bytes: u64,
    /// Bytes those blocks hold once decoded.
    pub sent_raw_bytes: u64,
    /// Blocks the agent wrote.
    pub written_blocks: u64,
    /// Blocks the agent wrote, flushed, re-read and verified.
    pub verified_blocks: u64,
    /// The agent's root equals the point's: the target holds the point.
    pub verified: bool,
}

/// A failback pass.
#[derive(Debug, Clone, Serialize)]
pub struct FailbackStatus {
    /// Session id.
    pub session: u64,
    /// The failback agent writing the targets.
    pub agent: String,
    /// Pass number.
    pub pass: u32,
    /// State.
    pub state: PassState,
    /// Targets.
    pub targets: Vec<TargetProgress>,
    /// Seconds since the pass started (to its end once over).
    pub elapsed_secs: f64,
    /// Decoded MiB per second sent so far.
    pub mib_per_s: Option<f64>,
    /// Seconds left at the current rate.
    pub eta_secs: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    #[serde(skip)]
    started: Option<Instant>,
}

/// Shared between the connection task and the admin interface.
pub type SharedFailback = Arc<Mutex<FailbackStatus>>;

impl FailbackStatus {
    /// A new pass.
    pub fn new(session: u64, agent: &str, pass: u32, targets: Vec<TargetProgress>) -> Self {
        FailbackStatus {
            session,
            agent: agent.to_owned(),
            pass,
            state: PassState::Describing,
            targets,
            elapsed_secs: 0.0,
            mib_per_s: None,
            eta_secs: None,
            error: None,
            started: Some(Instant::now()),
        }
    }

    /// Refreshes time, rate and ETA.
    pub fn touch(&mut self) {
        if matches!(self.state, PassState::Describing | PassState::Writing) {
            if let Some(s) = self.started {
                self.elapsed_secs = s.elapsed().as_secs_f64();
            }
            let sent: u64 = self.targets.iter().map(|t| t.sent_blocks).sum();
            let differing: u64 = self.targets.iter().map(|t| t.differing_blocks).sum();
            let raw: u64 = self.targets.iter().map(|t| t.sent_raw_bytes).sum();
            if self.elapsed_secs > 0.0 && raw > 0 {
                let rate = raw as f64 / 1048576.0 / self.elapsed_secs;
                self.mib_per_s = Some(rate);
                let per_block = raw as f64 / sent.max(1) as f64 / 1048576.0;
                let left = differing.saturating_sub(sent) as f64 * per_block;
                self.eta_secs = Some(left / rate);
            }
        }
    }

    /// Whether the pass is over.
    pub fn finished(&self) -> bool {
        matches!(self.state, PassState::Done | PassState::Failed)
    }

    /// Ends the pass as failed (unless it already ended).
    pub fn fail(&mut self, why: String) {
        self.touch();
        if !self.finished() {
            self.state = PassState::Failed;
            self.error = Some(why);
        }
    }
}
