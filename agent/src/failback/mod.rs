//! Failback: writing recovery points back into the disks of newly created
//! source machines, in verified incremental passes until cut-over.
//!
//! The controller starts a pass over the control channel ("write point P
//! of disk D into target T"). The agent checks its targets ([`guard`]),
//! describes what each holds ([`describe`], or the [`map`] its last pass
//! left when that map can vouch for the target), receives the blocks that
//! differ as the controller stores them, and writes them ([`pass`]) while a
//! second thread flushes, re-reads and verifies the round written before
//! (`round`) into raw files, block devices or NBD exports
//! ([`target`]). A pass after no change writes nothing; a pass cut off is
//! resumed by the next one without rewriting what it verified.

pub mod describe;
pub mod guard;
pub mod map;
pub mod pass;
mod round;
pub mod target;

pub use pass::{BlockIn, FailbackPass, PassItem};
