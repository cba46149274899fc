//! The control channel: dial the controller, keep the link up, and run the
//! sessions it starts.
//!
//! One task owns the link. It reads frames from the TLS stream, feeds them
//! to the protocol state machine, and acts on the events: a `StartSync`
//! becomes a [`SyncRun`] (`sync/runner.rs`, which decides what is read in
//! which round and when the instant is taken), whose scan items become
//! `Block`, `Checkpoint`, `Round` and `DiskEnd` frames; a `StartFailback`
//! becomes a failback pass. Writes go through a bounded channel to a writer
//! task, so that a slow network holds the pipeline back instead of growing
//! memory. The agent never listens on a port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use tideline_protocol::frame::FrameBuffer;
use tideline_protocol::message::{
    DiskInfo, ErrorCode, ErrorMsg, FailbackProgress, Inventory, Message, TargetInfo,
};
use tideline_protocol::session::agent::{AgentEvent, AgentHandshake, AgentLink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::failback::{BlockIn, FailbackPass, PassItem};
use crate::service::status_file::StatusFile;
use crate::service::{Heartbeat, Notifier, StatusLine};
use crate::sync::runner::{error_code, RunError, RunEvent, SlotSummary, SyncRun};
use crate::transport::throttle::{Schedule, Throttle};
use crate::transport::tls::client_config;
use std::sync::RwLock;

/// Software name sent in `Hello`.
pub const SOFTWARE: &str = concat!("tideline-agent/", env!("CARGO_PKG_VERSION"));

/// How the loop reports to the service manager: status lines, and a
/// heartbeat beaten whenever the work makes progress (the watchdog stops
/// pinging systemd when it no longer does).
#[derive(Clone)]
pub struct ServiceHooks {
    /// `sd_notify` to systemd (a no-op outside systemd).
    pub notifier: Arc<Notifier>,
    /// Progress of the work loop.
    pub heartbeat: Heartbeat,
    /// `<state_dir>/status.json` for `tideline-agent status`.
    pub status_file: Arc<StatusFile>,
}

impl ServiceHooks {
    fn status(&self, line: &StatusLine) {
        if let Err(e) = self.notifier.status(&line.to_string()) {
            debug!(error = %e, "status not delivered to the service manager");
        }
    }
}

/// What can change while the agent runs (SIGHUP): the controller it dials
/// and the bandwidth schedule.
pub struct RuntimeSettings {
    /// `host:port` to dial and the name its certificate must carry; used
    /// from the next connection on.
    pub controller: RwLock<(String, String)>,
    /// Bandwidth limits, looked up on every write.
    pub bandwidth: Arc<RwLock<Schedule>>,
}

impl RuntimeSettings {
    /// The settings a configuration starts with.
    pub fn from_config(cfg: &AgentConfig) -> Result<RuntimeSettings> {
        let schedule = cfg
            .bandwidth
            .schedule()
            .map_err(|(key, why)| anyhow!("{key}: {why}"))?;
        Ok(RuntimeSettings {
            controller: RwLock::new((cfg.controller_addr(), cfg.server_name())),
            bandwidth: Arc::new(RwLock::new(schedule)),
        })
    }

    fn controller(&self) -> (String, String) {
        self.controller
            .read()
            .map(|c| c.clone())
            .unwrap_or_default()
    }
}

/// A scan that has produced nothing for this long is wedged: the loop stops
/// beating the heartbeat, so the watchdog lets systemd restart the agent.
const SCAN_STALL: Duration = Duration::from_secs(60);

/// Keeps the control channel up until `shutdown` turns true.
pub async fn run(
    cfg: Arc<AgentConfig>,
    mut shutdown: watch::Receiver<bool>,
    hooks: ServiceHooks,
    settings: Arc<RuntimeSettings>,
) -> Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.controller.reconnect_min_ms),
        Duration::from_millis(cfg.controller.reconnect_max_ms),
    );
    loop {
        let started = Instant::now();
        match serve_once(&cfg, &mut shutdown, &hooks, &settings).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let (addr, _) = settings.controller();
                warn!(controller = %addr, error = %format!("{e:#}"), "control channel down");
                hooks.status_file.update(|d| {
                    d.connected = false;
                    d.session = None;
                    d.controller = addr.clone();
                    d.last_error = Some(format!("{e:#}"));
                });
                hooks.status(&StatusLine {
                    connected: false,
                    controller: addr,
                    last_error: Some(format!("{e:#}")),
                    ..StatusLine::default()
                });
            }
        }
        // Waiting to reconnect is the agent working as intended.
        hooks.heartbeat.beat();
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if *shutdown.borrow() {
            return Ok(());
        }
    }
}

/// Exponential backoff with full jitter.
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }
    /// Back to the shortest delay (after a link that stayed up).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    /// The next delay: uniform in `[min, min * 2^attempt]`, capped at `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let lo = self.min.as_millis() as u64;
        let hi = (ceiling.as_millis() as u64).max(lo);
        Duration::from_millis(rand::thread_rng().gen_range(lo..=hi))
    }
}

/// The agent's disks as the inventory reports them.
pub fn inventory(cfg: &AgentConfig) -> Inventory {
    let disks = cfg
        .disks
        .iter()
        .filter_map(|d| match crate::source::open(&d.path) {
            Ok(src) => Some(DiskInfo {
                id: d.id.clone(),
                size: src.size(),
                block_size: d.block_size,
            }),
            Err(e) => {
                warn!(disk = %d.id, error = %e, "disk left out of the inventory");
                None
            }
        })
        .collect();
    let targets = cfg
        .targets
        .iter()
        .filter_map(|t| match crate::source::open(&t.path) {
            Ok(src) => Some(TargetInfo {
                id: t.id.clone(),
                size: src.size(),
            }),
            Err(e) => {
                warn!(target = %t.id, error = %e, "failback target left out of the inventory");
                None
            }
        })
        .collect();
    Inventory { disks, targets }
}

async fn serve_once(
    cfg: &Arc<AgentConfig>,
    shutdown: &mut watch::Receiver<bool>,
    hooks: &ServiceHooks,
    settings: &RuntimeSettings,
) -> Result<()> {
    let tls = client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    let (addr, server_name) = settings.controller();
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
        .await
        .map_err(|_| anyhow!("timed out connecting to controller {addr}"))?
        .with_context(|| format!("cannot connect to controller {addr}"))?;
    tcp.set_nodelay(true).ok();
    let name = rustls::pki_types::ServerName::try_from(server_name.clone())
        .with_context(|| format!("invalid controller name {server_name:?}"))?;
    let stream = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake with controller {addr} timed out"))?
    .with_context(|| format!("TLS handshake with controller {addr} failed"))?;
    let (mut rd, mut wr) = tokio::io::split(stream);

    // Protocol handshake.
    let (hs, hello) = AgentHandshake::start(SOFTWARE);
    wr.write_all(&hello).await.context("sending Hello")?;
    let mut frames = FrameBuffer::new();
    let mut buf = vec![0u8; 256 * 1024];
    let first = loop {
        if let Some(f) = frames.next_frame()? {
            break Message::decode(f)?;
        }
        let n = tokio::time::timeout(Duration::from_secs(15), rd.read(&mut buf))
            .await
            .map_err(|_| anyhow!("controller {addr} did not answer Hello"))??;
        if n == 0 {
            bail!("controller {addr} closed the connection during the handshake (certificate refused?)");
        }
        frames.extend(&buf[..n]);
    };
    let mut link = hs
        .on_message(first)
        .with_context(|| format!("handshake with controller {addr}"))?;
    info!(controller = %addr, agent_id = link.agent_id(), software = link.controller(), "connected to controller");
    link.send_inventory(&inventory(cfg));

    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    let mut throttle = Throttle::new(settings.bandwidth.clone());
    let writer = tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            throttle.consume(bytes.len()).await;
            wr.write_all(&bytes).await?;
        }
        wr.shutdown().await
    });

    let mut driver = Driver {
        cfg: cfg.clone(),
        link,
        run: None,
        failback: None,
        reported: Vec::new(),
        hooks: hooks.clone(),
        status: StatusLine {
            connected: true,
            controller: addr.clone(),
            ..StatusLine::default()
        },
        last_status: String::new(),
    };
    driver.publish_status();
    let mut service_tick = tokio::time::interval(Duration::from_secs(1));
    let hb_every = Duration::from_secs(cfg.controller.heartbeat_secs);
    let mut heartbeat = tokio::time::interval(hb_every);
    heartbeat.tick().await;
    let mut last_heard = Instant::now();
    let mut hb_seq = 0u64;

    let result: Result<()> = async {
        loop {
            if driver.link.has_output() {
                out_tx
                    .send(driver.link.take_output())
                    .await
                    .map_err(|_| anyhow!("connection to controller {addr} lost while writing"))?;
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        driver.stop_for_shutdown();
                        return Ok(());
                    }
                }
                n = rd.read(&mut buf) => {
                    let n = n.with_context(|| format!("reading from controller {addr}"))?;
                    if n == 0 {
                        bail!("controller {addr} closed the connection");
                    }
                    last_heard = Instant::now();
                    frames.extend(&buf[..n]);
                    while let Some(f) = frames.next_frame()? {
                        let msg = Message::decode(f)?;
                        match driver.link.handle(msg)? {
                            // Blocks for a failback target wait for room in
                            // the pass's queue: a slow target holds the
                            // socket, and so the controller, back.
                            Some(AgentEvent::FailbackBlock(b)) => {
                                driver.forward(BlockIn::Block(b)).await;
                            }
                            Some(AgentEvent::FailbackSent { slot, sent_blocks }) => {
                                driver.forward(BlockIn::Sent { slot, sent_blocks }).await;
                            }
                            Some(ev) => driver.on_event(ev)?,
                            None => {}
                        }
                    }
                }
                ev = next_run_event(&mut driver.run), if driver.run.is_some() => {
                    driver.on_run_event(ev);
                }
                item = recv_pass(&mut driver.failback), if driver.failback.is_some() => {
                    driver.on_pass_item(item);
                }
                _ = service_tick.tick() => {
                    driver.service_tick();
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > hb_every * 3 {
                        bail!("controller {addr} silent for {}s", last_heard.elapsed().as_secs());
                    }
                    hb_seq += 1;
                    driver.link.send_heartbeat(hb_seq);
                }
            }
        }
    }
    .await;
    // Flush what was queued (an Error frame, say) before closing.
    if driver.link.has_output() {
        let _ = out_tx.send(driver.link.take_output()).await;
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    result
}

async fn recv_pass(pass: &mut Option<FailbackPass>) -> Option<PassItem> {
    match pass {
        Some(p) => p.items.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_run_event(run: &mut Option<SyncRun>) -> RunEvent {
    match run {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

/// Acts on link events, the sync run's events and the failback pass for
/// one connection.
struct Driver {
    cfg: Arc<AgentConfig>,
    link: AgentLink,
    /// The sync session running, if any.
    run: Option<SyncRun>,
    /// The failback pass running, if any.
    failback: Option<FailbackPass>,
    /// Per slot of the pass: (written, verified) last reported.
    reported: Vec<(u64, u64)>,
    hooks: ServiceHooks,
    status: StatusLine,
    last_status: String,
}

impl Driver {
    /// Once a second: beat the heartbeat unless a scan is wedged, and tell
    /// the service manager what the agent is doing.
    fn service_tick(&mut self) {
        let progress = self.run.as_ref().and_then(|r| r.progress()).copied();
        if progress.is_none_or(|p| p.last_item.elapsed() < SCAN_STALL) {
            self.hooks.heartbeat.beat();
        }
        self.report_failback_progress();
        self.status.session = self.run.as_ref().map(|s| s.id());
        let mut left_mib = 0.0;
        match (&self.run, progress) {
            (Some(run), Some(p)) => {
                let disk = run.disk_id(p.slot);
                self.status.disk = Some(if p.round > 0 {
                    format!("{disk} round {}", p.round)
                } else {
                    disk.to_owned()
                });
                self.status.percent =
                    (p.block_count > 0).then(|| p.next_block as f64 * 100.0 / p.block_count as f64);
                let secs = p.started.elapsed().as_secs_f64();
                self.status.mib_per_s = (secs > 0.0).then(|| p.bytes as f64 / 1048576.0 / secs);
                let block_size = run.geometry(p.slot).map_or(0, |g| u64::from(g.block_size));
                left_mib = p.block_count.saturating_sub(p.next_block) as f64 * block_size as f64
                    / 1048576.0;
            }
            (Some(run), None) if run.capturing() => {
                self.status.disk = Some("taking the instant (freeze)".into());
                self.status.percent = None;
                self.status.mib_per_s = None;
            }
            _ => {
                self.status.disk = None;
                self.status.percent = None;
                self.status.mib_per_s = None;
            }
        }
        self.publish_status();
        let scanning_disk =
            progress.and_then(|p| self.run.as_ref().map(|r| r.disk_id(p.slot).to_owned()));
        let (percent, speed) = (self.status.percent, self.status.mib_per_s);
        let status = &self.status;
        self.hooks.status_file.update(|d| {
            d.connected = status.connected;
            d.controller = status.controller.clone();
            d.session = status.session;
            for (id, disk) in d.disks.iter_mut() {
                let here = scanning_disk.as_deref() == Some(id.as_str());
                disk.scanning = here;
                disk.percent = if here { percent } else { None };
                disk.mib_per_s = if here { speed } else { None };
                disk.eta_secs = if here {
                    speed.filter(|s| *s > 0.0).map(|s| left_mib / s)
                } else {
                    None
                };
            }
            if let Some(id) = &scanning_disk {
                let disk = d.disks.entry(id.clone()).or_default();
                disk.scanning = true;
                disk.percent = percent;
                disk.mib_per_s = speed;
                disk.eta_secs = speed.filter(|s| *s > 0.0).map(|s| left_mib / s);
            }
        });
    }

    fn publish_status(&mut self) {
        let line = self.status.to_string();
        if line != self.last_status {
            self.hooks.status(&self.status);
            self.last_status = line;
        }
    }

    fn abort_session(&mut self, code: ErrorCode, message: String, disk: Option<String>) {
        let session = self
            .run
            .as_ref()
            .map(|s| s.id())
            .or(self.link.session())
            .unwrap_or(0);
        warn!(session, error = %message, "session failed");
        let disk = disk.or_else(|| {
            let run = self.run.as_ref()?;
            run.progress().map(|p| run.disk_id(p.slot).to_owned())
        });
        self.hooks.status_file.update(|d| {
            d.last_error = Some(message.clone());
            if let Some(disk) = disk {
                d.disks.entry(disk).or_default().last_error = Some(message.clone());
            }
        });
        self.run = None;
        self.link.send_error(ErrorMsg {
            code,
            session,
            fatal: false,
            message,
        });
    }

    /// Sends a `FailbackProgress` for every slot that moved since the last.
    fn report_failback_progress(&mut self) {
        let Some(pass) = &self.failback else {
            return;
        };
        if !self.link.failback_receiving() {
            return;
        }
        self.reported.resize(pass.counters.len(), (0, 0));
        for (slot, c) in pass.counters.iter().enumerate() {
            use std::sync::atomic::Ordering::Relaxed;
            let (w, v) = (
                c.written_blocks.load(Relaxed),
                c.verified_blocks.load(Relaxed),
            );
            if (w, v) != self.reported[slot] {
                self.reported[slot] = (w, v);
                let _ = self.link.send_failback_progress(FailbackProgress {
                    slot: slot as u16,
                    written_blocks: w,
                    verified_blocks: v,
                    written_bytes: c.written_bytes.load(Relaxed),
                });
            }
        }
        self.status.disk = pass.targets.first().map(|t| format!("failback target {t}"));
    }

    /// Hands a block (or the end of a slot) to the pass thread, waiting for
    /// room. Without a pass (it failed meanwhile) the block is dropped.
    async fn forward(&mut self, item: BlockIn) {
        if let Some(pass) = &self.failback {
            if pass.blocks.send(item).await.is_err() {
                debug!("failback pass thread gone; block dropped");
            }
        }
    }

    fn on_pass_item(&mut self, item: Option<PassItem>) {
        let session = self.failback.as_ref().map_or(0, |p| p.session);
        let r = match item {
            Some(PassItem::Chunk(c)) => self.link.send_target_chunk(c),
            Some(PassItem::Described { slot }) => self.link.send_target_end(slot),
            Some(PassItem::Done(d)) => {
                self.report_failback_progress();
                if let Some(p) = &mut self.failback {
                    p.done_slots += 1;
                }
                self.link.send_failback_done(d)
            }
            Some(PassItem::Failed { code, message }) => {
                self.stop_failback();
                self.hooks
                    .status_file
                    .update(|d| d.last_error = Some(message.clone()));
                self.link.send_error(ErrorMsg {
                    code,
                    session,
                    fatal: false,
                    message,
                });
                Ok(())
            }
            None => {
                // The thread ended; unless every target was reported done,
                // the controller is told, or it would wait for the rest.
                let unfinished = self
                    .failback
                    .take()
                    .filter(|p| p.done_slots < p.targets.len());
                if let Some(p) = unfinished {
                    warn!(session, "failback pass thread ended before the pass did");
                    self.link.send_error(ErrorMsg {
                        code: ErrorCode::Internal,
                        session,
                        fatal: false,
                        message: format!(
                            "the failback pass into {} stopped after {} of {} targets",
                            p.targets.join(", "),
                            p.done_slots,
                            p.targets.len()
                        ),
                    });
                }
                Ok(())
            }
        };
        if let Err(e) = r {
            warn!(session, error = %e, "failback pass out of step with the protocol");
            self.stop_failback();
            self.link.send_error(ErrorMsg {
                code: ErrorCode::Internal,
                session,
                fatal: false,
                message: e.to_string(),
            });
        }
    }

    /// Stops the pass, letting it verify and record its current round.
    fn stop_failback(&mut self) {
        if let Some(p) = self.failback.take() {
            p.stop(Duration::from_secs(3));
        }
        self.reported.clear();
    }

    fn stop_for_shutdown(&mut self) {
        self.stop_failback();
        // Stop at a frame boundary: the scan is dropped, the change logs hold
        // what was sent, and the controller resumes from its last ack. A
        // freeze in progress is thawed by its guard when the agent exits.
        if let Some(run) = &mut self.run {
            run.sync_running_log();
        }
        self.run = None;
        self.link.send_error(ErrorMsg {
            code: ErrorCode::ShuttingDown,
            session: self.link.session().unwrap_or(0),
            fatal: true,
            message: "agent is shutting down".into(),
        });
    }

    fn on_event(&mut self, ev: AgentEvent) -> Result<()> {
        match ev {
            AgentEvent::SyncRequested(req) => {
                info!(
                    session = req.session,
                    disks = req.disks.len(),
                    "sync requested"
                );
                match SyncRun::start(&req, &self.cfg) {
                    Ok((run, ready)) => {
                        self.run = Some(run);
                        self.link.send_ready(ready)?;
                        self.kick();
                    }
                    Err(e) => {
                        self.link.send_error(ErrorMsg {
                            code: error_code(&e),
                            session: req.session,
                            fatal: false,
                            message: e.to_string(),
                        });
                        warn!(session = req.session, error = %e, "refused sync");
                    }
                }
            }
            AgentEvent::IndexChunk(c) => {
                if let Some(s) = &mut self.run {
                    if let Err(e) = s.on_index_chunk(&c) {
                        let disk = s.disk_id(c.slot).to_owned();
                        self.abort_session(error_code(&e), e.to_string(), Some(disk));
                    }
                }
            }
            AgentEvent::IndexComplete { slot } => {
                if let Some(s) = &mut self.run {
                    if let Err(e) = s.on_index_complete(slot) {
                        let disk = s.disk_id(slot).to_owned();
                        self.abort_session(error_code(&e), e.to_string(), Some(disk));
                        return Ok(());
                    }
                }
                self.kick();
            }
            AgentEvent::Acked { slot, at } => {
                debug!(
                    slot,
                    round = at.round,
                    next_block = at.block,
                    "acknowledged"
                );
            }
            AgentEvent::Committed(c) => {
                if let Some(s) = &mut self.run {
                    let disk = s.disk_id(c.slot).to_owned();
                    match s.on_committed(&c) {
                        Ok(()) => {
                            info!(disk = %disk, point = c.point, root = %c.root, "point committed");
                            self.hooks.status_file.update(|d| {
                                let e = d.disks.entry(disk.clone()).or_default();
                                e.last_point = Some(c.point);
                                e.last_point_unix = Some(crate::service::status_file::unix_now());
                                e.last_error = None;
                            });
                        }
                        Err(e) => {
                            warn!(disk = %disk, error = %e, "could not advance the block map; the next sync will reconcile")
                        }
                    }
                }
            }
            AgentEvent::FailbackRequested(req) => {
                info!(
                    session = req.session,
                    pass = req.pass,
                    targets = req.targets.len(),
                    "failback pass requested"
                );
                match FailbackPass::prepare(&req, &self.cfg) {
                    Ok((pass, ready)) => {
                        self.failback = Some(pass);
                        self.reported.clear();
                        self.link.send_failback_ready(ready)?;
                    }
                    Err(refusal) => {
                        warn!(session = req.session, error = %refusal, "refused failback pass");
                        self.hooks
                            .status_file
                            .update(|d| d.last_error = Some(refusal.to_string()));
                        self.link.send_error(ErrorMsg {
                            code: ErrorCode::TargetRefused,
                            session: req.session,
                            fatal: false,
                            message: refusal.to_string(),
                        });
                    }
                }
            }
            // Handled by the read loop (they wait for room in the queue).
            AgentEvent::FailbackBlock(_) | AgentEvent::FailbackSent { .. } => {}
            AgentEvent::SessionEnded { session } => {
                info!(session, "session ended");
                self.stop_failback();
                self.run = None;
            }
            AgentEvent::PeerError(e) => {
                warn!(code = ?e.code, session = e.session, message = %e.message, "controller reported an error");
                if e.code != ErrorCode::ShuttingDown {
                    // What failed at the controller (its store full, a
                    // digest mismatch) is this agent's last error too.
                    let message = format!("controller: {}", e.message);
                    self.hooks
                        .status_file
                        .update(|d| d.last_error = Some(message.clone()));
                }
                if self.link.session().is_none() {
                    self.run = None;
                    self.stop_failback();
                }
            }
        }
        Ok(())
    }

    /// Lets the sync run start whatever can run now.
    fn kick(&mut self) {
        let Some(run) = &mut self.run else {
            return;
        };
        let r = run.kick(&mut self.link);
        self.after_run_step(r);
    }

    fn on_run_event(&mut self, ev: RunEvent) {
        let Some(run) = &mut self.run else {
            return;
        };
        let r = run.handle(ev, &mut self.link);
        self.after_run_step(r);
    }

    fn after_run_step(&mut self, r: Result<Vec<SlotSummary>, RunError>) {
        match r {
            Ok(ended) => {
                for e in ended {
                    self.hooks.status_file.update(|d| {
                        let s = d.disks.entry(e.disk.clone()).or_default();
                        s.last_consistency = Some(e.consistency.level.as_str().to_owned());
                        s.last_frozen_ms = Some(e.consistency.frozen_ms);
                        s.last_rounds = Some(e.consistency.rounds);
                        s.last_bytes_read = Some(e.bytes_read);
                        s.last_note =
                            (!e.consistency.note.is_empty()).then(|| e.consistency.note.clone());
                        s.method = Some(e.method.to_owned());
                    });
                }
            }
            Err(e) => self.abort_session(e.code, e.message, e.disk),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1600));
        let mut b = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= min && *d <= max));
        // The ceiling grows: late delays may reach values the first cannot.
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[20..].iter().any(|d| *d > Duration::from_millis(400)));
        // Jitter: not all late delays are equal.
        assert!(delays[20..].windows(2).any(|w| w[0] != w[1]));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
