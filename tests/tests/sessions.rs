//! Session policy: syncs on a schedule (the RPO), never two at once for an
//! agent, and each agent's points kept apart from every other agent's.

use anyhow::Result;
use std::time::{Duration, Instant};
use tideline_tests::*;

#[test]
fn scheduled_syncs_follow_the_interval() -> Result<()> {
    let mut w = World::new(&["sched"])?;
    w.controller_extra = "[schedule]\ninterval_secs = 2\n".into();
    w.start_controller()?;
    make_image(&w.path("d.raw"), 4 << 20, 61)?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    w.start_agent("sched", &disks, "")?;
    w.wait_connected("sched")?;

    // With no point yet, the first sync starts at once; a second follows
    // once the first point is older than the interval.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut count = 0;
    while Instant::now() < deadline {
        let points = w.admin(&["points", "--agent", "sched", "--disk", "d"])?;
        count = points.as_array().map_or(0, Vec::len);
        if count >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        count >= 2,
        "expected two scheduled points, found {count}:\n{}",
        w.log("controller.log")
    );
    let points = w.admin(&["points", "--agent", "sched", "--disk", "d"])?;
    let t0 = points[0]["created_unix"].as_u64().unwrap_or(0);
    let t1 = points[1]["created_unix"].as_u64().unwrap_or(0);
    assert!(
        t1 >= t0 + 2,
        "points {t0} and {t1} closer than the 2 s interval"
    );
    assert_same(&w.export("sched", "d", "latest")?, &w.path("d.raw"));
    Ok(())
}

#[test]
fn a_second_sync_while_one_runs_is_refused() -> Result<()> {
    let mut w = World::new(&["busy"])?;
    w.start_controller()?;
    make_image(&w.path("d.raw"), 128 << 20, 62)?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    w.start_agent("busy", &disks, "")?;
    w.wait_connected("busy")?;
    let first = w.admin(&["sync", "--agent", "busy", "--no-wait"])?;
    let second = w.admin(&["sync", "--agent", "busy", "--no-wait"]);
    let msg = format!(
        "{:#}",
        second.expect_err("a second concurrent session must be refused")
    );
    assert!(msg.contains("busy"), "{msg}");
    let id = first["session"].as_u64().unwrap_or(0).to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.admin(&["sessions", &id])?["state"] != "done" {
        assert!(Instant::now() < deadline, "first session did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_same(&w.export("busy", "d", "latest")?, &w.path("d.raw"));
    Ok(())
}

#[test]
fn agents_with_the_same_disk_id_keep_separate_points() -> Result<()> {
    let mut w = World::new(&["left", "right"])?;
    w.start_controller()?;
    make_image(&w.path("left.raw"), 6 << 20, 63)?;
    make_image(&w.path("right.raw"), 5 << 20, 64)?;
    w.start_agent(
        "left",
        &[DiskSpec {
            id: "data".into(),
            path: w.path("left.raw"),
            block_size: 65536,
        }],
        "",
    )?;
    w.start_agent(
        "right",
        &[DiskSpec {
            id: "data".into(),
            path: w.path("right.raw"),
            block_size: 65536,
        }],
        "",
    )?;
    w.wait_connected("left")?;
    w.wait_connected("right")?;
    w.sync("left")?;
    w.sync("right")?;
    // The controller files each point under the id in the agent's
    // certificate, so the same disk id never mixes.
    assert_same(&w.export("left", "data", "latest")?, &w.path("left.raw"));
    assert_same(&w.export("right", "data", "latest")?, &w.path("right.raw"));
    Ok(())
}

#[test]
fn prometheus_metrics_report_points_lag_and_sessions() -> Result<()> {
    use std::io::{Read, Write};
    let mut w = World::new(&["prom"])?;
    w.start_controller()?;
    make_image(&w.path("d.raw"), 4 << 20, 65)?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    w.start_agent("prom", &disks, "")?;
    w.wait_connected("prom")?;
    w.sync("prom")?;

    let mut s = std::os::unix::net::UnixStream::connect(w.socket())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("Content-Type: text/plain; version=0.0.4"),
        "{text}"
    );
    for line in [
        "tideline_agent_connected{agent=\"prom\"} 1",
        "tideline_disk_latest_point{agent=\"prom\",disk=\"d\"} 1",
        "tideline_sessions{state=\"done\"} 1",
        "# TYPE tideline_disk_rpo_lag_seconds gauge",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert!(text
        .lines()
        .any(|l| l.starts_with("tideline_disk_rpo_lag_seconds{agent=\"prom\",disk=\"d\"} ")));
    Ok(())
}
