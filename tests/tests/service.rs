//! The agent as a service: systemd notifications over a real NOTIFY_SOCKET,
//! SIGTERM, and GELF log messages over UDP.

use anyhow::Result;
use serde_json::Value;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use tideline_tests::service::{wait_for_notification, GelfReceiver};
use tideline_tests::*;

#[test]
fn systemd_sees_ready_status_watchdog_and_stopping() -> Result<()> {
    let mut w = World::new(&["svc"])?;
    make_image(&w.path("d.raw"), 8 << 20, 91)?;
    let notify_path = w.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(200)))?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    let cfg = w.agent_config("svc", &disks, "svc", "pki/ca.crt", w.port, "")?;
    let socket = notify_path.to_string_lossy().into_owned();
    w.spawn_agent_env(
        "svc",
        &cfg,
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")],
    )?;

    // No controller yet: the agent is ready all the same, and says it is
    // reconnecting.
    let mut seen = Vec::new();
    wait_for_notification(&notify, &mut seen, |m| m.contains("READY=1"), "READY=1")?;
    wait_for_notification(
        &notify,
        &mut seen,
        |m| m.contains("STATUS=reconnecting"),
        "a reconnecting status",
    )?;
    w.start_controller()?;
    w.wait_connected("svc")?;
    wait_for_notification(
        &notify,
        &mut seen,
        |m| m.starts_with("STATUS=connected"),
        "a connected status",
    )?;
    w.sync("svc")?;
    wait_for_notification(&notify, &mut seen, |m| m == "WATCHDOG=1", "watchdog pings")?;

    let status = w.signal_agent("svc", libc::SIGTERM, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "agent did not exit cleanly on SIGTERM: {status:?}"
    );
    wait_for_notification(
        &notify,
        &mut seen,
        |m| m.contains("STOPPING=1"),
        "STOPPING=1",
    )?;
    Ok(())
}

#[test]
fn logs_reach_a_gelf_receiver_with_their_fields() -> Result<()> {
    let mut w = World::new(&["loud"])?;
    w.start_controller()?;
    make_image(&w.path("d.raw"), 8 << 20, 92)?;
    let gelf = GelfReceiver::start(Instant::now())?;
    let port = gelf.port;
    let disks = [DiskSpec {
        id: "data".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    let extra = format!("[log]\ngelf_address = \"127.0.0.1:{port}\"\ngelf_compression = \"gzip\"\ngelf_chunk_size = 600\n");
    let cfg = w.agent_config("loud", &disks, "loud", "pki/ca.crt", w.port, &extra)?;
    w.spawn_agent("loud", &cfg)?;
    w.wait_connected("loud")?;
    w.sync("loud")?;

    let (_, committed) = gelf.wait_for("point committed", Duration::from_secs(10))?;
    let messages: Vec<Value> = gelf.messages().into_iter().map(|(_, m)| m).collect();
    assert_eq!(committed["version"], "1.1");
    assert_eq!(committed["level"], 6);
    assert_eq!(committed["_disk"], "data");
    assert_eq!(committed["_point"], 1);
    assert!(committed["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(committed["timestamp"].as_f64().is_some());
    let scanned = messages
        .iter()
        .find(|m| m["short_message"] == "disk scanned")
        .expect("a 'disk scanned' message");
    assert!(
        scanned["_bytes_read"].as_u64().is_some_and(|b| b > 0),
        "{scanned}"
    );
    Ok(())
}

#[test]
fn bandwidth_limit_holds_and_sighup_reloads_what_it_can() -> Result<()> {
    use rand::SeedableRng;
    let mut w = World::new(&["slow"])?;
    w.start_controller()?;
    // Incompressible data, so wire bytes ≈ disk bytes.
    let img = w.path("d.raw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(93);
    std::fs::File::create(&img)?.set_len(12 << 20)?;
    write_random(&img, 0, 12 << 20, &mut rng)?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: img.clone(),
        block_size: 65536,
    }];
    let extra = "[sync]\ncheckpoint_bytes = 1048576\n[bandwidth]\nlimit = \"4M\"\n";
    let cfg = w.agent_config("slow", &disks, "slow", "pki/ca.crt", w.port, extra)?;
    w.spawn_agent("slow", &cfg)?;
    w.wait_connected("slow")?;
    let s = w.sync("slow")?;
    let secs = s["elapsed_secs"].as_f64().unwrap_or(0.0);
    // 12 MiB at 4 MiB/s, less one burst of 0.4 MiB.
    assert!(secs >= 2.5, "12 MiB took {secs:.2} s under a 4 MiB/s limit");

    // Lift the limit, raise the log level, and change something that needs
    // a restart; SIGHUP applies the first two and names the third.
    let text = std::fs::read_to_string(&cfg)?
        .replace(
            "[bandwidth]\nlimit = \"4M\"\n",
            "[bandwidth]\nlimit = \"0\"\n[log]\nlevel = \"debug\"\n",
        )
        .replace("heartbeat_secs = 2", "heartbeat_secs = 3");
    std::fs::write(&cfg, text)?;
    let before = w.log("agent-slow.log").len();
    w.signal_agent("slow", libc::SIGHUP, Duration::from_millis(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.log("agent-slow.log")[before..].contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = w.log("agent-slow.log")[before..].to_owned();
    assert!(
        log.contains("bandwidth") && log.contains("log.level"),
        "{log}"
    );
    assert!(
        log.contains("need a restart") && log.contains("heartbeat_secs"),
        "{log}"
    );

    write_random(&img, 0, 12 << 20, &mut rng)?;
    let s = w.sync("slow")?;
    let secs = s["elapsed_secs"].as_f64().unwrap_or(f64::MAX);
    assert!(
        secs < 2.0,
        "12 MiB took {secs:.2} s after the limit was lifted"
    );
    // Acknowledgements are logged at debug level: visible only now.
    assert!(
        w.log("agent-slow.log")[before..].contains("DEBUG"),
        "debug logging is not on after the reload"
    );
    assert_same(&w.export("slow", "d", "latest")?, &img);
    Ok(())
}

#[test]
fn status_shows_the_last_point_and_rpo_lag_per_disk() -> Result<()> {
    use std::process::Command;
    let mut w = World::new(&["st"])?;
    w.start_controller()?;
    make_image(&w.path("d.raw"), 4 << 20, 94)?;
    let disks = [DiskSpec {
        id: "data".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    let cfg = w.agent_config("st", &disks, "st", "pki/ca.crt", w.port, "")?;
    w.spawn_agent("st", &cfg)?;
    w.wait_connected("st")?;
    w.sync("st")?;
    // The status file is refreshed about once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let doc: Value = loop {
        let out = run(Command::new(bin("tideline-agent"))
            .arg("--config")
            .arg(&cfg)
            .args(["status", "--json"]))?;
        let doc: Value = serde_json::from_str(&out)?;
        if doc["disks"]["data"]["last_point"] == 1 && doc["connected"] == true {
            break doc;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed point 1: {doc}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(doc["disks"]["data"]["last_point_unix"].as_u64().is_some());
    let text = run(Command::new(bin("tideline-agent"))
        .arg("--config")
        .arg(&cfg)
        .arg("status"))?;
    assert!(
        text.contains("agent running") && text.contains("connected to"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("data "))
        .unwrap_or_default();
    assert!(row.contains(" 1 ") && row.contains("idle"), "{text}");
    Ok(())
}
