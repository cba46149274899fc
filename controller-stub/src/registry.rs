//! What the controller knows about agents and sessions while it runs.
//!
//! The store holds what is durable (recovery points); the registry holds
//! what is live: which agents are connected, their inventories, the session
//! each one is running (or that waits for it to come back), and the status
//! of every session for the admin interface.
//!
//! A connection enters the registry only through
//! [`Controller::register_connection`], which checks the revocation list
//! under the registry lock; [`Controller::enforce_revocations`] takes the
//! same lock after a new list is in force, so a connection is either
//! refused at registration or closed by the enforcement, never missed by
//! both.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tideline_protocol::message::{DiskInfo, StartSync, TargetInfo};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::ControllerConfig;
use crate::revocation::{Refusal, Revocations, RevokedAgent};
use crate::session::{SessionWriter, SharedStatus, WriteReply};
use crate::store::Store;
use crate::tls::PeerCertificate;

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
    /// The certificate the agent presented.
    pub certificate: PeerCertificate,
    /// Set to the refusal when the certificate is revoked while connected:
    /// the connection task then tells the agent and closes. Shared with
    /// that task, so it outlives this entry.
    pub revoked: Arc<watch::Sender<Option<Refusal>>>,
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
    /// The revocation list in force (also read by the TLS verifier).
    pub revocations: Arc<Revocations>,
    /// Points served over NBD.
    pub exports: Arc<crate::serve::Exports>,
    registry: Mutex<Registry>,
    next_id: AtomicU64,
}

impl Controller {
    /// A controller over an opened store and a loaded revocation list.
    pub fn new(
        cfg: ControllerConfig,
        store: Store,
        revocations: Arc<Revocations>,
    ) -> Arc<Controller> {
        // Session and connection ids start at the current time in
        // milliseconds, so that they do not repeat across restarts.
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        Arc::new(Controller {
            exports: Arc::new(crate::serve::Exports::new(cfg.serve_dir())),
            cfg,
            store: Arc::new(store),
            revocations,
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

    /// Makes `conn` the live connection of its agent, unless the list in
    /// force revokes its certificate. Checked under the registry lock,
    /// which [`Controller::enforce_revocations`] also takes: a list put in
    /// force after this check finds the connection registered.
    pub fn register_connection(&self, conn: Connection) -> Result<(), Box<Refusal>> {
        let mut reg = self.registry();
        if let Some(refusal) = self.revocations.check(&conn.certificate) {
            return Err(Box::new(refusal));
        }
        let entry = reg
            .agents
            .entry(conn.certificate.agent.clone())
            .or_default();
        entry.inventory_received = false;
        entry.connection = Some(conn);
        Ok(())
    }

    /// Closes every live connection whose certificate the list in force
    /// revokes (call after the list changed); returns their refusals.
    pub fn enforce_revocations(&self) -> Vec<Refusal> {
        let reg = self.registry();
        let mut closed = Vec::new();
        for conn in reg.agents.values().filter_map(|e| e.connection.as_ref()) {
            if let Some(refusal) = self.revocations.check(&conn.certificate) {
                tracing::warn!(agent = %conn.certificate.agent, peer = %conn.peer, refusal = %refusal, "closing the connection of a revoked agent");
                conn.revoked.send_replace(Some(refusal.clone()));
                closed.push(refusal);
            }
        }
        closed
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
        let revocations = self.revocations.current();
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
                    revoked: revocations.agent_entry(&id).cloned(),
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
    /// The revocation list's entry for the agent id, when it is revoked.
    pub revoked: Option<RevokedAgent>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::RevocationTarget;

    fn controller(dir: &std::path::Path) -> Arc<Controller> {
        let cfg = ControllerConfig::parse(
            "[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[store]\ndir=\"store\"\n",
            &dir.join("controller.toml"),
        )
        .unwrap();
        let store = Store::open(&cfg.store.dir).unwrap();
        let revocations = Arc::new(Revocations::load(&cfg.revocation_file()).unwrap());
        Controller::new(cfg, store, revocations)
    }

    fn connection(agent: &str) -> (Connection, watch::Receiver<Option<Refusal>>) {
        let revoked = Arc::new(watch::channel(None).0);
        let rx = revoked.subscribe();
        let conn = Connection {
            conn_id: 1,
            peer: "127.0.0.1:1".into(),
            software: "test".into(),
            since_unix: 0,
            commands: mpsc::channel(1).0,
            certificate: PeerCertificate {
                agent: agent.into(),
                serial: "1".into(),
                sha256: "a".repeat(64),
            },
            revoked,
        };
        (conn, rx)
    }

    #[test]
    fn revoking_closes_the_live_connection_and_refuses_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = controller(dir.path());
        let (web1, web1_rx) = connection("web-1");
        let (web2, web2_rx) = connection("web-2");
        ctl.register_connection(web1).unwrap();
        ctl.register_connection(web2).unwrap();
        assert!(ctl.enforce_revocations().is_empty());

        let target = RevocationTarget::new("web-1", None, None).unwrap();
        ctl.revocations
            .edit(|l| l.revoke(&target, "stolen", "t"))
            .unwrap();
        let closed = ctl.enforce_revocations();
        assert_eq!(closed.len(), 1);
        assert!(
            closed[0].to_string().contains("agent web-1"),
            "{}",
            closed[0]
        );
        let told = web1_rx.borrow().clone().expect("web-1 is told to close");
        assert!(told.to_string().contains("reason: stolen"), "{told}");
        assert!(web2_rx.borrow().is_none(), "web-2 is not revoked");

        let (again, _) = connection("web-1");
        let refusal = ctl.register_connection(again).unwrap_err();
        assert!(refusal.to_string().contains("agent web-1"), "{refusal}");
        let summary = ctl.agents_summary();
        let web1 = summary.iter().find(|a| a.id == "web-1").unwrap();
        assert_eq!(
            web1.revoked.as_ref().map(|r| r.reason.as_str()),
            Some("stolen")
        );

        ctl.revocations.edit(|l| Ok(l.unrevoke(&target))).unwrap();
        let (back, back_rx) = connection("web-1");
        ctl.register_connection(back).unwrap();
        assert!(ctl.enforce_revocations().is_empty());
        assert!(back_rx.borrow().is_none());
    }
}
