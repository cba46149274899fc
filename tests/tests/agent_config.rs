//! A configuration that cannot work stops the agent at start: a missing,
//! unreadable or garbage key, a certificate that does not parse, a key that
//! is not the certificate's, a missing CA. `tideline-agent run` exits
//! non-zero within seconds, names the file once with its cause, and never
//! tells systemd it is ready; `check-config` refuses the same files the same
//! way. A valid configuration still starts and connects.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tideline_tests::fs::wait_for;
use tideline_tests::service::wait_for_notification;
use tideline_tests::*;

/// How long an agent with a configuration that cannot work may run.
const GIVE_UP: Duration = Duration::from_secs(10);

/// A PEM block whose base64 decodes to bytes that are not a certificate.
const NOT_A_CERT: &str = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";

/// An agent process, killed when dropped whatever the test's outcome.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How `tideline-agent run` ended.
struct Ended {
    status: ExitStatus,
    stderr: String,
}

/// Runs `tideline-agent run` on `cfg` and waits for it to exit; fails,
/// with what it printed, if it is still running after [`GIVE_UP`].
fn run_agent(cfg: &Path, env: &[(&str, &str)]) -> Result<Ended> {
    let mut agent = Agent(
        Command::new(bin("tideline-agent"))
            .arg("--config")
            .arg(cfg)
            .arg("run")
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tideline-agent run")?,
    );
    let mut pipe = agent.0.stderr.take().context("agent stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let mut status = None;
    let exited = wait_for(GIVE_UP, "the agent to exit", || {
        status = agent.0.try_wait().ok().flatten();
        status.is_some()
    });
    // Killing a running agent closes the pipe, so the reader ends.
    drop(agent);
    let stderr = reader.join().unwrap_or_default();
    match (exited, status) {
        (Ok(()), Some(status)) => Ok(Ended { status, stderr }),
        _ => bail!(
            "tideline-agent run with {} was still running after {GIVE_UP:?}; stderr:\n{stderr}",
            cfg.display()
        ),
    }
}

/// Whether `text` says one thing twice in a row, as in
/// `cannot read X: No such file (os error 2): No such file (os error 2)`.
fn repeats_a_cause(text: &str) -> bool {
    let parts: Vec<&str> = text.split(": ").map(str::trim).collect();
    parts.windows(2).any(|w| w[0] == w[1] && !w[0].is_empty())
}

/// One configuration that cannot work: the file it must be refused for.
struct Broken {
    name: &'static str,
    /// Agent configuration.
    cfg: PathBuf,
    /// The file the refusal must name.
    culprit: PathBuf,
}

/// Writes, in `pki/<name>/`, a copy of agent `good`'s certificate files
/// that `spoil` then breaks; returns the configuration using them.
fn broken_config(
    w: &World,
    name: &'static str,
    disks: &[DiskSpec],
    spoil: impl FnOnce(&Path, &Path) -> Result<PathBuf>,
) -> Result<Broken> {
    let dir = w.path(&format!("pki/{name}"));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("a.crt"), dir.join("a.key"));
    std::fs::copy(w.path("pki/good.crt"), &cert)?;
    std::fs::copy(w.path("pki/good.key"), &key)?;
    let culprit = spoil(&cert, &key)?;
    let cfg = w.agent_config(
        &format!("broken-{name}"),
        disks,
        &format!("{name}/a"),
        "pki/ca.crt",
        w.port,
        "",
    )?;
    Ok(Broken { name, cfg, culprit })
}

#[test]
fn a_configuration_that_cannot_work_stops_the_agent_at_start() -> Result<()> {
    let mut w = World::new(&["good", "other"])?;
    make_image(&w.path("d.raw"), 1 << 20, 7)?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: w.path("d.raw"),
        block_size: 65536,
    }];
    let other_key = w.path("pki/other.key");
    let mut cases = vec![
        broken_config(&w, "missing-key", &disks, |_, key| {
            std::fs::remove_file(key)?;
            Ok(key.to_owned())
        })?,
        // Root reads files whatever their mode: a directory is what cannot
        // be read here.
        broken_config(&w, "unreadable-key", &disks, |_, key| {
            std::fs::remove_file(key)?;
            std::fs::create_dir(key)?;
            Ok(key.to_owned())
        })?,
        broken_config(&w, "garbage-key", &disks, |_, key| {
            std::fs::write(key, "this is not a private key\n")?;
            Ok(key.to_owned())
        })?,
        broken_config(&w, "garbage-cert", &disks, |cert, _| {
            std::fs::write(cert, NOT_A_CERT)?;
            Ok(cert.to_owned())
        })?,
        broken_config(&w, "not-pem-cert", &disks, |cert, _| {
            std::fs::write(cert, "not PEM at all\n")?;
            Ok(cert.to_owned())
        })?,
        broken_config(&w, "key-of-another", &disks, |_, key| {
            std::fs::copy(&other_key, key)?;
            Ok(key.to_owned())
        })?,
    ];
    // A CA file that is not there.
    let missing_ca = w.agent_config("broken-ca", &disks, "good", "pki/nope.crt", w.port, "")?;
    cases.push(Broken {
        name: "missing-ca",
        cfg: missing_ca,
        culprit: w.path("pki/nope.crt"),
    });

    for case in &cases {
        let culprit = case.culprit.display().to_string();
        // The service manager's socket: the agent must not report READY=1.
        let notify_path = w.path(&format!("notify-{}.sock", case.name));
        let notify = UnixDatagram::bind(&notify_path)?;
        let socket = notify_path.to_string_lossy().into_owned();
        let ended = run_agent(&case.cfg, &[("NOTIFY_SOCKET", &socket)])
            .with_context(|| format!("case {}", case.name))?;
        assert_eq!(
            ended.status.code(),
            Some(1),
            "case {}: {}; stderr:\n{}",
            case.name,
            ended.status,
            ended.stderr
        );
        assert_eq!(
            ended.stderr.matches(&culprit).count(),
            1,
            "case {}: stderr does not name {culprit} once:\n{}",
            case.name,
            ended.stderr
        );
        assert!(
            !repeats_a_cause(&ended.stderr),
            "case {}: stderr repeats its cause:\n{}",
            case.name,
            ended.stderr
        );
        notify.set_nonblocking(true)?;
        let mut buf = [0u8; 4096];
        while let Ok(n) = notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]);
            assert!(
                !msg.contains("READY=1"),
                "case {}: the agent told systemd it was ready: {msg:?}",
                case.name
            );
        }

        // `check-config` refuses the same file, the same way.
        let checked = run(Command::new(bin("tideline-agent"))
            .arg("--config")
            .arg(&case.cfg)
            .arg("check-config"));
        let err = match checked {
            Ok(out) => panic!("case {}: check-config accepted it: {out}", case.name),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&culprit),
            "case {}: check-config does not name {culprit}: {err}",
            case.name
        );
        assert!(
            !repeats_a_cause(&err),
            "case {}: check-config repeats its cause: {err}",
            case.name
        );
    }

    // The valid configuration: READY=1 on the same kind of socket (so the
    // check above could see one), and the agent connects.
    let notify_path = w.path("notify-good.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(200)))?;
    let cfg = w.agent_config("good", &disks, "good", "pki/ca.crt", w.port, "")?;
    let out = run(Command::new(bin("tideline-agent"))
        .arg("--config")
        .arg(&cfg)
        .arg("check-config"))?;
    assert!(out.contains("ok"), "{out}");
    let socket = notify_path.to_string_lossy().into_owned();
    w.spawn_agent_env("good", &cfg, &[("NOTIFY_SOCKET", &socket)])?;
    let mut seen = Vec::new();
    wait_for_notification(&notify, &mut seen, |m| m.contains("READY=1"), "READY=1")?;
    w.start_controller()?;
    w.wait_connected("good")?;
    Ok(())
}

#[test]
fn check_config_names_a_missing_disk_once() -> Result<()> {
    let w = World::new(&["good"])?;
    let missing = w.path("missing.img");
    let disks = [DiskSpec {
        id: "gone".into(),
        path: missing.clone(),
        block_size: 65536,
    }];
    let cfg = w.agent_config("good", &disks, "good", "pki/ca.crt", w.port, "")?;
    let err = match run(Command::new(bin("tideline-agent"))
        .arg("--config")
        .arg(&cfg)
        .arg("check-config"))
    {
        Ok(out) => panic!("check-config accepted a missing disk: {out}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("gone"), "{err}");
    assert!(!repeats_a_cause(&err), "the cause is repeated: {err}");
    Ok(())
}
