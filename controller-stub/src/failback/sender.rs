//! The failback sender: compares what a target holds with the point and
//! sends what differs, as stored.
//!
//! ```text
//!  connection task ──TargetChunk/TargetEnd──▶ sender thread ──SendOut──▶ connection task
//!                                             1. per slot, walk the point's index
//!                                                page by page beside the target's
//!                                                digests; mark blocks that differ
//!                                             2. per slot, walk the index again and
//!                                                read each marked chunk as stored
//! ```
//!
//! Both walks are streaming: memory is one index page, the unconsumed part
//! of one target chunk, and one bit per block. Chunks are sent without
//! recompression; the agent decodes and checks every digest before writing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use tideline_protocol::message::IndexChunk;
use tideline_protocol::{Digest, Geometry, ZeroDigests};
use tokio::sync::mpsc;

use super::status::SharedFailback;
use crate::store::{PointId, Store, StoreError, StoredChunk};

/// From the connection task: the target's description.
#[derive(Debug)]
pub enum DescribeIn {
    /// Digests of a target, in order (already checked by the link).
    Chunk(IndexChunk),
    /// A target is fully described.
    End {
        /// Slot.
        slot: u16,
    },
}

/// To the connection task: what to send.
#[derive(Debug)]
pub enum SendOut {
    /// A differing block; `chunk` is `None` for a zero block.
    Block {
        /// Slot.
        slot: u16,
        /// Block number.
        block: u64,
        /// Its digest in the point.
        digest: Digest,
        /// The chunk as stored.
        chunk: Option<StoredChunk>,
        /// Decoded length.
        raw_len: u32,
    },
    /// Every differing block of a slot was handed over.
    Sent {
        /// Slot.
        slot: u16,
        /// How many.
        sent_blocks: u64,
    },
    /// The sender could not go on.
    Failed(String),
}

/// One slot: which point is written.
#[derive(Debug, Clone)]
pub struct SlotSource {
    /// Agent whose point it is.
    pub agent: String,
    /// Its disk.
    pub disk: String,
    /// The point.
    pub point: PointId,
    /// The point's geometry.
    pub geometry: Geometry,
}

/// Starts the sender thread.
pub fn spawn(
    store: Arc<Store>,
    slots: Vec<SlotSource>,
    status: SharedFailback,
    rx: mpsc::Receiver<DescribeIn>,
    tx: mpsc::Sender<SendOut>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("failback-sender".into())
        .spawn(move || {
            let mut s = Sender {
                store,
                slots,
                status,
                rx,
                tx: tx.clone(),
            };
            if let Err(why) = s.run() {
                let _ = tx.blocking_send(SendOut::Failed(why));
            }
        })
}

struct Sender {
    store: Arc<Store>,
    slots: Vec<SlotSource>,
    status: SharedFailback,
    rx: mpsc::Receiver<DescribeIn>,
    tx: mpsc::Sender<SendOut>,
}

/// Stops a walk of the index when the connection is gone.
const GONE: &str = "the agent's connection went away";

impl Sender {
    fn run(&mut self) -> Result<(), String> {
        let mut differs = Vec::with_capacity(self.slots.len());
        for slot in 0..self.slots.len() {
            differs.push(self.compare(slot)?);
        }
        if let Ok(mut st) = self.status.lock() {
            st.state = super::status::PassState::Writing;
        }
        for (slot, bits) in differs.iter().enumerate() {
            self.send_slot(slot, bits)?;
        }
        Ok(())
    }

    /// Walks the point beside the target's digests; one bit per block that
    /// differs.
    fn compare(&mut self, slot: usize) -> Result<Vec<u64>, String> {
        let src = self.slots[slot].clone();
        let mut bits = vec![0u64; src.geometry.block_count.div_ceil(64) as usize];
        let mut pending: VecDeque<Digest> = VecDeque::new();
        let rx = &mut self.rx;
        let status = &self.status;
        let mut differing = 0u64;
        self.store
            .for_each_index_page(&src.agent, &src.disk, src.point, &mut |first, entries| {
                while pending.len() < entries.len() {
                    match rx.blocking_recv() {
                        Some(DescribeIn::Chunk(c)) if usize::from(c.slot) == slot => {
                            pending.extend(c.digests)
                        }
                        Some(other) => {
                            return Err(StoreError::Protocol(format!(
                                "slot {slot}: unexpected {other:?} while comparing"
                            )))
                        }
                        None => return Err(StoreError::Protocol(GONE.into())),
                    }
                }
                for (b, want) in (first..).zip(entries) {
                    // The loop above filled `pending` with at least
                    // `entries.len()` digests.
                    let have = pending.pop_front().unwrap_or(Digest([0; 32]));
                    if have != *want {
                        bits[(b / 64) as usize] |= 1 << (b % 64);
                        differing += 1;
                    }
                }
                if let Ok(mut st) = status.lock() {
                    let t = &mut st.targets[slot];
                    t.compared_blocks = first + entries.len() as u64;
                    t.differing_blocks = differing;
                }
                Ok(())
            })
            .map_err(|e| format!("{}/{} point {}: {e}", src.agent, src.disk, src.point))?;
        match self.rx.blocking_recv() {
            Some(DescribeIn::End { slot: s }) if usize::from(s) == slot => Ok(bits),
            Some(other) => Err(format!(
                "slot {slot}: expected its TargetEnd, got {other:?}"
            )),
            None => Err(GONE.into()),
        }
    }

    fn send_slot(&mut self, slot: usize, bits: &[u64]) -> Result<(), String> {
        let src = self.slots[slot].clone();
        let zeros = ZeroDigests::new(src.geometry.disk_size, src.geometry.block_size);
        let g = src.geometry;
        let mut sent = 0u64;
        let store = self.store.clone();
        let tx = &self.tx;
        let status = &self.status;
        store
            .for_each_index_page(&src.agent, &src.disk, src.point, &mut |first, entries| {
                for (b, digest) in (first..).zip(entries) {
                    if bits[(b / 64) as usize] & (1 << (b % 64)) == 0 {
                        continue;
                    }
                    let raw_len = g.block_len(b);
                    let chunk = if zeros.is_zero(b, digest) {
                        None
                    } else {
                        Some(store.read_stored(digest)?)
                    };
                    let bytes = chunk.as_ref().map_or(0, |c| c.payload.len() as u64);
                    tx.blocking_send(SendOut::Block {
                        slot: slot as u16,
                        block: b,
                        digest: *digest,
                        chunk,
                        raw_len,
                    })
                    .map_err(|_| StoreError::Protocol(GONE.into()))?;
                    sent += 1;
                    if let Ok(mut st) = status.lock() {
                        let t = &mut st.targets[slot];
                        t.sent_blocks = sent;
                        t.sent_bytes += bytes;
                        t.sent_raw_bytes += u64::from(raw_len);
                    }
                }
                Ok(())
            })
            .map_err(|e| format!("{}/{} point {}: {e}", src.agent, src.disk, src.point))?;
        self.tx
            .blocking_send(SendOut::Sent {
                slot: slot as u16,
                sent_blocks: sent,
            })
            .map_err(|_| GONE.to_string())
    }
}
