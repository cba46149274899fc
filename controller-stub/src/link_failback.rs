//! The failback side of an agent's connection task: starts a pass, feeds
//! the agent's target description to the sender thread, turns what the
//! sender hands back into frames, and checks each target's root.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use tideline_protocol::message::{ErrorCode, TargetDescription};
use tideline_protocol::session::controller::ControllerEvent;
use tideline_protocol::{Digest, Encoding};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::AgentConn;
use crate::failback::sender::{self, DescribeIn, SendOut};
use crate::failback::{FailbackRequest, FailbackStatus, PassState, SharedFailback};

/// A pass running on this connection.
pub(super) struct FailbackRun {
    session: u64,
    status: SharedFailback,
    describe: mpsc::Sender<DescribeIn>,
    pub(super) out: Option<mpsc::Receiver<SendOut>>,
    roots: Vec<Digest>,
}

impl Drop for FailbackRun {
    /// A pass dropped without a verdict (its connection task ended by a
    /// path that did not fail it, a panic included) is failed here, so that
    /// nobody waits for it.
    fn drop(&mut self) {
        if let Ok(mut st) = self.status.lock() {
            st.fail("the connection task of the pass ended".into());
        }
    }
}

/// The next item from the sender, or never when none runs.
pub(super) async fn recv_send_out(run: &mut Option<FailbackRun>) -> Option<SendOut> {
    match run.as_mut().and_then(|r| r.out.as_mut()) {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl AgentConn {
    /// Starts a failback pass on this agent; returns its session id.
    pub(super) fn start_failback(&mut self, req: FailbackRequest) -> Result<u64, String> {
        if self.session.is_some() || self.failback.is_some() || self.link.session().is_some() {
            return Err(format!("agent {} is busy with another session", self.agent));
        }
        let offered = self
            .link
            .inventory()
            .ok_or_else(|| format!("agent {} has not reported its targets yet", self.agent))?
            .targets
            .clone();
        let id = self.ctl.next_id();
        let pass = {
            let mut reg = self.ctl.registry();
            let e = reg.agents.entry(self.agent.clone()).or_default();
            e.failback_passes += 1;
            e.failback_passes
        };
        let resolved = req.resolve(&self.ctl.store, &offered, id, pass)?;
        self.link
            .start_failback(resolved.start.clone())
            .map_err(|e| e.to_string())?;
        let status: SharedFailback = Arc::new(Mutex::new(FailbackStatus::new(
            id,
            &self.agent,
            pass,
            resolved.progress,
        )));
        let (describe_tx, describe_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(64);
        sender::spawn(
            self.ctl.store.clone(),
            resolved.sources,
            status.clone(),
            describe_rx,
            out_tx,
        )
        .map_err(|e| format!("cannot start the failback sender: {e}"))?;
        {
            let mut reg = self.ctl.registry();
            reg.failbacks.insert(id, status.clone());
            if let Some(e) = reg.agents.get_mut(&self.agent) {
                e.running = Some(id);
            }
        }
        info!(agent = %self.agent, session = id, pass, targets = ?resolved.start.targets.iter().map(|t| &t.target).collect::<Vec<_>>(), "failback pass started");
        self.failback = Some(FailbackRun {
            session: id,
            status,
            describe: describe_tx,
            out: Some(out_rx),
            roots: resolved.start.targets.iter().map(|t| t.root).collect(),
        });
        Ok(id)
    }

    /// Handles the failback events of the link; `false` for other events.
    pub(super) async fn on_failback_event(&mut self, ev: &ControllerEvent) -> Result<bool> {
        let Some(run) = &mut self.failback else {
            return Ok(false);
        };
        match ev {
            ControllerEvent::FailbackReady(r) => {
                if let Ok(mut st) = run.status.lock() {
                    for (t, ready) in st.targets.iter_mut().zip(&r.targets) {
                        t.described_by = Some(
                            match ready.described_by {
                                TargetDescription::Scanned => "scanned",
                                TargetDescription::Map => "map",
                            }
                            .into(),
                        );
                    }
                }
            }
            ControllerEvent::TargetChunk(c) => {
                // Waiting for room holds the agent back through TCP.
                if run
                    .describe
                    .send(DescribeIn::Chunk(c.clone()))
                    .await
                    .is_err()
                {
                    self.fail_failback("the failback sender stopped", ErrorCode::StoreFailure);
                }
            }
            ControllerEvent::TargetEnd { slot } => {
                if run
                    .describe
                    .send(DescribeIn::End { slot: *slot })
                    .await
                    .is_err()
                {
                    self.fail_failback("the failback sender stopped", ErrorCode::StoreFailure);
                }
            }
            ControllerEvent::FailbackProgress(p) => {
                if let Ok(mut st) = run.status.lock() {
                    if let Some(t) = st.targets.get_mut(usize::from(p.slot)) {
                        t.written_blocks = p.written_blocks;
                        t.verified_blocks = p.verified_blocks;
                    }
                }
            }
            ControllerEvent::FailbackDone(d) => {
                let slot = usize::from(d.slot);
                let expected = run.roots.get(slot).copied();
                let target = run
                    .status
                    .lock()
                    .ok()
                    .and_then(|st| st.targets.get(slot).map(|t| t.target.clone()))
                    .unwrap_or_default();
                if expected != Some(d.root) {
                    let why = format!(
                        "target {target}: the agent's root {} differs from the point's; the target does not hold the point",
                        d.root
                    );
                    self.fail_failback(&why, ErrorCode::IndexMismatch);
                    return Ok(true);
                }
                if let Ok(mut st) = run.status.lock() {
                    if let Some(t) = st.targets.get_mut(slot) {
                        t.written_blocks = d.written_blocks;
                        t.verified_blocks = d.verified_blocks;
                        t.verified = true;
                    }
                }
                info!(agent = %self.agent, session = run.session, target = %target, written = d.written_blocks, "failback target verified");
                if self.link.failback_done() {
                    self.link.end_session();
                    if let Some(run) = self.failback.take() {
                        if let Ok(mut st) = run.status.lock() {
                            st.touch();
                            st.state = PassState::Done;
                        }
                        info!(agent = %self.agent, session = run.session, "failback pass complete");
                    }
                    if let Some(e) = self.ctl.registry().agents.get_mut(&self.agent) {
                        e.running = None;
                    }
                }
            }
            ControllerEvent::PeerError(e) if self.link.session().is_none() => {
                let why = format!("agent reported {:?}: {}", e.code, e.message);
                self.fail_failback(&why, ErrorCode::SessionAborted);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Turns what the sender hands over into frames.
    pub(super) fn on_send_out(&mut self, out: Option<SendOut>) -> Result<()> {
        let Some(run) = &mut self.failback else {
            return Ok(());
        };
        match out {
            Some(SendOut::Block {
                slot,
                block,
                digest,
                chunk,
                raw_len,
            }) => {
                let r = match &chunk {
                    Some(c) => self
                        .link
                        .send_failback_block(slot, block, c.encoding, raw_len, &digest, &c.payload),
                    None => self.link.send_failback_block(
                        slot,
                        block,
                        Encoding::Zero,
                        raw_len,
                        &digest,
                        &[],
                    ),
                };
                r?;
            }
            Some(SendOut::Sent { slot, sent_blocks }) => {
                self.link.send_failback_sent(slot, sent_blocks)?;
            }
            Some(SendOut::Failed(why)) => {
                self.fail_failback(&why, ErrorCode::StoreFailure);
            }
            // The sender finished; the pass waits for the agent's reports.
            None => run.out = None,
        }
        Ok(())
    }

    /// Ends the running pass as failed, telling the agent.
    pub(super) fn fail_failback(&mut self, why: &str, code: ErrorCode) {
        if let Some(run) = self.failback.take() {
            warn!(agent = %self.agent, session = run.session, error = why, "failback pass failed");
            if let Ok(mut st) = run.status.lock() {
                st.fail(why.to_owned());
            }
            if self.link.session() == Some(run.session) {
                self.link.send_error(code, false, why.to_owned());
            }
            if let Some(e) = self.ctl.registry().agents.get_mut(&self.agent) {
                e.last_error = Some(why.to_owned());
                // A connection that ends late must not clear a pass the
                // agent already started on its next connection.
                if e.running == Some(run.session) {
                    e.running = None;
                }
            }
        }
    }
}
