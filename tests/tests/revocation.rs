//! Revoking one agent without replacing the CA: `tideline-controller
//! revoke` closes the agent's live connection and refuses its new ones,
//! naming the agent, while other agents carry on; `unrevoke` lets it back
//! in and it syncs again. A hand edit of the list takes effect on SIGHUP,
//! and a broken edit leaves the list in force.

use anyhow::{Context, Result};
use rand::SeedableRng;
use std::process::Command;
use std::time::Duration;
use tideline_tests::*;

/// How long the tests wait for a log line or a state change.
const LIMIT: Duration = Duration::from_secs(30);

fn disk(w: &World, name: &str) -> Vec<DiskSpec> {
    vec![DiskSpec {
        id: "d".into(),
        path: w.path(name),
        block_size: 65536,
    }]
}

/// Lines of log `name` that contain every needle.
fn count_lines(w: &World, name: &str, needles: &[&str]) -> usize {
    w.log(name)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[test]
fn revoked_agent_is_cut_off_refused_and_readmitted() -> Result<()> {
    let mut w = World::new(&["web-1", "web-2"])?;
    w.start_controller()?;
    make_image(&w.path("web-1.raw"), 4 << 20, 71)?;
    make_image(&w.path("web-2.raw"), 2 << 20, 72)?;
    w.start_agent("web-1", &disk(&w, "web-1.raw"), "")?;
    w.start_agent("web-2", &disk(&w, "web-2.raw"), "")?;
    w.wait_connected("web-1")?;
    w.wait_connected("web-2")?;
    w.sync("web-1")?;

    let out = w.admin(&["revoke", "web-1", "--reason", "laptop stolen"])?;
    assert_eq!(out["changed"], true, "{out}");
    let closed = out["closed"].to_string();
    assert!(
        closed.contains("agent web-1") && closed.contains("laptop stolen"),
        "the answer must name the closed connection: {out}"
    );

    // The live connection is closed, with the reason, on both sides.
    w.wait_disconnected("web-1")?;
    w.wait_log_line(
        "controller.log",
        &["closing the connection of a revoked agent", "agent=web-1"],
        LIMIT,
    )?;
    w.wait_log_line(
        "agent-web-1.log",
        &[
            "controller reported an error",
            "Revoked",
            "agent web-1",
            "laptop stolen",
        ],
        LIMIT,
    )?;
    // The agent dials again and is refused in the TLS handshake.
    w.wait_log_line(
        "controller.log",
        &["TLS handshake refused: revoked certificate", "agent=web-1"],
        LIMIT,
    )?;
    w.wait_log_line("agent-web-1.log", &["CertificateRevoked"], LIMIT)?;

    let entry = w.agent_entry("web-1")?;
    assert_eq!(entry["connected"], false, "{entry}");
    assert_eq!(entry["revoked"]["reason"], "laptop stolen", "{entry}");
    let other = w.agent_entry("web-2")?;
    assert_eq!(other["connected"], true, "only web-1 is revoked: {other}");
    assert!(other["revoked"].is_null(), "{other}");
    let refused = format!(
        "{:#}",
        w.admin(&["sync", "--agent", "web-1"])
            .expect_err("a revoked agent cannot sync")
    );
    assert!(refused.contains("web-1"), "{refused}");
    let list = w.admin(&["revoked"])?;
    assert_eq!(list["agents"][0]["id"], "web-1", "{list}");
    let again = w.admin(&["revoke", "web-1", "--reason", "twice"])?;
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(again["entry"]["reason"], "laptop stolen", "{again}");
    w.sync("web-2")?;

    // Lifted: the agent comes back by itself and its new data is stored.
    let mut rng = rand::rngs::StdRng::seed_from_u64(73);
    write_random(&w.path("web-1.raw"), 1 << 20, 256 << 10, &mut rng)?;
    let out = w.admin(&["unrevoke", "web-1"])?;
    assert!(
        out["message"].as_str().is_some_and(|m| m.contains("web-1")),
        "{out}"
    );
    let twice = format!(
        "{:#}",
        w.admin(&["unrevoke", "web-1"])
            .expect_err("nothing left to lift")
    );
    assert!(twice.contains("agent web-1 is not revoked"), "{twice}");
    w.wait_connected("web-1")?;
    assert!(w.agent_entry("web-1")?["revoked"].is_null());
    w.sync("web-1")?;
    assert_same(&w.export("web-1", "d", "latest")?, &w.path("web-1.raw"));
    assert_same(&w.export("web-2", "d", "latest")?, &w.path("web-2.raw"));
    Ok(())
}

#[test]
fn sighup_puts_a_hand_edited_list_in_force() -> Result<()> {
    let mut w = World::new(&["edge"])?;
    w.start_controller()?;
    make_image(&w.path("edge.raw"), 2 << 20, 74)?;
    w.start_agent("edge", &disk(&w, "edge.raw"), "")?;
    w.wait_connected("edge")?;

    // One certificate, by the fingerprint openssl prints (upper case, with
    // colons), in the default file in the store directory.
    let fingerprint = run(Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(w.path("pki/edge.crt")))?;
    let fingerprint = fingerprint
        .trim()
        .split_once('=')
        .map(|(_, f)| f.to_owned())
        .context(format!("openssl printed {fingerprint:?}"))?;
    let file = w.path("store/revoked.toml");
    std::fs::write(
        &file,
        format!("[[certificate]]\nagent = \"edge\"\nsha256 = \"{fingerprint}\"\nreason = \"key leaked\"\n"),
    )?;
    w.signal_controller(libc::SIGHUP)?;
    w.wait_disconnected("edge")?;
    w.wait_log_line(
        "controller.log",
        &[
            "closing the connection of a revoked agent",
            "agent=edge",
            "key leaked",
        ],
        LIMIT,
    )?;
    let list = w.admin(&["revoked"])?;
    let stored = list["certificates"][0]["sha256"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        stored,
        fingerprint.replace(':', "").to_lowercase(),
        "{list}"
    );

    // A broken edit is reported, naming the file, and the list in force
    // stays: the agent's next attempts are still refused.
    std::fs::write(&file, "[[certificate]\nagent = ")?;
    let refusal = ["TLS handshake refused: revoked certificate", "agent=edge"];
    w.signal_controller(libc::SIGHUP)?;
    w.wait_log_line(
        "controller.log",
        &["revocation list not reloaded", "revoked.toml"],
        LIMIT,
    )?;
    let before = count_lines(&w, "controller.log", &refusal);
    fs::wait_for(LIMIT, "another refused attempt of edge", || {
        count_lines(&w, "controller.log", &refusal) > before
    })?;
    assert_eq!(w.agent_entry("edge")?["connected"], false);
    assert_eq!(w.admin(&["revoked"])?["certificates"][0]["agent"], "edge");

    // Emptied by hand: the agent is back and syncs.
    std::fs::write(&file, "")?;
    w.signal_controller(libc::SIGHUP)?;
    w.wait_connected("edge")?;
    w.sync("edge")?;
    assert_same(&w.export("edge", "d", "latest")?, &w.path("edge.raw"));
    Ok(())
}
