//! Sync: finding what changed on a disk and streaming it to the controller.
//!
//! * [`expected`]: the digests the controller already holds (base point
//!   carried to the current disk size);
//! * [`pipeline`]: the concurrent read → hash → compress stages;
//! * [`session`]: per-session bookkeeping on the agent (block map checks,
//!   base index download, change log, map advance on commit).

pub mod changes;
pub mod expected;
pub mod frozen_copy;
pub mod instant;
pub mod method;
pub mod pipeline;
pub mod priority;
pub mod runner;
pub mod session;
