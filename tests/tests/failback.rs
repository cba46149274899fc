//! Failback end to end: a machine protected at the production site fails
//! over to the recovery site, runs and changes there, replicates from there,
//! and is failed back into a new disk in verified incremental passes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use serde_json::Value;
use tideline_tests::fs::wait_for;
use tideline_tests::proxy::Proxy;
use tideline_tests::*;

const BS: u32 = 64 * 1024;
const MIB: u64 = 1024 * 1024;

fn disk(id: &str, path: PathBuf) -> DiskSpec {
    DiskSpec {
        id: id.into(),
        path,
        block_size: BS,
    }
}

fn target(id: &str, location: &str) -> String {
    format!("[[target]]\nid = \"{id}\"\npath = \"{location}\"\n")
}

/// Waits until the controller lists `agent` as connected with its
/// failback targets.
fn wait_targets(w: &World, agent: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(v) = w.admin(&["agents"]) {
            if v.as_array().into_iter().flatten().any(|a| {
                a["id"] == agent
                    && a["connected"] == true
                    && a["inventory_received"] == true
                    && a["targets"].as_array().is_some_and(|t| !t.is_empty())
            }) {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "failback agent {agent} did not connect:\n{}",
        w.log(&format!("agent-{agent}.log"))
    )
}

/// One failback pass, waited for; the pass's final status.
fn pass(w: &World, agent: &str, spec: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["failback", "--agent", agent, "--target", spec];
    args.extend_from_slice(extra);
    w.admin(&args).with_context(|| {
        format!(
            "failback pass failed; agent log:\n{}\ncontroller log:\n{}",
            w.log(&format!("agent-{agent}.log")),
            w.log("controller.log")
        )
    })
}

/// `qemu-nbd` serving an image writable on a Unix socket; killed on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_writable(image: &Path, format: &str, sock: &Path) -> Result<QemuNbd> {
    let child = Command::new("qemu-nbd")
        .args(["--persistent", "--shared=4", "--cache=none"])
        .arg(format!("--format={format}"))
        .arg(format!("--socket={}", sock.display()))
        .arg("--export-name=disk")
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-nbd")?;
    let server = QemuNbd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("qemu-nbd did not create {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

fn qemu_img_compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b)
        .output()?;
    if !out.status.success() {
        bail!(
            "qemu-img compare {} {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn n(v: &Value, key: &str) -> u64 {
    v["targets"][0][key].as_u64().unwrap_or(u64::MAX)
}

/// The whole flow of the issue: protect A; materialise its point as B, the
/// failover VM, and change B; B replicates under its own lineage; pass 1
/// writes B's point into C, a VMDK served by qemu-nbd; B changes again and
/// replicates; pass 2 transfers exactly that change; a final pass after no
/// change transfers nothing; `qemu-img compare` finds C identical to B's
/// last point.
#[test]
fn failback_from_a_running_recovery_site_in_incremental_passes() -> Result<()> {
    let mut w = World::new(&["prod-web", "cloud-web", "new-web"])?;
    w.start_controller()?;

    // Production: disk A, protected.
    let a = w.path("a.raw");
    make_image(&a, 64 * MIB, 41)?;
    w.start_agent("prod-web", &[disk("root", a.clone())], "")?;
    w.wait_connected("prod-web")?;
    w.sync("prod-web")?;

    // Failover: B is A's latest point, running and changing at the recovery
    // site, protected there under its own lineage.
    let b = w.export("prod-web", "root", "latest")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for i in 0..12u64 {
        write_random(&b, i * 5 * MIB + 12345, 20000, &mut rng)?;
    }
    w.start_agent("cloud-web", &[disk("root", b.clone())], "")?;
    w.wait_connected("cloud-web")?;
    let s = w.sync("cloud-web")?;
    assert_eq!(s["state"], "done", "{s}");

    // The new production VM's disk: an empty VMDK behind qemu-nbd.
    let c = w.path("c.vmdk");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vmdk"])
        .arg(&c)
        .arg((64 * MIB).to_string()))?;
    let sock = w.path("c.sock");
    let _server = serve_writable(&c, "vmdk", &sock)?;
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    w.start_agent("new-web", &[], &target("web-root", &uri))?;
    wait_targets(&w, "new-web")?;

    // Pass 1: the target is empty; every non-zero block of B is sent,
    // written and verified.
    let p1 = pass(&w, "new-web", "web-root=cloud-web/root", &[])?;
    assert_eq!(p1["state"], "done", "{p1}");
    let nonzero = nonzero_blocks(&b, BS as usize)?.len() as u64;
    assert_eq!(n(&p1, "sent_blocks"), nonzero, "{p1}");
    assert_eq!(n(&p1, "verified_blocks"), nonzero, "{p1}");
    assert_eq!(p1["targets"][0]["described_by"], "scanned", "{p1}");
    assert_eq!(p1["targets"][0]["verified"], true, "{p1}");

    // B keeps running: 7 blocks change, and B replicates again.
    let mut changed = std::collections::BTreeSet::new();
    for i in 0..7u64 {
        let block = 3 + i * 131;
        write_random(&b, block * u64::from(BS) + 100, 3000, &mut rng)?;
        changed.insert(block);
    }
    let s = w.sync("cloud-web")?;
    assert_eq!(s["disks"][0]["blocks_received"], 7, "{s}");

    // Pass 2: the map of pass 1 describes C; exactly the 7 blocks travel.
    let p2 = pass(&w, "new-web", "web-root=cloud-web/root", &[])?;
    assert_eq!(p2["targets"][0]["described_by"], "map", "{p2}");
    assert_eq!(n(&p2, "differing_blocks"), 7, "{p2}");
    assert_eq!(n(&p2, "sent_blocks"), 7, "{p2}");
    assert_eq!(n(&p2, "written_blocks"), 7, "{p2}");

    // Final pass at cut-over, after no change: nothing is written.
    let p3 = pass(&w, "new-web", "web-root=cloud-web/root", &[])?;
    assert_eq!(n(&p3, "sent_blocks"), 0, "{p3}");
    assert_eq!(n(&p3, "written_blocks"), 0, "{p3}");
    assert_eq!(p3["targets"][0]["verified"], true, "{p3}");

    drop(_server);
    let last = w.export("cloud-web", "root", "latest")?;
    qemu_img_compare(&last, "raw", &c, "vmdk")?;
    assert!(same_contents(&last, &b)?, "B's last point differs from B");
    Ok(())
}

/// A pass cut off by SIGKILL of the failback agent is resumed by the next
/// pass, which does not rewrite what the first one verified.
#[test]
fn a_pass_cut_off_by_sigkill_resumes_without_rewriting_verified_blocks() -> Result<()> {
    let mut w = World::new(&["cloud-db", "new-db"])?;
    w.start_controller()?;
    let b = w.path("b.raw");
    make_image(&b, 128 * MIB, 7)?;
    w.start_agent("cloud-db", &[disk("data", b.clone())], "")?;
    w.wait_connected("cloud-db")?;
    w.sync("cloud-db")?;
    let total = nonzero_blocks(&b, BS as usize)?.len() as u64;

    // The failback agent reaches the controller through a proxy that slows
    // the download to 16 MiB/s, so the pass is long enough to cut.
    let proxy = Proxy::start(w.port, None, Some(16 << 20))?;
    let c = w.path("c.raw");
    std::fs::File::create(&c)?.set_len(128 * MIB)?;
    let extra = format!(
        "[failback]\nverify_bytes = 2097152\n{}",
        target("db-data", &c.display().to_string())
    );
    let cfg = w.agent_config("new-db", &[], "new-db", "pki/ca.crt", proxy.port, &extra)?;
    w.spawn_agent("new-db", &cfg)?;
    wait_targets(&w, "new-db")?;

    let r = w.admin(&[
        "failback",
        "--agent",
        "new-db",
        "--target",
        "db-data=cloud-db/data",
        "--no-wait",
    ])?;
    let id = r["session"].as_u64().context("no session id")?.to_string();
    // Kill the agent once some blocks are verified and reported.
    let deadline = Instant::now() + Duration::from_secs(60);
    let verified_before = loop {
        let s = w.admin(&["passes", &id])?;
        let v = n(&s, "verified_blocks");
        assert_ne!(
            s["state"], "done",
            "the pass ended before it could be cut: {s}"
        );
        if v > 0 && v != u64::MAX {
            break v;
        }
        if Instant::now() > deadline {
            bail!("no block verified in time: {s}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    w.kill_agent("new-db");
    let s = w.admin(&["passes", &id])?;
    assert!(verified_before < total, "{s}");
    // Until the controller has seen the killed agent's connection close, it
    // still lists it as connected, with its targets: a pass requested then
    // would go to the dead connection. (It once never saw it: the proxy
    // half-closes without closing its socket, the controller's write into
    // the full window blocked forever, and the task that would have noticed
    // the silence waited behind it. Writes now time out like silence.) Wait
    // for the old connection to be gone before the agent comes back.
    wait_for(
        Duration::from_secs(30),
        "the killed agent's connection to close",
        || {
            w.admin(&["agents"]).is_ok_and(|v| {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a["id"] == "new-db" && a["connected"] == false)
            })
        },
    )?;

    // Restart and run the next pass straight to the controller.
    let cfg = w.agent_config("new-db", &[], "new-db", "pki/ca.crt", w.port, &extra)?;
    w.spawn_agent("new-db", &cfg)?;
    wait_targets(&w, "new-db")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let p2 = loop {
        match pass(&w, "new-db", "db-data=cloud-db/data", &[]) {
            Ok(p) => break p,
            // The controller may still hold the killed agent's connection.
            Err(e)
                if Instant::now() < deadline
                    && ["busy", "disconnected", "not connected", "has not reported"]
                        .iter()
                        .any(|m| format!("{e:#}").contains(m)) =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    assert_eq!(p2["state"], "done", "{p2}");
    let sent2 = n(&p2, "sent_blocks");
    assert!(
        sent2 + verified_before <= total,
        "pass 2 sent {sent2} blocks, {verified_before} of {total} were verified before the kill: {p2}"
    );
    let last = w.export("cloud-db", "data", "latest")?;
    assert_same(&c, &last);
    drop(proxy);
    Ok(())
}

/// Guards: a target smaller than the point, and a block device that is
/// mounted, are refused before anything is written, each naming the target
/// and the reason; forcing lets the second through.
#[test]
fn too_small_and_mounted_targets_are_refused_before_writing() -> Result<()> {
    let mut w = World::new(&["cloud-app", "new-app"])?;
    w.start_controller()?;
    let b = w.path("b.raw");
    make_image(&b, 32 * MIB, 9)?;
    w.start_agent("cloud-app", &[disk("data", b.clone())], "")?;
    w.wait_connected("cloud-app")?;
    w.sync("cloud-app")?;

    let small = w.path("small.raw");
    std::fs::write(&small, vec![0x5a; (16 * MIB) as usize])?;
    w.start_agent(
        "new-app",
        &[],
        &target("small", &small.display().to_string()),
    )?;
    wait_targets(&w, "new-app")?;
    let err = pass(&w, "new-app", "small=cloud-app/data", &[]).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("\"small\"") && text.contains("smaller"),
        "refusal does not name the target and the reason: {text}"
    );
    // Nothing was written.
    assert!(std::fs::read(&small)?.iter().all(|&x| x == 0x5a));
    Ok(())
}

fn plan_json(devices: &str) -> String {
    format!(
        r#"{{
  "devices": {{ {devices} }},
  "subnets": {{
    "main_subnet": {{ "cidr": "192.168.15.0/24", "subnet_id": "eda47a07-d1dd-4aca-ae8f-c652e997008e" }}
  }}
}}"#
    )
}

fn device(
    name: &str,
    id: &str,
    rank: u32,
    ip: &str,
    agent: &str,
    replica: &str,
    target: &str,
) -> String {
    format!(
        r#""{name}": {{
      "id": "{id}", "rank": {rank}, "flavor": "2-4",
      "ports": [ {{ "name": "port_0", "subnet": "main_subnet", "ip": "{ip}" }} ],
      "boot_condition": {{ "delay_seconds": 120, "type": "wait" }},
      "failback": {{ "agent": "{agent}", "disks": [ {{ "replica": {{ "agent": "{replica}", "disk": "root" }}, "target": "{target}" }} ] }}
    }}"#
    )
}

/// A DR plan drives failback: a plan with problems is refused with every
/// problem and its path, nothing started; a sound plan fails its devices
/// back in rank order and every target ends up equal to its replica.
#[test]
fn a_dr_plan_is_validated_whole_then_failed_back_in_rank_order() -> Result<()> {
    let mut w = World::new(&["cloud-web", "cloud-db", "new-web", "new-db"])?;
    w.start_controller()?;
    let mut replicas = Vec::new();
    for (agent, seed) in [("cloud-web", 51), ("cloud-db", 52)] {
        let img = w.path(&format!("{agent}.raw"));
        make_image(&img, 16 * MIB, seed)?;
        w.start_agent(agent, &[disk("root", img.clone())], "")?;
        w.wait_connected(agent)?;
        w.sync(agent)?;
        replicas.push(img);
    }
    let mut targets = Vec::new();
    for (agent, t) in [("new-web", "web-root"), ("new-db", "db-root")] {
        let path = w.path(&format!("{t}.raw"));
        std::fs::File::create(&path)?.set_len(16 * MIB)?;
        w.start_agent(agent, &[], &target(t, &path.display().to_string()))?;
        wait_targets(&w, agent)?;
        targets.push(path);
    }

    // Every problem at once: unknown subnet, duplicate device, a missing
    // required field, an address outside its subnet, a replica that does
    // not exist.
    let bad = plan_json(&format!(
        "{}, {}, {}, {}",
        device(
            "web",
            "id-1",
            1,
            "192.168.15.10",
            "new-web",
            "cloud-web",
            "web-root"
        )
        .replace("\"subnet\": \"main_subnet\"", "\"subnet\": \"dmz\""),
        device(
            "db",
            "id-2",
            0,
            "10.0.0.5",
            "new-db",
            "cloud-gone",
            "db-root"
        ),
        device(
            "db",
            "id-3",
            0,
            "192.168.15.12",
            "new-db",
            "cloud-db",
            "db-root"
        ),
        device(
            "cache",
            "id-4",
            2,
            "192.168.15.13",
            "new-db",
            "cloud-db",
            "x"
        )
        .replace("\"flavor\": \"2-4\",", ""),
    ));
    let bad_path = w.path("bad-plan.json");
    std::fs::write(&bad_path, &bad)?;
    let err = w
        .admin(&[
            "failback-plan",
            "--plan",
            bad_path.to_str().unwrap_or_default(),
        ])
        .unwrap_err();
    let text = format!("{err:#}");
    for path in [
        "/devices/web/ports/0/subnet",
        "/devices/db/ports/0/ip",
        "/devices/db/failback/disks/0/replica",
        "/devices/cache/flavor",
    ] {
        assert!(
            text.contains(path),
            "no problem reported at {path}:\n{text}"
        );
    }
    assert!(text.contains("`db` is defined 2 times"), "{text}");
    let passes = w.admin(&["passes"])?;
    assert_eq!(
        passes.as_array().map(Vec::len),
        Some(0),
        "a pass started: {passes}"
    );

    // A sound plan: the database (rank 0) before the web server (rank 1).
    let good = plan_json(&format!(
        "{}, {}",
        device(
            "web",
            "id-1",
            1,
            "192.168.15.10",
            "new-web",
            "cloud-web",
            "web-root"
        ),
        device(
            "db",
            "id-2",
            0,
            "192.168.15.11",
            "new-db",
            "cloud-db",
            "db-root"
        ),
    ));
    let good_path = w.path("plan.json");
    std::fs::write(&good_path, &good)?;
    let run = w.admin(&[
        "failback-plan",
        "--plan",
        good_path.to_str().unwrap_or_default(),
    ])?;
    assert_eq!(run["state"], "done", "{run}");
    let devices = run["devices"].as_array().context("no devices")?;
    assert_eq!(devices[0]["name"], "db", "{run}");
    assert_eq!(devices[1]["name"], "web", "{run}");
    let db_session = devices[0]["session"].as_u64().context("db not run")?;
    let web_session = devices[1]["session"].as_u64().context("web not run")?;
    assert!(db_session < web_session, "web started before db: {run}");
    let db_pass = w.admin(&["passes", &db_session.to_string()])?;
    let web_pass = w.admin(&["passes", &web_session.to_string()])?;
    assert_eq!(db_pass["state"], "done", "{db_pass}");
    assert_eq!(web_pass["state"], "done", "{web_pass}");
    assert_same(&targets[0], &replicas[0]);
    assert_same(&targets[1], &replicas[1]);
    Ok(())
}

/// A loop device, detached on drop.
struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A block device with a mounted file system is refused, naming the target
/// and the mount; once unmounted, the same pass writes it and it equals the
/// replica.
#[test]
fn a_mounted_block_device_is_refused_until_unmounted() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 || Command::new("losetup").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and losetup");
        return Ok(());
    }
    let mut w = World::new(&["cloud-fs", "new-fs"])?;
    w.start_controller()?;
    let b = w.path("b.raw");
    make_image(&b, 32 * MIB, 17)?;
    w.start_agent("cloud-fs", &[disk("data", b.clone())], "")?;
    w.wait_connected("cloud-fs")?;
    w.sync("cloud-fs")?;

    let backing = w.path("new-disk.raw");
    std::fs::File::create(&backing)?.set_len(32 * MIB)?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&backing))?;
    let dev = run(Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing))?;
    let dev = Loop(PathBuf::from(dev.trim()));
    let mnt = w.path("mnt");
    std::fs::create_dir_all(&mnt)?;
    run(Command::new("mount").arg(&dev.0).arg(&mnt))?;

    w.start_agent(
        "new-fs",
        &[],
        &target("fs-data", &dev.0.display().to_string()),
    )?;
    wait_targets(&w, "new-fs")?;
    let err = pass(&w, "new-fs", "fs-data=cloud-fs/data", &[]).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("fs-data") && text.contains("mounted"),
        "refusal does not name the target and the mount: {text}"
    );
    // Refused before anything was sent or written (the mount itself
    // changes the file system's superblock, so the bytes cannot tell).
    let refused = w.admin(&["passes"])?;
    assert_eq!(refused[0]["state"], "failed", "{refused}");
    assert_eq!(refused[0]["targets"][0]["sent_blocks"], 0, "{refused}");
    assert_eq!(refused[0]["targets"][0]["written_blocks"], 0, "{refused}");
    run(Command::new("umount").arg(&mnt))?;

    let p = pass(&w, "new-fs", "fs-data=cloud-fs/data", &[])?;
    assert_eq!(p["state"], "done", "{p}");
    let last = w.export("cloud-fs", "data", "latest")?;
    // Compare what reached the device's backing file once detached.
    drop(dev);
    assert_same(&backing, &last);
    Ok(())
}
