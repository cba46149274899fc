//! One agent's control channel on the controller.
//!
//! A task per connection: mutual TLS (the agent id is the CN of its
//! certificate), the protocol handshake, then a loop that feeds frames to
//! the [`ControllerLink`] state machine, hands blocks to the session's
//! writer thread, and turns the writer's acks and commits into frames.
//! Sessions outlive connections: when the link drops mid-session, the
//! session waits in the registry for the agent to come back and resume.
//! A revoked agent is refused at registration, and a connection whose
//! certificate is revoked while it runs is told why and closed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tideline_protocol::frame::FrameBuffer;
use tideline_protocol::limits::MAX_INDEX_CHUNK;
use tideline_protocol::message::{
    BaseRef, Committed, ErrorCode, IndexChunk, Message, Position, StartSync, SyncDisk,
};
use tideline_protocol::session::controller::{
    ControllerEvent, ControllerHandshake, ControllerLink,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::registry::{unix_now, ActiveSession, AgentCommand, Connection, Controller, SOFTWARE};
use crate::revocation::Refusal;
use crate::session::{
    DiskProgress, SessionState, SessionStatus, SessionWriter, WriteCmd, WriteReply,
};
use crate::tls::PeerCertificate;

#[path = "link_failback.rs"]
mod failback;
use failback::{recv_send_out, FailbackRun};

/// Accepts agents until `shutdown` turns true.
pub async fn serve_agents(
    ctl: Arc<Controller>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut stop = shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let ctl = ctl.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_connection(ctl, tcp, peer, acceptor, shutdown).await {
                warn!(peer = %peer, error = %format!("{e:#}"), "agent connection closed");
            }
        });
    }
}

async fn handle_connection(
    ctl: Arc<Controller>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    tcp.set_nodelay(true).ok();
    let stream = tokio::time::timeout(Duration::from_secs(15), acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))?
        .context("TLS handshake refused (no client certificate, not from our CA, or revoked?)")?;
    let certificate = PeerCertificate::from_peer(stream.get_ref().1.peer_certificates())
        .context("client certificate does not name an agent")?;
    let agent_id = certificate.agent.clone();
    let (mut rd, mut wr) = tokio::io::split(stream);

    let mut frames = FrameBuffer::new();
    let mut buf = vec![0u8; 256 * 1024];
    let hello = loop {
        if let Some(f) = frames.next_frame()? {
            break Message::decode(f)?;
        }
        let n = tokio::time::timeout(Duration::from_secs(15), rd.read(&mut buf))
            .await
            .map_err(|_| anyhow!("agent {agent_id} sent no Hello"))??;
        if n == 0 {
            bail!("agent {agent_id} closed the connection before Hello");
        }
        frames.extend(&buf[..n]);
    };
    let mut link = match ControllerHandshake::new(SOFTWARE).on_message(hello, &agent_id) {
        Ok(l) => l,
        Err((e, bytes)) => {
            let _ = wr.write_all(&bytes).await;
            bail!("agent {agent_id}: {e}");
        }
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let conn_id = ctl.next_id();
    let revoked = Arc::new(watch::channel(None).0);
    let revoked_rx = revoked.subscribe();
    let registered = ctl.register_connection(Connection {
        conn_id,
        peer: peer.to_string(),
        software: link.agent_software().to_owned(),
        since_unix: unix_now(),
        commands: cmd_tx,
        certificate,
        revoked: revoked.clone(),
    });
    if let Err(refusal) = registered {
        // Revoked between the TLS check and now: the agent gets the reason
        // in words, which the TLS alert could not carry.
        link.send_error(ErrorCode::Revoked, true, refusal.to_string());
        let _ = wr.write_all(&link.take_output()).await;
        let _ = wr.shutdown().await;
        bail!("refused agent {agent_id}: {refusal}");
    }
    info!(agent = %agent_id, peer = %peer, software = link.agent_software(), "agent connected");

    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    // A peer that stops taking bytes (gone without a reset, or a proxy that
    // half-closed) would block a write forever, and the connection task
    // behind it would never see the agent's silence: a write that makes no
    // progress for three heartbeats ends the connection, like silence does.
    let stall = Duration::from_secs(ctl.cfg.listen.heartbeat_secs) * 3;
    let writer = tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            write_with_progress(&mut wr, &bytes, stall).await?;
        }
        wr.shutdown().await
    });
    let first = link.take_output();
    out_tx.send(first).await.ok();

    let mut conn = AgentConn {
        ctl: ctl.clone(),
        agent: agent_id.clone(),
        link,
        out_tx: out_tx.clone(),
        session: None,
        failback: None,
    };
    let result = conn
        .run(&mut rd, frames, buf, cmd_rx, shutdown, revoked_rx)
        .await;
    // The sender lives as long as this task: a replaced registry entry
    // does not end the receiver early.
    drop(revoked);
    if conn.failback.is_some() {
        conn.fail_failback(
            "the connection to the agent was lost; the next pass resumes where this one stopped",
            ErrorCode::SessionAborted,
        );
    }

    // Detach: a session in progress waits for the agent to come back, once
    // its writer has finished what this link handed it.
    if let Some(att) = conn.session.take() {
        if let Some(active) = quiesce(att, &agent_id).await {
            let mut reg = ctl.registry();
            if let Some(entry) = reg.agents.get_mut(&agent_id) {
                entry.active = Some(active);
                entry.running = None;
                // The agent may already be back on a newer connection that
                // found nothing to resume when its inventory arrived.
                if let Some(c) = entry.connection.as_ref().filter(|c| c.conn_id != conn_id) {
                    let _ = c.commands.try_send(AgentCommand::ResumePending);
                }
            }
        } else if let Some(entry) = ctl.registry().agents.get_mut(&agent_id) {
            entry.running = None;
        }
    }
    {
        let mut reg = ctl.registry();
        if let Some(entry) = reg.agents.get_mut(&agent_id) {
            if entry
                .connection
                .as_ref()
                .is_some_and(|c| c.conn_id == conn_id)
            {
                entry.connection = None;
            }
        }
    }
    if conn.link.has_output() {
        let _ = out_tx.send(conn.link.take_output()).await;
    }
    drop(conn);
    drop(out_tx);
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), writer).await {
        warn!(agent = %agent_id, error = %e, "writing to the agent failed");
    }
    info!(agent = %agent_id, "agent disconnected");
    result
}

/// Lets the writer of a session whose link dropped finish every command
/// the link queued (a barrier travels through its queue), drops the replies
/// meant for the old link, and returns the session to wait for its agent;
/// or `None` when the session ended meanwhile (all committed, or failed).
async fn quiesce(mut att: Attached, agent: &str) -> Option<ActiveSession> {
    let token = att.active.id;
    let tx = att.active.writer.sender();
    let queued = tokio::task::spawn_blocking(move || tx.send(WriteCmd::Barrier { token }).is_ok())
        .await
        .unwrap_or(false);
    let mut failed = !queued;
    if queued {
        loop {
            match tokio::time::timeout(Duration::from_secs(300), att.replies.recv()).await {
                Ok(Some(WriteReply::Barrier { token: t })) if t == token => break,
                Ok(Some(WriteReply::Failed { message, .. })) => {
                    warn!(agent, session = token, error = %message, "session failed while its link was down");
                    failed = true;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
    }
    let mut s = att.active.status.lock().unwrap_or_else(|p| p.into_inner());
    s.touch();
    if failed {
        s.state = SessionState::Failed;
        s.error.get_or_insert_with(|| att.active.writer.failure().1);
        return None;
    }
    if s.disks.iter().all(|d| d.committed.is_some()) {
        // Everything was committed; the agent learns it from its sealed
        // change log at the next session.
        s.state = SessionState::Done;
        return None;
    }
    s.state = SessionState::Interrupted;
    drop(s);
    att.active.replies = Some(att.replies);
    att.active.interrupted_at = Some(Instant::now());
    Some(att.active)
}

/// A session attached to this connection.
struct Attached {
    active: ActiveSession,
    replies: mpsc::Receiver<WriteReply>,
    /// Slot of the current StartSync → disk index of the original request.
    slot_disk: Vec<usize>,
    /// Resume position of each slot in the current StartSync.
    slot_resume: Vec<Position>,
}

struct AgentConn {
    ctl: Arc<Controller>,
    agent: String,
    link: ControllerLink,
    out_tx: mpsc::Sender<Vec<u8>>,
    session: Option<Attached>,
    failback: Option<FailbackRun>,
}

async fn recv_reply(s: &mut Option<Attached>) -> Option<WriteReply> {
    match s {
        Some(a) => a.replies.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes all of `bytes`, failing when no byte is taken for `stall`.
async fn write_with_progress(
    wr: &mut (impl AsyncWriteExt + Unpin),
    mut bytes: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match tokio::time::timeout(stall, wr.write(bytes)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => bytes = &bytes[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the agent took no byte for {}s", stall.as_secs()),
                ))
            }
        }
    }
    Ok(())
}

impl AgentConn {
    async fn flush(&mut self) -> Result<()> {
        if self.link.has_output() {
            self.out_tx
                .send(self.link.take_output())
                .await
                .map_err(|_| anyhow!("connection to agent {} lost while writing", self.agent))?;
        }
        Ok(())
    }

    async fn run(
        &mut self,
        rd: &mut (impl AsyncReadExt + Unpin),
        mut frames: FrameBuffer,
        mut buf: Vec<u8>,
        mut commands: mpsc::Receiver<AgentCommand>,
        mut shutdown: watch::Receiver<bool>,
        mut revoked: watch::Receiver<Option<Refusal>>,
    ) -> Result<()> {
        let hb_every = Duration::from_secs(self.ctl.cfg.listen.heartbeat_secs);
        let mut heartbeat = tokio::time::interval(hb_every);
        heartbeat.tick().await;
        let mut last_heard = Instant::now();
        let mut seq = 0u64;
        loop {
            self.flush().await?;
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        self.link.send_error(ErrorCode::ShuttingDown, true, "controller is shutting down".into());
                        return Ok(());
                    }
                }
                n = rd.read(&mut buf) => {
                    let n = n.with_context(|| format!("reading from agent {}", self.agent))?;
                    if n == 0 {
                        bail!("agent {} closed the connection", self.agent);
                    }
                    last_heard = Instant::now();
                    frames.extend(&buf[..n]);
                    loop {
                        let msg = match frames.next_frame() {
                            Ok(Some(f)) => {
                                let wire = (f.body.len() + 12) as u64;
                                self.count_wire(wire);
                                Message::decode(f)
                            }
                            Ok(None) => break,
                            Err(e) => {
                                self.link.send_error(ErrorCode::Malformed, true, e.to_string());
                                bail!("agent {}: {e}", self.agent);
                            }
                        };
                        let msg = match msg {
                            Ok(m) => m,
                            Err(e) => {
                                self.link.send_error(ErrorCode::Malformed, true, e.to_string());
                                bail!("agent {}: {e}", self.agent);
                            }
                        };
                        match self.link.handle(msg) {
                            Ok(Some(ev)) => self.on_event(ev).await?,
                            Ok(None) => {}
                            Err(e) => {
                                self.fail_session(&format!("protocol violation: {e}"));
                                self.link.send_error(e.code(), true, e.to_string());
                                bail!("agent {}: {e}", self.agent);
                            }
                        }
                    }
                }
                Ok(()) = revoked.changed() => {
                    let refusal = revoked.borrow_and_update().clone();
                    if let Some(refusal) = refusal {
                        return Err(self.close_revoked(&refusal));
                    }
                }
                reply = recv_reply(&mut self.session) => self.on_reply(reply)?,
                out = recv_send_out(&mut self.failback) => self.on_send_out(out)?,
                cmd = commands.recv() => match cmd {
                    Some(AgentCommand::Sync { disks, reply }) => {
                        let r = self.start_session(disks);
                        let _ = reply.send(r);
                    }
                    Some(AgentCommand::Failback { request, reply }) => {
                        let r = self.start_failback(request);
                        let _ = reply.send(r);
                    }
                    Some(AgentCommand::ResumePending)
                        if self.session.is_none() && self.link.session().is_none() && self.link.inventory().is_some() =>
                    {
                        self.resume_pending();
                    }
                    Some(AgentCommand::ResumePending) | None => {}
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > hb_every * 3 {
                        bail!("agent {} silent for {}s", self.agent, last_heard.elapsed().as_secs());
                    }
                    seq += 1;
                    self.link.send_heartbeat(seq);
                }
            }
        }
    }

    /// Ends what runs on a connection whose certificate was revoked, and
    /// queues a fatal `Error{Revoked}` naming the agent and the reason (the
    /// caller flushes it before closing). A sync session fails rather
    /// than waiting for a resume: its uncommitted points are discarded.
    fn close_revoked(&mut self, refusal: &Refusal) -> anyhow::Error {
        let why = format!("agent {} was revoked: {refusal}", self.agent);
        self.fail_session(&why);
        self.fail_failback(&why, ErrorCode::Revoked);
        self.link
            .send_error(ErrorCode::Revoked, true, refusal.to_string());
        anyhow!(
            "closed the connection of revoked agent {}: {refusal}",
            self.agent
        )
    }

    fn count_wire(&self, n: u64) {
        if let Some(a) = &self.session {
            if let Ok(mut s) = a.active.status.lock() {
                s.wire_bytes += n;
            }
        }
    }

    /// Creates a new session for `disks` (all when empty) and starts it.
    fn start_session(&mut self, disks: Vec<String>) -> Result<u64, String> {
        if let Some(a) = &self.session {
            return Err(format!(
                "agent {} is busy with session {}",
                self.agent, a.active.id
            ));
        }
        if let Some(id) = self.link.session() {
            return Err(format!("agent {} is busy with session {id}", self.agent));
        }
        if let Some(a) = self
            .ctl
            .registry()
            .agents
            .get(&self.agent)
            .and_then(|e| e.active.as_ref())
        {
            return Err(format!(
                "agent {} has interrupted session {} pending",
                self.agent, a.id
            ));
        }
        // A full store refuses here, naming the cause, rather than in the
        // middle of the transfer.
        self.ctl
            .store
            .check_writable()
            .map_err(|e| format!("agent {}: {e}", self.agent))?;
        let inv = self
            .link
            .inventory()
            .ok_or_else(|| format!("agent {} has not reported its disks yet", self.agent))?
            .clone();
        let wanted: Vec<_> = if disks.is_empty() {
            inv.disks.clone()
        } else {
            let mut v = Vec::new();
            for d in &disks {
                match inv.disks.iter().find(|i| &i.id == d) {
                    Some(i) => v.push(i.clone()),
                    None => return Err(format!("agent {} has no disk {d:?}", self.agent)),
                }
            }
            v
        };
        if wanted.is_empty() {
            return Err(format!("agent {} protects no disk", self.agent));
        }
        let store = &self.ctl.store;
        let mut sync_disks = Vec::new();
        let mut progress = Vec::new();
        for d in &wanted {
            let latest = store
                .latest_point(&self.agent, &d.id)
                .map_err(|e| format!("disk {}: {e}", d.id))?;
            let point = latest.as_ref().map(|p| p.point + 1).unwrap_or(1);
            // A base in another block size cannot be carried over: sync as
            // if there were none.
            let base = latest
                .as_ref()
                .filter(|p| p.block_size == d.block_size)
                .and_then(|p| {
                    p.root_digest().map(|root| BaseRef {
                        point: p.point,
                        disk_size: p.disk_size,
                        block_size: p.block_size,
                        root,
                    })
                });
            sync_disks.push(SyncDisk {
                id: d.id.clone(),
                point,
                base,
                resume_from: Position::default(),
            });
            progress.push(DiskProgress {
                disk: d.id.clone(),
                point,
                base: base.map(|b| b.point),
                block_count: 0,
                acked: Position::default(),
                scanned: Position::default(),
                blocks_received: 0,
                payload_bytes: 0,
                stored_bytes: 0,
                committed: None,
            });
        }
        let id = self.ctl.next_id();
        let request = StartSync {
            session: id,
            disks: sync_disks,
        };
        self.link
            .start_sync(request.clone())
            .map_err(|e| e.to_string())?;
        let status = Arc::new(Mutex::new(SessionStatus::new(id, &self.agent, progress)));
        let (reply_tx, reply_rx) = mpsc::channel(64);
        let writer = SessionWriter::start(
            self.ctl.store.clone(),
            self.agent.clone(),
            wanted.iter().map(|d| d.id.clone()).collect(),
            status.clone(),
            reply_tx,
        )
        .map_err(|e| format!("cannot start the session's store thread: {e}"))?;
        {
            let mut reg = self.ctl.registry();
            reg.sessions.insert(id, status.clone());
            if let Some(e) = reg.agents.get_mut(&self.agent) {
                e.running = Some(id);
            }
        }
        let slot_disk = (0..request.disks.len()).collect();
        let slot_resume = vec![Position::default(); request.disks.len()];
        self.session = Some(Attached {
            slot_resume,
            active: ActiveSession {
                id,
                request,
                writer,
                replies: None,
                status,
                interrupted_at: None,
            },
            replies: reply_rx,
            slot_disk,
        });
        info!(agent = %self.agent, session = id, disks = ?wanted.iter().map(|d| &d.id).collect::<Vec<_>>(), "sync session started");
        Ok(id)
    }

    /// Re-attaches an interrupted session after the agent reconnected.
    fn resume_pending(&mut self) {
        let pending = {
            let mut reg = self.ctl.registry();
            reg.agents
                .get_mut(&self.agent)
                .and_then(|e| e.active.take())
        };
        let Some(mut active) = pending else { return };
        let Some(replies) = active.replies.take() else {
            return;
        };
        let (disks, slot_disk): (Vec<SyncDisk>, Vec<usize>) = {
            let s = active.status.lock().unwrap_or_else(|p| p.into_inner());
            active
                .request
                .disks
                .iter()
                .enumerate()
                .filter(|(i, _)| s.disks[*i].committed.is_none())
                .map(|(i, d)| {
                    let mut d = d.clone();
                    d.resume_from = s.disks[i].acked;
                    (d, i)
                })
                .unzip()
        };
        let slot_resume = disks.iter().map(|d| d.resume_from).collect();
        let req = StartSync {
            session: active.id,
            disks,
        };
        if let Err(e) = self.link.start_sync(req) {
            warn!(agent = %self.agent, session = active.id, error = %e, "cannot resume session");
            if let Ok(mut s) = active.status.lock() {
                s.state = SessionState::Failed;
                s.error = Some(format!("cannot resume: {e}"));
            }
            return;
        }
        if let Ok(mut s) = active.status.lock() {
            s.state = SessionState::Running;
            s.resumes += 1;
        }
        active.interrupted_at = None;
        if let Some(e) = self.ctl.registry().agents.get_mut(&self.agent) {
            e.running = Some(active.id);
        }
        info!(agent = %self.agent, session = active.id, "resuming interrupted session");
        self.session = Some(Attached {
            active,
            replies,
            slot_disk,
            slot_resume,
        });
    }

    fn fail_session(&mut self, why: &str) {
        if let Some(a) = self.session.take() {
            warn!(agent = %self.agent, session = a.active.id, error = why, "session failed");
            if let Ok(mut s) = a.active.status.lock() {
                s.touch();
                s.state = SessionState::Failed;
                s.error = Some(why.to_owned());
            }
            if let Some(e) = self.ctl.registry().agents.get_mut(&self.agent) {
                e.last_error = Some(why.to_owned());
                e.running = None;
            }
            // Dropping the writer ends its thread, which aborts the
            // uncommitted points.
        }
    }

    fn disk_of(&self, slot: u16) -> Result<usize> {
        self.session
            .as_ref()
            .and_then(|a| a.slot_disk.get(usize::from(slot)).copied())
            .ok_or_else(|| anyhow!("agent {}: slot {slot} has no session disk", self.agent))
    }

    /// Queues `cmd` for the session's store thread. If the thread has
    /// stopped, the session fails with the cause the thread recorded (the
    /// same one its `Failed` reply carries, whichever arrives first).
    fn write(&mut self, cmd: WriteCmd) -> Result<()> {
        // No session: it already failed, and the link drops its messages.
        let Some(a) = self.session.as_ref() else {
            return Ok(());
        };
        let tx = a.active.writer.sender();
        let sent = match tx.try_send(cmd) {
            Ok(()) => true,
            // The writer's queue is bounded: waiting here holds the agent
            // back through TCP instead of buffering without limit.
            Err(std::sync::mpsc::TrySendError::Full(cmd)) => {
                tokio::task::block_in_place(|| tx.send(cmd).is_ok())
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        };
        if !sent {
            self.writer_stopped();
        }
        Ok(())
    }

    /// The session's store thread stopped: fails the session with its
    /// recorded cause and tells the agent.
    fn writer_stopped(&mut self) {
        let Some(a) = self.session.as_ref() else {
            return;
        };
        let (code, message) = a.active.writer.failure();
        self.fail_session(&message);
        self.link.send_error(code, false, message);
    }

    async fn on_event(&mut self, ev: ControllerEvent) -> Result<()> {
        if self.on_failback_event(&ev).await? {
            return Ok(());
        }
        match ev {
            ControllerEvent::Inventory(inv) => {
                info!(agent = %self.agent, disks = inv.disks.len(), "inventory received");
                if let Some(e) = self.ctl.registry().agents.get_mut(&self.agent) {
                    e.inventory = inv.disks;
                    e.targets = inv.targets;
                    e.inventory_received = true;
                }
                if self.session.is_none() && self.link.session().is_none() {
                    self.resume_pending();
                }
            }
            ControllerEvent::SyncReady(r) => {
                let a = self
                    .session
                    .as_ref()
                    .ok_or_else(|| anyhow!("SyncReady without session"))?;
                let req = a.active.request.clone();
                let slot_disk = a.slot_disk.clone();
                let slot_resume = a.slot_resume.clone();
                let mut begins = Vec::with_capacity(r.disks.len());
                for (slot, ready) in r.disks.iter().enumerate() {
                    let di = slot_disk[slot];
                    let d = &req.disks[di];
                    if let Ok(mut s) = a.active.status.lock() {
                        let g = tideline_protocol::Geometry::new(ready.disk_size, ready.block_size);
                        s.disks[di].block_count = g.block_count;
                    }
                    begins.push(WriteCmd::Begin {
                        disk: di,
                        point: d.point,
                        base: d.base.map(|b| b.point),
                        disk_size: ready.disk_size,
                        block_size: ready.block_size,
                        resume_from: slot_resume[slot],
                    });
                }
                for begin in begins {
                    self.write(begin)?;
                }
                if self.session.is_none() {
                    return Ok(());
                }
                for (slot, ready) in r.disks.iter().enumerate() {
                    if ready.needs_index {
                        let d = &req.disks[slot_disk[slot]];
                        let base = d
                            .base
                            .ok_or_else(|| anyhow!("index requested without base"))?;
                        self.send_base_index(slot as u16, &d.id, base.point).await?;
                    }
                }
            }
            ControllerEvent::Block(b) => {
                let disk = self.disk_of(b.slot)?;
                self.write(WriteCmd::Block { disk, block: b })?;
            }
            ControllerEvent::Checkpoint { slot, at } => {
                let disk = self.disk_of(slot)?;
                self.write(WriteCmd::Checkpoint { disk, slot, at })?;
            }
            ControllerEvent::Round { slot, round } => {
                let disk = self.disk_of(slot)?;
                self.write(WriteCmd::Round { disk, round })?;
            }
            ControllerEvent::DiskEnd(end) => {
                let disk = self.disk_of(end.slot)?;
                self.write(WriteCmd::End {
                    disk,
                    slot: end.slot,
                    root: end.root,
                    consistency: end.consistency,
                })?;
            }
            ControllerEvent::FailbackReady(_)
            | ControllerEvent::TargetChunk(_)
            | ControllerEvent::TargetEnd { .. }
            | ControllerEvent::FailbackProgress(_)
            | ControllerEvent::FailbackDone(_) => {
                bail!(
                    "agent {}: failback message without a failback pass",
                    self.agent
                )
            }
            ControllerEvent::PeerError(e) => {
                if e.code == ErrorCode::ShuttingDown {
                    info!(agent = %self.agent, "agent is shutting down; its session will resume when it returns");
                } else {
                    self.fail_session(&format!("agent reported {:?}: {}", e.code, e.message));
                }
            }
        }
        Ok(())
    }

    async fn send_base_index(&mut self, slot: u16, disk: &str, base: u64) -> Result<()> {
        info!(agent = %self.agent, disk, base, "sending base index");
        let store = self.ctl.store.clone();
        let agent = self.agent.clone();
        let link = &mut self.link;
        let out = self.out_tx.clone();
        let mut pending: Vec<tideline_protocol::Digest> = Vec::with_capacity(MAX_INDEX_CHUNK);
        let mut first = 0u64;
        let r: Result<()> = tokio::task::block_in_place(|| {
            let emit = |link: &mut ControllerLink,
                        first: u64,
                        digests: &mut Vec<tideline_protocol::Digest>|
             -> Result<()> {
                link.send_index_chunk(&IndexChunk {
                    slot,
                    first_block: first,
                    digests: std::mem::take(digests),
                })?;
                if link.has_output() {
                    out.blocking_send(link.take_output())
                        .map_err(|_| anyhow!("connection lost while sending the base index"))?;
                }
                Ok(())
            };
            let mut err = None;
            store
                .for_each_index_page(&agent, disk, base, &mut |page_first, digests| {
                    if pending.is_empty() {
                        first = page_first;
                    }
                    pending.extend_from_slice(digests);
                    if pending.len() + tideline_protocol::PAGE_BLOCKS > MAX_INDEX_CHUNK {
                        if let Err(e) = emit(link, first, &mut pending) {
                            err = Some(e);
                            return Err(crate::store::StoreError::NotFound {
                                what: "connection".into(),
                            });
                        }
                    }
                    Ok(())
                })
                .map_err(|e| {
                    err.take()
                        .unwrap_or_else(|| anyhow!("disk {disk}: reading base point {base}: {e}"))
                })?;
            if !pending.is_empty() {
                emit(link, first, &mut pending)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            self.fail_session(&format!("{e:#}"));
            self.link
                .send_error(ErrorCode::StoreFailure, false, format!("{e:#}"));
            return Ok(());
        }
        self.link.send_index_end(slot)?;
        Ok(())
    }

    fn on_reply(&mut self, reply: Option<WriteReply>) -> Result<()> {
        let Some(reply) = reply else {
            self.writer_stopped();
            return Ok(());
        };
        match reply {
            WriteReply::Acked { slot, at, .. } => {
                self.link.send_ack(slot, at)?;
            }
            WriteReply::Committed {
                slot,
                disk: _,
                info,
            } => {
                let root = info
                    .root_digest()
                    .ok_or_else(|| anyhow!("committed point has no root"))?;
                self.link.send_committed(Committed {
                    slot,
                    point: info.point,
                    root,
                })?;
                let done = self.session.as_ref().is_some_and(|a| {
                    a.active
                        .status
                        .lock()
                        .map(|s| s.disks.iter().all(|d| d.committed.is_some()))
                        .unwrap_or(false)
                });
                if done {
                    self.link.end_session();
                    if let Some(a) = self.session.take() {
                        if let Ok(mut s) = a.active.status.lock() {
                            s.touch();
                            s.state = SessionState::Done;
                        }
                        if let Some(e) = self.ctl.registry().agents.get_mut(&self.agent) {
                            e.running = None;
                        }
                        info!(agent = %self.agent, session = a.active.id, "sync session complete");
                    }
                }
            }
            WriteReply::Failed { code, message } => {
                self.fail_session(&message);
                self.link.send_error(code, false, message);
            }
            WriteReply::Barrier { .. } => {}
        }
        Ok(())
    }
}
