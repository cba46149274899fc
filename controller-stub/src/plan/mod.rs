//! DR plans for failback: from a plan's JSON text to an ordered list of
//! devices whose disks are pulled from the store's replicas.
//!
//! A DR plan (`docs/dr-plan.md` has the full syntax) describes the machines
//! of a site (`devices`, each with an `id`, a `rank`, a `flavor` and its
//! `ports`) and the networks they sit on (`subnets`). Tideline adds one
//! section per device, `failback`, which names the failback agent that runs
//! on the machine's new host and maps each of the device's replicated disks
//! (a lineage `agent`/`disk` in the store, at a chosen or the latest point)
//! to a target of that agent. [`validate`] reads such a plan, checks it
//! against itself and against the store ([`ReplicaLookup`]), and returns
//! either a [`FailbackPlan`] or every problem it found ([`PlanErrors`]).
//!
//! # Place in the data path
//!
//! The plan is the controller's input for a failback: an operator submits
//! it, the controller validates it here, then drives the failback agents
//! stage by stage ([`FailbackPlan::stages`]): all devices of one rank are
//! written before any device of the next rank starts.
//!
//! # Paths
//!
//! Every problem carries the place in the document it is about, as a JSON
//! Pointer (RFC 6901, [`PlanPath`]): `/devices/web01/ports/1/subnet`, with
//! `~` written `~0` and `/` written `~1` inside a key. A device name such as
//! `rhel7.2` therefore stays one segment (`/devices/rhel7.2/rank`). The
//! pointer names the value that is wrong, or the place where a missing field
//! should be. The whole document is the empty pointer, listed as
//! `(document)`.
//!
//! # Duplicate keys
//!
//! Plans are read with their own small document model (`json.rs`) rather
//! than `serde_json::Value`, which keeps only the last of two equal keys:
//! here every key of an object is kept, in order, so that a device defined
//! twice is reported instead of silently replaced. In every object the
//! checker reads, the first occurrence of a key is the one checked and used;
//! the later ones are reported (a duplicate device name, a duplicate subnet
//! name, or a duplicate key) and otherwise ignored.
//!
//! # Order
//!
//! [`FailbackPlan::devices`] is sorted by rank ascending, then by device name
//! in byte order; names are unique, so the order is total and does not
//! depend on the order of the document.

mod cidr;
mod error;
mod fields;
mod json;
mod validate;

#[cfg(test)]
mod tests;

use serde::Serialize;

use crate::store::{PointId, PointInfo, Store, StoreError};

pub use cidr::{Cidr, CidrError};
pub use error::{PathSegment, PlanErrors, PlanPath, PlanProblem, ProblemKind};
pub use validate::validate;

/// Largest plan text accepted, in bytes (16 MiB). Plans describe machines,
/// not data: a plan of a thousand devices is well under a megabyte. The
/// bound keeps the document model (several times the text) small.
pub const MAX_PLAN_LEN: usize = 16 * 1024 * 1024;

/// A validated failback plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailbackPlan {
    /// Devices sorted by rank, then name (see the module doc).
    devices: Vec<PlanDevice>,
    /// The plan's `project_name`, if given.
    project_name: Option<String>,
}

/// One device of a plan: a machine to be written back by one failback agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanDevice {
    /// The machine name (its key under `devices`).
    pub name: String,
    /// The machine's `id`.
    pub id: String,
    /// The machine's `rank`: it is written after every device of a lower
    /// rank is done.
    pub rank: u64,
    /// Id (TLS certificate CN) of the failback agent that writes its disks.
    pub failback_agent: String,
    /// Its disks, in the order of `failback.disks`.
    pub disks: Vec<PlanDisk>,
}

/// One disk of a device: a replica point to be written to a target of the
/// device's failback agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanDisk {
    /// Agent id of the replica's lineage in the store.
    pub replica_agent: String,
    /// Disk id of the replica's lineage in the store.
    pub replica_disk: String,
    /// The point the plan asked for; `None` asked for the latest one.
    pub requested_point: Option<PointId>,
    /// The point to write: the one asked for, or the latest committed when
    /// the plan was validated.
    pub point: PointId,
    /// Size in bytes of the disk at that point.
    pub disk_size: u64,
    /// Target id configured on the failback agent.
    pub target: String,
    /// Whether to write even if the target looks in use.
    pub force: bool,
}

/// A committed replica point, as [`ReplicaLookup`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaPoint {
    /// The point's id.
    pub point: PointId,
    /// Size in bytes of the disk at that point.
    pub disk_size: u64,
}

impl From<&PointInfo> for ReplicaPoint {
    fn from(info: &PointInfo) -> ReplicaPoint {
        ReplicaPoint {
            point: info.point,
            disk_size: info.disk_size,
        }
    }
}

/// How validation asks the controller's store about replicas.
pub trait ReplicaLookup {
    /// The committed point `point` of lineage `agent`/`disk`, or its latest
    /// committed point when `point` is `None`.
    ///
    /// Returns `Ok(None)` when the lineage or the point does not exist; an
    /// error only when the store could not answer. A returned point's id is
    /// `point` itself when one was asked for. `agent` and `disk` are always
    /// valid ids ([`tideline_protocol::limits::valid_id`]).
    fn find_point(
        &self,
        agent: &str,
        disk: &str,
        point: Option<PointId>,
    ) -> Result<Option<ReplicaPoint>, StoreError>;
}

impl ReplicaLookup for Store {
    fn find_point(
        &self,
        agent: &str,
        disk: &str,
        point: Option<PointId>,
    ) -> Result<Option<ReplicaPoint>, StoreError> {
        match point {
            None => Ok(self
                .latest_point(agent, disk)?
                .as_ref()
                .map(ReplicaPoint::from)),
            Some(id) => match self.point(agent, disk, id) {
                Ok(info) => Ok(Some(ReplicaPoint::from(&info))),
                Err(StoreError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }
}

impl FailbackPlan {
    /// Sorts `devices` into plan order (rank, then name).
    fn new(mut devices: Vec<PlanDevice>, project_name: Option<String>) -> FailbackPlan {
        devices.sort_by(|a, b| (a.rank, &a.name).cmp(&(b.rank, &b.name)));
        FailbackPlan {
            devices,
            project_name,
        }
    }

    /// Every device, by rank ascending, then by name in byte order.
    pub fn devices(&self) -> &[PlanDevice] {
        &self.devices
    }

    /// The plan's `project_name`, if it has one.
    pub fn project_name(&self) -> Option<&str> {
        self.project_name.as_deref()
    }

    /// The devices grouped by rank: one stage per rank that has devices,
    /// lowest rank first, each stage in name order. A stage starts only when
    /// every device of the previous stage is done. Ranks need not be
    /// contiguous: ranks 0, 2 and 5 make three stages.
    pub fn stages(&self) -> Vec<Vec<&PlanDevice>> {
        self.devices
            .chunk_by(|a, b| a.rank == b.rank)
            .map(|stage| stage.iter().collect())
            .collect()
    }
}
