//! What the controller knows about agents and sessions while it runs.
//!
//! The store holds what is durable (recovery points); the registry holds
//! what is live: which agents are connected, their inventories, the session
//! each one is running (or that waits for it to come back), and the status
//! of every session for the admin interface.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tideline_protocol::message::{DiskInfo, StartSync, TargetInfo};
use tokio::sync::{mpsc, oneshot};

use crate::config::ControllerConfig;
use crate::session::{SessionWriter, SharedStatus, WriteReply};
use crate::store::Store;

/// Software name sent in `Welcome`.
pub const SOFTWARE: &str = concat!("tideline-controller/", env!("CARGO_PKG_VERSION"));

/// A request to an agent's connection task.
pub enum AgentCommand {
    /// Start a sync of these disks (all of the inventory when empty).
    Sync {
        /// Disk ids.
        disks: Vec<String>,
        /// The new session id, or why not.
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Start a failback pass into targets of this agent.
    Failback {
        /// What to write where.
        request: crate::failback::FailbackRequest,
        /// The new session id, or why not.
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// An interrupted session of this agent was parked after this
    /// connection started: pick it up.
    ResumePending,
}

/// A live connection of an agent.
pub struct Connection {
    /// Distinguishes reconnections of the same agent.
    pub conn_id: u64,
    /// Peer address.
    pub peer: String,
    /// Agent software from its `Hello`.
    pub software: String,
    /// Unix time of the connection.
    pub since_unix: u64,
    /// Commands to the connection task.
    pub commands: mpsc::Sender<AgentCommand>,
}

/// A session that is running on, or waiting for, an agent.
pub struct ActiveSession {
    /// Session id.
    pub id: u64,
    /// The original request (slot order = disk index order).
    pub request: StartSync,
    /// The session's store writer.
    pub writer: SessionWriter,
    /// Replies of the writer; held by the connection task while attached.
    pub replies: Option<mpsc::Receiver<WriteReply>>,
    /// Status shared with the admin interface.
    pub status: SharedStatus,
    /// When the link dropped, if it did.
    pub interrupted_at: Option<Instant>,
}

/// Everything known about one agent.
#[derive(Default)]
pub struct AgentEntry {
    /// Its live connection.
    pub connection: Option<Connection>,
    /// Last inventory received.
    pub inventory: Vec<DiskInfo>,
    /// Failback targets of the last inventory.
    pub targets: Vec<TargetInfo>,
    /// The live connection has sent its inventory.
    pub inventory_received: bool,
    /// Failback passes started on this agent since the controller started.
    pub failback_passes: u32,
    /// Interrupted session waiting for the agent.
    pub active: Option<ActiveSession>,
    /// Id of the session running on the live connection, if any.
    pub running: Option<u64>,
    /// Last session failure.
    pub last_error: Option<String>,
    /// When the scheduler last started a sync.
    pub last_scheduled: Option<Instant>,
}

/// Live state of the controller.
#[derive(Default)]
pub struct Registry {
    /// Agents by id.
    pub agents: BTreeMap<String, AgentEntry>,
    /// Sessions by id (kept after they end, for the admin interface).
    pub sessions: BTreeMap<u64, SharedStatus>,
    /// Failback passes by session id (kept after they end).
    pub failbacks: BTreeMap<u64, crate::failback::SharedFailback>,
    /// DR plan runs by id (kept after they end).
    pub plan_runs: BTreeMap<u64, crate::failback::plan_run::SharedPlanRun>,
}

/// The controller: configuration, store and registry, shared by every task.
pub struct Controller {
    /// Configuration.
    pub cfg: ControllerConfig,
    /// Recovery point store.
    pub store: Arc<Store>,
    registry: Mutex<Registry>,
    next_id: AtomicU64,
}

impl Controller {
    /// A controller over an opened store.
    pub fn new(cfg: ControllerConfig, store: Store) -> Arc<Controller> {
        // Session and connection ids start at the current time in
        // milliseconds, so that they do not repeat across restarts.
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        Arc::new(Controller {
            cfg,
            store: Arc::new(store),
            registry: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(start),
        })
    }

    /// The registry, locked. Hold it briefly and never across an await.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock would be a bug elsewhere; the data
        // itself stays usable, so recover it rather than cascading.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id for a session or connection.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks a connected agent to sync; returns the session id.
    pub async fn request_sync(&self, agent: &str, disks: Vec<String>) -> Result<u64, String> {
        let commands = {
            let reg = self.registry();
            let entry = reg
                .agents
                .get(agent)
                .ok_or_else(|| format!("unknown agent {agent:?}"))?;
            let conn = entry
                .connection
                .as_ref()
                .ok_or_else(|| format!("agent {agent:?} is not connected"))?;
            conn.commands.clone()
        };
        let (tx, rx) = oneshot::channel();
        commands
            .send(AgentCommand::Sync { disks, reply: tx })
            .await
            .map_err(|_| format!("agent {agent:?} disconnected"))?;
        rx.await
            .map_err(|_| format!("agent {agent:?} disconnected"))?
    }

    /// Asks a connected agent to run a failback pass; returns the session
    /// id.
    pub async fn request_failback(
        &self,
        agent: &str,
        request: crate::failback::FailbackRequest,
    ) -> Result<u64, String> {
        let commands = {
            let reg = self.registry();
            reg.agents
                .get(agent)
                .and_then(|e| e.connection.as_ref())
                .map(|c| c.commands.clone())
                .ok_or_else(|| format!("agent {agent:?} is not connected"))?
        };
        let (tx, rx) = oneshot::channel();
        commands
            .send(AgentCommand::Failback { request, reply: tx })
            .await
            .map_err(|_| format!("agent {agent:?} disconnected"))?;
        rx.await
            .map_err(|_| format!("agent {agent:?} disconnected"))?
    }

    /// Status of a failback pass.
    pub fn failback_status(&self, id: u64) -> Option<crate::failback::FailbackStatus> {
        let status = self.registry().failbacks.get(&id).cloned()?;
        let mut s = status.lock().ok()?.clone();
        s.touch();
        Some(s)
    }

    /// Status of a session.
    pub fn session_status(&self, id: u64) -> Option<crate::session::SessionStatus> {
        let status = self.registry().sessions.get(&id).cloned()?;
        let mut s = status.lock().ok()?.clone();
        s.touch();
        Some(s)
    }

    /// A summary of every known agent (connected, or with points in the
    /// store).
    pub fn agents_summary(&self) -> Vec<AgentSummary> {
        let mut ids: Vec<String> = self.store.agents().unwrap_or_default();
        let reg = self.registry();
        for id in reg.agents.keys() {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids.sort();
        let now = unix_now();
        ids.into_iter()
            .map(|id| {
                let entry = reg.agents.get(&id);
                let mut disk_ids: Vec<String> = self.store.disks(&id).unwrap_or_default();
                if let Some(e) = entry {
                    for d in &e.inventory {
                        if !disk_ids.contains(&d.id) {
                            disk_ids.push(d.id.clone());
                        }
                    }
                }
                disk_ids.sort();
                let disks = disk_ids
                    .into_iter()
                    .map(|d| {
                        let inv = entry.and_then(|e| e.inventory.iter().find(|i| i.id == d));
                        let latest = self.store.latest_point(&id, &d).ok().flatten();
                        DiskSummary {
                            size: inv.map(|i| i.size),
                            block_size: inv.map(|i| i.block_size),
                            latest_point: latest.as_ref().map(|p| p.point),
                            latest_consistency: latest.as_ref().map(|p| p.consistency.clone()),
                            rpo_lag_secs: latest
                                .as_ref()
                                .map(|p| now.saturating_sub(p.created_unix)),
                            id: d,
                        }
                    })
                    .collect();
                AgentSummary {
                    connected: entry.is_some_and(|e| e.connection.is_some()),
                    peer: entry.and_then(|e| e.connection.as_ref().map(|c| c.peer.clone())),
                    software: entry.and_then(|e| e.connection.as_ref().map(|c| c.software.clone())),
                    session: entry.and_then(|e| e.running.or(e.active.as_ref().map(|a| a.id))),
                    last_error: entry.and_then(|e| e.last_error.clone()),
                    inventory_received: entry.is_some_and(|e| e.inventory_received),
                    targets: entry
                        .map(|e| {
                            e.targets
                                .iter()
                                .map(|t| TargetSummary {
                                    id: t.id.clone(),
                                    size: t.size,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    disks,
                    id,
                }
            })
            .collect()
    }
}

/// One agent, as the admin interface lists it.
#[derive(Debug, Serialize)]
pub struct AgentSummary {
    /// Agent id.
    pub id: String,
    /// Connected now.
    pub connected: bool,
    /// Peer address.
    pub peer: Option<String>,
    /// Agent software.
    pub software: Option<String>,
    /// Running or interrupted session.
    pub session: Option<u64>,
    /// Last session failure.
    pub last_error: Option<String>,
    /// Whether the live connection has reported its inventory (sessions
    /// can start only then).
    pub inventory_received: bool,
    /// Failback targets the connected agent offers.
    pub targets: Vec<TargetSummary>,
    /// Disks.
    pub disks: Vec<DiskSummary>,
}

/// A failback target, as the admin interface lists it.
#[derive(Debug, Serialize)]
pub struct TargetSummary {
    /// Target id on the agent.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
}

/// One disk, as the admin interface lists it.
#[derive(Debug, Serialize)]
pub struct DiskSummary {
    /// Disk id.
    pub id: String,
    /// Size reported by the connected agent.
    pub size: Option<u64>,
    /// Block size reported by the connected agent.
    pub block_size: Option<u32>,
    /// Latest committed point.
    pub latest_point: Option<u64>,
    /// How consistent the latest point is.
    pub latest_consistency: Option<crate::store::ConsistencyInfo>,
    /// Age of the latest point in seconds (the RPO lag).
    pub rpo_lag_secs: Option<u64>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
