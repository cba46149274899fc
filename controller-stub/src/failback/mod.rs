//! Failback on the controller: passes that write recovery points into the
//! disks of newly created source machines.
//!
//! A pass runs over a failback agent's control channel, like a sync: the
//! controller asks the agent to write point P of `agent/disk` into its
//! target T ([`request`]); the agent describes what each target holds; the
//! [`sender`] compares that with the point and sends what differs, as
//! stored; the agent writes, verifies and reports the root of what the
//! target now holds, which must equal the point's. [`status`] is what the
//! admin interface shows meanwhile. DR plans ([`crate::plan`]) drive
//! passes for whole groups of machines in rank order.

pub mod plan_run;
pub mod request;
pub mod sender;
pub mod status;

pub use request::{FailbackRequest, TargetRequest};
pub use status::{FailbackStatus, PassState, SharedFailback, TargetProgress};
