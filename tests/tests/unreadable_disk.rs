//! A disk whose reads fail with EIO, without device-mapper: nbdkit serves an
//! image behind its `error` filter, so that every read answers EIO while the
//! handshake and block status work. The agent reads it either as an NBD
//! export or as a plain file (the export mounted with `nbdfuse`, whose reads
//! then fail with EIO in the kernel, as a disk with bad sectors does).
//!
//! Either way the session fails with the disk-unreadable code; the
//! controller's session error names the disk and says why, once; the
//! agent's status shows the error on that disk; and `tideline-agent dump`
//! of the disk fails naming it, with the cause said once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tideline_tests::fs::wait_for;
use tideline_tests::*;

const BS: u32 = 64 * 1024;

/// nbdkit, killed when dropped whatever the test's outcome.
struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `image` read-only on `sock`, every read failing with EIO, and
/// waits until it accepts clients.
fn serve_failing_reads(image: &Path, sock: &Path) -> Result<Nbdkit> {
    let mut server = Nbdkit(
        Command::new("nbdkit")
            .args(["--foreground", "--readonly", "--exit-with-parent"])
            .arg("--unix")
            .arg(sock)
            .arg("--filter=error")
            .arg("file")
            .arg(image)
            .args(["error-pread=EIO", "error-pread-rate=100%"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nbdkit")?,
    );
    let mut exited = None;
    wait_for(Duration::from_secs(20), "nbdkit to listen", || {
        exited = server.0.try_wait().ok().flatten();
        exited.is_some() || std::os::unix::net::UnixStream::connect(sock).is_ok()
    })?;
    if let Some(status) = exited {
        bail!("nbdkit exited: {status}");
    }
    Ok(server)
}

/// An NBD export mounted as a file with `nbdfuse`; unmounted when dropped.
struct FuseFile {
    child: Child,
    mount: PathBuf,
    file: PathBuf,
}

impl FuseFile {
    /// Mounts the export on `sock` read-only as `<mount>/disk.raw` and
    /// waits until the file shows the export's size.
    fn mount(sock: &Path, mount: &Path, size: u64) -> Result<FuseFile> {
        std::fs::create_dir_all(mount)?;
        let file = mount.join("disk.raw");
        let child = Command::new("nbdfuse")
            .arg("-r")
            .arg(&file)
            .arg("--unix")
            .arg(sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nbdfuse")?;
        let mut fuse = FuseFile {
            child,
            mount: mount.to_owned(),
            file,
        };
        let mut exited = None;
        wait_for(Duration::from_secs(20), "nbdfuse to mount", || {
            exited = fuse.child.try_wait().ok().flatten();
            exited.is_some() || std::fs::metadata(&fuse.file).is_ok_and(|m| m.len() == size)
        })?;
        if let Some(status) = exited {
            bail!("nbdfuse exited: {status}");
        }
        Ok(fuse)
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        // Lazily: an agent may still hold the file open.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `text` says one thing twice in a row, as in
/// `read error: Input/output error (os error 5): Input/output error (os error 5)`.
fn repeats_a_cause(text: &str) -> bool {
    let parts: Vec<&str> = text.split(": ").map(str::trim).collect();
    parts.windows(2).any(|w| w[0] == w[1] && !w[0].is_empty())
}

/// Asserts that `text` names `what` and gives `cause` exactly once.
fn assert_names_once(text: &str, what: &str, cause: &str, context: &str) {
    assert!(
        text.contains(what),
        "{context} does not name {what}: {text}"
    );
    assert_eq!(
        text.matches(cause).count(),
        1,
        "{context} does not give the cause {cause:?} exactly once: {text}"
    );
    assert!(
        !repeats_a_cause(text),
        "{context} repeats its cause: {text}"
    );
}

/// Protects disk `id` at `location` with a fresh agent, syncs it, and
/// checks how the failure is reported: at the controller, in the agent's
/// status, and by `tideline-agent dump`. `cause` is how the read error is
/// spelt for that kind of disk.
fn unreadable_disk_is_reported(
    location: &Path,
    id: &str,
    cause: &str,
    w: &mut World,
) -> Result<()> {
    let disk = DiskSpec {
        id: id.into(),
        path: location.to_owned(),
        block_size: BS,
    };
    w.start_agent("agent-u", &[disk], "")?;
    w.wait_connected("agent-u")?;

    let started = w.admin(&["sync", "--agent", "agent-u", "--no-wait"])?;
    let session_id = started["session"]
        .as_u64()
        .with_context(|| format!("no session id in {started}"))?
        .to_string();
    let mut session = serde_json::Value::Null;
    wait_for(Duration::from_secs(60), "the session to end", || {
        session = w.admin(&["sessions", &session_id]).unwrap_or_default();
        session["state"] == "failed" || session["state"] == "done"
    })
    .with_context(|| {
        format!(
            "session {session_id}: {session}\n{}",
            w.log("agent-agent-u.log")
        )
    })?;
    assert_eq!(session["state"], "failed", "{session}");
    let error = session["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("DiskUnreadable"),
        "not reported as an unreadable disk: {error}"
    );
    assert_names_once(error, id, cause, "the controller's session error");

    // The agent's own status says the same, on that disk.
    let cfg = w.path("agent-agent-u.toml");
    let mut last_error = String::new();
    wait_for(
        Duration::from_secs(20),
        "the disk's last error in the agent's status",
        || {
            let status = run(Command::new(bin("tideline-agent"))
                .arg("--config")
                .arg(&cfg)
                .args(["status", "--json"]))
            .ok()
            .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
            .unwrap_or_default();
            last_error = status["disks"][id]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            !last_error.is_empty()
        },
    )
    .with_context(|| w.log("agent-agent-u.log"))?;
    assert_names_once(&last_error, id, cause, "the agent's status");

    // Reading the disk by hand fails the same way, naming its location.
    let out = w.path("dump.raw");
    let dumped = run(Command::new(bin("tideline-agent"))
        .arg("dump")
        .arg("--path")
        .arg(location)
        .arg("--out")
        .arg(&out));
    let err = match dumped {
        Ok(o) => panic!("dump of a disk that cannot be read succeeded: {o}"),
        Err(e) => format!("{e:#}"),
    };
    // What the agent printed, after the command line `run` quotes.
    let stderr = err
        .split_once("tideline-agent: ")
        .map_or(err.as_str(), |(_, printed)| printed);
    assert_names_once(
        stderr,
        &location.display().to_string(),
        cause,
        "tideline-agent dump",
    );
    Ok(())
}

#[test]
fn an_nbd_export_that_cannot_be_read_fails_the_session_as_unreadable() -> Result<()> {
    let mut w = World::new(&["agent-u"])?;
    w.start_controller()?;
    let image = w.path("disk.raw");
    make_image(&image, 16 << 20, 23)?;
    let sock = w.path("nbd.sock");
    let _server = serve_failing_reads(&image, &sock)?;
    let uri = PathBuf::from(format!("nbd+unix:///?socket={}", sock.display()));
    unreadable_disk_is_reported(&uri, "failing-export", "EIO", &mut w)
}

#[test]
fn a_file_that_cannot_be_read_fails_the_session_as_unreadable() -> Result<()> {
    let mut w = World::new(&["agent-u"])?;
    w.start_controller()?;
    let image = w.path("disk.raw");
    let size = 16 << 20;
    make_image(&image, size, 29)?;
    let sock = w.path("nbd.sock");
    let _server = serve_failing_reads(&image, &sock)?;
    let fuse = FuseFile::mount(&sock, &w.path("mnt"), size)?;
    unreadable_disk_is_reported(&fuse.file, "failing-file", "Input/output error", &mut w)?;
    // The agent is stopped before the file goes away.
    w.kill_agent("agent-u");
    drop(fuse);
    Ok(())
}
