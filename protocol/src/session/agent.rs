//! The agent end of a control channel.
//!
//! ```text
//! AgentHandshake --Welcome--> AgentLink (idle)
//!   idle      --StartSync-->          awaiting ready   (shell inspects its maps)
//!   awaiting  --send_ready-->         indexing (slots that need the base index)
//!   indexing  --IndexEnd for each-->  streaming
//!   streaming --send_round-->         streaming, the slot's next round from block 0
//!   streaming --send_disk_end, all--> draining (waiting for Committed)
//!   any       --SessionEnd-->         idle
//!   idle      --StartFailback-->      a failback pass (see `agent_failback.rs`)
//! ```

use crate::digest::Digest;
use crate::encoding::Encoding;
use crate::frame::{begin_frame, finish_frame};
use crate::message::{
    kind, Block, Committed, DiskEnd, ErrorMsg, Hello, IndexChunk, Inventory, Message, Position,
    StartFailback, StartSync, SyncReady, PROTOCOL_VERSION,
};
use crate::session::ProtocolError;
use crate::wire::Writer;

#[path = "agent_failback.rs"]
mod failback;

/// The agent before the controller has answered its `Hello`.
pub struct AgentHandshake {
    _sent: (),
}

impl AgentHandshake {
    /// Starts a handshake: returns the state and the `Hello` frame to send.
    pub fn start(software: &str) -> (AgentHandshake, Vec<u8>) {
        let hello = Message::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            software: software.to_owned(),
        });
        (AgentHandshake { _sent: () }, hello.to_frame())
    }

    /// Takes the controller's answer. Only a `Welcome` with a version we
    /// speak establishes the link.
    pub fn on_message(self, msg: Message) -> Result<AgentLink, ProtocolError> {
        match msg {
            Message::Welcome(w) if w.version == PROTOCOL_VERSION => Ok(AgentLink {
                version: w.version,
                draining: false,
                agent_id: w.agent_id,
                controller: w.controller,
                session: None,
                failback: None,
                out: Vec::new(),
            }),
            Message::Welcome(w) => Err(ProtocolError::NoCommonVersion {
                ours_min: PROTOCOL_VERSION,
                ours_max: PROTOCOL_VERSION,
                theirs_min: w.version,
                theirs_max: w.version,
            }),
            Message::Error(e) => Err(ProtocolError::Peer {
                code: e.code,
                message: e.message,
            }),
            other => Err(ProtocolError::Unexpected {
                got: other.name(),
                state: "waiting for Welcome",
            }),
        }
    }
}

/// What the agent's shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The controller asks for a sync; answer with [`AgentLink::send_ready`].
    SyncRequested(StartSync),
    /// Part of a base index for a slot.
    IndexChunk(IndexChunk),
    /// The base index of a slot is complete.
    IndexComplete {
        /// Slot.
        slot: u16,
    },
    /// Every block of the slot before `at` is durably stored.
    Acked {
        /// Slot.
        slot: u16,
        /// Resume position.
        at: Position,
    },
    /// A slot's point is committed: the block map may advance.
    Committed(Committed),
    /// The session is over.
    SessionEnded {
        /// Session id.
        session: u64,
    },
    /// The controller reports a problem.
    PeerError(ErrorMsg),
    /// The controller asks for a failback pass; check the targets, then
    /// [`AgentLink::send_failback_ready`] and describe them.
    FailbackRequested(StartFailback),
    /// A block to write into a failback target (order, range and length
    /// already checked; the payload is not yet verified).
    FailbackBlock(Block),
    /// Every differing block of a failback slot has been sent.
    FailbackSent {
        /// Slot.
        slot: u16,
        /// Blocks the controller sent for the slot.
        sent_blocks: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingReady,
    Indexing,
    Streaming,
    Draining,
}

#[derive(Debug, Clone)]
struct SlotState {
    needs_index: bool,
    index_done: bool,
    /// Where the next block of the slot may be.
    at: Position,
    block_count: u64,
    ended: bool,
    committed: bool,
}

#[derive(Debug, Clone)]
struct SyncState {
    session: u64,
    phase: Phase,
    slots: Vec<SlotState>,
    resume: Vec<Position>,
}

/// An established control channel, agent side.
pub struct AgentLink {
    version: u16,
    /// A session ended by an error while the controller may still have
    /// frames of it in flight; those are dropped until the next session.
    draining: bool,
    agent_id: String,
    controller: String,
    session: Option<SyncState>,
    failback: Option<failback::AgentPass>,
    out: Vec<u8>,
}

impl AgentLink {
    /// Negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }
    /// Our id as the controller knows it (from our certificate).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }
    /// Controller software, for logs.
    pub fn controller(&self) -> &str {
        &self.controller
    }
    /// Id of the session in progress, if any.
    pub fn session(&self) -> Option<u64> {
        self.session
            .as_ref()
            .map(|s| s.session)
            .or(self.failback.as_ref().map(|p| p.session))
    }

    /// Ends whatever session runs; true if one did.
    fn drop_session(&mut self) -> bool {
        let sync = self.session.take().is_some();
        let failback = self.failback.take().is_some();
        sync || failback
    }

    /// Bytes queued for the controller.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether bytes are queued.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Takes one message from the controller.
    pub fn handle(&mut self, msg: Message) -> Result<Option<AgentEvent>, ProtocolError> {
        if self.draining
            && self.session().is_none()
            && matches!(
                msg,
                Message::IndexChunk(_)
                    | Message::IndexEnd { .. }
                    | Message::Ack { .. }
                    | Message::Committed(_)
                    | Message::SessionEnd { .. }
                    | Message::Block(_)
                    | Message::FailbackSent { .. }
            )
        {
            return Ok(None);
        }
        match msg {
            Message::Heartbeat { seq } => {
                Message::HeartbeatAck { seq }.encode(&mut self.out);
                Ok(None)
            }
            Message::HeartbeatAck { .. } => Ok(None),
            Message::Error(e) => {
                if e.fatal || self.session() == Some(e.session) {
                    self.draining |= self.drop_session();
                }
                Ok(Some(AgentEvent::PeerError(e)))
            }
            Message::StartFailback(req) => {
                if self.session().is_some() {
                    return Err(ProtocolError::Unexpected {
                        got: "StartFailback",
                        state: "a session is already running",
                    });
                }
                if req.targets.is_empty() {
                    return Err(ProtocolError::Inconsistent(
                        "StartFailback names no target".into(),
                    ));
                }
                self.draining = false;
                self.failback = Some(failback::AgentPass::new(&req));
                Ok(Some(AgentEvent::FailbackRequested(req)))
            }
            Message::Block(b) => {
                let pass = self.failback.as_mut().ok_or(ProtocolError::Unexpected {
                    got: "Block",
                    state: "no failback pass (blocks flow to the controller in a sync)",
                })?;
                pass.on_block(&b)?;
                Ok(Some(AgentEvent::FailbackBlock(b)))
            }
            Message::FailbackSent { slot, sent_blocks } => {
                let pass = self.failback.as_mut().ok_or(ProtocolError::Unexpected {
                    got: "FailbackSent",
                    state: "no failback pass",
                })?;
                pass.on_sent(slot)?;
                Ok(Some(AgentEvent::FailbackSent { slot, sent_blocks }))
            }
            Message::StartSync(s) => {
                if self.session().is_some() {
                    return Err(ProtocolError::Unexpected {
                        got: "StartSync",
                        state: "a session is already running",
                    });
                }
                if s.disks.is_empty() {
                    return Err(ProtocolError::Inconsistent(
                        "StartSync names no disk".into(),
                    ));
                }
                self.draining = false;
                self.session = Some(SyncState {
                    session: s.session,
                    phase: Phase::AwaitingReady,
                    slots: Vec::new(),
                    resume: s.disks.iter().map(|d| d.resume_from).collect(),
                });
                Ok(Some(AgentEvent::SyncRequested(s)))
            }
            Message::IndexChunk(c) => {
                let st = self.slot_mut(c.slot, "IndexChunk")?;
                if !st.needs_index || st.index_done {
                    return Err(ProtocolError::Unexpected {
                        got: "IndexChunk",
                        state: "slot did not ask for an index",
                    });
                }
                Ok(Some(AgentEvent::IndexChunk(c)))
            }
            Message::IndexEnd { slot } => {
                let st = self.slot_mut(slot, "IndexEnd")?;
                if !st.needs_index || st.index_done {
                    return Err(ProtocolError::Unexpected {
                        got: "IndexEnd",
                        state: "slot did not ask for an index",
                    });
                }
                st.index_done = true;
                self.maybe_start_streaming();
                Ok(Some(AgentEvent::IndexComplete { slot }))
            }
            Message::Ack { slot, at } => {
                let st = self.slot_mut(slot, "Ack")?;
                if at > st.at {
                    return Err(ProtocolError::BadBlock {
                        slot,
                        block: at.block,
                        why: "acknowledged past what was sent",
                    });
                }
                Ok(Some(AgentEvent::Acked { slot, at }))
            }
            Message::Committed(c) => {
                let st = self.slot_mut(c.slot, "Committed")?;
                if !st.ended || st.committed {
                    return Err(ProtocolError::Unexpected {
                        got: "Committed",
                        state: "slot not ended or already committed",
                    });
                }
                st.committed = true;
                Ok(Some(AgentEvent::Committed(c)))
            }
            Message::SessionEnd { session } => match self.session() {
                Some(s) if s == session => {
                    self.drop_session();
                    Ok(Some(AgentEvent::SessionEnded { session }))
                }
                _ => Err(ProtocolError::Unexpected {
                    got: "SessionEnd",
                    state: "no such session",
                }),
            },
            other => Err(ProtocolError::Unexpected {
                got: other.name(),
                state: "agent link established",
            }),
        }
    }

    fn slot_mut(&mut self, slot: u16, got: &'static str) -> Result<&mut SlotState, ProtocolError> {
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            got,
            state: "no session",
        })?;
        if s.phase == Phase::AwaitingReady {
            return Err(ProtocolError::Unexpected {
                got,
                state: "SyncReady not sent yet",
            });
        }
        let n = s.slots.len();
        s.slots
            .get_mut(usize::from(slot))
            .ok_or(ProtocolError::NoSuchSlot { slot, slots: n })
    }

    fn maybe_start_streaming(&mut self) {
        if let Some(s) = &mut self.session {
            if s.phase == Phase::Indexing && s.slots.iter().all(|t| !t.needs_index || t.index_done)
            {
                s.phase = Phase::Streaming;
            }
        }
    }

    /// Whether every requested base index has arrived and blocks may flow.
    pub fn streaming(&self) -> bool {
        matches!(&self.session, Some(s) if s.phase == Phase::Streaming)
    }

    /// Sends the inventory.
    pub fn send_inventory(&mut self, inv: &Inventory) {
        Message::Inventory(inv.clone()).encode(&mut self.out);
    }

    /// Accepts the requested session.
    pub fn send_ready(&mut self, ready: SyncReady) -> Result<(), ProtocolError> {
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            got: "SyncReady",
            state: "no session",
        })?;
        if s.phase != Phase::AwaitingReady || ready.session != s.session {
            return Err(ProtocolError::Unexpected {
                got: "SyncReady",
                state: "session already accepted or other session",
            });
        }
        if ready.disks.len() != s.resume.len() {
            return Err(ProtocolError::Inconsistent(format!(
                "SyncReady has {} disks, session has {}",
                ready.disks.len(),
                s.resume.len()
            )));
        }
        s.slots = ready
            .disks
            .iter()
            .zip(&s.resume)
            .map(|(d, &resume)| SlotState {
                needs_index: d.needs_index,
                index_done: false,
                at: resume,
                block_count: crate::digest::Geometry::new(d.disk_size, d.block_size).block_count,
                ended: false,
                committed: false,
            })
            .collect();
        s.phase = Phase::Indexing;
        Message::SyncReady(ready).encode(&mut self.out);
        self.maybe_start_streaming();
        Ok(())
    }

    fn streaming_slot(
        &mut self,
        slot: u16,
        got: &'static str,
    ) -> Result<&mut SlotState, ProtocolError> {
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            got,
            state: "no session",
        })?;
        if s.phase != Phase::Streaming {
            return Err(ProtocolError::Unexpected {
                got,
                state: "not streaming",
            });
        }
        let n = s.slots.len();
        let st = s
            .slots
            .get_mut(usize::from(slot))
            .ok_or(ProtocolError::NoSuchSlot { slot, slots: n })?;
        if st.ended {
            return Err(ProtocolError::Unexpected {
                got,
                state: "slot already ended",
            });
        }
        Ok(st)
    }

    /// Queues a block. Blocks of a slot go in ascending order within a
    /// round, from the resume position; the payload is copied straight into
    /// the frame.
    pub fn send_block(
        &mut self,
        slot: u16,
        block: u64,
        encoding: Encoding,
        raw_len: u32,
        digest: &Digest,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        let st = self.streaming_slot(slot, "Block")?;
        if block < st.at.block || block >= st.block_count {
            return Err(ProtocolError::BadBlock {
                slot,
                block,
                why: "out of order or past the end of the disk",
            });
        }
        st.at.block = block + 1;
        let start = begin_frame(&mut self.out, kind::BLOCK);
        let mut w = Writer::new(&mut self.out);
        w.u16(slot);
        w.u64(block);
        w.u8(encoding.code());
        w.u32(raw_len);
        w.digest(digest);
        w.bytes(payload);
        finish_frame(&mut self.out, start);
        Ok(())
    }

    /// Reports that every block of the current round before `next_block`
    /// has been scanned.
    pub fn send_checkpoint(&mut self, slot: u16, next_block: u64) -> Result<(), ProtocolError> {
        let st = self.streaming_slot(slot, "Checkpoint")?;
        if next_block < st.at.block || next_block > st.block_count {
            return Err(ProtocolError::BadBlock {
                slot,
                block: next_block,
                why: "checkpoint behind the last block sent or past the end",
            });
        }
        st.at.block = next_block;
        let at = st.at;
        Message::Checkpoint { slot, at }.encode(&mut self.out);
        Ok(())
    }

    /// Ends the slot's current round and begins the next, from block 0.
    pub fn send_round(&mut self, slot: u16) -> Result<u32, ProtocolError> {
        let st = self.streaming_slot(slot, "Round")?;
        let round = st.at.round + 1;
        if round >= crate::limits::MAX_ROUNDS {
            return Err(ProtocolError::Inconsistent(format!(
                "slot {slot} would need round {round}, the limit is {}",
                crate::limits::MAX_ROUNDS - 1
            )));
        }
        st.at = Position::new(round, 0);
        Message::Round { slot, round }.encode(&mut self.out);
        Ok(round)
    }

    /// The slot's current position (round, next block).
    pub fn position(&self, slot: u16) -> Option<Position> {
        self.session
            .as_ref()
            .and_then(|s| s.slots.get(usize::from(slot)))
            .map(|st| st.at)
    }

    /// Ends a slot with the root of its new index.
    pub fn send_disk_end(&mut self, end: DiskEnd) -> Result<(), ProtocolError> {
        let st = self.streaming_slot(end.slot, "DiskEnd")?;
        if end.block_count != st.block_count {
            return Err(ProtocolError::Inconsistent(format!(
                "DiskEnd for slot {} claims {} blocks, session has {}",
                end.slot, end.block_count, st.block_count
            )));
        }
        st.ended = true;
        st.at.block = st.block_count;
        Message::DiskEnd(end).encode(&mut self.out);
        if let Some(s) = &mut self.session {
            if s.slots.iter().all(|t| t.ended) {
                s.phase = Phase::Draining;
            }
        }
        Ok(())
    }

    /// Reports an error to the controller; a fatal one, or one about the
    /// running session, also ends the session.
    pub fn send_error(&mut self, e: ErrorMsg) {
        if e.fatal || self.session() == Some(e.session) {
            self.draining |= self.drop_session();
        }
        Message::Error(e).encode(&mut self.out);
    }

    /// Sends a heartbeat.
    pub fn send_heartbeat(&mut self, seq: u64) {
        Message::Heartbeat { seq }.encode(&mut self.out);
    }
}
