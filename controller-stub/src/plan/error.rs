//! What can be wrong with a DR plan, and where.
//!
//! Validation never stops at the first problem: each one is a
//! [`PlanProblem`] (a [`PlanPath`] and a [`ProblemKind`]) and
//! [`PlanErrors`] carries all of them, in document order of the plan's
//! top-level sections and in reading order within one.

use std::fmt;

use crate::store::PointId;

use super::cidr::CidrError;

/// One step of a [`PlanPath`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathSegment {
    /// An object key.
    Key(String),
    /// An array index, from 0.
    Index(usize),
}

/// A place in a plan document, shown as a JSON Pointer (RFC 6901):
/// `/devices/web01/ports/1/subnet`; in keys `~` is written `~0` and `/` is
/// written `~1`. The empty path is the whole document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlanPath(Vec<PathSegment>);

impl PlanPath {
    /// The whole document.
    pub fn root() -> PlanPath {
        PlanPath(Vec::new())
    }

    /// This path extended by an object key.
    pub fn key(&self, key: &str) -> PlanPath {
        let mut segments = self.0.clone();
        segments.push(PathSegment::Key(key.to_string()));
        PlanPath(segments)
    }

    /// This path extended by an array index.
    pub fn index(&self, index: usize) -> PlanPath {
        let mut segments = self.0.clone();
        segments.push(PathSegment::Index(index));
        PlanPath(segments)
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }

    /// Whether this is the whole document.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for PlanPath {
    /// The JSON Pointer; empty for the whole document.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for segment in &self.0 {
            match segment {
                PathSegment::Key(k) => write!(f, "/{}", k.replace('~', "~0").replace('/', "~1"))?,
                PathSegment::Index(i) => write!(f, "/{i}")?,
            }
        }
        Ok(())
    }
}

/// What is wrong at one place of a plan.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    /// The plan text is longer than [`super::MAX_PLAN_LEN`].
    #[error("plan is {len} bytes, more than the {max} accepted")]
    TooLarge {
        /// Length of the text.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The text is not JSON.
    #[error("invalid JSON at line {line}, column {column}: {reason}")]
    InvalidJson {
        /// 1-based line.
        line: usize,
        /// 1-based column, in bytes.
        column: usize,
        /// What the parser expected or found.
        reason: String,
    },
    /// A required field is absent.
    #[error("missing required field `{field}`")]
    Missing {
        /// The field's name.
        field: String,
    },
    /// A required field is absent and a misspelling of it is present.
    #[error("missing required field `{field}` (found `{found}`; the key is spelled `{field}`)")]
    Misspelled {
        /// The field's name.
        field: String,
        /// The key found instead.
        found: String,
    },
    /// A value has another JSON type than the field takes.
    #[error("expected {expected}, found {found}")]
    WrongType {
        /// What the field takes, e.g. `string` or `array or object`.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A number that must be a non-negative integer is not one.
    #[error("expected a non-negative integer, found {found}")]
    NotUnsignedInteger {
        /// The number, as written back.
        found: String,
    },
    /// A string, list or object that must not be empty is empty.
    #[error("must not be empty")]
    Empty,
    /// An agent, disk or target id is not a valid id.
    #[error("`{value}` is not a valid id (1 to 128 ASCII letters, digits, `.`, `_` or `-`, not starting with `.`)")]
    InvalidId {
        /// The value given.
        value: String,
    },
    /// A port's `ip` is not an IPv4 or IPv6 address.
    #[error("`{value}` is not an IP address")]
    InvalidIp {
        /// The value given.
        value: String,
    },
    /// A subnet's `cidr` is not a network in CIDR notation.
    #[error("`{value}` is not a valid CIDR: {reason}")]
    InvalidCidr {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: CidrError,
    },
    /// A key outside the `failback` section's fixed set (a typo there would
    /// silently change what is written, so unknown keys are refused).
    #[error("unknown key `{key}` (expected one of: {expected})")]
    UnknownKey {
        /// The key found.
        key: String,
        /// The keys allowed here, comma-separated.
        expected: &'static str,
    },
    /// A key appears more than once in one object.
    #[error("key `{key}` appears {count} times; only the first is read")]
    DuplicateKey {
        /// The key.
        key: String,
        /// How many times it appears.
        count: usize,
    },
    /// Two devices have the same name.
    #[error("device `{name}` is defined {count} times")]
    DuplicateDeviceName {
        /// The device name.
        name: String,
        /// How many times it is defined.
        count: usize,
    },
    /// Two devices have the same `id`.
    #[error("device id `{id}` is also the id of device `{first}`")]
    DuplicateDeviceId {
        /// The id.
        id: String,
        /// The device that has it first, in document order.
        first: String,
    },
    /// Two subnets have the same name.
    #[error("subnet `{name}` is defined {count} times")]
    DuplicateSubnetName {
        /// The subnet name.
        name: String,
        /// How many times it is defined.
        count: usize,
    },
    /// Two ports of one device have the same name.
    #[error("port name `{name}` is also the name of port {first}")]
    DuplicatePortName {
        /// The port name.
        name: String,
        /// Index of the port that has it first.
        first: usize,
    },
    /// A port in object form has a `name` other than its key.
    #[error("port name `{name}` differs from its key `{key}`")]
    PortNameMismatch {
        /// The `name` field.
        name: String,
        /// The key the port is under.
        key: String,
    },
    /// A port refers to a subnet that `subnets` does not define.
    #[error("subnet `{subnet}` is not defined under /subnets")]
    UnknownSubnet {
        /// The subnet name referred to.
        subnet: String,
    },
    /// A port's address is not in its subnet's network.
    #[error("{ip} is outside subnet `{subnet}` ({cidr})")]
    IpOutsideSubnet {
        /// The port's address.
        ip: String,
        /// The subnet's name.
        subnet: String,
        /// The subnet's network.
        cidr: String,
    },
    /// Two ports claim the same address in the same subnet.
    #[error("{ip} in subnet `{subnet}` is also the address of {first}")]
    DuplicateIp {
        /// The address.
        ip: String,
        /// The subnet.
        subnet: String,
        /// Path of the `ip` that claims it first.
        first: PlanPath,
    },
    /// Two disks would write the same target of the same failback agent.
    #[error("target `{target}` of failback agent `{agent}` is also written by {first}")]
    DuplicateTarget {
        /// The failback agent.
        agent: String,
        /// The target id.
        target: String,
        /// Path of the disk entry that writes it first.
        first: PlanPath,
    },
    /// The store has no such replica, or not the point asked for.
    #[error("{}", missing_replica(agent, disk, *point))]
    MissingReplica {
        /// The lineage's agent id.
        agent: String,
        /// The lineage's disk id.
        disk: String,
        /// The point asked for; `None` for the latest.
        point: Option<PointId>,
    },
    /// The store could not answer whether the replica exists.
    #[error("cannot look up replica `{agent}/{disk}` in the store: {reason}")]
    LookupFailed {
        /// The lineage's agent id.
        agent: String,
        /// The lineage's disk id.
        disk: String,
        /// The store's error.
        reason: String,
    },
}

/// The message of [`ProblemKind::MissingReplica`].
fn missing_replica(agent: &str, disk: &str, point: Option<PointId>) -> String {
    match point {
        None => format!("replica `{agent}/{disk}` has no committed point in the store"),
        Some(p) => format!("replica `{agent}/{disk}` has no point {p} in the store"),
    }
}

/// One problem of a plan: where, and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {kind}", Listing(path))]
pub struct PlanProblem {
    /// Where in the document.
    pub path: PlanPath,
    /// What is wrong.
    pub kind: ProblemKind,
}

/// A path as listed in messages: the JSON Pointer, or `(document)` for the
/// whole document (whose pointer is empty).
struct Listing<'a>(&'a PlanPath);

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_root() {
            f.write_str("(document)")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Every problem found in a plan; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanErrors {
    problems: Vec<PlanProblem>,
}

impl PlanErrors {
    /// Wraps `problems`, which the caller guarantees is not empty.
    pub(crate) fn new(problems: Vec<PlanProblem>) -> PlanErrors {
        debug_assert!(!problems.is_empty());
        PlanErrors { problems }
    }

    /// The problems, in the order they are listed.
    pub fn problems(&self) -> &[PlanProblem] {
        &self.problems
    }
}

impl fmt::Display for PlanErrors {
    /// One problem per line, `<path>: <message>`, no trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PlanErrors {}
