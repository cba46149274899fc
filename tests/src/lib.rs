//! End-to-end test harness: real binaries, real TLS on loopback, real files.
//!
//! Each test gets a [`World`]: a temporary directory with a CA and
//! certificates made by `tideline-controller ca`, a controller process
//! listening on a free loopback port, and agent processes configured with
//! the disks the test creates. Admin requests go through the controller's
//! real CLI. Binaries are taken from the cargo target directory of the
//! current profile (`scripts/test.sh` builds them before the tests run).

pub mod appliance;
pub mod fs;
pub mod proxy;
pub mod service;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

pub use serde_json;

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TIDELINE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target.join(profile)
}

/// Path of a Tideline binary; fails clearly when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (scripts/test.sh does: cargo build --bins)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// How long one command a test runs may take before it is killed: a hang
/// becomes a failure that names the command, not a CI run that never ends.
/// `TIDELINE_TEST_COMMAND_SECS` overrides the default of 300 s.
pub fn command_timeout() -> Duration {
    let secs = std::env::var("TIDELINE_TEST_COMMAND_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Runs a command and returns its stdout, failing with its stderr; kills it
/// after [`command_timeout`].
pub fn run(cmd: &mut Command) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + command_timeout();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(String::from_utf8_lossy(&out).into_owned()),
        Some(s) => bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            s,
            String::from_utf8_lossy(&err),
            String::from_utf8_lossy(&out)
        ),
        None => bail!(
            "{:?} was killed after {:?}: {}{}",
            cmd,
            command_timeout(),
            String::from_utf8_lossy(&err),
            String::from_utf8_lossy(&out)
        ),
    }
}

/// A protected disk for an agent's configuration.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    /// Disk id.
    pub id: String,
    /// Image file or block device.
    pub path: PathBuf,
    /// Block size.
    pub block_size: u32,
}

/// One test's controller, agents and files.
pub struct World {
    /// Temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// Controller listen port.
    pub port: u16,
    controller: Option<Child>,
    agents: Vec<(String, Child)>,
    /// Every agent id ever started (their trackers are removed on drop).
    started: std::collections::BTreeSet<String>,
    /// Extra TOML appended to the controller's configuration.
    pub controller_extra: String,
}

impl World {
    /// A world with a CA, a controller certificate, and certificates for
    /// `agents`. The controller is not started yet.
    pub fn new(agents: &[&str]) -> Result<World> {
        let dir = tempfile::Builder::new().prefix("tideline-e2e-").tempdir()?;
        let ctl = bin("tideline-controller");
        let pki = dir.path().join("pki");
        run(Command::new(&ctl)
            .args(["ca", "init", "--dir"])
            .arg(pki.join("ca")))?;
        run(Command::new(&ctl)
            .args(["ca", "issue-controller", "--ca-dir"])
            .arg(pki.join("ca"))
            .arg("--out")
            .arg(&pki)
            .args(["--san", "localhost", "--san", "127.0.0.1"]))?;
        for a in agents {
            run(Command::new(&ctl)
                .args(["ca", "issue-agent", "--ca-dir"])
                .arg(pki.join("ca"))
                .arg("--out")
                .arg(&pki)
                .args(["--id", a]))?;
        }
        Ok(World {
            dir,
            port: free_port(),
            controller: None,
            agents: Vec::new(),
            started: std::collections::BTreeSet::new(),
            controller_extra: String::new(),
        })
    }

    /// Path inside the world's directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The admin socket.
    pub fn socket(&self) -> PathBuf {
        self.path("controller.sock")
    }

    /// Starts (or restarts) the controller and waits for its admin socket.
    pub fn start_controller(&mut self) -> Result<()> {
        let cfg = self.path("controller.toml");
        std::fs::write(
            &cfg,
            format!(
                "[listen]\naddress = \"127.0.0.1:{}\"\nheartbeat_secs = 2\n[tls]\nca = \"pki/ca.crt\"\ncert = \"pki/controller.crt\"\nkey = \"pki/controller.key\"\n[store]\ndir = \"store\"\n[admin]\nsocket = \"controller.sock\"\n{}\n",
                self.port,
                if self.controller_extra.is_empty() {
                    "[schedule]\nresume_window_secs = 120"
                } else {
                    &self.controller_extra
                }
            ),
        )?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.path("controller.log"))?;
        let child = Command::new(bin("tideline-controller"))
            .arg("--config")
            .arg(&cfg)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.controller = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.socket().exists() && self.admin(&["agents"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "controller did not start; log:\n{}",
            self.log("controller.log")
        )
    }

    /// Kills the controller with SIGKILL.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the controller with SIGTERM (a clean stop) and waits for it.
    pub fn stop_controller(&mut self) -> Result<()> {
        let Some(mut c) = self.controller.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + command_timeout();
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait()? {
                if !status.success() {
                    bail!("controller exited with {status} on SIGTERM");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!(
            "controller did not stop within {:?} of SIGTERM",
            command_timeout()
        )
    }

    /// Writes an agent configuration and returns its path.
    pub fn agent_config(
        &self,
        id: &str,
        disks: &[DiskSpec],
        cert_of: &str,
        ca: &str,
        port: u16,
        extra: &str,
    ) -> Result<PathBuf> {
        let mut text = format!(
            "[controller]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\nheartbeat_secs = 2\n[tls]\nca = \"{ca}\"\ncert = \"pki/{cert_of}.crt\"\nkey = \"pki/{cert_of}.key\"\n[state]\ndir = \"state-{id}\"\n{extra}\n"
        );
        if !extra.contains("[tracking]") {
            // Each agent its own write tracker, removed with the world, so
            // that no test leaves a program attached to the kernel.
            text.push_str(&format!(
                "[tracking]\npin_dir = \"{}\"\n",
                self.pin_dir(id).display()
            ));
        }
        for d in disks {
            text.push_str(&format!(
                "[[disk]]\nid = \"{}\"\npath = \"{}\"\nblock_size = {}\n",
                d.id,
                d.path.display(),
                d.block_size
            ));
        }
        let p = self.path(&format!("agent-{id}.toml"));
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// Starts an agent process with the standard configuration (port may be
    /// overridden, e.g. to go through a proxy).
    pub fn start_agent(&mut self, id: &str, disks: &[DiskSpec], extra: &str) -> Result<()> {
        let cfg = self.agent_config(id, disks, id, "pki/ca.crt", self.port, extra)?;
        self.spawn_agent(id, &cfg)
    }

    /// Starts an agent process from an existing configuration file.
    pub fn spawn_agent(&mut self, id: &str, cfg: &Path) -> Result<()> {
        self.spawn_agent_env(id, cfg, &[])
    }

    /// Sends `signal` to an agent and waits up to `timeout` for it to exit;
    /// returns its exit status, or `None` if it is still running.
    pub fn signal_agent(
        &mut self,
        id: &str,
        signal: i32,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let (_, child) = self.agents.iter_mut().find(|(a, _)| a == id)?;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts an agent process with extra environment variables.
    pub fn spawn_agent_env(&mut self, id: &str, cfg: &Path, env: &[(&str, &str)]) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.path(&format!("agent-{id}.log")))?;
        let child = Command::new(bin("tideline-agent"))
            .arg("--config")
            .arg(cfg)
            .arg("run")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.agents.push((id.to_owned(), child));
        self.started.insert(id.to_owned());
        Ok(())
    }

    /// Kills an agent with SIGKILL.
    pub fn kill_agent(&mut self, id: &str) {
        self.agents.retain_mut(|(a, c)| {
            if a == id {
                let _ = c.kill();
                let _ = c.wait();
                false
            } else {
                true
            }
        });
    }

    /// Runs the controller CLI against the admin socket; parses its JSON.
    pub fn admin(&self, args: &[&str]) -> Result<Value> {
        let out = run(Command::new(bin("tideline-controller"))
            .arg("--socket")
            .arg(self.socket())
            .args(args))?;
        serde_json::from_str(&out).with_context(|| format!("admin output is not JSON: {out}"))
    }

    /// Waits until the controller lists `agent` as connected.
    pub fn wait_connected(&self, agent: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.admin(&["agents"]) {
                Ok(v) => {
                    let up = v.as_array().into_iter().flatten().any(|a| {
                        a["id"] == agent
                            && a["connected"] == true
                            && a["inventory_received"] == true
                            && a["disks"].as_array().is_some_and(|d| !d.is_empty())
                    });
                    if up {
                        return Ok(());
                    }
                    last = v.to_string();
                }
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "agent {agent} did not connect; last `agents`: {last}\nagent log:\n{}\ncontroller log:\n{}",
            self.log(&format!("agent-{agent}.log")),
            self.log("controller.log")
        )
    }

    /// Syncs every disk of `agent` and waits; returns the session status.
    pub fn sync(&self, agent: &str) -> Result<Value> {
        self.admin(&["sync", "--agent", agent]).with_context(|| {
            format!(
                "sync of {agent} failed; agent log:\n{}\ncontroller log:\n{}",
                self.log(&format!("agent-{agent}.log")),
                self.log("controller.log")
            )
        })
    }

    /// Exports a point and returns the path of the image.
    pub fn export(&self, agent: &str, disk: &str, point: &str) -> Result<PathBuf> {
        let out = self.path(&format!("export-{agent}-{disk}-{point}.raw"));
        let _ = std::fs::remove_file(&out);
        self.admin(&[
            "export",
            "--agent",
            agent,
            "--disk",
            disk,
            "--point",
            point,
            "--out",
            out.to_str().unwrap_or_default(),
        ])?;
        Ok(out)
    }

    /// Verifies a point; fails unless the controller says it is sound.
    pub fn verify(&self, agent: &str, disk: &str, point: &str) -> Result<Value> {
        self.admin(&["verify", "--agent", agent, "--disk", disk, "--point", point])
    }

    /// Where agent `id` pins its write tracker (bpffs).
    pub fn pin_dir(&self, id: &str) -> PathBuf {
        let name = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        PathBuf::from(format!("/sys/fs/bpf/{name}-{id}"))
    }

    /// A log file's text (for failure messages).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_else(|e| format!("(no {name}: {e})"))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unpinning the links and maps detaches the tracker once no process
        // holds them.
        let ids: Vec<String> = self.started.iter().cloned().collect();
        for id in ids {
            let _ = std::fs::remove_dir_all(self.pin_dir(&id));
        }
        self.kill_controller();
        if std::thread::panicking() || std::env::var_os("TIDELINE_KEEP").is_some() {
            let keep = self.dir.path().to_owned();
            eprintln!("keeping {} for inspection", keep.display());
            let d = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            let _ = d.keep();
        }
    }
}

/// Writes a disk image of `size` bytes with realistic content: runs of
/// incompressible bytes, compressible text, written zeros and holes.
pub fn make_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.set_len(size)?;
    let words: [&[u8]; 8] = [
        b"replica ",
        b"block ",
        b"digest ",
        b"point ",
        b"agent ",
        b"volume ",
        b"restore ",
        b"log\n",
    ];
    let mut off = 0u64;
    let mut buf = Vec::new();
    while off < size {
        let len = (rng.gen_range(1..=32u64) * 64 * 1024).min(size - off);
        buf.clear();
        match rng.gen_range(0..4) {
            0 => {
                buf.resize(len as usize, 0);
                rng.fill_bytes(&mut buf);
            }
            1 => {
                while (buf.len() as u64) < len {
                    buf.extend_from_slice(words[rng.gen_range(0..words.len())]);
                }
                buf.truncate(len as usize);
            }
            2 => buf.resize(len as usize, 0),
            _ => {} // hole: leave unwritten
        }
        if !buf.is_empty() {
            f.write_all_at(&buf, off)?;
        }
        off += len;
    }
    f.sync_all()?;
    Ok(())
}

/// Writes random bytes at `offset`.
pub fn write_random(path: &Path, offset: u64, len: usize, rng: &mut impl RngCore) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    f.write_all_at(&buf, offset)?;
    f.sync_all()?;
    Ok(())
}

/// Whether two files (or block devices) have the same length and bytes.
pub fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    use std::io::{Seek, SeekFrom};
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    // A block device's metadata says 0 bytes: its end says its size.
    let (la, lb) = (fa.seek(SeekFrom::End(0))?, fb.seek(SeekFrom::End(0))?);
    if la != lb {
        return Ok(false);
    }
    fa.seek(SeekFrom::Start(0))?;
    fb.seek(SeekFrom::Start(0))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Asserts that a file equals the expected image, naming both.
pub fn assert_same(actual: &Path, expected: &Path) {
    assert!(
        same_contents(actual, expected).unwrap_or(false),
        "{} differs from {}",
        actual.display(),
        expected.display()
    );
}

/// Copies a file (for keeping the expected image of a point).
pub fn snapshot(src: &Path, dst: &Path) -> Result<()> {
    std::fs::copy(src, dst)?;
    Ok(())
}

/// Blocks of `block_size` that are not all zero in an image.
pub fn nonzero_blocks(path: &Path, block_size: usize) -> Result<Vec<u64>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; block_size];
    let mut out = Vec::new();
    let mut i = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            out.push(i);
        }
        i += 1;
    }
    Ok(out)
}

/// zstd level-1 size of each given block (what the agent would send).
pub fn compressed_sizes(path: &Path, block_size: usize, blocks: &[u64]) -> Result<u64> {
    let f = File::open(path)?;
    let mut total = 0u64;
    let mut buf = vec![0u8; block_size];
    for &b in blocks {
        let n = f.read_at(&mut buf, b * block_size as u64)?;
        let c = zstd::bulk::compress(&buf[..n], 1)?;
        total += c.len().min(n) as u64;
    }
    Ok(total)
}

/// Appends a line to a file (for logs kept by tests).
pub fn note(path: &Path, line: &str) {
    if let Ok(mut f) = File::options().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// Bytes the agent read in its most recent scan, from its log's
/// "disk scanned" line (`u64::MAX` when there is none).
pub fn last_scan_bytes_read(log: &str) -> u64 {
    log.lines()
        .rev()
        .find(|l| l.contains("disk scanned"))
        .and_then(|l| l.split("bytes_read=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Bytes the agent read for its most recent point of `disk`, from its log's
/// "disk copied" line (every round counted; `u64::MAX` when there is none).
pub fn last_point_bytes_read(log: &str, disk: &str) -> u64 {
    log.lines()
        .rev()
        .find(|l| l.contains("disk copied") && l.contains(&format!("disk={disk} ")))
        .and_then(|l| l.split(" bytes_read=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// Revocation (tests/tests/revocation.rs): signalling the controller and
// waiting on log lines and on disconnection.
// ---------------------------------------------------------------------------

impl World {
    /// Sends `signal` (e.g. `libc::SIGHUP`) to the running controller.
    pub fn signal_controller(&self, signal: i32) -> Result<()> {
        let child = self
            .controller
            .as_ref()
            .context("the controller is not running")?;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
            bail!(
                "cannot signal the controller: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits up to `limit` until one line of log `name` contains every
    /// needle; returns that line, or fails with the log.
    pub fn wait_log_line(&self, name: &str, needles: &[&str], limit: Duration) -> Result<String> {
        let mut found = None;
        let waited = fs::wait_for(limit, &format!("{needles:?} in {name}"), || {
            found = self
                .log(name)
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned);
            found.is_some()
        });
        match (waited, found) {
            (Ok(()), Some(line)) => Ok(line),
            (r, _) => Err(r
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("no line found"))
                .context(format!("{name}:\n{}", self.log(name)))),
        }
    }

    /// The controller's `agents` entry for `agent` (`Null` when not listed).
    pub fn agent_entry(&self, agent: &str) -> Result<Value> {
        let agents = self.admin(&["agents"])?;
        Ok(agents
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["id"] == agent)
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// Waits until the controller no longer lists `agent` as connected.
    pub fn wait_disconnected(&self, agent: &str) -> Result<()> {
        fs::wait_for(
            Duration::from_secs(30),
            &format!("agent {agent} to be disconnected"),
            || {
                self.agent_entry(agent)
                    .is_ok_and(|a| a["connected"] != true)
            },
        )
        .with_context(|| format!("controller log:\n{}", self.log("controller.log")))
    }
}

/// Offset and payload length of the record of chunk `digest` in the bytes
/// of a controller pack file (records: 52-byte header with magic `TCHK`,
/// stored length at 12, digest at 16; see controller-stub/src/store/pack.rs),
/// for tests that damage one chunk on purpose.
pub fn find_pack_record(pack: &[u8], digest: &[u8; 32]) -> Option<(usize, usize)> {
    let mut at = 0usize;
    while at + 52 <= pack.len() {
        let stored = u32::from_le_bytes(pack[at + 12..at + 16].try_into().ok()?) as usize;
        if &pack[at..at + 4] != b"TCHK" {
            return None;
        }
        if pack[at + 16..at + 48] == digest[..] {
            return Some((at, stored));
        }
        at += 52 + stored;
    }
    None
}
