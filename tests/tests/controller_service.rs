//! The controller as a service: systemd notifications over a real
//! NOTIFY_SOCKET (READY=1, STATUS=, WATCHDOG=1, STOPPING=1 on SIGTERM) and
//! its logs as GELF over UDP, as `packaging/systemd/tideline-controller.service`
//! (`Type=notify`, `WatchdogSec=`) expects.

use anyhow::{bail, Result};
use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tideline_tests::service::{wait_for_notification, GelfReceiver};
use tideline_tests::*;

/// The controller process, killed if the test fails before SIGTERM.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn controller_tells_systemd_and_graylog_what_it_does() -> Result<()> {
    let mut w = World::new(&["cs"])?;
    let notify_path = w.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(200)))?;
    let gelf = GelfReceiver::start(Instant::now())?;
    let gelf_port = gelf.port;

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
    let ready = wait_for_notification(&notify, &mut seen, |m| m.contains("READY=1"), "READY=1")?;
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
        wait_for_notification(
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
    wait_for_notification(
        &notify,
        &mut seen,
        |m| m.contains("STATUS=1 agents connected"),
        "a status with one agent connected",
    )?;

    // The controller's logs arrive as GELF, with its fields.
    let (_, accepting) = gelf.wait_for("accepting agents", Duration::from_secs(20))?;
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
    wait_for_notification(
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
    gelf.wait_for("shutting down", Duration::from_secs(20))?;
    Ok(())
}
