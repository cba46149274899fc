//! The controller end of a failback pass.
//!
//! ```text
//! idle       --start_failback-->          awaiting FailbackReady
//! awaiting   --FailbackReady-->           describing (TargetChunk…, TargetEnd per slot)
//! describing --TargetEnd, last slot-->    sending (Blocks that differ, FailbackSent per slot)
//! sending    --FailbackDone per slot-->   the controller checks roots and ends the session
//! ```
//!
//! The link checks that each target's digests arrive in order and cover
//! exactly the point's blocks, that the controller sends a slot's blocks in
//! ascending order with the geometry's lengths, and that a slot is reported
//! done only after everything was sent.

use super::ControllerLink;
use crate::digest::{Digest, Geometry};
use crate::encoding::Encoding;
use crate::frame::{begin_frame, finish_frame};
use crate::message::{kind, FailbackReady, IndexChunk, Message, StartFailback};
use crate::session::ProtocolError;
use crate::wire::Writer;

#[derive(Debug, Clone)]
pub(super) struct ControllerPass {
    pub(super) session: u64,
    request: StartFailback,
    accepted: bool,
    slots: Vec<PassSlot>,
}

#[derive(Debug, Clone)]
struct PassSlot {
    geometry: Geometry,
    described: u64,
    described_all: bool,
    next_block: u64,
    sent: bool,
    done: bool,
}

impl ControllerPass {
    fn sending(&self) -> bool {
        self.accepted && self.slots.iter().all(|s| s.described_all)
    }

    fn slot(&mut self, slot: u16, got: &'static str) -> Result<&mut PassSlot, ProtocolError> {
        if !self.accepted {
            return Err(ProtocolError::Unexpected {
                got,
                state: "failback pass not accepted yet",
            });
        }
        let n = self.slots.len();
        self.slots
            .get_mut(usize::from(slot))
            .ok_or(ProtocolError::NoSuchSlot { slot, slots: n })
    }

    pub(super) fn on_ready(&mut self, r: &FailbackReady) -> Result<(), ProtocolError> {
        if self.accepted || r.session != self.session {
            return Err(ProtocolError::Unexpected {
                got: "FailbackReady",
                state: "pass already accepted or other session",
            });
        }
        if r.targets.len() != self.slots.len() {
            return Err(ProtocolError::Inconsistent(format!(
                "FailbackReady has {} targets, the pass has {}",
                r.targets.len(),
                self.slots.len()
            )));
        }
        for (t, req) in r.targets.iter().zip(&self.request.targets) {
            if t.target_size < req.disk_size {
                return Err(ProtocolError::Inconsistent(format!(
                    "target {:?} ({} bytes) is smaller than point {} ({} bytes)",
                    req.target, t.target_size, req.point, req.disk_size
                )));
            }
        }
        self.accepted = true;
        Ok(())
    }

    pub(super) fn on_target_chunk(&mut self, c: &IndexChunk) -> Result<(), ProtocolError> {
        let st = self.slot(c.slot, "TargetChunk")?;
        let end = c.first_block + c.digests.len() as u64;
        if st.described_all || c.first_block != st.described || end > st.geometry.block_count {
            return Err(ProtocolError::BadBlock {
                slot: c.slot,
                block: c.first_block,
                why: "target digests out of order or past the end of the point",
            });
        }
        st.described = end;
        Ok(())
    }

    pub(super) fn on_target_end(&mut self, slot: u16) -> Result<(), ProtocolError> {
        let st = self.slot(slot, "TargetEnd")?;
        if st.described_all || st.described != st.geometry.block_count {
            return Err(ProtocolError::Inconsistent(format!(
                "slot {slot}: TargetEnd after {} of {} digests",
                st.described, st.geometry.block_count
            )));
        }
        st.described_all = true;
        Ok(())
    }

    pub(super) fn on_progress(&mut self, slot: u16) -> Result<(), ProtocolError> {
        self.slot(slot, "FailbackProgress").map(|_| ())
    }

    pub(super) fn on_done(&mut self, slot: u16) -> Result<(), ProtocolError> {
        let st = self.slot(slot, "FailbackDone")?;
        if !st.sent || st.done {
            return Err(ProtocolError::Unexpected {
                got: "FailbackDone",
                state: "slot not fully sent or already done",
            });
        }
        st.done = true;
        Ok(())
    }
}

impl ControllerLink {
    /// The failback pass running on this link, if any.
    pub fn failback(&self) -> Option<&StartFailback> {
        self.failback.as_ref().map(|p| &p.request)
    }

    /// Whether every target of the pass has been described, so that blocks
    /// may be sent.
    pub fn failback_sending(&self) -> bool {
        self.failback.as_ref().is_some_and(|p| p.sending())
    }

    /// Whether every slot of the pass has been reported done.
    pub fn failback_done(&self) -> bool {
        self.failback
            .as_ref()
            .is_some_and(|p| p.slots.iter().all(|s| s.done))
    }

    /// Starts a failback pass. The targets must be in the agent's inventory
    /// and at least as large as their points.
    pub fn start_failback(&mut self, req: StartFailback) -> Result<(), ProtocolError> {
        if self.session().is_some() {
            return Err(ProtocolError::Unexpected {
                got: "StartFailback",
                state: "a session is already running on this agent",
            });
        }
        let inv = self.inventory.as_ref().ok_or(ProtocolError::Unexpected {
            got: "StartFailback",
            state: "no inventory from the agent yet",
        })?;
        if req.targets.is_empty() || req.targets.len() > crate::limits::MAX_DISKS {
            return Err(ProtocolError::Inconsistent(format!(
                "a failback pass needs 1 to {} targets",
                crate::limits::MAX_DISKS
            )));
        }
        for (i, t) in req.targets.iter().enumerate() {
            let Some(info) = inv.targets.iter().find(|x| x.id == t.target) else {
                return Err(ProtocolError::Inconsistent(format!(
                    "target {:?} is not in the agent's inventory",
                    t.target
                )));
            };
            if info.size < t.disk_size {
                return Err(ProtocolError::Inconsistent(format!(
                    "target {:?} ({} bytes) is smaller than point {} of {} ({} bytes)",
                    t.target, info.size, t.point, t.source, t.disk_size
                )));
            }
            if req.targets[..i].iter().any(|o| o.target == t.target) {
                return Err(ProtocolError::Inconsistent(format!(
                    "target {:?} named twice in one pass",
                    t.target
                )));
            }
        }
        Message::StartFailback(req.clone()).encode(&mut self.out);
        self.draining = false;
        self.failback = Some(ControllerPass {
            session: req.session,
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
            request: req,
            accepted: false,
        });
        Ok(())
    }

    fn sending_slot(
        &mut self,
        slot: u16,
        got: &'static str,
    ) -> Result<&mut PassSlot, ProtocolError> {
        let p = self.failback.as_mut().ok_or(ProtocolError::Unexpected {
            got,
            state: "no failback pass",
        })?;
        if !p.sending() {
            return Err(ProtocolError::Unexpected {
                got,
                state: "failback targets not yet described",
            });
        }
        let st = p.slot(slot, got)?;
        if st.sent {
            return Err(ProtocolError::Unexpected {
                got,
                state: "slot already complete",
            });
        }
        Ok(st)
    }

    /// Queues a block for a failback target, as stored (the payload is
    /// copied straight into the frame). Blocks of a slot go in ascending
    /// order.
    pub fn send_failback_block(
        &mut self,
        slot: u16,
        block: u64,
        encoding: Encoding,
        raw_len: u32,
        digest: &Digest,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        let st = self.sending_slot(slot, "Block")?;
        if block < st.next_block || block >= st.geometry.block_count {
            return Err(ProtocolError::BadBlock {
                slot,
                block,
                why: "out of order or past the end of the point",
            });
        }
        if raw_len != st.geometry.block_len(block) {
            return Err(ProtocolError::BadBlock {
                slot,
                block,
                why: "length differs from the point's geometry",
            });
        }
        st.next_block = block + 1;
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

    /// Tells the agent that every differing block of a slot has been sent.
    pub fn send_failback_sent(&mut self, slot: u16, sent_blocks: u64) -> Result<(), ProtocolError> {
        self.sending_slot(slot, "FailbackSent")?.sent = true;
        Message::FailbackSent { slot, sent_blocks }.encode(&mut self.out);
        Ok(())
    }
}
