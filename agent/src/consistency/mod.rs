//! Consistent recovery points: the building blocks the sync engine uses to
//! turn "blocks read while the machine runs" into a point a restore can boot.
//!
//! The sync engine pre-copies changed blocks while the protected machine runs,
//! then, for a consistency group (every filesystem that lives on the group's
//! protected disks), runs the pre-freeze hooks, freezes the filesystems, reads
//! the last changed blocks into memory, thaws, and runs the post-thaw hooks.
//! The pieces, one idea per file:
//!
//! - [`mounts`]: which mounted filesystems live on the protected block
//!   devices (partitions and stacked holders included), and which mounted
//!   filesystem holds a protected image file.
//! - [`guard`]: freezing through a separate thaw guard process, so that a
//!   frozen filesystem is thawed within its bound whatever happens to the
//!   agent (error, panic, SIGTERM, SIGKILL, OOM kill).
//! - [`hooks`]: application pre-freeze and post-thaw hooks, with timeouts that
//!   kill the hook's whole process group.
//! - [`snapshot`]: reflink (`FICLONE`) snapshots of image files on XFS and
//!   btrfs, the cheap point-in-time copy for image files.
//!
//! The level a point reaches, and the level a configuration requires, are
//! `tideline_protocol::Consistency` and `Requirement` (re-exported here): the
//! agent states the level in `DiskEnd` and the controller keeps it in the
//! point's manifest.
//!
//! Nothing here decides protocol matters: the sync engine chooses what to
//! freeze and when, and records the [`Consistency`] it achieved.

pub mod guard;
pub mod hooks;
pub mod mounts;
pub mod snapshot;

pub use guard::{flush, freeze, FreezeError, FreezeRequest, Frozen, ThawCause, ThawReport};
pub use hooks::{Hook, HookContext, HookOutcome, HookPhase, HookRun};
pub use mounts::{filesystem_holding, filesystems_on, MountedFs, MountsError};
pub use snapshot::{remove_stale_clones, ReflinkSnapshot, SnapshotError};
pub use tideline_protocol::{Consistency, Requirement};
