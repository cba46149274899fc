//! Interrupted sessions resume from the controller's last acknowledgement:
//! a connection cut by a proxy, and an agent killed with SIGKILL.

use anyhow::{bail, Result};
use serde_json::Value;
use std::time::{Duration, Instant};
use tideline_tests::proxy::Proxy;
use tideline_tests::*;

const BS: u32 = 64 * 1024;
const CHECKPOINT: u64 = 4 << 20;

fn session(w: &World, id: u64) -> Result<Value> {
    w.admin(&["sessions", &id.to_string()])
}

fn wait_acked_past(w: &World, id: u64, fraction: f64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let s = session(w, id)?;
        let d = &s["disks"][0];
        let (acked, total) = (
            d["acked"]["block"].as_u64().unwrap_or(0),
            d["block_count"].as_u64().unwrap_or(0),
        );
        if s["state"] != "running" {
            bail!("session left running before the cut: {s}");
        }
        if total > 0 && acked as f64 >= fraction * total as f64 {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("session {id} never reached {fraction} acknowledged")
}

fn wait_done(w: &World, id: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let s = session(w, id)?;
        match s["state"].as_str() {
            Some("done") => return Ok(s),
            Some("failed") => bail!("session failed: {s}\nagent:\n{}", w.log("agent-r.log")),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    bail!("session {id} did not finish")
}

/// Blocks sent again after the interruption must be at most what was in
/// flight after the last acknowledgement: one checkpoint interval plus the
/// bounded queues between the agent's scan and the controller's store.
fn assert_few_resent(s: &Value, nonzero: u64) {
    let received = s["disks"][0]["blocks_received"].as_u64().unwrap_or(0);
    let resent = received.saturating_sub(nonzero);
    eprintln!("{received} blocks received for {nonzero} data blocks: {resent} sent again after {} resume(s)", s["resumes"]);
    let bound = CHECKPOINT / u64::from(BS) + 512;
    assert!(received >= nonzero, "{s}");
    assert!(
        s["resumes"].as_u64().unwrap_or(0) >= 1,
        "session did not resume: {s}"
    );
    assert!(
        resent <= bound,
        "{resent} blocks sent again (bound {bound}): acknowledged blocks were re-sent\n{s}"
    );
}

/// A 256 MiB disk behind a throttling proxy, with frequent checkpoints, and
/// a sync started and run until 40% of it is acknowledged.
struct Interrupted {
    w: World,
    proxy: Proxy,
    img: std::path::PathBuf,
    cfg: std::path::PathBuf,
    nonzero: u64,
    session: u64,
}

fn sync_until_interrupted(seed: u64) -> Result<Interrupted> {
    let mut w = World::new(&["r"])?;
    w.start_controller()?;
    let img = w.path("disk.raw");
    make_image(&img, 256 << 20, seed)?;
    let nonzero = nonzero_blocks(&img, BS as usize)?.len() as u64;
    let proxy = Proxy::start(w.port, Some(40 << 20), None)?;
    let disks = [DiskSpec {
        id: "data".into(),
        path: img.clone(),
        block_size: BS,
    }];
    let extra = format!("[sync]\ncheckpoint_bytes = {CHECKPOINT}\n");
    let cfg = w.agent_config("r", &disks, "r", "pki/ca.crt", proxy.port, &extra)?;
    w.spawn_agent("r", &cfg)?;
    w.wait_connected("r")?;
    let session = w.admin(&["sync", "--agent", "r", "--no-wait"])?["session"]
        .as_u64()
        .unwrap_or(0);
    wait_acked_past(&w, session, 0.4)?;
    Ok(Interrupted {
        w,
        proxy,
        img,
        cfg,
        nonzero,
        session,
    })
}

#[test]
fn a_connection_cut_mid_sync_resumes_without_resending_acknowledged_blocks() -> Result<()> {
    let t = sync_until_interrupted(21)?;
    t.proxy.cut_all();
    let s = wait_done(&t.w, t.session)?;
    assert_few_resent(&s, t.nonzero);
    assert_same(&t.w.export("r", "data", "latest")?, &t.img);
    Ok(())
}

#[test]
fn an_agent_killed_mid_sync_resumes_after_restart() -> Result<()> {
    let mut t = sync_until_interrupted(22)?;
    t.w.kill_agent("r");
    t.proxy.cut_all();
    t.w.spawn_agent("r", &t.cfg)?;
    let s = wait_done(&t.w, t.session)?;
    assert_few_resent(&s, t.nonzero);
    assert_same(&t.w.export("r", "data", "latest")?, &t.img);

    // The agent's map advanced: an unchanged disk now sends nothing.
    let s = t.w.sync("r")?;
    assert_eq!(s["disks"][0]["blocks_received"].as_u64(), Some(0), "{s}");
    Ok(())
}

#[test]
fn an_agent_stopped_with_sigterm_exits_promptly_and_its_session_resumes() -> Result<()> {
    let mut t = sync_until_interrupted(23)?;
    let asked = Instant::now();
    let status =
        t.w.signal_agent("r", libc::SIGTERM, Duration::from_secs(10));
    let took = asked.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "agent did not exit cleanly: {status:?}"
    );
    // docs/operations.md states that the agent stops within 5 seconds.
    assert!(took < Duration::from_secs(5), "agent took {took:?} to stop");
    assert!(t
        .w
        .log("agent-r.log")
        .contains("stopping at the next frame boundary"));

    // The controller keeps the session for the agent to come back to.
    let deadline = Instant::now() + Duration::from_secs(10);
    while session(&t.w, t.session)?["state"] != "interrupted" {
        assert!(
            Instant::now() < deadline,
            "session not interrupted after the agent stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.w.spawn_agent("r", &t.cfg)?;
    let s = wait_done(&t.w, t.session)?;
    assert_few_resent(&s, t.nonzero);
    assert_same(&t.w.export("r", "data", "latest")?, &t.img);
    Ok(())
}
