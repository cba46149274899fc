//! Scheduled syncs (the admin's RPO) and expiry of interrupted sessions.
//!
//! Once a second the scheduler looks at every connected agent with an
//! interval: when no session runs and its oldest latest point is older than
//! the interval, it starts a sync of all its disks. Interrupted sessions
//! whose agent has not come back within the resume window are abandoned.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::registry::{unix_now, Controller};
use crate::session::SessionState;

/// Runs until `shutdown` turns true.
pub async fn run(ctl: Arc<Controller>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        expire_interrupted(&ctl);
        for agent in due_agents(&ctl) {
            mark_scheduled(&ctl, &agent);
            match ctl.request_sync(&agent, Vec::new()).await {
                Ok(session) => info!(agent = %agent, session, "scheduled sync started"),
                Err(e) => warn!(agent = %agent, error = %e, "scheduled sync not started"),
            }
        }
    }
}

fn expire_interrupted(ctl: &Controller) {
    let window = Duration::from_secs(ctl.cfg.schedule.resume_window_secs);
    let mut reg = ctl.registry();
    for (id, entry) in reg.agents.iter_mut() {
        let expired = entry
            .active
            .as_ref()
            .and_then(|a| a.interrupted_at)
            .is_some_and(|t| t.elapsed() > window);
        if expired {
            if let Some(a) = entry.active.take() {
                warn!(agent = %id, session = a.id, "interrupted session abandoned: the agent did not come back in time");
                if let Ok(mut s) = a.status.lock() {
                    s.state = SessionState::Failed;
                    s.error = Some("agent did not reconnect within the resume window".into());
                }
                entry.last_error = Some(format!("session {} abandoned", a.id));
            }
        }
    }
}

fn due_agents(ctl: &Controller) -> Vec<String> {
    let now = unix_now();
    let reg = ctl.registry();
    reg.agents
        .iter()
        .filter(|(_, e)| {
            e.connection.is_some()
                && e.active.is_none()
                && e.running.is_none()
                && !e.inventory.is_empty()
        })
        .filter_map(|(id, e)| {
            let interval = ctl.cfg.interval_for(id)?;
            if e.last_scheduled
                .is_some_and(|t: Instant| t.elapsed() < Duration::from_secs(interval))
            {
                return None;
            }
            let oldest = e
                .inventory
                .iter()
                .map(|d| {
                    ctl.store
                        .latest_point(id, &d.id)
                        .ok()
                        .flatten()
                        .map(|p| p.created_unix)
                        .unwrap_or(0)
                })
                .min()
                .unwrap_or(0);
            (now.saturating_sub(oldest) >= interval).then(|| id.clone())
        })
        .collect()
}

/// Marks that the scheduler started a sync for `agent` now.
pub fn mark_scheduled(ctl: &Controller, agent: &str) {
    if let Some(e) = ctl.registry().agents.get_mut(agent) {
        e.last_scheduled = Some(Instant::now());
    }
}
