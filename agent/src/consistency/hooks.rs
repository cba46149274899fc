//! Application hooks: executables run before the freeze (to make an
//! application flush and pause its writes) and after the thaw (to resume it).
//!
//! A hook is an executable path and a timeout ([`Hook`]). [`run`] starts it
//! with:
//!
//! - standard input `/dev/null`; standard output and error captured, the last
//!   [`TAIL_BYTES`] of each kept for the report;
//! - its own process group, so that at the timeout the whole group (the hook
//!   and every child it started that stayed in the group) gets SIGTERM, then,
//!   [`KILL_GRACE`] later if anything of it is still there, SIGKILL. A process
//!   that moved to another group or session (a daemon) is not touched: a
//!   pre-freeze hook may leave a lock-holding helper running until its
//!   post-thaw hook, and this is how it does so;
//! - the agent's environment, less systemd's service variables
//!   (`NOTIFY_SOCKET`, `WATCHDOG_PID`, `WATCHDOG_USEC`, `LISTEN_PID`,
//!   `LISTEN_FDS`, `LISTEN_FDNAMES`: a hook must not speak for the agent) and
//!   any inherited `TIDELINE_*`, plus:
//!
//! | variable | value |
//! | --- | --- |
//! | `TIDELINE_PHASE` | `pre-freeze` or `post-thaw` |
//! | `TIDELINE_POINT` | the recovery point id, decimal |
//! | `TIDELINE_SESSION` | the sync session id |
//! | `TIDELINE_GROUP` | the consistency group's name |
//! | `TIDELINE_DISKS` | the disk ids, separated by single spaces |
//! | `TIDELINE_DISK_COUNT` | the number of disks, n |
//! | `TIDELINE_DISK_<i>_ID`, `TIDELINE_DISK_<i>_DEVICE` | for i in 0..n: a disk's id and its device or image path |
//! | `TIDELINE_FREEZE` | post-thaw only: `ok` (frozen, thawed on request), `deadline` (the guard's deadline thawed first), `failed` (the freeze failed), `none` (nothing was frozen) |
//!
//! The result ([`HookOutcome`]) says: succeeded (exit 0), failed (exit code or
//! signal, with the output tails), timed out (and which signal ended it), or
//! could not start (naming the path). The hook's own children that outlive it
//! in other groups keep its output pipes open; the output read within
//! [`OUTPUT_GRACE`] of the hook's exit is what is reported.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How much of the end of stdout and of stderr is kept.
pub const TAIL_BYTES: usize = 4096;
/// After SIGTERM at the timeout, how long before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// After the hook exits, how long its output is still read.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(250);

/// Environment variables systemd gives a service; not passed to hooks.
const SERVICE_VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// A configured hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The executable.
    pub path: PathBuf,
    /// How long it may run.
    pub timeout: Duration,
}

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPhase {
    /// Before the consistency group is frozen.
    PreFreeze,
    /// After it is thawed (also after a failed freeze).
    PostThaw,
}

impl HookPhase {
    /// The `TIDELINE_PHASE` value.
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::PreFreeze => "pre-freeze",
            HookPhase::PostThaw => "post-thaw",
        }
    }
}

/// How the freeze went, for post-thaw hooks (`TIDELINE_FREEZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeSummary {
    /// Frozen, and thawed when the agent asked.
    Ok,
    /// The guard's deadline thawed first.
    Deadline,
    /// The freeze failed.
    Failed,
    /// Nothing was frozen.
    None,
}

impl FreezeSummary {
    /// The `TIDELINE_FREEZE` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FreezeSummary::Ok => "ok",
            FreezeSummary::Deadline => "deadline",
            FreezeSummary::Failed => "failed",
            FreezeSummary::None => "none",
        }
    }
}

/// A protected disk, as a hook sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDisk {
    /// The disk id from the configuration.
    pub id: String,
    /// Its block device or image file.
    pub device: PathBuf,
}

/// What a hook is told about the point being made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookContext {
    /// Which hook this is.
    pub phase: HookPhase,
    /// The recovery point id.
    pub point: u64,
    /// The sync session id.
    pub session: String,
    /// The consistency group.
    pub group: String,
    /// The group's disks.
    pub disks: Vec<HookDisk>,
    /// Post-thaw: how the freeze went.
    pub freeze: Option<FreezeSummary>,
}

impl HookContext {
    /// The `TIDELINE_*` variables, as documented in the module.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("TIDELINE_PHASE".to_owned(), self.phase.as_str().to_owned()),
            ("TIDELINE_POINT".to_owned(), self.point.to_string()),
            ("TIDELINE_SESSION".to_owned(), self.session.clone()),
            ("TIDELINE_GROUP".to_owned(), self.group.clone()),
            (
                "TIDELINE_DISKS".to_owned(),
                self.disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            (
                "TIDELINE_DISK_COUNT".to_owned(),
                self.disks.len().to_string(),
            ),
        ];
        for (i, d) in self.disks.iter().enumerate() {
            env.push((format!("TIDELINE_DISK_{i}_ID"), d.id.clone()));
            env.push((
                format!("TIDELINE_DISK_{i}_DEVICE"),
                d.device.display().to_string(),
            ));
        }
        if let Some(f) = self.freeze {
            env.push(("TIDELINE_FREEZE".to_owned(), f.as_str().to_owned()));
        }
        env
    }
}

/// The last bytes of an output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputTail {
    /// The last [`TAIL_BYTES`] bytes (or fewer).
    pub bytes: Vec<u8>,
    /// How many bytes came before them and were dropped.
    pub dropped: u64,
}

impl OutputTail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > TAIL_BYTES {
            let cut = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..cut);
            self.dropped += cut as u64;
        }
    }
}

impl fmt::Display for OutputTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dropped > 0 {
            write!(f, "[{} bytes before] ", self.dropped)?;
        }
        f.write_str(String::from_utf8_lossy(&self.bytes).trim_end())
    }
}

/// How a hook that ran ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this non-zero code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exit code {c}"),
            ExitKind::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// A hook that could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start hook {}: {cause}", .path.display())]
pub struct HookStartError {
    /// The executable.
    pub path: PathBuf,
    /// Why (`NotFound`, `PermissionDenied`, ...).
    pub cause: io::Error,
}

/// How a hook ended.
#[derive(Debug)]
pub enum HookOutcome {
    /// Exit code 0.
    Succeeded {
        /// The end of its standard output.
        stdout: OutputTail,
        /// The end of its standard error.
        stderr: OutputTail,
    },
    /// Non-zero exit, or killed by a signal it did not get from the agent.
    Failed {
        /// How it ended.
        exit: ExitKind,
        /// The end of its standard output.
        stdout: OutputTail,
        /// The end of its standard error.
        stderr: OutputTail,
    },
    /// Still running at the timeout; its process group was killed.
    TimedOut {
        /// The timeout.
        timeout: Duration,
        /// The last signal the group needed: SIGTERM, or SIGKILL if anything
        /// of it outlived [`KILL_GRACE`].
        killed_with: Signal,
        /// The end of its standard output.
        stdout: OutputTail,
        /// The end of its standard error.
        stderr: OutputTail,
    },
    /// It could not be started.
    CouldNotStart(HookStartError),
}

/// A hook's run, for the point's report.
#[derive(Debug)]
pub struct HookRun {
    /// The executable.
    pub path: PathBuf,
    /// Which hook.
    pub phase: HookPhase,
    /// From start to end (including any kill).
    pub took: Duration,
    /// How it ended.
    pub outcome: HookOutcome,
}

impl HookRun {
    /// Whether it exited with code 0.
    pub fn succeeded(&self) -> bool {
        matches!(self.outcome, HookOutcome::Succeeded { .. })
    }
}

impl fmt::Display for HookRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} hook {}: ", self.phase.as_str(), self.path.display())?;
        match &self.outcome {
            HookOutcome::Succeeded { .. } => write!(f, "succeeded in {:?}", self.took),
            HookOutcome::Failed { exit, stderr, .. } => write!(f, "failed ({exit}): {stderr}"),
            HookOutcome::TimedOut {
                timeout,
                killed_with,
                stderr,
                ..
            } => write!(
                f,
                "timed out after {timeout:?}, killed with {killed_with}: {stderr}"
            ),
            HookOutcome::CouldNotStart(e) => write!(f, "{e}"),
        }
    }
}

/// Reads a pipe into a shared tail until EOF, then says so.
fn drain(
    mut pipe: impl Read + Send + 'static,
    tail: Arc<Mutex<OutputTail>>,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Ok(mut t) = tail.lock() {
                        t.push(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}

/// Whether any process of the group is still running. Zombies do not count
/// (a child the hook left behind is reaped by init, maybe later).
fn group_alive(pgid: Pid) -> bool {
    // Signal 0 checks existence; ESRCH: no process left in the group.
    if killpg(pgid, None).is_err() {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may contain anything but
        // ends at the last ") ".
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            return false;
        };
        let mut f = rest.split(' ');
        let state = f.next();
        let pgrp = f.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid.as_raw()) && state != Some("Z")
    })
}

/// Runs `hook` with the context's environment; never panics, never leaves
/// the hook's process group running past its timeout and [`KILL_GRACE`].
pub fn run(hook: &Hook, ctx: &HookContext) -> HookRun {
    let started = Instant::now();
    let finish = |outcome| HookRun {
        path: hook.path.clone(),
        phase: ctx.phase,
        took: started.elapsed(),
        outcome,
    };
    let mut cmd = Command::new(&hook.path);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, _) in std::env::vars_os() {
        let inherited_ours = k.to_str().is_some_and(|k| k.starts_with("TIDELINE_"));
        if inherited_ours || SERVICE_VARS.iter().any(|v| k == *v) {
            cmd.env_remove(&k);
        }
    }
    cmd.envs(ctx.environment());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            return finish(HookOutcome::CouldNotStart(HookStartError {
                path: hook.path.clone(),
                cause: source,
            }))
        }
    };
    // process_group(0): the group id is the child's pid.
    let pgid = Pid::from_raw(child.id() as i32);
    let stdout = Arc::new(Mutex::new(OutputTail::default()));
    let stderr = Arc::new(Mutex::new(OutputTail::default()));
    let (done_tx, done_rx) = mpsc::channel();
    if let Some(p) = child.stdout.take() {
        drain(p, stdout.clone(), done_tx.clone());
    }
    if let Some(p) = child.stderr.take() {
        drain(p, stderr.clone(), done_tx);
    }
    let wait_until = |child: &mut std::process::Child, until: Instant| loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            // Cannot wait (should not happen for our own child): treat as
            // still running, so the kill path runs.
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= until {
            return None;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(5)));
    };

    let status = wait_until(&mut child, started + hook.timeout);
    let (status, killed_with) = match status {
        Some(s) => (Some(s), None),
        None => {
            let _ = killpg(pgid, Signal::SIGTERM);
            let grace_end = Instant::now() + KILL_GRACE;
            let mut s = wait_until(&mut child, grace_end);
            while group_alive(pgid) && Instant::now() < grace_end {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut last = Signal::SIGTERM;
            if group_alive(pgid) {
                let _ = killpg(pgid, Signal::SIGKILL);
                last = Signal::SIGKILL;
            }
            if s.is_none() {
                // SIGKILL cannot be ignored, but a process blocked in the
                // kernel (a hung NFS server) dies only when it wakes: wait a
                // little, then leave it (unreaped) rather than hang.
                s = wait_until(&mut child, Instant::now() + KILL_GRACE);
            }
            (s, Some(last))
        }
    };
    // Read what is left of the output, briefly.
    let output_end = Instant::now() + OUTPUT_GRACE;
    for _ in 0..2 {
        let left = output_end.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let take = |t: &Arc<Mutex<OutputTail>>| t.lock().map(|t| t.clone()).unwrap_or_default();
    let (stdout, stderr) = (take(&stdout), take(&stderr));
    let outcome = match (killed_with, status) {
        (Some(killed_with), _) => HookOutcome::TimedOut {
            timeout: hook.timeout,
            killed_with,
            stdout,
            stderr,
        },
        (None, Some(s)) if s.success() => HookOutcome::Succeeded { stdout, stderr },
        (None, Some(s)) => HookOutcome::Failed {
            exit: exit_kind(s),
            stdout,
            stderr,
        },
        // Unreachable: without a kill, `status` came from a successful wait.
        (None, None) => HookOutcome::Failed {
            exit: ExitKind::Code(-1),
            stdout,
            stderr,
        },
    };
    finish(outcome)
}

fn exit_kind(s: ExitStatus) -> ExitKind {
    match (s.code(), s.signal()) {
        (Some(c), _) => ExitKind::Code(c),
        (None, Some(sig)) => ExitKind::Signal(sig),
        (None, None) => ExitKind::Code(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = OutputTail::default();
        t.push(&[b'a'; 3000]);
        t.push(&[b'b'; 3000]);
        assert_eq!(t.bytes.len(), TAIL_BYTES);
        assert_eq!(t.dropped, 6000 - TAIL_BYTES as u64);
        assert!(t.bytes.ends_with(&[b'b'; 3000]));
        assert!(t
            .to_string()
            .starts_with(&format!("[{} bytes before] ", t.dropped)));
    }

    #[test]
    fn the_environment_names_every_disk() {
        let ctx = HookContext {
            phase: HookPhase::PostThaw,
            point: 42,
            session: "s-1".into(),
            group: "db".into(),
            disks: vec![
                HookDisk {
                    id: "sys".into(),
                    device: PathBuf::from("/dev/sda"),
                },
                HookDisk {
                    id: "data".into(),
                    device: PathBuf::from("/srv/data.img"),
                },
            ],
            freeze: Some(FreezeSummary::Deadline),
        };
        let env: std::collections::BTreeMap<_, _> = ctx.environment().into_iter().collect();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("TIDELINE_PHASE"), Some("post-thaw"));
        assert_eq!(get("TIDELINE_POINT"), Some("42"));
        assert_eq!(get("TIDELINE_SESSION"), Some("s-1"));
        assert_eq!(get("TIDELINE_GROUP"), Some("db"));
        assert_eq!(get("TIDELINE_DISKS"), Some("sys data"));
        assert_eq!(get("TIDELINE_DISK_COUNT"), Some("2"));
        assert_eq!(get("TIDELINE_DISK_1_ID"), Some("data"));
        assert_eq!(get("TIDELINE_DISK_1_DEVICE"), Some("/srv/data.img"));
        assert_eq!(get("TIDELINE_FREEZE"), Some("deadline"));
        let pre = HookContext {
            phase: HookPhase::PreFreeze,
            freeze: None,
            ..ctx
        };
        assert!(pre
            .environment()
            .iter()
            .all(|(k, _)| k != "TIDELINE_FREEZE"));
    }
}
