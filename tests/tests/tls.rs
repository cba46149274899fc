//! Mutual TLS refusals: an agent whose certificate is not from the
//! controller's CA, and a controller the agent's CA did not issue.

use anyhow::Result;
use std::process::Command;
use std::time::Duration;
use tideline_tests::*;

fn rogue_ca(w: &World, agent: &str) -> Result<()> {
    let ctl = bin("tideline-controller");
    let dir = w.path("pki/rogue");
    run(Command::new(&ctl)
        .args(["ca", "init", "--name", "Rogue CA", "--dir"])
        .arg(dir.join("ca")))?;
    run(Command::new(&ctl)
        .args(["ca", "issue-agent", "--ca-dir"])
        .arg(dir.join("ca"))
        .arg("--out")
        .arg(&dir)
        .args(["--id", agent]))?;
    Ok(())
}

fn wait_for(w: &World, file: &str, needles: &[&str]) -> bool {
    for _ in 0..100 {
        let log = w.log(file);
        if needles.iter().any(|n| log.contains(n)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn agent_with_a_certificate_from_another_ca_is_refused() -> Result<()> {
    let mut w = World::new(&["good"])?;
    w.start_controller()?;
    make_image(&w.path("d.raw"), 1 << 20, 1)?;
    rogue_ca(&w, "evil")?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    let cfg = w.agent_config("evil", &disks, "rogue/evil", "pki/ca.crt", w.port, "")?;
    w.spawn_agent("evil", &cfg)?;
    assert!(
        wait_for(&w, "controller.log", &["TLS handshake refused"]),
        "controller did not report the refusal:\n{}",
        w.log("controller.log")
    );
    assert!(
        wait_for(&w, "agent-evil.log", &["certificate", "alert"]),
        "agent log does not explain the refusal:\n{}",
        w.log("agent-evil.log")
    );
    let agents = w.admin(&["agents"])?;
    assert!(
        !agents
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["id"] == "evil"),
        "a refused agent must not be registered: {agents}"
    );
    Ok(())
}

#[test]
fn agent_refuses_a_controller_from_another_ca() -> Result<()> {
    let mut w = World::new(&["wary"])?;
    w.start_controller()?;
    make_image(&w.path("d.raw"), 1 << 20, 1)?;
    rogue_ca(&w, "unused")?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    // The agent trusts only the rogue CA, so the real controller's
    // certificate does not chain to it.
    let cfg = w.agent_config("wary", &disks, "wary", "pki/rogue/ca.crt", w.port, "")?;
    w.spawn_agent("wary", &cfg)?;
    assert!(
        wait_for(
            &w,
            "agent-wary.log",
            &["UnknownIssuer", "invalid peer certificate"]
        ),
        "agent did not name the certificate problem:\n{}",
        w.log("agent-wary.log")
    );
    let agents = w.admin(&["agents"])?;
    assert!(!agents
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a["id"] == "wary" && a["connected"] == true));
    Ok(())
}
