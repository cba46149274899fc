//! The controller as a service: systemd notifications over a real
//! NOTIFY_SOCKET (READY=1, STATUS=, WATCHDOG=1, STOPPING=1 on SIGTERM) and
//! its logs as GELF over UDP, as `packaging/systemd/tideline-controller.service`
//! (`Type=notify`, `WatchdogSec=`) expects.

use anyhow::{bail, Result};
use serde_json::Value;
use std::fs::File;
use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tideline_agent::gelf::Reassembler;
use tideline_tests::*;

/// The controller process, killed if the test fails before SIGTERM.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects notifications until one satisfies `want` (or times out).
fn wait_for(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    want: impl Fn(&str) -> bool,
    what: &str,
) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = want(&msg);
            seen.push(msg.clone());
            if hit {
                return Ok(msg);
            }
        }
    }
    bail!("no notification with {what}; received: {seen:#?}")
}

/// GELF messages received until one has `short_message == wanted`.
fn wait_for_gelf(receiver: &UdpSocket, messages: &mut Vec<Value>, wanted: &str) -> Result<Value> {
    let mut reassembler = Reassembler::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        if let Some(m) = messages.iter().find(|m| m["short_message"] == wanted) {
            return Ok(m.clone());
        }
        if let Ok(n) = receiver.recv(&mut buf) {
            if let Some(payload) = reassembler.push(&buf[..n]) {
                messages.push(serde_json::from_slice(&payload)?);
            }
        }
    }
    bail!("no GELF message {wanted:?} among {messages:#?}")
}

#[test]
fn controller_tells_systemd_and_graylog_what_it_does() -> Result<()> {
    let mut w = World::new(&["cs"])?;
    let notify_path = w.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(200)))?;
    let receiver = UdpSocket::bind("127.0.0.1:0")?;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    let gelf_port = receiver.local_addr()?.port();

    let cfg = w.path("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\naddress = \"127.0.0.1:{}\"\nheartbeat_secs = 2\n\
             [tls]\nca = \"pki/ca.crt\"\ncert = \"pki/controller.crt\"\nkey = \"pki/controller.key\"\n\
             [store]\ndir = \"store\"\n[admin]\nsocket = \"controller.sock\"\n\
             [log]\nlevel = \"info\"\ngelf_address = \"127.0.0.1:{gelf_port}\"\ngelf_compression = \"zlib\"\n",
            w.port
        ),
    )?;
    let log = File::create(w.path("controller.log"))?;
    let mut ctl = Controller(
        Command::new(bin("tideline-controller"))
            .arg("--config")
            .arg(&cfg)
            .arg("serve")
            .env_remove("RUST_LOG")
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );

    // READY=1 comes with the first status, once the admin socket answers.
    let mut seen = Vec::new();
    let ready = wait_for(&notify, &mut seen, |m| m.contains("READY=1"), "READY=1")?;
    assert!(
        ready.contains("STATUS=0 agents connected, 0 sessions running"),
        "{ready:?}"
    );
    assert!(
        w.socket().exists(),
        "READY=1 before the admin socket exists"
    );
    w.admin(&["agents"])?;

    // Pings at half of WATCHDOG_USEC: several within a second.
    let started = Instant::now();
    for _ in 0..3 {
        wait_for(
            &notify,
            &mut seen,
            |m| m.contains("WATCHDOG=1"),
            "WATCHDOG=1",
        )?;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "three pings took {:?}",
        started.elapsed()
    );

    // An agent connects: the status says so.
    make_image(&w.path("d.raw"), 4 << 20, 17)?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    w.start_agent("cs", &disks, "")?;
    w.wait_connected("cs")?;
    wait_for(
        &notify,
        &mut seen,
        |m| m.contains("STATUS=1 agents connected"),
        "a status with one agent connected",
    )?;

    // The controller's logs arrive as GELF, with its fields.
    let mut messages = Vec::new();
    let accepting = wait_for_gelf(&receiver, &mut messages, "accepting agents")?;
    assert_eq!(accepting["version"], "1.1");
    assert_eq!(accepting["level"], 6);
    assert_eq!(accepting["_component"], "controller");
    assert_eq!(
        accepting["_address"],
        format!("127.0.0.1:{}", w.port),
        "{accepting}"
    );
    assert!(accepting["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(accepting["timestamp"].as_f64().is_some());
    assert!(accepting["_target"]
        .as_str()
        .is_some_and(|t| t.starts_with("tideline_controller")));

    // SIGTERM: STOPPING=1, then a clean exit.
    w.kill_agent("cs");
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe {
        libc::kill(ctl.0.id() as libc::pid_t, libc::SIGTERM);
    }
    wait_for(
        &notify,
        &mut seen,
        |m| m.contains("STOPPING=1"),
        "STOPPING=1",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = ctl.0.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            bail!("controller did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "controller exit status {status:?}");
    wait_for_gelf(&receiver, &mut messages, "shutting down")?;
    Ok(())
}
