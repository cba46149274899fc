//! Checking a plan document and building its [`FailbackPlan`].
//!
//! One pass over the document model: each section is checked field by
//! field, every problem is recorded with its path and checking goes on, so
//! that one run lists everything an operator has to fix. Cross-references
//! (a port's subnet, device ids, failback targets, addresses) are checked
//! against tables built along the way; replicas are asked of the store.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;

use super::fields::{duplicate_device, duplicate_key, duplicate_subnet, Fields};
use super::json::{self, Node};
use super::{
    Cidr, FailbackPlan, PathSegment, PlanDevice, PlanDisk, PlanErrors, PlanPath, PlanProblem,
    ProblemKind, ReplicaLookup, MAX_PLAN_LEN,
};

/// Keys of a device's `failback` section, the only ones allowed there.
const FAILBACK_KEYS: (&[&str], &str) = (&["agent", "disks"], "agent, disks");
/// Keys of one entry of `failback.disks`.
const DISK_KEYS: (&[&str], &str) = (
    &["replica", "point", "target", "force"],
    "replica, point, target, force",
);
/// Keys of a disk's `replica`.
const REPLICA_KEYS: (&[&str], &str) = (&["agent", "disk"], "agent, disk");

/// Reads `doc_text` as a DR plan with failback sections, checks it, and
/// resolves each disk's replica point through `replicas`.
///
/// Returns the plan, its devices in rank order, or every problem found
/// (see `docs/dr-plan.md` for the checks). Text longer than
/// [`MAX_PLAN_LEN`] is refused before it is parsed.
pub fn validate(doc_text: &str, replicas: &dyn ReplicaLookup) -> Result<FailbackPlan, PlanErrors> {
    let root = PlanPath::root();
    if doc_text.len() > MAX_PLAN_LEN {
        return Err(PlanErrors::new(vec![PlanProblem {
            path: root,
            kind: ProblemKind::TooLarge {
                len: doc_text.len(),
                max: MAX_PLAN_LEN,
            },
        }]));
    }
    let doc = json::parse(doc_text).map_err(|e| {
        PlanErrors::new(vec![PlanProblem {
            path: PlanPath::root(),
            kind: ProblemKind::InvalidJson {
                line: e.line,
                column: e.column,
                reason: e.reason,
            },
        }])
    })?;
    let mut checker = Checker {
        replicas,
        problems: Vec::new(),
        device_ids: HashMap::new(),
        targets: HashMap::new(),
        addresses: HashMap::new(),
    };
    let plan = checker.plan(&doc);
    let mut problems = checker.problems;
    match plan {
        Some(plan) if problems.is_empty() => Ok(plan),
        _ => {
            in_document_order(&mut problems, &doc);
            Err(PlanErrors::new(problems))
        }
    }
}

/// Orders problems by the position of their top-level section in the
/// document (problems about the whole document first, about absent
/// sections last), keeping the reading order within a section.
fn in_document_order(problems: &mut [PlanProblem], doc: &Node) {
    let keys: Vec<&str> = match doc {
        Node::Object(entries) => entries.iter().map(|(k, _)| k.as_str()).collect(),
        _ => Vec::new(),
    };
    problems.sort_by_key(|p| match p.path.segments().first() {
        None => 0,
        Some(PathSegment::Key(k)) => keys
            .iter()
            .position(|x| x == k)
            .map_or(usize::MAX, |i| i + 1),
        Some(PathSegment::Index(_)) => usize::MAX,
    });
}

/// The subnets by name: the network of each, `None` where its `cidr` is
/// missing or invalid (already reported; addresses in it go unchecked).
type SubnetTable<'n> = HashMap<&'n str, Option<Cidr>>;

/// The state of one validation.
pub(super) struct Checker<'l> {
    replicas: &'l dyn ReplicaLookup,
    problems: Vec<PlanProblem>,
    /// Device id -> name of the first device that has it.
    device_ids: HashMap<String, String>,
    /// (failback agent, target) -> path of the first disk entry writing it.
    targets: HashMap<(String, String), PlanPath>,
    /// (subnet, address) -> path of the first port `ip` that has it.
    addresses: HashMap<(String, IpAddr), PlanPath>,
}

impl Checker<'_> {
    pub(super) fn report(&mut self, path: PlanPath, kind: ProblemKind) {
        self.problems.push(PlanProblem { path, kind });
    }

    /// The whole document. `None` means a problem was reported.
    fn plan(&mut self, doc: &Node) -> Option<FailbackPlan> {
        let root = PlanPath::root();
        let top = self.object(doc, &root, duplicate_key)?;
        let subnets = self.subnets(&top, &root);
        let devices = self.devices(&top, &root, subnets.as_ref());
        let project_name = match top.optional("project_name") {
            None => Some(None),
            Some(n) => self.string(n, &root.key("project_name")).map(Some),
        };
        Some(FailbackPlan::new(
            devices?,
            project_name?.map(str::to_string),
        ))
    }

    /// `/subnets`; `None` if it is missing or not an object, in which case
    /// port subnets go unchecked (one problem, not one per port).
    fn subnets<'n>(&mut self, top: &Fields<'n>, root: &PlanPath) -> Option<SubnetTable<'n>> {
        let path = root.key("subnets");
        let node = self.required(top, "subnets", root)?;
        let subnets = self.object(node, &path, duplicate_subnet)?;
        let mut table = HashMap::new();
        for (name, node) in subnets.first_occurrences() {
            let cidr = self.subnet(node, &path.key(name));
            table.insert(name, cidr);
        }
        Some(table)
    }

    /// One subnet; its network if `cidr` is valid.
    fn subnet(&mut self, node: &Node, path: &PlanPath) -> Option<Cidr> {
        let fields = self.object(node, path, duplicate_key)?;
        for key in ["subnet_id", "name"] {
            if let Some(n) = fields.optional(key) {
                self.string(n, &path.key(key));
            }
        }
        let cidr_path = path.key("cidr");
        let text = self
            .required(&fields, "cidr", path)
            .and_then(|n| self.string(n, &cidr_path))?;
        match text.parse::<Cidr>() {
            Ok(cidr) => Some(cidr),
            Err(reason) => {
                let value = text.to_string();
                self.report(cidr_path, ProblemKind::InvalidCidr { value, reason });
                None
            }
        }
    }

    /// `/devices`: every device, or `None` if any problem was reported.
    fn devices(
        &mut self,
        top: &Fields<'_>,
        root: &PlanPath,
        subnets: Option<&SubnetTable<'_>>,
    ) -> Option<Vec<PlanDevice>> {
        let path = root.key("devices");
        let node = self.required(top, "devices", root)?;
        let devices = self.object(node, &path, duplicate_device)?;
        if devices.is_empty() {
            self.report(path, ProblemKind::Empty);
            return None;
        }
        let mut out = Vec::new();
        let mut complete = true;
        for (name, node) in devices.first_occurrences() {
            let before = self.problems.len();
            match self.device(name, node, &path.key(name), subnets) {
                Some(device) => out.push(device),
                None => {
                    // Every `None` comes with a problem, so no device is
                    // ever dropped from a plan that validates.
                    debug_assert!(self.problems.len() > before);
                    complete = false;
                }
            }
        }
        complete.then_some(out)
    }

    /// One device under `path` (`/devices/<name>`).
    fn device(
        &mut self,
        name: &str,
        node: &Node,
        path: &PlanPath,
        subnets: Option<&SubnetTable<'_>>,
    ) -> Option<PlanDevice> {
        let fields = self.object(node, path, duplicate_key)?;
        let id = self.required_text(&fields, "id", path);
        if let Some(id) = id {
            match self.device_ids.entry(id.to_string()) {
                Entry::Occupied(first) => {
                    let kind = ProblemKind::DuplicateDeviceId {
                        id: id.to_string(),
                        first: first.get().clone(),
                    };
                    self.report(path.key("id"), kind);
                }
                Entry::Vacant(slot) => {
                    slot.insert(name.to_string());
                }
            }
        }
        let rank_path = path.key("rank");
        let rank = self
            .required(&fields, "rank", path)
            .and_then(|n| self.unsigned(n, &rank_path));
        // The seed documentation's parameter table spells it `flavour`;
        // its examples, and the clouds, use `flavor`.
        let flavor = match fields.get("flavor") {
            Some(n) => self.text(n, &path.key("flavor")),
            None => {
                let kind = match fields.get("flavour") {
                    Some(_) => ProblemKind::Misspelled {
                        field: "flavor".into(),
                        found: "flavour".into(),
                    },
                    None => ProblemKind::Missing {
                        field: "flavor".into(),
                    },
                };
                self.report(path.key("flavor"), kind);
                None
            }
        };
        let ports = self.ports(&fields, path, subnets);
        let failback_path = path.key("failback");
        let failback = self
            .required(&fields, "failback", path)
            .and_then(|n| self.failback(n, &failback_path));
        let (failback_agent, disks) = failback?;
        flavor?;
        ports.then_some(())?;
        Some(PlanDevice {
            name: name.to_string(),
            id: id?.to_string(),
            rank: rank?,
            failback_agent,
            disks,
        })
    }

    /// A device's `ports`, a list or an object keyed by port name; `true`
    /// if no problem was found.
    fn ports(
        &mut self,
        device: &Fields<'_>,
        device_path: &PlanPath,
        subnets: Option<&SubnetTable<'_>>,
    ) -> bool {
        let path = device_path.key("ports");
        let Some(node) = self.required(device, "ports", device_path) else {
            return false;
        };
        let mut ok = true;
        match node {
            Node::Array(items) => {
                if items.is_empty() {
                    self.report(path.clone(), ProblemKind::Empty);
                    ok = false;
                }
                let mut names: HashMap<&str, usize> = HashMap::new();
                for (i, item) in items.iter().enumerate() {
                    let (port_ok, name) = self.port(item, &path.index(i), None, subnets);
                    ok &= port_ok;
                    let Some(name) = name else { continue };
                    match names.entry(name) {
                        Entry::Occupied(first) => {
                            let kind = ProblemKind::DuplicatePortName {
                                name: name.to_string(),
                                first: *first.get(),
                            };
                            self.report(path.index(i).key("name"), kind);
                            ok = false;
                        }
                        Entry::Vacant(slot) => {
                            slot.insert(i);
                        }
                    }
                }
            }
            Node::Object(_) => {
                let Some(ports) = self.object(node, &path, duplicate_key) else {
                    return false;
                };
                if ports.is_empty() {
                    self.report(path.clone(), ProblemKind::Empty);
                    ok = false;
                }
                for (key, item) in ports.first_occurrences() {
                    ok &= self.port(item, &path.key(key), Some(key), subnets).0;
                }
            }
            other => {
                let kind = ProblemKind::WrongType {
                    expected: "array or object",
                    found: other.type_name(),
                };
                self.report(path, kind);
                ok = false;
            }
        }
        ok
    }

    /// One port; `key` is its key in the object form. Returns whether it
    /// is sound, and its name in the list form (for the duplicate check).
    fn port<'n>(
        &mut self,
        node: &'n Node,
        path: &PlanPath,
        key: Option<&str>,
        subnets: Option<&SubnetTable<'_>>,
    ) -> (bool, Option<&'n str>) {
        let before = self.problems.len();
        let Some(fields) = self.object(node, path, duplicate_key) else {
            return (false, None);
        };
        let name = match key {
            None => self.required_text(&fields, "name", path),
            Some(key) => {
                if let Some(n) = fields.optional("name") {
                    match self.string(n, &path.key("name")) {
                        Some(name) if name != key => {
                            let kind = ProblemKind::PortNameMismatch {
                                name: name.to_string(),
                                key: key.to_string(),
                            };
                            self.report(path.key("name"), kind);
                        }
                        _ => {}
                    }
                }
                None
            }
        };
        let subnet_path = path.key("subnet");
        let subnet = self.required_text(&fields, "subnet", path);
        let mut cidr = None;
        if let (Some(subnet), Some(table)) = (subnet, subnets) {
            match table.get(subnet) {
                Some(c) => cidr = *c,
                None => {
                    let subnet = subnet.to_string();
                    self.report(subnet_path, ProblemKind::UnknownSubnet { subnet });
                }
            }
        }
        if let Some(n) = fields.optional("ip") {
            let ip_path = path.key("ip");
            if let Some(text) = self.string(n, &ip_path) {
                match text.parse::<IpAddr>() {
                    Err(_) => {
                        let value = text.to_string();
                        self.report(ip_path, ProblemKind::InvalidIp { value });
                    }
                    Ok(ip) => self.address(ip, ip_path, subnet, cidr),
                }
            }
        }
        (self.problems.len() == before, name)
    }

    /// A port's address `ip` (at `path`) in `subnet` of network `cidr`:
    /// inside the network, and not claimed by another port of the subnet.
    fn address(&mut self, ip: IpAddr, path: PlanPath, subnet: Option<&str>, cidr: Option<Cidr>) {
        let Some(subnet) = subnet else { return };
        if let Some(cidr) = cidr.filter(|c| !c.contains(ip)) {
            let kind = ProblemKind::IpOutsideSubnet {
                ip: ip.to_string(),
                subnet: subnet.to_string(),
                cidr: cidr.to_string(),
            };
            self.report(path.clone(), kind);
        }
        match self.addresses.entry((subnet.to_string(), ip)) {
            Entry::Occupied(first) => {
                let kind = ProblemKind::DuplicateIp {
                    ip: ip.to_string(),
                    subnet: subnet.to_string(),
                    first: first.get().clone(),
                };
                self.report(path, kind);
            }
            Entry::Vacant(slot) => {
                slot.insert(path);
            }
        }
    }

    /// A device's `failback` section: its agent and disks.
    fn failback(&mut self, node: &Node, path: &PlanPath) -> Option<(String, Vec<PlanDisk>)> {
        let fields = self.object(node, path, duplicate_key)?;
        let mut ok = self.known_keys_only(&fields, path, FAILBACK_KEYS);
        let agent_path = path.key("agent");
        let agent = self
            .required(&fields, "agent", path)
            .and_then(|n| self.id(n, &agent_path));
        let disks_path = path.key("disks");
        let items = match self.required(&fields, "disks", path) {
            None => None,
            Some(Node::Array(items)) => Some(items),
            Some(other) => {
                let kind = ProblemKind::WrongType {
                    expected: "array",
                    found: other.type_name(),
                };
                self.report(disks_path.clone(), kind);
                None
            }
        };
        let mut disks = Vec::new();
        match items {
            None => ok = false,
            Some(items) if items.is_empty() => {
                self.report(disks_path, ProblemKind::Empty);
                ok = false;
            }
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    match self.failback_disk(item, &disks_path.index(i), agent) {
                        Some(disk) => disks.push(disk),
                        None => ok = false,
                    }
                }
            }
        }
        let agent = agent?;
        ok.then(|| (agent.to_string(), disks))
    }

    /// One entry of `failback.disks`, written by failback agent `agent`.
    fn failback_disk(
        &mut self,
        node: &Node,
        path: &PlanPath,
        agent: Option<&str>,
    ) -> Option<PlanDisk> {
        let fields = self.object(node, path, duplicate_key)?;
        let known = self.known_keys_only(&fields, path, DISK_KEYS);
        let replica_path = path.key("replica");
        let replica = self
            .required(&fields, "replica", path)
            .and_then(|n| self.replica(n, &replica_path));
        // Outer `None`: `point` is invalid; inner `None`: the latest point.
        let point = match fields.optional("point") {
            None => Some(None),
            Some(n) => self.unsigned(n, &path.key("point")).map(Some),
        };
        let target_path = path.key("target");
        let target = self
            .required(&fields, "target", path)
            .and_then(|n| self.id(n, &target_path));
        let force = match fields.optional("force") {
            None => Some(false),
            Some(n) => self.boolean(n, &path.key("force")),
        };
        if let (Some(agent), Some(target)) = (agent, target) {
            match self.targets.entry((agent.to_string(), target.to_string())) {
                Entry::Occupied(first) => {
                    let kind = ProblemKind::DuplicateTarget {
                        agent: agent.to_string(),
                        target: target.to_string(),
                        first: first.get().clone(),
                    };
                    self.report(target_path, kind);
                }
                Entry::Vacant(slot) => {
                    slot.insert(path.clone());
                }
            }
        }
        let ((replica_agent, replica_disk), requested_point) = (replica?, point?);
        let found = match self
            .replicas
            .find_point(replica_agent, replica_disk, requested_point)
        {
            Ok(Some(found)) => Some(found),
            Ok(None) => {
                let kind = ProblemKind::MissingReplica {
                    agent: replica_agent.to_string(),
                    disk: replica_disk.to_string(),
                    point: requested_point,
                };
                self.report(replica_path, kind);
                None
            }
            Err(e) => {
                let kind = ProblemKind::LookupFailed {
                    agent: replica_agent.to_string(),
                    disk: replica_disk.to_string(),
                    reason: e.to_string(),
                };
                self.report(replica_path, kind);
                None
            }
        }?;
        known.then_some(())?;
        Some(PlanDisk {
            replica_agent: replica_agent.to_string(),
            replica_disk: replica_disk.to_string(),
            requested_point,
            point: found.point,
            disk_size: found.disk_size,
            target: target?.to_string(),
            force: force?,
        })
    }

    /// A disk's `replica`: the lineage's agent and disk ids.
    fn replica<'n>(&mut self, node: &'n Node, path: &PlanPath) -> Option<(&'n str, &'n str)> {
        let fields = self.object(node, path, duplicate_key)?;
        let known = self.known_keys_only(&fields, path, REPLICA_KEYS);
        let agent_path = path.key("agent");
        let agent = self
            .required(&fields, "agent", path)
            .and_then(|n| self.id(n, &agent_path));
        let disk_path = path.key("disk");
        let disk = self
            .required(&fields, "disk", path)
            .and_then(|n| self.id(n, &disk_path));
        known.then_some(())?;
        Some((agent?, disk?))
    }
}
