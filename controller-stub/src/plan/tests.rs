//! Plan validation tests: the seed documentation's plan shapes extended
//! with failback sections, every check with its exact path and message, and
//! the store as a replica lookup.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::*;

const GIB: u64 = 1 << 30;

/// A replica lookup over a fixed table; records what it was asked.
#[derive(Default)]
struct Replicas {
    /// (agent, disk) -> committed point ids, ascending.
    points: BTreeMap<(String, String), Vec<PointId>>,
    /// A lineage whose lookup fails as a store error would.
    broken: Option<(String, String)>,
    asked: RefCell<Vec<String>>,
}

impl Replicas {
    fn with(mut self, agent: &str, disk: &str, points: &[PointId]) -> Replicas {
        self.points
            .insert((agent.into(), disk.into()), points.to_vec());
        self
    }

    fn broken(mut self, agent: &str, disk: &str) -> Replicas {
        self.broken = Some((agent.into(), disk.into()));
        self
    }
}

impl ReplicaLookup for Replicas {
    fn find_point(
        &self,
        agent: &str,
        disk: &str,
        point: Option<PointId>,
    ) -> Result<Option<ReplicaPoint>, StoreError> {
        self.asked
            .borrow_mut()
            .push(format!("{agent}/{disk}@{point:?}"));
        let key = (agent.to_string(), disk.to_string());
        if self.broken.as_ref() == Some(&key) {
            return Err(StoreError::Io {
                path: "/store/points".into(),
                source: std::io::Error::other("disk on fire"),
            });
        }
        let Some(points) = self.points.get(&key) else {
            return Ok(None);
        };
        let found = match point {
            None => points.last().copied(),
            Some(p) => points.iter().copied().find(|&x| x == p),
        };
        Ok(found.map(|point| ReplicaPoint {
            point,
            disk_size: 10 * GIB + point,
        }))
    }
}

/// The lineages the seed-shaped plans pull from.
fn seed_replicas() -> Replicas {
    Replicas::default()
        .with("cloud-iis", "disk0", &[3, 4, 5])
        .with("cloud-iis", "disk1", &[5])
        .with("cloud-rhel", "disk0", &[1, 2])
        .with("cloud-db01", "disk0", &[9])
        .with("cloud-web01", "disk0", &[7, 8])
}

/// The problems of a plan that must not validate, one line each.
fn problems(doc: &str, replicas: &dyn ReplicaLookup) -> Vec<String> {
    match validate(doc, replicas) {
        Ok(plan) => panic!("validated: {plan:?}"),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

fn valid(doc: &str, replicas: &dyn ReplicaLookup) -> FailbackPlan {
    validate(doc, replicas).unwrap_or_else(|e| panic!("problems:\n{e}"))
}

/// A minimal sound device on `main` (192.168.15.0/24) with one disk.
fn device(id: &str, rank: u64, agent: &str, replica: (&str, &str), target: &str) -> Value {
    json!({
        "id": id, "rank": rank, "flavor": "2-4",
        "ports": [{"name": "port_0", "subnet": "main"}],
        "failback": {"agent": agent, "disks": [
            {"replica": {"agent": replica.0, "disk": replica.1}, "target": target}
        ]}
    })
}

fn main_subnet() -> Value {
    json!({"main": {"cidr": "192.168.15.0/24", "subnet_id": "eda47a07"}})
}

fn names(plan: &FailbackPlan) -> Vec<&str> {
    plan.devices().iter().map(|d| d.name.as_str()).collect()
}

/// The seed's "Example of a Disaster Recovery plan", extended with
/// failback sections. Two changes make it valid under its own rules: each
/// device gets the `flavor` the parameter table requires, and the subnet
/// `external` that `port_1` refers to is defined.
const SEED_EXAMPLE: &str = r#"{
"devices": {
"IIS_Acura-Demo": {
"rank": 1,
"id": "52ce9361-b282-72b6-425a-f67347c5b79a",
"flavor": "2-4",
"ports": [
{ "name": "port_0", "ip": "192.168.15.112", "subnet": "main_subnet" },
{ "name": "port_1", "subnet": "external" }
],
"failback": {
"agent": "prod-iis",
"disks": [
{ "replica": { "agent": "cloud-iis", "disk": "disk0" }, "target": "disk0" },
{ "replica": { "agent": "cloud-iis", "disk": "disk1" }, "point": 5, "target": "disk1", "force": true }
]
}
},
"rhel7.2": {
"id": "522f3448-6a56-aa45-2131-207f7dda6664",
"flavor": "m1.medium",
"ports": [
{ "name": "port_0", "ip": "192.168.15.100", "subnet": "main_subnet" }
],
"rank": 0,
"boot_condition": { "delay_seconds": 120, "type": "wait" },
"failback": {
"agent": "prod-rhel",
"disks": [ { "replica": { "agent": "cloud-rhel", "disk": "disk0" }, "point": 1, "target": "sda", "force": false } ]
}
}
},
"subnets": {
"main_subnet": { "cidr": "192.168.15.0/24", "subnet_id": "eda47a07-d1dd-4aca-ae8f-c652e997008e" },
"external": { "cidr": "203.0.113.0/24", "subnet_id": "ext-net" }
}
}"#;

#[test]
fn seed_example_validates_in_rank_order() {
    let plan = valid(SEED_EXAMPLE, &seed_replicas());
    assert_eq!(names(&plan), ["rhel7.2", "IIS_Acura-Demo"]);
    assert_eq!(plan.project_name(), None);
    let rhel = &plan.devices()[0];
    assert_eq!(rhel.id, "522f3448-6a56-aa45-2131-207f7dda6664");
    assert_eq!((rhel.rank, rhel.failback_agent.as_str()), (0, "prod-rhel"));
    assert_eq!(
        rhel.disks,
        [PlanDisk {
            replica_agent: "cloud-rhel".into(),
            replica_disk: "disk0".into(),
            requested_point: Some(1),
            point: 1,
            disk_size: 10 * GIB + 1,
            target: "sda".into(),
            force: false,
        }]
    );
    let iis = &plan.devices()[1];
    assert_eq!(iis.rank, 1);
    // The latest point when none is asked for; disks keep their order.
    let disks: Vec<_> = iis
        .disks
        .iter()
        .map(|d| {
            (
                d.replica_disk.as_str(),
                d.requested_point,
                d.point,
                d.target.as_str(),
                d.force,
            )
        })
        .collect();
    assert_eq!(
        disks,
        [
            ("disk0", None, 5, "disk0", false),
            ("disk1", Some(5), 5, "disk1", true)
        ]
    );
    let stages: Vec<Vec<&str>> = plan
        .stages()
        .iter()
        .map(|s| s.iter().map(|d| d.name.as_str()).collect())
        .collect();
    assert_eq!(stages, [["rhel7.2"], ["IIS_Acura-Demo"]]);
}

/// The seed's "Syntax of machine description" example: ports in object
/// form and many optional keys, all allowed as they are.
#[test]
fn seed_machine_description_with_object_ports_validates() {
    let doc = r##"{
"devices": {
"rhel7.2": {
"id": "522f3448-6a56-aa45-2131-207f7dda6664",
"custom_image_metadata": { "hw_qemu_guest_agent": "no", "hw_disk_bus": "scsi" },
"security_groups": [ "sg-1", "sg-2" ],
"availability_zone": "zone-1",
"user_data": "#!/bin/bash\nrpm -e hlragent\nrm -rf /etc/hystax\n",
"config_drive": "true",
"meta": { "Image Name": "Hystax_CATI_", "Image": "image" },
"flavor": "m1.medium",
"ports": { "port_0": { "ip": "192.168.15.100", "subnet": "main_subnet" },
           "port_1": { "name": "port_1", "subnet": "main_subnet", "floating_ip": true } },
"rank": 0,
"boot_condition": { "delay_seconds": 120, "type": "wait" },
"failback": { "agent": "prod-rhel", "disks": [ { "replica": { "agent": "cloud-rhel", "disk": "disk0" }, "target": "sda" } ] }
}
},
"subnets": { "main_subnet": { "cidr": "192.168.15.0/24", "subnet_id": "eda47a07-d1dd-4aca-ae8f-c652e997008e" } },
"project_name": "acura_project"
}"##;
    let plan = valid(doc, &seed_replicas());
    assert_eq!(names(&plan), ["rhel7.2"]);
    assert_eq!(plan.project_name(), Some("acura_project"));
    assert_eq!(plan.devices()[0].disks[0].point, 2);
}

/// The seed's Windows static-address, VMware and `ntp_server` examples:
/// mac, gateway, DNS servers, mtu, a subnet without `subnet_id`.
#[test]
fn seed_windows_and_vmware_examples_validate() {
    let doc = r#"{
"devices": {
"DS2012R2MULMBR": {
"id": "9f51d0de-b6cb-400e-b223-5e748cc39d01", "flavor": "m1.medium", "rank": 0,
"hostname": "my-super-long-custom-hostname",
"ports": [ { "name": "port_0", "ip": "172.22.8.249", "mac": "08:00:27:46:79:29",
  "gateway_ip": "172.22.1.2", "dns_nameservers": [ "172.22.1.2", "8.8.4.4" ], "mtu": 1511,
  "subnet": "DS-internal-2" } ],
"failback": { "agent": "prod-ds2012", "disks": [ { "replica": { "agent": "cloud-iis", "disk": "disk0" }, "target": "c" } ] }
},
"ubuntu-small": {
"id": "52560751-12ca-9b0e-db00-02cb718a138a", "guest_id": "centos64Guest", "hardware_ver": "vmx-11",
"flavor": "1-2", "rank": 0,
"ports": [ { "name": "port_0", "mac": "de:ad:be:ef:15:89", "subnet": "net" } ],
"failback": { "agent": "esxi-01", "disks": [ { "replica": { "agent": "cloud-web01", "disk": "disk0" }, "target": "ubuntu-small.vmdk", "point": null, "force": null } ] }
},
"im-WS2019-ntp": {
"flavor": "m1.medium", "ports": [ { "name": "port_0", "subnet": "provider-subnet" } ],
"id": "52eef058-012b-70dd-9271-28ee5f56d171", "rank": 0, "ntp_server": "ntp6.ntp-servers.net",
"failback": { "agent": "esxi-01", "disks": [ { "replica": { "agent": "cloud-db01", "disk": "disk0" }, "target": "ws2019.vmdk" } ] }
}
},
"subnets": {
"DS-internal-2": { "name": "DS-internal-2", "subnet_id": "76377dae-4e35-4183-bafa-b06eef69249e", "cidr": "172.22.0.0/16" },
"net": { "name": "net", "subnet_id": "VM Network", "cidr": "172.22.0.0/16" },
"provider-subnet": { "name": "provider-subnet", "cidr": "172.24.1.0/24" }
}
}"#;
    let plan = valid(doc, &seed_replicas());
    // All rank 0: one stage, in name byte order (upper case first).
    assert_eq!(
        names(&plan),
        ["DS2012R2MULMBR", "im-WS2019-ntp", "ubuntu-small"]
    );
    assert_eq!(plan.stages().len(), 1);
    // `null` optional fields take their defaults.
    let ubuntu = &plan.devices()[2];
    assert_eq!(ubuntu.disks[0].requested_point, None);
    assert_eq!(ubuntu.disks[0].point, 8);
    assert!(!ubuntu.disks[0].force);
}

#[test]
fn many_problems_are_all_reported_with_their_paths() {
    let doc = r#"{
  "devices": {
    "web01": {
      "id": "dup-id",
      "rank": -1,
      "flavour": "2-4",
      "ports": [
        {"name": "port_0", "subnet": "main", "ip": "10.0.0.5"},
        {"name": "port_0", "subnet": "nowhere", "ip": "not-an-ip"},
        {"subnet": "v6", "ip": "192.168.15.7"}
      ],
      "failback": {
        "agent": "prod web01",
        "disks": [
          {"replica": {"agent": "cloud-web01", "disk": "disk0"}, "target": "disk0", "point": 1.5, "force": "yes"},
          {"replica": {"agent": "cloud-web01"}, "target": "disk1", "pointt": 3}
        ]
      }
    },
    "db01": {
      "id": "dup-id",
      "rank": "0",
      "flavor": "",
      "ports": {},
      "failback": {"agent": "prod-db01", "disks": [
        {"replica": {"agent": "cloud-db01", "disk": "disk0"}, "target": "disk0"},
        {"replica": {"agent": "cloud-db01", "disk": "disk9"}, "target": "disk0", "point": 4}
      ]}
    },
    "app01": {"id": "app", "rank": 0, "flavor": "2-4", "ports": [{"name": "p", "subnet": "main"}],
              "failback": {"agent": "prod-app01", "disks": []}},
    "cache01": "not an object"
  },
  "subnets": {
    "main": {"cidr": "192.168.15.0/24", "subnet_id": 42},
    "v6": {"cidr": "2001:db8::/64"},
    "bad": {"cidr": "10.0.0.1/8"},
    "worse": {"cidr": "10.0.0.0/33"},
    "none": {"subnet_id": "x"}
  },
  "project_name": 7
}"#;
    let replicas = seed_replicas();
    let expected = [
        "/devices/web01/rank: expected a non-negative integer, found -1",
        "/devices/web01/flavor: missing required field `flavor` (found `flavour`; the key is spelled `flavor`)",
        "/devices/web01/ports/0/ip: 10.0.0.5 is outside subnet `main` (192.168.15.0/24)",
        "/devices/web01/ports/1/subnet: subnet `nowhere` is not defined under /subnets",
        "/devices/web01/ports/1/ip: `not-an-ip` is not an IP address",
        "/devices/web01/ports/1/name: port name `port_0` is also the name of port 0",
        "/devices/web01/ports/2/name: missing required field `name`",
        "/devices/web01/ports/2/ip: 192.168.15.7 is outside subnet `v6` (2001:db8::/64)",
        "/devices/web01/failback/agent: `prod web01` is not a valid id (1 to 128 ASCII letters, digits, `.`, `_` or `-`, not starting with `.`)",
        "/devices/web01/failback/disks/0/point: expected a non-negative integer, found 1.5",
        "/devices/web01/failback/disks/0/force: expected boolean, found string",
        "/devices/web01/failback/disks/1/pointt: unknown key `pointt` (expected one of: replica, point, target, force)",
        "/devices/web01/failback/disks/1/replica/disk: missing required field `disk`",
        "/devices/db01/id: device id `dup-id` is also the id of device `web01`",
        "/devices/db01/rank: expected non-negative integer, found string",
        "/devices/db01/flavor: must not be empty",
        "/devices/db01/ports: must not be empty",
        "/devices/db01/failback/disks/1/target: target `disk0` of failback agent `prod-db01` is also written by /devices/db01/failback/disks/0",
        "/devices/db01/failback/disks/1/replica: replica `cloud-db01/disk9` has no point 4 in the store",
        "/devices/app01/failback/disks: must not be empty",
        "/devices/cache01: expected object, found string",
        "/subnets/main/subnet_id: expected string, found number",
        "/subnets/bad/cidr: `10.0.0.1/8` is not a valid CIDR: host bits are set past the prefix (the network is 10.0.0.0/8)",
        "/subnets/worse/cidr: `10.0.0.0/33` is not a valid CIDR: prefix length 33 is larger than 32",
        "/subnets/none/cidr: missing required field `cidr`",
        "/project_name: expected string, found number",
    ];
    assert_eq!(problems(doc, &replicas), expected);
    // Only well-formed replica references reach the store.
    assert_eq!(
        *replicas.asked.borrow(),
        ["cloud-db01/disk0@None", "cloud-db01/disk9@Some(4)"]
    );
}

#[test]
fn problems_follow_the_order_of_top_level_sections() {
    // Raw text: `json!` objects may not keep insertion order.
    let doc = r#"{
        "subnets": {"main": {"cidr": "192.168.15.0/33"}},
        "devices": {"a": {"id": "a", "rank": 0, "flavor": "1-2", "ports": [{"name": "p", "subnet": "main"}]}}
    }"#;
    assert_eq!(
        problems(doc, &seed_replicas()),
        [
            "/subnets/main/cidr: `192.168.15.0/33` is not a valid CIDR: prefix length 33 is larger than 32",
            "/devices/a/failback: missing required field `failback`",
        ]
    );
}

#[test]
fn duplicate_device_names_are_reported_not_replaced() {
    let dev = |id: &str, target: &str| {
        device(id, 0, "prod", ("cloud-web01", "disk0"), target).to_string()
    };
    // serde_json::Value would keep only the last `web01`; the plan reader
    // sees all three.
    let doc = format!(
        r#"{{"devices": {{"web01": {}, "db01": {}, "web01": {}, "web01": {}}}, "subnets": {}}}"#,
        dev("w1", "t1"),
        dev("d1", "t2"),
        dev("w2", "t3"),
        dev("w3", "t4"),
        main_subnet()
    );
    assert_eq!(
        problems(&doc, &seed_replicas()),
        ["/devices/web01: device `web01` is defined 3 times"]
    );
}

#[test]
fn duplicate_device_ids_are_reported() {
    let doc = json!({
        "devices": {
            "a": device("same", 0, "prod-a", ("cloud-web01", "disk0"), "disk0"),
            "b": device("other", 0, "prod-b", ("cloud-web01", "disk0"), "disk0"),
            "c": device("same", 1, "prod-c", ("cloud-web01", "disk0"), "disk0"),
        },
        "subnets": main_subnet(),
    });
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        ["/devices/c/id: device id `same` is also the id of device `a`"]
    );
}

#[test]
fn duplicate_keys_anywhere_checked_are_reported() {
    let doc = r#"{
  "devices": {"a": {"id": "a", "rank": 0, "rank": 5, "flavor": "1-2",
    "ports": {"p": {"subnet": "main"}, "p": {"subnet": "main"}},
    "failback": {"agent": "prod", "disks": [{"replica": {"agent": "cloud-web01", "disk": "disk0", "disk": "disk1"}, "target": "t"}]}}},
  "subnets": {"main": {"cidr": "192.168.15.0/24"}, "main": {"cidr": "10.0.0.0/8"}},
  "subnets": {}
}"#;
    assert_eq!(
        problems(doc, &seed_replicas()),
        [
            "/devices/a/rank: key `rank` appears 2 times; only the first is read",
            "/devices/a/ports/p: key `p` appears 2 times; only the first is read",
            "/devices/a/failback/disks/0/replica/disk: key `disk` appears 2 times; only the first is read",
            "/subnets: key `subnets` appears 2 times; only the first is read",
            "/subnets/main: subnet `main` is defined 2 times",
        ]
    );
}

#[test]
fn devices_are_ordered_by_rank_then_name_and_staged() {
    let doc = json!({
        "devices": {
            "zeta": device("1", 2, "p1", ("cloud-web01", "disk0"), "t1"),
            "beta": device("2", 0, "p2", ("cloud-web01", "disk0"), "t2"),
            "alpha": device("3", 5, "p3", ("cloud-web01", "disk0"), "t3"),
            "Gamma": device("4", 0, "p4", ("cloud-web01", "disk0"), "t4"),
            "delta": device("5", 2, "p5", ("cloud-web01", "disk0"), "t5"),
        },
        "subnets": main_subnet(),
    });
    let plan = valid(&doc.to_string(), &seed_replicas());
    assert_eq!(names(&plan), ["Gamma", "beta", "delta", "zeta", "alpha"]);
    let stages: Vec<Vec<(u64, &str)>> = plan
        .stages()
        .iter()
        .map(|s| s.iter().map(|d| (d.rank, d.name.as_str())).collect())
        .collect();
    // Ranks 0, 2, 5: three stages, no empty stage for the missing ranks.
    assert_eq!(
        stages,
        [
            vec![(0, "Gamma"), (0, "beta")],
            vec![(2, "delta"), (2, "zeta")],
            vec![(5, "alpha")],
        ]
    );
}

#[test]
fn ranks_must_be_non_negative_integers() {
    for (rank, message) in [
        (json!(2.0), "expected a non-negative integer, found 2.0"),
        (json!(-3), "expected a non-negative integer, found -3"),
        (json!(1e3), "expected a non-negative integer, found 1000.0"),
        (json!("1"), "expected non-negative integer, found string"),
        (json!(null), "expected non-negative integer, found null"),
        (json!(true), "expected non-negative integer, found boolean"),
    ] {
        let mut dev = device("a", 0, "prod", ("cloud-web01", "disk0"), "t");
        dev["rank"] = rank;
        let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
        assert_eq!(
            problems(&doc.to_string(), &seed_replicas()),
            [format!("/devices/a/rank: {message}")]
        );
    }
    // The largest rank is fine.
    let dev = device("a", u64::MAX, "prod", ("cloud-web01", "disk0"), "t");
    let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
    assert_eq!(
        valid(&doc.to_string(), &seed_replicas()).devices()[0].rank,
        u64::MAX
    );
}

#[test]
fn ipv4_and_ipv6_addresses_are_checked_against_their_subnets() {
    let doc = json!({
        "devices": {"a": {
            "id": "a", "rank": 0, "flavor": "1-2",
            "ports": [
                {"name": "v4", "subnet": "lan", "ip": "10.20.30.40"},
                {"name": "v6", "subnet": "lan6", "ip": "2001:db8:15::10"},
                {"name": "v6b", "subnet": "lan6", "ip": "2001:db8:16::1"},
                {"name": "mixed", "subnet": "lan", "ip": "::ffff:10.20.30.41"},
                {"name": "again", "subnet": "lan6", "ip": "2001:DB8:15:0::10"},
            ],
            "failback": {"agent": "prod", "disks": [{"replica": {"agent": "cloud-web01", "disk": "disk0"}, "target": "t"}]}
        }},
        "subnets": {"lan": {"cidr": "10.0.0.0/8"}, "lan6": {"cidr": "2001:db8:15::/48"}},
    });
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        [
            "/devices/a/ports/2/ip: 2001:db8:16::1 is outside subnet `lan6` (2001:db8:15::/48)",
            "/devices/a/ports/3/ip: ::ffff:10.20.30.41 is outside subnet `lan` (10.0.0.0/8)",
            "/devices/a/ports/4/ip: 2001:db8:15::10 in subnet `lan6` is also the address of /devices/a/ports/1/ip",
        ]
    );
}

#[test]
fn an_address_is_claimed_once_per_subnet() {
    let mut a = device("a", 0, "prod-a", ("cloud-web01", "disk0"), "t");
    let mut b = device("b", 0, "prod-b", ("cloud-web01", "disk0"), "t");
    a["ports"][0]["ip"] = json!("192.168.15.10");
    b["ports"][0]["ip"] = json!("192.168.15.10");
    let doc = json!({"devices": {"a": a, "b": b}, "subnets": main_subnet()});
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        ["/devices/b/ports/0/ip: 192.168.15.10 in subnet `main` is also the address of /devices/a/ports/0/ip"]
    );
}

#[test]
fn whole_document_problems() {
    let r = seed_replicas();
    assert_eq!(
        problems("[1, 2]", &r),
        ["(document): expected object, found array"]
    );
    assert_eq!(
        problems("{}", &r),
        [
            "/subnets: missing required field `subnets`",
            "/devices: missing required field `devices`",
        ]
    );
    assert_eq!(
        problems(r#"{"devices": {}, "subnets": {}}"#, &r),
        ["/devices: must not be empty"]
    );
    assert_eq!(
        problems(r#"{"devices": [], "subnets": []}"#, &r),
        [
            "/devices: expected object, found array",
            "/subnets: expected object, found array",
        ]
    );
    assert_eq!(
        problems("{\n  \"devices\": {\n    \"a\": {\"rank\": 0,}\n  }\n}", &r),
        ["(document): invalid JSON at line 3, column 21: trailing comma"]
    );
    assert_eq!(
        problems("", &r),
        ["(document): invalid JSON at line 1, column 0: EOF while parsing a value"]
    );
}

#[test]
fn oversized_plans_are_refused_before_parsing() {
    let doc = " ".repeat(MAX_PLAN_LEN + 1);
    let err = validate(&doc, &seed_replicas()).unwrap_err();
    assert_eq!(
        err.problems(),
        [PlanProblem {
            path: PlanPath::root(),
            kind: ProblemKind::TooLarge {
                len: MAX_PLAN_LEN + 1,
                max: MAX_PLAN_LEN,
            },
        }]
    );
}

#[test]
fn missing_replicas_name_the_lineage_and_point() {
    let mut dev = device("a", 0, "prod", ("cloud-web01", "disk0"), "t0");
    dev["failback"]["disks"] = json!([
        {"replica": {"agent": "cloud-gone", "disk": "disk0"}, "target": "t0"},
        {"replica": {"agent": "cloud-web01", "disk": "disk0"}, "point": 6, "target": "t1"},
        {"replica": {"agent": "cloud-web01", "disk": "disk0"}, "point": 8, "target": "t2"},
        {"replica": {"agent": "cloud-sick", "disk": "disk0"}, "target": "t3"},
    ]);
    let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
    let replicas = seed_replicas().broken("cloud-sick", "disk0");
    assert_eq!(
        problems(&doc.to_string(), &replicas),
        [
            "/devices/a/failback/disks/0/replica: replica `cloud-gone/disk0` has no committed point in the store",
            "/devices/a/failback/disks/1/replica: replica `cloud-web01/disk0` has no point 6 in the store",
            "/devices/a/failback/disks/3/replica: cannot look up replica `cloud-sick/disk0` in the store: I/O error on /store/points: disk on fire",
        ]
    );
}

#[test]
fn a_target_is_written_once_per_failback_agent() {
    // The same target id on two agents is fine; on one agent it is not,
    // across devices too (one failback agent may serve several machines).
    let doc = json!({
        "devices": {
            "a": device("a", 0, "host-1", ("cloud-web01", "disk0"), "disk0"),
            "b": device("b", 0, "host-2", ("cloud-web01", "disk0"), "disk0"),
            "c": device("c", 1, "host-1", ("cloud-db01", "disk0"), "disk0"),
        },
        "subnets": main_subnet(),
    });
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        ["/devices/c/failback/disks/0/target: target `disk0` of failback agent `host-1` is also written by /devices/a/failback/disks/0"]
    );
}

#[test]
fn failback_sections_are_strict() {
    let mut dev = device("a", 0, "prod", ("cloud-web01", "disk0"), "t");
    dev["failback"] = json!({
        "agent": ".hidden",
        "disks": [{"replica": {"agent": "cloud-web01", "disk": "disk0", "pool": "x"}, "target": "", "force": 1}],
        "mode": "fast",
    });
    let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
    let got = problems(&doc.to_string(), &seed_replicas());
    assert_eq!(
        got,
        [
            "/devices/a/failback/mode: unknown key `mode` (expected one of: agent, disks)",
            "/devices/a/failback/agent: `.hidden` is not a valid id (1 to 128 ASCII letters, digits, `.`, `_` or `-`, not starting with `.`)",
            "/devices/a/failback/disks/0/replica/pool: unknown key `pool` (expected one of: agent, disk)",
            "/devices/a/failback/disks/0/target: `` is not a valid id (1 to 128 ASCII letters, digits, `.`, `_` or `-`, not starting with `.`)",
            "/devices/a/failback/disks/0/force: expected boolean, found number",
        ]
    );
    let mut dev = device("a", 0, "prod", ("cloud-web01", "disk0"), "t");
    dev["failback"] = json!({"disks": {}});
    let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        [
            "/devices/a/failback/agent: missing required field `agent`",
            "/devices/a/failback/disks: expected array, found object",
        ]
    );
}

#[test]
fn every_required_field_is_named_when_missing() {
    let doc = json!({
        "devices": {"a": {"ports": [{}], "failback": {"agent": "prod", "disks": [{}, {"replica": {}}]}}},
        "subnets": {"main": {}},
    });
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        [
            "/devices/a/id: missing required field `id`",
            "/devices/a/rank: missing required field `rank`",
            "/devices/a/flavor: missing required field `flavor`",
            "/devices/a/ports/0/name: missing required field `name`",
            "/devices/a/ports/0/subnet: missing required field `subnet`",
            "/devices/a/failback/disks/0/replica: missing required field `replica`",
            "/devices/a/failback/disks/0/target: missing required field `target`",
            "/devices/a/failback/disks/1/replica/agent: missing required field `agent`",
            "/devices/a/failback/disks/1/replica/disk: missing required field `disk`",
            "/devices/a/failback/disks/1/target: missing required field `target`",
            "/subnets/main/cidr: missing required field `cidr`",
        ]
    );
    let doc = json!({"devices": {"a": {"id": "a", "rank": 0, "flavor": "x"}}, "subnets": {}});
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        [
            "/devices/a/ports: missing required field `ports`",
            "/devices/a/failback: missing required field `failback`",
        ]
    );
}

#[test]
fn port_shapes() {
    let mut dev = device("a", 0, "prod", ("cloud-web01", "disk0"), "t");
    dev["ports"] = json!({"port_0": {"name": "port_9", "subnet": "main"}, "port_1": [], "port_2": {"subnet": "main"}});
    let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
    assert_eq!(
        problems(&doc.to_string(), &seed_replicas()),
        [
            "/devices/a/ports/port_0/name: port name `port_9` differs from its key `port_0`",
            "/devices/a/ports/port_1: expected object, found array",
        ]
    );
    for (ports, message) in [
        (json!([]), "/devices/a/ports: must not be empty"),
        (
            json!("port_0"),
            "/devices/a/ports: expected array or object, found string",
        ),
        (
            json!([{"name": "p", "subnet": "main", "ip": 10}]),
            "/devices/a/ports/0/ip: expected string, found number",
        ),
        (
            json!([{"name": "p", "subnet": "main", "ip": "fe80::1%eth0"}]),
            "/devices/a/ports/0/ip: `fe80::1%eth0` is not an IP address",
        ),
        (
            json!([{"name": "p", "subnet": ""}]),
            "/devices/a/ports/0/subnet: must not be empty",
        ),
    ] {
        let mut dev = device("a", 0, "prod", ("cloud-web01", "disk0"), "t");
        dev["ports"] = ports;
        let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
        assert_eq!(problems(&doc.to_string(), &seed_replicas()), [message]);
    }
    // Matching name and key, and an `ip` of null, are fine.
    let mut dev = device("a", 0, "prod", ("cloud-web01", "disk0"), "t");
    dev["ports"] = json!({"port_0": {"name": "port_0", "subnet": "main", "ip": null}});
    let doc = json!({"devices": {"a": dev}, "subnets": main_subnet()});
    valid(&doc.to_string(), &seed_replicas());
}

#[test]
fn pointers_escape_keys_and_list_the_root_by_name() {
    let doc = json!({
        "devices": {"web/01~a": {"id": "x", "rank": 0, "flavor": "1-2",
            "ports": [{"name": "p", "subnet": "main"}]}},
        "subnets": main_subnet(),
    });
    let err = validate(&doc.to_string(), &seed_replicas()).unwrap_err();
    assert_eq!(err.problems().len(), 1);
    let path = &err.problems()[0].path;
    assert_eq!(path.to_string(), "/devices/web~101~0a/failback");
    assert_eq!(
        path.segments(),
        [
            PathSegment::Key("devices".into()),
            PathSegment::Key("web/01~a".into()),
            PathSegment::Key("failback".into()),
        ]
    );
    assert_eq!(PlanPath::root().to_string(), "");
    assert_eq!(PlanPath::root().key("a").index(3).to_string(), "/a/3");
}

#[test]
fn the_store_answers_as_a_replica_lookup() {
    use tideline_protocol::{Digest, IndexRootHasher};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.find_point("cloud-web01", "disk0", None).unwrap(),
        None
    );
    assert_eq!(
        store.find_point("cloud-web01", "disk0", Some(1)).unwrap(),
        None
    );

    // Two all-zero points: nothing to record, the root is that of zeros.
    const BS: u32 = 4096;
    let size = 4 * u64::from(BS);
    let mut root = IndexRootHasher::new();
    for _ in 0..4 {
        root.push(&Digest::of_zeros(BS as usize));
    }
    let root = root.finish();
    for point in [3, 7] {
        let b = store
            .begin_point("cloud-web01", "disk0", point, None, size, BS)
            .unwrap();
        b.commit(&root, 0, &Default::default()).unwrap();
    }
    let found = |p| store.find_point("cloud-web01", "disk0", p).unwrap();
    assert_eq!(
        found(None),
        Some(ReplicaPoint {
            point: 7,
            disk_size: size
        })
    );
    assert_eq!(
        found(Some(3)),
        Some(ReplicaPoint {
            point: 3,
            disk_size: size
        })
    );
    assert_eq!(found(Some(5)), None);

    let doc = json!({
        "devices": {"a": device("a", 0, "prod", ("cloud-web01", "disk0"), "disk0")},
        "subnets": main_subnet(),
    });
    let plan = valid(&doc.to_string(), &store);
    assert_eq!(
        (
            plan.devices()[0].disks[0].point,
            plan.devices()[0].disks[0].disk_size
        ),
        (7, size)
    );
}

#[test]
fn a_validated_plan_serializes_for_the_admin_api() {
    let plan = valid(SEED_EXAMPLE, &seed_replicas());
    let v = serde_json::to_value(&plan).unwrap();
    assert_eq!(v["devices"][0]["name"], "rhel7.2");
    assert_eq!(v["devices"][1]["disks"][0]["point"], 5);
    assert_eq!(v["devices"][1]["disks"][0]["requested_point"], Value::Null);
}
