//! How consistent a recovery point is, as the agent states it in `DiskEnd`
//! and the controller keeps it in the point's manifest.
//!
//! A point read block by block from a disk that a running machine keeps
//! writing is a mixture of moments: every block was copied correctly, yet a
//! database on it may be corrupt. A point is *crash-consistent* when it is
//! exactly the disk at one instant (what a power cut at that instant would
//! have left), and *application-consistent* when, in addition, the
//! applications on it were told to make their files whole first (a hook
//! flushed and locked the database). Every point says which it is:
//!
//! | level | wire | spelling | what made it |
//! |---|---|---|---|
//! | `none` | 0 | `none` | read live, or the freeze could not be made |
//! | `crash (hypervisor)` | 1 | `crash-hypervisor` | an NBD or VMDK export the hypervisor made from a snapshot (declared by the admin) |
//! | `crash (snapshot)` | 2 | `crash-snapshot` | an image file read from its reflink clone |
//! | `crash (frozen)` | 3 | `crash-frozen` | the last changes read while the filesystems were frozen |
//! | `application` | 4 | `application` | frozen, and every pre-freeze hook succeeded |

use std::fmt;

/// The consistency level of a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Consistency {
    /// A mixture of moments: read while the machine wrote.
    #[default]
    None,
    /// The disk at one instant, because the hypervisor exported a snapshot.
    CrashHypervisor,
    /// The disk at one instant, read from a reflink clone of its image file.
    CrashSnapshot,
    /// The disk at one instant: the last changes were read with every
    /// filesystem on the disk (and on the disks of its group) frozen.
    CrashFrozen,
    /// Crash-consistent, and the applications' pre-freeze hooks succeeded.
    Application,
}

impl Consistency {
    /// Every level, lowest first.
    pub const ALL: [Consistency; 5] = [
        Consistency::None,
        Consistency::CrashHypervisor,
        Consistency::CrashSnapshot,
        Consistency::CrashFrozen,
        Consistency::Application,
    ];

    /// Wire value.
    pub fn code(self) -> u8 {
        match self {
            Consistency::None => 0,
            Consistency::CrashHypervisor => 1,
            Consistency::CrashSnapshot => 2,
            Consistency::CrashFrozen => 3,
            Consistency::Application => 4,
        }
    }

    /// The level with wire value `v`.
    pub fn from_code(v: u8) -> Option<Consistency> {
        Consistency::ALL.into_iter().find(|c| c.code() == v)
    }

    /// The stable spelling used in manifests, JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::None => "none",
            Consistency::CrashHypervisor => "crash-hypervisor",
            Consistency::CrashSnapshot => "crash-snapshot",
            Consistency::CrashFrozen => "crash-frozen",
            Consistency::Application => "application",
        }
    }

    /// Parses [`Consistency::as_str`]'s spelling.
    pub fn parse(s: &str) -> Option<Consistency> {
        Consistency::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether this level satisfies a requirement.
    pub fn meets(self, required: Requirement) -> bool {
        self.rank() >= required.rank()
    }

    fn rank(self) -> u8 {
        match self {
            Consistency::None => 0,
            Consistency::CrashHypervisor
            | Consistency::CrashSnapshot
            | Consistency::CrashFrozen => 1,
            Consistency::Application => 2,
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Consistency::None => "none",
            Consistency::CrashHypervisor => "crash (hypervisor)",
            Consistency::CrashSnapshot => "crash (snapshot)",
            Consistency::CrashFrozen => "crash (frozen)",
            Consistency::Application => "application",
        })
    }
}

/// The lowest level a disk's points may have (`[[disk]] min_consistency`).
/// The crash kinds are equal for this purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Requirement {
    /// Any point is committed.
    #[default]
    None,
    /// Only crash-consistent or application-consistent points.
    Crash,
    /// Only application-consistent points.
    Application,
}

impl Requirement {
    /// Parses `none`, `crash` or `application`.
    pub fn parse(s: &str) -> Option<Requirement> {
        match s {
            "none" => Some(Requirement::None),
            "crash" => Some(Requirement::Crash),
            "application" => Some(Requirement::Application),
            _ => None,
        }
    }

    fn rank(self) -> u8 {
        match self {
            Requirement::None => 0,
            Requirement::Crash => 1,
            Requirement::Application => 2,
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Requirement::None => "none",
            Requirement::Crash => "crash",
            Requirement::Application => "application",
        })
    }
}

/// What the agent says about a point's consistency in `DiskEnd`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PointConsistency {
    /// The level reached.
    pub level: Consistency,
    /// How long the filesystems were frozen for this point, in
    /// milliseconds (0 when nothing was frozen).
    pub frozen_ms: u32,
    /// Rounds the slot took: the first copy, the pre-copy rounds and the
    /// last one.
    pub rounds: u32,
    /// Why the level is not higher, or what happened on the way (a hook that
    /// timed out, a freeze retried), for the admin; empty when there is
    /// nothing to say.
    pub note: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_spellings_round_trip() {
        for c in Consistency::ALL {
            assert_eq!(Consistency::from_code(c.code()), Some(c));
            assert_eq!(Consistency::parse(c.as_str()), Some(c));
        }
        assert_eq!(Consistency::from_code(5), None);
        assert_eq!(Consistency::parse("crash"), None);
    }

    #[test]
    fn requirements_rank_crash_kinds_equal() {
        use Consistency::*;
        for c in [CrashHypervisor, CrashSnapshot, CrashFrozen] {
            assert!(c.meets(Requirement::Crash));
            assert!(!c.meets(Requirement::Application));
        }
        assert!(!None.meets(Requirement::Crash));
        assert!(None.meets(Requirement::None));
        assert!(Application.meets(Requirement::Application));
        assert_eq!(Requirement::parse("crash"), Some(Requirement::Crash));
        assert_eq!(Requirement::parse("frozen"), Option::None);
    }
}
