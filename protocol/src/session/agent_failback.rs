//! The agent end of a failback pass.
//!
//! ```text
//! idle         --StartFailback-->             awaiting ready (shell checks its targets' guards)
//! awaiting     --send_failback_ready-->       describing (TargetChunk…, TargetEnd per slot, in slot order)
//! describing   --send_target_end, last slot--> receiving (Blocks, FailbackSent per slot)
//! receiving    --send_failback_done per slot--> (the controller ends the session)
//! any          --SessionEnd-->                idle
//! ```
//!
//! The controller sends a slot's blocks in ascending order, within the
//! point, with the length the point's geometry gives each block; the agent
//! reports a slot done only after the controller said it sent everything.

use super::AgentLink;
use crate::digest::Geometry;
use crate::message::{
    Block, FailbackDone, FailbackProgress, FailbackReady, IndexChunk, Message, StartFailback,
};
use crate::session::ProtocolError;

#[derive(Debug, Clone)]
pub(super) struct AgentPass {
    pub(super) session: u64,
    accepted: bool,
    slots: Vec<PassSlot>,
}

#[derive(Debug, Clone)]
struct PassSlot {
    geometry: Geometry,
    /// Next block whose digest the agent describes.
    described: u64,
    /// `TargetEnd` sent.
    described_all: bool,
    /// Next block the controller may send.
    next_block: u64,
    /// `FailbackSent` received.
    sent: bool,
    /// `FailbackDone` sent.
    done: bool,
}

impl AgentPass {
    pub(super) fn new(req: &StartFailback) -> Self {
        AgentPass {
            session: req.session,
            accepted: false,
            slots: req
                .targets
                .iter()
                .map(|t| PassSlot {
                    geometry: Geometry::new(t.disk_size, t.block_size),
                    described: 0,
                    described_all: false,
                    next_block: 0,
                    sent: false,
                    done: false,
                })
                .collect(),
        }
    }

    fn receiving(&self) -> bool {
        self.accepted && self.slots.iter().all(|s| s.described_all)
    }

    fn slot(&mut self, slot: u16, got: &'static str) -> Result<&mut PassSlot, ProtocolError> {
        if !self.accepted {
            return Err(ProtocolError::Unexpected {
                got,
                state: "FailbackReady not sent yet",
            });
        }
        let n = self.slots.len();
        self.slots
            .get_mut(usize::from(slot))
            .ok_or(ProtocolError::NoSuchSlot { slot, slots: n })
    }

    /// Checks a block from the controller against the pass.
    pub(super) fn on_block(&mut self, b: &Block) -> Result<(), ProtocolError> {
        if !self.receiving() {
            return Err(ProtocolError::Unexpected {
                got: "Block",
                state: "failback targets not yet described",
            });
        }
        let st = self.slot(b.slot, "Block")?;
        if st.sent {
            return Err(ProtocolError::Unexpected {
                got: "Block",
                state: "slot already complete",
            });
        }
        if b.block < st.next_block || b.block >= st.geometry.block_count {
            return Err(ProtocolError::BadBlock {
                slot: b.slot,
                block: b.block,
                why: "out of order or past the end of the point",
            });
        }
        if b.raw_len != st.geometry.block_len(b.block) {
            return Err(ProtocolError::BadBlock {
                slot: b.slot,
                block: b.block,
                why: "length differs from the point's geometry",
            });
        }
        st.next_block = b.block + 1;
        Ok(())
    }

    /// Checks `FailbackSent` against the pass.
    pub(super) fn on_sent(&mut self, slot: u16) -> Result<(), ProtocolError> {
        if !self.receiving() {
            return Err(ProtocolError::Unexpected {
                got: "FailbackSent",
                state: "failback targets not yet described",
            });
        }
        let st = self.slot(slot, "FailbackSent")?;
        if st.sent {
            return Err(ProtocolError::Unexpected {
                got: "FailbackSent",
                state: "slot already complete",
            });
        }
        st.sent = true;
        Ok(())
    }
}

impl AgentLink {
    /// Whether a failback pass is running on this link.
    pub fn in_failback(&self) -> bool {
        self.failback.is_some()
    }

    /// Whether the pass's targets are all described and blocks may come.
    pub fn failback_receiving(&self) -> bool {
        self.failback.as_ref().is_some_and(|p| p.receiving())
    }

    fn pass_mut(&mut self, got: &'static str) -> Result<&mut AgentPass, ProtocolError> {
        self.failback.as_mut().ok_or(ProtocolError::Unexpected {
            got,
            state: "no failback pass",
        })
    }

    /// Accepts the requested pass: every target passed its guards.
    pub fn send_failback_ready(&mut self, ready: FailbackReady) -> Result<(), ProtocolError> {
        let p = self.pass_mut("FailbackReady")?;
        if p.accepted || ready.session != p.session {
            return Err(ProtocolError::Unexpected {
                got: "FailbackReady",
                state: "pass already accepted or other session",
            });
        }
        if ready.targets.len() != p.slots.len() {
            return Err(ProtocolError::Inconsistent(format!(
                "FailbackReady has {} targets, the pass has {}",
                ready.targets.len(),
                p.slots.len()
            )));
        }
        for (i, (t, s)) in ready.targets.iter().zip(&p.slots).enumerate() {
            if t.target_size < s.geometry.disk_size {
                return Err(ProtocolError::Inconsistent(format!(
                    "target of slot {i} ({} bytes) is smaller than the point ({} bytes)",
                    t.target_size, s.geometry.disk_size
                )));
            }
        }
        p.accepted = true;
        Message::FailbackReady(ready).encode(&mut self.out);
        Ok(())
    }

    /// Describes the next run of a target's digests. Slots are described
    /// one after the other, each from block 0 without gaps.
    pub fn send_target_chunk(&mut self, chunk: IndexChunk) -> Result<(), ProtocolError> {
        let p = self.pass_mut("TargetChunk")?;
        if let Some(earlier) = p.slots[..usize::from(chunk.slot).min(p.slots.len())]
            .iter()
            .position(|s| !s.described_all)
        {
            return Err(ProtocolError::Inconsistent(format!(
                "slot {} described before slot {earlier}",
                chunk.slot
            )));
        }
        let st = p.slot(chunk.slot, "TargetChunk")?;
        let end = chunk.first_block + chunk.digests.len() as u64;
        if st.described_all || chunk.first_block != st.described || end > st.geometry.block_count {
            return Err(ProtocolError::BadBlock {
                slot: chunk.slot,
                block: chunk.first_block,
                why: "target digests out of order or past the end of the point",
            });
        }
        st.described = end;
        Message::TargetChunk(chunk).encode(&mut self.out);
        Ok(())
    }

    /// Ends a target's description (every block of the point described).
    pub fn send_target_end(&mut self, slot: u16) -> Result<(), ProtocolError> {
        let st = self.pass_mut("TargetEnd")?.slot(slot, "TargetEnd")?;
        if st.described_all || st.described != st.geometry.block_count {
            return Err(ProtocolError::Inconsistent(format!(
                "slot {slot}: TargetEnd after {} of {} digests",
                st.described, st.geometry.block_count
            )));
        }
        st.described_all = true;
        Message::TargetEnd { slot }.encode(&mut self.out);
        Ok(())
    }

    /// Reports how far a slot's writing has come.
    pub fn send_failback_progress(&mut self, p: FailbackProgress) -> Result<(), ProtocolError> {
        self.pass_mut("FailbackProgress")?
            .slot(p.slot, "FailbackProgress")?;
        Message::FailbackProgress(p).encode(&mut self.out);
        Ok(())
    }

    /// Reports a slot done: everything sent was written and verified.
    pub fn send_failback_done(&mut self, d: FailbackDone) -> Result<(), ProtocolError> {
        let st = self
            .pass_mut("FailbackDone")?
            .slot(d.slot, "FailbackDone")?;
        if !st.sent || st.done {
            return Err(ProtocolError::Unexpected {
                got: "FailbackDone",
                state: "slot not complete or already done",
            });
        }
        st.done = true;
        Message::FailbackDone(d).encode(&mut self.out);
        Ok(())
    }
}
