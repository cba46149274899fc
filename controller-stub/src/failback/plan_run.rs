//! Failing back a whole DR plan: its devices in rank order, one pass each.
//!
//! The plan is validated first ([`crate::plan::validate`]); nothing runs
//! unless it is sound. Devices of one rank run at the same time (each on
//! its own failback agent); a rank starts only once every device of the
//! rank before it is done. A device that fails stops the run before the
//! next rank: the machines that depend on it are not written.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::{FailbackRequest, PassState, TargetRequest};
use crate::plan::FailbackPlan;
use crate::registry::Controller;

/// State of a plan run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Devices are being written.
    Running,
    /// Every device's pass is done and verified.
    Done,
    /// A device's pass failed; later ranks were not started.
    Failed,
}

/// One device of a run.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRun {
    /// Machine name in the plan.
    pub name: String,
    /// Its rank.
    pub rank: u64,
    /// The failback agent writing it.
    pub agent: String,
    /// The pass's session, once started.
    pub session: Option<u64>,
    /// "waiting", or the pass's state.
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// A plan run, as the admin interface shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRun {
    /// Run id.
    pub id: u64,
    /// State.
    pub state: RunState,
    /// Devices in the order they run.
    pub devices: Vec<DeviceRun>,
}

/// Shared between the run's task and the admin interface.
pub type SharedPlanRun = Arc<Mutex<PlanRun>>;

/// The pass request for one device.
fn request_for(device: &crate::plan::PlanDevice, rescan: bool) -> FailbackRequest {
    FailbackRequest {
        targets: device
            .disks
            .iter()
            .map(|d| TargetRequest {
                target: d.target.clone(),
                from_agent: d.replica_agent.clone(),
                disk: d.replica_disk.clone(),
                // A plan that names no point follows the running recovery
                // site: each pass takes the latest point at that time.
                point: d.requested_point,
                force: d.force,
                rescan,
            })
            .collect(),
    }
}

/// Starts running `plan` in the background; returns the run's status.
pub fn start(ctl: Arc<Controller>, plan: FailbackPlan, rescan: bool) -> SharedPlanRun {
    let id = ctl.next_id();
    let run = Arc::new(Mutex::new(PlanRun {
        id,
        state: RunState::Running,
        devices: plan
            .devices()
            .iter()
            .map(|d| DeviceRun {
                name: d.name.clone(),
                rank: d.rank,
                agent: d.failback_agent.clone(),
                session: None,
                state: "waiting".into(),
                error: None,
            })
            .collect(),
    }));
    ctl.registry().plan_runs.insert(id, run.clone());
    let status = run.clone();
    tokio::spawn(async move {
        let ok = execute(&ctl, &plan, rescan, &status).await;
        if let Ok(mut r) = status.lock() {
            r.state = if ok { RunState::Done } else { RunState::Failed };
        }
    });
    run
}

fn set(status: &SharedPlanRun, name: &str, f: impl FnOnce(&mut DeviceRun)) {
    if let Ok(mut r) = status.lock() {
        if let Some(d) = r.devices.iter_mut().find(|d| d.name == name) {
            f(d);
        }
    }
}

/// Runs the stages in rank order; false once a device failed.
async fn execute(
    ctl: &Arc<Controller>,
    plan: &FailbackPlan,
    rescan: bool,
    status: &SharedPlanRun,
) -> bool {
    for stage in plan.stages() {
        let mut sessions = Vec::new();
        for device in &stage {
            match ctl
                .request_failback(&device.failback_agent, request_for(device, rescan))
                .await
            {
                Ok(session) => {
                    set(status, &device.name, |d| {
                        d.session = Some(session);
                        d.state = "describing".into();
                    });
                    sessions.push((device.name.clone(), session));
                }
                Err(e) => set(status, &device.name, |d| {
                    d.state = "failed".into();
                    d.error = Some(e);
                }),
            }
        }
        // Wait for every pass of the rank.
        loop {
            let mut running = false;
            for (name, session) in &sessions {
                if let Some(s) = ctl.failback_status(*session) {
                    running |= !s.finished();
                    let state = match s.state {
                        PassState::Describing => "describing",
                        PassState::Writing => "writing",
                        PassState::Done => "done",
                        PassState::Failed => "failed",
                    };
                    set(status, name, |d| {
                        d.state = state.into();
                        d.error = s.error.clone();
                    });
                }
            }
            if !running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let failed = status
            .lock()
            .map(|r| {
                r.devices
                    .iter()
                    .any(|d| d.rank == stage[0].rank && d.state != "done")
            })
            .unwrap_or(true);
        if failed {
            return false;
        }
    }
    true
}
