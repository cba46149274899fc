//! Reading the fields of a plan's objects: the first occurrence of each
//! key, repeated keys reported, and typed values (strings, ids, integers,
//! booleans) each checked where it is read.
//!
//! Each helper reports its own problem and returns `None` (or `false`) when
//! it does, so that a caller's `None` always comes with a problem.

use std::collections::{HashMap, HashSet};

use tideline_protocol::limits::valid_id;

use super::json::{Node, Number};
use super::validate::Checker;
use super::{PlanPath, ProblemKind};

/// The fields of one object: lookups read the first occurrence of a key.
pub(super) struct Fields<'n> {
    entries: &'n [(String, Node)],
}

impl<'n> Fields<'n> {
    /// The first value under `key`.
    pub(super) fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The first value under `key`, unless it is absent or `null`.
    pub(super) fn optional(&self, key: &str) -> Option<&'n Node> {
        self.get(key).filter(|n| !matches!(n, Node::Null))
    }

    /// Each key's first occurrence, in document order.
    pub(super) fn first_occurrences(&self) -> Vec<(&'n str, &'n Node)> {
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .filter(|(k, _)| seen.insert(k.as_str()))
            .map(|(k, v)| (k.as_str(), v))
            .collect()
    }

    /// Whether the object has no keys at all.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How a repeated key of an object is reported.
pub(super) type DuplicateReport = fn(&str, usize) -> ProblemKind;

/// A key repeated in an ordinary object.
pub(super) fn duplicate_key(key: &str, count: usize) -> ProblemKind {
    ProblemKind::DuplicateKey {
        key: key.to_string(),
        count,
    }
}

/// A device name repeated under `/devices`.
pub(super) fn duplicate_device(name: &str, count: usize) -> ProblemKind {
    ProblemKind::DuplicateDeviceName {
        name: name.to_string(),
        count,
    }
}

/// A subnet name repeated under `/subnets`.
pub(super) fn duplicate_subnet(name: &str, count: usize) -> ProblemKind {
    ProblemKind::DuplicateSubnetName {
        name: name.to_string(),
        count,
    }
}

impl Checker<'_> {
    /// `node` as an object, its repeated keys reported with `duplicate`.
    pub(super) fn object<'n>(
        &mut self,
        node: &'n Node,
        path: &PlanPath,
        duplicate: DuplicateReport,
    ) -> Option<Fields<'n>> {
        let Node::Object(entries) = node else {
            let kind = ProblemKind::WrongType {
                expected: "object",
                found: node.type_name(),
            };
            self.report(path.clone(), kind);
            return None;
        };
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (k, _) in entries {
            *counts.entry(k.as_str()).or_default() += 1;
        }
        let fields = Fields { entries };
        for (k, _) in fields.first_occurrences() {
            let count = counts.get(k).copied().unwrap_or(1);
            if count > 1 {
                self.report(path.key(k), duplicate(k, count));
            }
        }
        Some(fields)
    }

    /// Reports each key of `fields` outside `allowed`; `true` if none.
    pub(super) fn known_keys_only(
        &mut self,
        fields: &Fields<'_>,
        path: &PlanPath,
        (allowed, expected): (&[&str], &'static str),
    ) -> bool {
        let mut ok = true;
        for (k, _) in fields.first_occurrences() {
            if !allowed.contains(&k) {
                let kind = ProblemKind::UnknownKey {
                    key: k.to_string(),
                    expected,
                };
                self.report(path.key(k), kind);
                ok = false;
            }
        }
        ok
    }

    /// The value of required field `key` of the object at `path`.
    pub(super) fn required<'n>(
        &mut self,
        fields: &Fields<'n>,
        key: &str,
        path: &PlanPath,
    ) -> Option<&'n Node> {
        let node = fields.get(key);
        if node.is_none() {
            let field = key.to_string();
            self.report(path.key(key), ProblemKind::Missing { field });
        }
        node
    }

    /// Required field `key` as a non-empty string.
    pub(super) fn required_text<'n>(
        &mut self,
        fields: &Fields<'n>,
        key: &str,
        path: &PlanPath,
    ) -> Option<&'n str> {
        let node = self.required(fields, key, path)?;
        self.text(node, &path.key(key))
    }

    /// A string.
    pub(super) fn string<'n>(&mut self, node: &'n Node, path: &PlanPath) -> Option<&'n str> {
        match node {
            Node::String(s) => Some(s),
            other => {
                let kind = ProblemKind::WrongType {
                    expected: "string",
                    found: other.type_name(),
                };
                self.report(path.clone(), kind);
                None
            }
        }
    }

    /// A non-empty string.
    pub(super) fn text<'n>(&mut self, node: &'n Node, path: &PlanPath) -> Option<&'n str> {
        let s = self.string(node, path)?;
        if s.is_empty() {
            self.report(path.clone(), ProblemKind::Empty);
            return None;
        }
        Some(s)
    }

    /// An agent, disk or target id ([`valid_id`]).
    pub(super) fn id<'n>(&mut self, node: &'n Node, path: &PlanPath) -> Option<&'n str> {
        let s = self.string(node, path)?;
        if !valid_id(s) {
            let value = s.to_string();
            self.report(path.clone(), ProblemKind::InvalidId { value });
            return None;
        }
        Some(s)
    }

    /// A non-negative integer; `2.0` and `1e3` are refused as not integers.
    pub(super) fn unsigned(&mut self, node: &Node, path: &PlanPath) -> Option<u64> {
        let kind = match node {
            Node::Number(Number::Unsigned(n)) => return Some(*n),
            Node::Number(n) => ProblemKind::NotUnsignedInteger {
                found: n.to_string(),
            },
            other => ProblemKind::WrongType {
                expected: "non-negative integer",
                found: other.type_name(),
            },
        };
        self.report(path.clone(), kind);
        None
    }

    /// A boolean.
    pub(super) fn boolean(&mut self, node: &Node, path: &PlanPath) -> Option<bool> {
        match node {
            Node::Bool(b) => Some(*b),
            other => {
                let kind = ProblemKind::WrongType {
                    expected: "boolean",
                    found: other.type_name(),
                };
                self.report(path.clone(), kind);
                None
            }
        }
    }
}
