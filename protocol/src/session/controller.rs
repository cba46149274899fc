//! The controller end of a control channel.
//!
//! ```text
//! ControllerHandshake --Hello--> ControllerLink (idle, no inventory yet)
//!   idle       --start_sync-->        awaiting SyncReady
//!   awaiting   --SyncReady-->         indexing (controller sends base indexes)
//!   indexing   --send_index_end all--> streaming (Blocks, Checkpoints, DiskEnds)
//!   streaming  --DiskEnd per slot-->  the controller commits and answers Committed
//!   any        --end_session-->       idle
//!   idle       --start_failback-->    a failback pass (see `controller_failback.rs`)
//! ```
//!
//! The link enforces that blocks of a slot arrive in ascending order within
//! a round, from the resume position, within the disk, with the length the
//! disk geometry gives that block, and that rounds follow each other.

use crate::digest::Geometry;
use crate::message::{
    Block, Committed, DiskEnd, ErrorCode, ErrorMsg, FailbackDone, FailbackProgress, FailbackReady,
    Hello, IndexChunk, Inventory, Message, Position, StartSync, SyncReady, Welcome,
    PROTOCOL_VERSION,
};
use crate::session::ProtocolError;

#[path = "controller_failback.rs"]
mod failback;

/// The controller before the agent's `Hello`.
pub struct ControllerHandshake {
    controller: String,
}

impl ControllerHandshake {
    /// A handshake for a controller that calls itself `controller` in logs.
    pub fn new(controller: &str) -> Self {
        ControllerHandshake {
            controller: controller.to_owned(),
        }
    }

    /// Takes the agent's first message. `agent_id` comes from the agent's
    /// certificate, never from the message. On success the `Welcome` is
    /// queued on the returned link; on a version mismatch the returned
    /// bytes hold an `Error` frame to send before closing.
    pub fn on_message(
        self,
        msg: Message,
        agent_id: &str,
    ) -> Result<ControllerLink, (ProtocolError, Vec<u8>)> {
        let hello: Hello = match msg {
            Message::Hello(h) => h,
            other => {
                let e = ProtocolError::Unexpected {
                    got: other.name(),
                    state: "waiting for Hello",
                };
                let bytes = Message::Error(e.to_message(0)).to_frame();
                return Err((e, bytes));
            }
        };
        if hello.min_version > PROTOCOL_VERSION || hello.max_version < PROTOCOL_VERSION {
            let e = ProtocolError::NoCommonVersion {
                ours_min: PROTOCOL_VERSION,
                ours_max: PROTOCOL_VERSION,
                theirs_min: hello.min_version,
                theirs_max: hello.max_version,
            };
            let bytes = Message::Error(e.to_message(0)).to_frame();
            return Err((e, bytes));
        }
        let mut link = ControllerLink {
            agent_software: hello.software,
            draining: false,
            inventory: None,
            session: None,
            failback: None,
            out: Vec::new(),
        };
        Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            controller: self.controller,
            agent_id: agent_id.to_owned(),
        })
        .encode(&mut link.out);
        Ok(link)
    }
}

/// What the controller's shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerEvent {
    /// The agent's disks (new or changed).
    Inventory(Inventory),
    /// The agent accepted the session; send the indexes it asks for.
    SyncReady(SyncReady),
    /// A block to verify and store (order and range already checked).
    Block(Block),
    /// The agent has scanned a slot up to `at`: make what was received
    /// durable, then [`ControllerLink::send_ack`].
    Checkpoint {
        /// Slot.
        slot: u16,
        /// Next position to scan.
        at: Position,
    },
    /// A slot's next round begins: its blocks replace those of earlier
    /// rounds.
    Round {
        /// Slot.
        slot: u16,
        /// The round that begins.
        round: u32,
    },
    /// A slot is complete: compare roots, commit, then
    /// [`ControllerLink::send_committed`].
    DiskEnd(DiskEnd),
    /// The agent reports a problem.
    PeerError(ErrorMsg),
    /// The agent accepted a failback pass; its targets' digests follow.
    FailbackReady(FailbackReady),
    /// A run of a failback target's digests (order checked).
    TargetChunk(IndexChunk),
    /// A failback target is fully described.
    TargetEnd {
        /// Slot.
        slot: u16,
    },
    /// How far the agent's writing has come.
    FailbackProgress(FailbackProgress),
    /// A failback slot is written and verified; compare its root with the
    /// point's.
    FailbackDone(FailbackDone),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingReady,
    Indexing,
    Streaming,
}

#[derive(Debug, Clone)]
struct SlotState {
    geometry: Geometry,
    needs_index: bool,
    index_done: bool,
    /// Where the next block of the slot may be.
    at: Position,
    ended: bool,
}

#[derive(Debug, Clone)]
struct SyncState {
    session: u64,
    phase: Phase,
    request: StartSync,
    slots: Vec<SlotState>,
}

/// An established control channel, controller side.
pub struct ControllerLink {
    agent_software: String,
    /// A session ended by an error while the agent may still have frames of
    /// it in flight; those are dropped until the next session starts.
    draining: bool,
    inventory: Option<Inventory>,
    session: Option<SyncState>,
    failback: Option<failback::ControllerPass>,
    out: Vec<u8>,
}

impl ControllerLink {
    /// Agent software, from its `Hello`.
    pub fn agent_software(&self) -> &str {
        &self.agent_software
    }
    /// Last inventory received.
    pub fn inventory(&self) -> Option<&Inventory> {
        self.inventory.as_ref()
    }
    /// Session in progress.
    pub fn session(&self) -> Option<u64> {
        self.session
            .as_ref()
            .map(|s| s.session)
            .or(self.failback.as_ref().map(|p| p.session))
    }

    /// Ends whatever session runs; its id if one did.
    fn drop_session(&mut self) -> Option<u64> {
        let id = self.session();
        self.session = None;
        self.failback = None;
        id
    }
    /// Geometry the agent reported for a slot of the running session.
    pub fn slot_geometry(&self, slot: u16) -> Option<Geometry> {
        self.session
            .as_ref()
            .and_then(|s| s.slots.get(usize::from(slot)))
            .map(|t| t.geometry)
    }
    /// Bytes queued for the agent.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
    /// Whether bytes are queued.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Starts a sync session. The disks must be in the agent's inventory.
    pub fn start_sync(&mut self, req: StartSync) -> Result<(), ProtocolError> {
        if self.session().is_some() {
            return Err(ProtocolError::Unexpected {
                got: "StartSync",
                state: "a session is already running on this agent",
            });
        }
        let inv = self.inventory.as_ref().ok_or(ProtocolError::Unexpected {
            got: "StartSync",
            state: "no inventory from the agent yet",
        })?;
        if req.disks.is_empty() || req.disks.len() > crate::limits::MAX_DISKS {
            return Err(ProtocolError::Inconsistent(format!(
                "a session needs 1 to {} disks",
                crate::limits::MAX_DISKS
            )));
        }
        for d in &req.disks {
            if !inv.disks.iter().any(|i| i.id == d.id) {
                return Err(ProtocolError::Inconsistent(format!(
                    "disk {:?} is not in the agent's inventory",
                    d.id
                )));
            }
        }
        Message::StartSync(req.clone()).encode(&mut self.out);
        self.draining = false;
        self.session = Some(SyncState {
            session: req.session,
            phase: Phase::AwaitingReady,
            request: req,
            slots: Vec::new(),
        });
        Ok(())
    }

    /// Takes one message from the agent.
    pub fn handle(&mut self, msg: Message) -> Result<Option<ControllerEvent>, ProtocolError> {
        if self.draining
            && self.session().is_none()
            && matches!(
                msg,
                Message::SyncReady(_)
                    | Message::Block(_)
                    | Message::Checkpoint { .. }
                    | Message::Round { .. }
                    | Message::DiskEnd(_)
                    | Message::FailbackReady(_)
                    | Message::TargetChunk(_)
                    | Message::TargetEnd { .. }
                    | Message::FailbackProgress(_)
                    | Message::FailbackDone(_)
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
            Message::Inventory(inv) => {
                self.inventory = Some(inv.clone());
                Ok(Some(ControllerEvent::Inventory(inv)))
            }
            Message::Error(e) => {
                if e.fatal || self.session() == Some(e.session) {
                    self.draining |= self.drop_session().is_some();
                }
                Ok(Some(ControllerEvent::PeerError(e)))
            }
            Message::SyncReady(r) => self.on_ready(r),
            Message::FailbackReady(r) => {
                self.pass_mut("FailbackReady")?.on_ready(&r)?;
                Ok(Some(ControllerEvent::FailbackReady(r)))
            }
            Message::TargetChunk(c) => {
                self.pass_mut("TargetChunk")?.on_target_chunk(&c)?;
                Ok(Some(ControllerEvent::TargetChunk(c)))
            }
            Message::TargetEnd { slot } => {
                self.pass_mut("TargetEnd")?.on_target_end(slot)?;
                Ok(Some(ControllerEvent::TargetEnd { slot }))
            }
            Message::FailbackProgress(p) => {
                self.pass_mut("FailbackProgress")?.on_progress(p.slot)?;
                Ok(Some(ControllerEvent::FailbackProgress(p)))
            }
            Message::FailbackDone(d) => {
                self.pass_mut("FailbackDone")?.on_done(d.slot)?;
                Ok(Some(ControllerEvent::FailbackDone(d)))
            }
            Message::Block(b) => {
                let st = self.streaming_slot(b.slot, "Block")?;
                if b.block < st.at.block {
                    return Err(ProtocolError::BadBlock {
                        slot: b.slot,
                        block: b.block,
                        why: "out of order or already sent",
                    });
                }
                if b.block >= st.geometry.block_count {
                    return Err(ProtocolError::BadBlock {
                        slot: b.slot,
                        block: b.block,
                        why: "past the end of the disk",
                    });
                }
                if b.raw_len != st.geometry.block_len(b.block) {
                    return Err(ProtocolError::BadBlock {
                        slot: b.slot,
                        block: b.block,
                        why: "length differs from the disk geometry",
                    });
                }
                st.at.block = b.block + 1;
                Ok(Some(ControllerEvent::Block(b)))
            }
            Message::Checkpoint { slot, at } => {
                let st = self.streaming_slot(slot, "Checkpoint")?;
                if at.round != st.at.round
                    || at.block < st.at.block
                    || at.block > st.geometry.block_count
                {
                    return Err(ProtocolError::BadBlock {
                        slot,
                        block: at.block,
                        why: "checkpoint in another round, behind the last block or past the end",
                    });
                }
                st.at = at;
                Ok(Some(ControllerEvent::Checkpoint { slot, at }))
            }
            Message::Round { slot, round } => {
                let st = self.streaming_slot(slot, "Round")?;
                if round != st.at.round + 1 {
                    return Err(ProtocolError::Inconsistent(format!(
                        "slot {slot} is in round {}; round {round} cannot begin",
                        st.at.round
                    )));
                }
                st.at = Position::new(round, 0);
                Ok(Some(ControllerEvent::Round { slot, round }))
            }
            Message::DiskEnd(end) => {
                let st = self.streaming_slot(end.slot, "DiskEnd")?;
                if end.block_count != st.geometry.block_count {
                    return Err(ProtocolError::Inconsistent(format!(
                        "DiskEnd for slot {} claims {} blocks, the disk has {}",
                        end.slot, end.block_count, st.geometry.block_count
                    )));
                }
                st.ended = true;
                st.at.block = st.geometry.block_count;
                Ok(Some(ControllerEvent::DiskEnd(end)))
            }
            other => Err(ProtocolError::Unexpected {
                got: other.name(),
                state: "controller link established",
            }),
        }
    }

    fn pass_mut(
        &mut self,
        got: &'static str,
    ) -> Result<&mut failback::ControllerPass, ProtocolError> {
        self.failback.as_mut().ok_or(ProtocolError::Unexpected {
            got,
            state: "no failback pass",
        })
    }

    fn on_ready(&mut self, r: SyncReady) -> Result<Option<ControllerEvent>, ProtocolError> {
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            got: "SyncReady",
            state: "no session",
        })?;
        if s.phase != Phase::AwaitingReady || r.session != s.session {
            return Err(ProtocolError::Unexpected {
                got: "SyncReady",
                state: "session already accepted or other session",
            });
        }
        if r.disks.len() != s.request.disks.len() {
            return Err(ProtocolError::Inconsistent(format!(
                "SyncReady has {} disks, session has {}",
                r.disks.len(),
                s.request.disks.len()
            )));
        }
        let mut slots = Vec::with_capacity(r.disks.len());
        for (d, req) in r.disks.iter().zip(&s.request.disks) {
            if d.needs_index && req.base.is_none() {
                return Err(ProtocolError::Inconsistent(format!(
                    "disk {:?} asks for a base index but has no base point",
                    req.id
                )));
            }
            let geometry = Geometry::new(d.disk_size, d.block_size);
            if req.resume_from.block > geometry.block_count {
                return Err(ProtocolError::Inconsistent(format!(
                    "disk {:?} resumes at block {} past its end ({} blocks)",
                    req.id, req.resume_from.block, geometry.block_count
                )));
            }
            slots.push(SlotState {
                geometry,
                needs_index: d.needs_index,
                index_done: false,
                at: req.resume_from,
                ended: false,
            });
        }
        s.slots = slots;
        s.phase = Phase::Indexing;
        self.maybe_start_streaming();
        Ok(Some(ControllerEvent::SyncReady(r)))
    }

    fn maybe_start_streaming(&mut self) {
        if let Some(s) = &mut self.session {
            if s.phase == Phase::Indexing && s.slots.iter().all(|t| !t.needs_index || t.index_done)
            {
                s.phase = Phase::Streaming;
            }
        }
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
                state: "session not streaming",
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

    fn indexing_slot(&mut self, slot: u16) -> Result<&mut SlotState, ProtocolError> {
        let s = self.session.as_mut().ok_or(ProtocolError::Unexpected {
            got: "IndexChunk",
            state: "no session",
        })?;
        let n = s.slots.len();
        let st = s
            .slots
            .get_mut(usize::from(slot))
            .ok_or(ProtocolError::NoSuchSlot { slot, slots: n })?;
        if s.phase != Phase::Indexing || !st.needs_index || st.index_done {
            return Err(ProtocolError::Unexpected {
                got: "IndexChunk",
                state: "slot is not waiting for an index",
            });
        }
        Ok(st)
    }

    /// Queues part of a slot's base index.
    pub fn send_index_chunk(&mut self, chunk: &IndexChunk) -> Result<(), ProtocolError> {
        self.indexing_slot(chunk.slot)?;
        if chunk.digests.len() > crate::limits::MAX_INDEX_CHUNK {
            return Err(ProtocolError::Inconsistent("index chunk too large".into()));
        }
        Message::IndexChunk(chunk.clone()).encode(&mut self.out);
        Ok(())
    }

    /// Marks a slot's base index as complete.
    pub fn send_index_end(&mut self, slot: u16) -> Result<(), ProtocolError> {
        self.indexing_slot(slot)?.index_done = true;
        Message::IndexEnd { slot }.encode(&mut self.out);
        self.maybe_start_streaming();
        Ok(())
    }

    /// Acknowledges that every block of a slot before `at` is stored.
    pub fn send_ack(&mut self, slot: u16, at: Position) -> Result<(), ProtocolError> {
        let s = self.session.as_ref().ok_or(ProtocolError::Unexpected {
            got: "Ack",
            state: "no session",
        })?;
        let n = s.slots.len();
        let st = s
            .slots
            .get(usize::from(slot))
            .ok_or(ProtocolError::NoSuchSlot { slot, slots: n })?;
        if at > st.at {
            return Err(ProtocolError::BadBlock {
                slot,
                block: at.block,
                why: "ack past what was received",
            });
        }
        Message::Ack { slot, at }.encode(&mut self.out);
        Ok(())
    }

    /// Reports a committed point.
    pub fn send_committed(&mut self, c: Committed) -> Result<(), ProtocolError> {
        let s = self.session.as_ref().ok_or(ProtocolError::Unexpected {
            got: "Committed",
            state: "no session",
        })?;
        match s.slots.get(usize::from(c.slot)) {
            Some(st) if st.ended => {
                Message::Committed(c).encode(&mut self.out);
                Ok(())
            }
            _ => Err(ProtocolError::Unexpected {
                got: "Committed",
                state: "slot not ended",
            }),
        }
    }

    /// Ends the session (successfully or not) and returns to idle.
    pub fn end_session(&mut self) {
        if let Some(session) = self.drop_session() {
            Message::SessionEnd { session }.encode(&mut self.out);
        }
    }

    /// Reports an error about the running session (or the link, when none
    /// runs); either way the session is over at both ends.
    pub fn send_error(&mut self, code: ErrorCode, fatal: bool, message: String) {
        let session = self.session().unwrap_or(0);
        self.draining |= self.drop_session().is_some();
        Message::Error(ErrorMsg {
            code,
            session,
            fatal,
            message,
        })
        .encode(&mut self.out);
    }

    /// Sends a heartbeat.
    pub fn send_heartbeat(&mut self, seq: u64) {
        Message::Heartbeat { seq }.encode(&mut self.out);
    }
}
