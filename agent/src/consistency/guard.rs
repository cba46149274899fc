//! Freezing a consistency group through a separate thaw guard process.
//!
//! A frozen filesystem on a production host is an outage: every writer
//! blocks, uninterruptibly, until someone thaws it. The agent therefore never
//! holds a freeze itself. [`freeze`] starts a guard child process
//! (`/proc/self/exe freeze-guard`: the very binary the agent runs, even after
//! a package upgrade replaced the file) connected by a socketpair; the guard
//! freezes, and the guard thaws when any of these comes first:
//!
//! - the agent asks (`thaw`, sent by [`Frozen::thaw`] or `Frozen`'s drop);
//! - the connection ends: the agent exited, panicked, was SIGKILLed or
//!   OOM-killed (the kernel closes its end of the socket);
//! - SIGTERM, SIGINT or SIGHUP reaches the guard (systemd stopping the
//!   service signals the whole cgroup; Ctrl-C signals the process group);
//! - the deadline: `max_frozen` after the first `FIFREEZE` was issued.
//!
//! The guard sets its `oom_score_adj` to -1000, so the OOM killer does not
//! pick it. Its standard output and error are `/dev/null` (stderr redirected
//! to a log file on a frozen filesystem would block it); it talks only through
//! the socket, its standard input. It opens every mount point (and checks the
//! mount id, so an unmounted path never freezes the filesystem below it)
//! before freezing any, and after freezing it does nothing but `ioctl`s on
//! those open descriptors: it never resolves a path on, or writes to, a
//! frozen filesystem. It never thaws a filesystem it did not freeze: a
//! `FIFREEZE` answered `EBUSY` means someone else froze it; the guard reports
//! that and leaves it frozen.
//!
//! The agent side watches the guard in turn: a thread reads the guard's
//! messages while the group is frozen, and if the connection ends while the
//! guard had reported filesystems frozen and not thawed (the guard was
//! SIGKILLed), the agent thaws those itself at once, through descriptors it
//! opened before the freeze. Only the death of both processes at once (a
//! SIGKILL of the whole cgroup without a SIGTERM first) leaves a freeze
//! behind; systemd sends SIGTERM first, and the guard thaws on it.
//!
//! # Protocol
//!
//! Version 1. Lines of bytes ending in `\n`, at most 20 KiB each, fields
//! separated by one space; mount points are escaped as in mountinfo (`\040`
//! for a space, see [`super::mounts::escape`]).
//!
//! Agent → guard, the request, sent at once:
//!
//! ```text
//! tideline-freeze-guard 1
//! max-frozen-ms <1..=60000>
//! fs <mount id> <major:minor of the superblock> <escaped mount point>   (1 to 256 lines, in freeze order)
//! freeze
//! ```
//!
//! and later, once: `thaw`. Anything else after `freeze` is treated as the
//! connection ending.
//!
//! Guard → agent:
//!
//! ```text
//! synced <µs>                        every filesystem syncfs()ed (all passes), which took µs
//! frozen <index>                     FIFREEZE of fs <index> (0-based) succeeded
//! ready <start ns> <freeze µs> <0|1> all frozen; CLOCK_MONOTONIC of the first FIFREEZE,
//!                                    time the FIFREEZEs took, oom_score_adj -1000 set
//! thaw-failed <index> <errno>        FITHAW of a filesystem the guard froze failed
//!                                    (EINVAL: it was no longer frozen: someone else thawed it)
//! error <kind> <index|-> <errno>     the freeze failed; whatever the guard froze is thawed
//!                                    (thaw-failed lines come first); the guard exits.
//!                                    kinds: request open mount-changed sync busy freeze
//!                                    deadline (errno 0) signal (errno = the signal number)
//! thawed <cause> <µs>                everything thawed; µs from the first FIFREEZE to the last
//!                                    FITHAW. causes: request deadline signal:<n> hangup
//! ```
//!
//! The guard's lines come in this order: `synced`, `frozen` for each
//! filesystem, `ready`; an `error` may end the sequence anywhere (the guard
//! also exits quietly if the connection ends or it is signalled before the
//! first `FIFREEZE`). After `ready`
//! it sends exactly one `thawed` line, at the moment it thaws, whatever the
//! cause, and exits, except after a deadline thaw, where it waits for `thaw`
//! (or the end of the connection, a signal, or 10 minutes) before exiting, so
//! the agent learns that the deadline came first.
//!
//! Freezing is ordered: the request lists the filesystems sorted by mount
//! point (`/` before `/var`), the guard freezes them in that order and thaws
//! in reverse. `syncfs()` of every filesystem comes first, while nothing is
//! frozen, so that `FIFREEZE` has little left to write and the frozen window
//! stays short: up to 3 passes, another while the last took over 50 ms. The
//! window (and the deadline) starts at the first `FIFREEZE`, because writers
//! block from that moment on.
//!
//! # Limits
//!
//! A `FIFREEZE` is one uninterruptible system call that blocks new writers
//! first and then writes back everything dirty. The guard checks the
//! deadline between calls, so it cannot cut a slow `FIFREEZE` short: under a
//! sustained writer as fast as the disk, the dirty data the kernel allows
//! (`vm.dirty_ratio`, gigabytes on a large host) is written inside the
//! window, and the freeze fails with [`FreezeError::TooSlow`] after the bound
//! has already been exceeded. Even idle, each `FIFREEZE` took about 40-50 ms
//! on the 6.18 test kernel (it waits for RCU grace periods), so the bound
//! must allow that per filesystem.
//!
//! # Test-only fault injection
//!
//! [`FAULT_HOLD_FROZEN_MS`] (`TIDELINE_FAULT_HOLD_FROZEN_MS`): when set to a
//! number of milliseconds, [`freeze`] sleeps that long after the guard reports
//! `ready` and before returning, having printed one line to stderr
//! (`... holding N filesystem(s) frozen for M ms (guard pid P)`), so tests can
//! SIGKILL the agent while a filesystem is frozen. It is read in the freeze
//! path only and must never be set in production.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::mounts::{self, DevNum, MountedFs};

/// The hidden subcommand of `tideline-agent` that runs the guard.
pub const GUARD_SUBCOMMAND: &str = "freeze-guard";
/// Test-only: milliseconds [`freeze`] holds the group frozen before returning.
pub const FAULT_HOLD_FROZEN_MS: &str = "TIDELINE_FAULT_HOLD_FROZEN_MS";
/// The most filesystems one freeze covers.
pub const MAX_FILESYSTEMS: usize = 256;
/// The longest frozen-time bound accepted.
pub const MAX_BOUND: Duration = Duration::from_secs(60);

const HELLO: &[u8] = b"tideline-freeze-guard 1";
const MAX_LINE: usize = 20 * 1024;
/// How long the guard waits for the request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for `synced` (syncfs under heavy write load can
/// take long; nothing is frozen yet).
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// The most `syncfs` passes over the group before freezing: another pass
/// follows while the last one took longer than [`SYNC_QUIET`] (there was
/// much to write, so more was probably dirtied meanwhile).
const SYNC_PASSES: usize = 3;
/// A `syncfs` pass this short means the group is quiet enough to freeze.
const SYNC_QUIET: Duration = Duration::from_millis(50);
/// Beyond the bound, how long the agent waits for `ready` or `thawed`.
const GRACE: Duration = Duration::from_secs(5);
/// How long the guard lingers after a deadline thaw for the agent to ask.
const LINGER_AFTER_DEADLINE: Duration = Duration::from_secs(600);

/// `_IOWR('X', 119, int)`, from `<linux/fs.h>`.
const FIFREEZE: libc::Ioctl = 0xC004_5877;
/// `_IOWR('X', 120, int)`, from `<linux/fs.h>`.
const FITHAW: libc::Ioctl = 0xC004_5878;

/// What to freeze, and for how long at most.
#[derive(Debug, Clone)]
pub struct FreezeRequest {
    /// The consistency group's filesystems (from [`mounts::filesystems_on`]).
    pub filesystems: Vec<MountedFs>,
    /// The guard thaws by itself this long after the first `FIFREEZE`.
    pub max_frozen: Duration,
}

/// Why a freeze or thaw failed. Every variant about a filesystem names its
/// mount point.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The request has no filesystem.
    #[error("nothing to freeze: the consistency group has no mounted filesystem")]
    Empty,
    /// The request has more filesystems than the protocol carries.
    #[error("{count} filesystems to freeze; at most {max} are supported")]
    TooMany {
        /// How many were asked for.
        count: usize,
        /// [`MAX_FILESYSTEMS`].
        max: usize,
    },
    /// The bound is zero or longer than [`MAX_BOUND`].
    #[error("frozen-time bound {bound:?} is outside 1 ms ..= {max:?}")]
    Bound {
        /// The bound asked for.
        bound: Duration,
        /// [`MAX_BOUND`].
        max: Duration,
    },
    /// A mount point could not be opened (agent or guard side).
    #[error("cannot open mount point {}: {cause}", .mount_point.display())]
    Open {
        /// The mount point.
        mount_point: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// The path is no longer the mount that was found (unmounted, remounted,
    /// or something mounted over it): find the filesystems again.
    #[error("{} is no longer the mount found earlier (mount id {expected}, now {found:?}); find the filesystems again", .mount_point.display())]
    MountChanged {
        /// The mount point.
        mount_point: PathBuf,
        /// The mount id it had.
        expected: u64,
        /// The mount id the path has now, where the kernel tells.
        found: Option<u64>,
    },
    /// The guard process could not be started.
    #[error("cannot start the thaw guard {}: {cause}", .exe.display())]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// Sending to the guard failed.
    #[error("cannot send to the thaw guard (pid {pid}): {cause}")]
    GuardIo {
        /// The guard's pid.
        pid: u32,
        /// The error.
        cause: io::Error,
    },
    /// The guard sent something the protocol does not have.
    #[error("the thaw guard (pid {pid}) sent an unexpected message: {line:?}")]
    UnexpectedGuardMessage {
        /// The guard's pid.
        pid: u32,
        /// The line, lossily decoded.
        line: String,
    },
    /// The guard did not understand the request (agent and guard binaries
    /// differ?).
    #[error("the thaw guard (pid {pid}) refused the request")]
    GuardRefusedRequest {
        /// The guard's pid.
        pid: u32,
    },
    /// The guard did not answer in time. Its connection was shut down, so it
    /// thaws whatever it froze as soon as it gets control back (a `syncfs` or
    /// `FIFREEZE` can hang on a stuck device).
    #[error("the thaw guard (pid {pid}) did not answer within {waited:?} while {phase}")]
    GuardUnresponsive {
        /// The guard's pid.
        pid: u32,
        /// How long the agent waited.
        waited: Duration,
        /// What it was doing: `syncing`, `freezing` or `thawing`.
        phase: &'static str,
    },
    /// The guard exited without saying why (killed?); nothing is left frozen
    /// (the agent thawed what the guard had reported frozen).
    #[error("the thaw guard (pid {pid}) exited unexpectedly ({status})")]
    GuardExited {
        /// The guard's pid.
        pid: u32,
        /// Its exit status, as text.
        status: String,
    },
    /// `syncfs` failed before freezing.
    #[error("syncfs of {} failed: {cause}", .mount_point.display())]
    Sync {
        /// The mount point.
        mount_point: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// `FIFREEZE` answered `EBUSY`: someone else holds a freeze. It is left
    /// frozen; everything this freeze had frozen is thawed.
    #[error("{} is already frozen by someone else (FIFREEZE: EBUSY); it is left as it is", .mount_point.display())]
    AlreadyFrozen {
        /// The mount point.
        mount_point: PathBuf,
    },
    /// The filesystem type cannot be frozen (`EOPNOTSUPP`).
    #[error("{} ({fs_type}) does not support freezing: {cause}", .mount_point.display())]
    NotSupported {
        /// The mount point.
        mount_point: PathBuf,
        /// Its filesystem type.
        fs_type: String,
        /// The error.
        cause: io::Error,
    },
    /// `FIFREEZE` failed otherwise.
    #[error("FIFREEZE of {} failed: {cause}", .mount_point.display())]
    FreezeFailed {
        /// The mount point.
        mount_point: PathBuf,
        /// The error.
        cause: io::Error,
    },
    /// Freezing took longer than the bound; everything was thawed. A
    /// `FIFREEZE` cannot be interrupted, so writers were blocked for about
    /// `took`: more than the bound (see "Limits" in the module docs).
    #[error("freezing took {took:?}, longer than the bound {max_frozen:?} (passed at {}); everything was thawed", .mount_point.display())]
    TooSlow {
        /// The filesystem frozen when the deadline had passed.
        mount_point: PathBuf,
        /// The bound.
        max_frozen: Duration,
        /// From the end of the `syncfs` passes to the guard's report, as the
        /// agent measured it.
        took: Duration,
    },
    /// The guard was signalled while freezing; everything was thawed.
    #[error("the thaw guard got signal {signal} while freezing; everything was thawed")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// `FITHAW` failed: the filesystem may still be frozen.
    #[error("FITHAW of {} failed, it may still be frozen (thaw it with `fsfreeze -u {}`): {cause}", .mount_point.display(), .mount_point.display())]
    ThawFailed {
        /// The mount point.
        mount_point: PathBuf,
        /// The error.
        cause: io::Error,
    },
}

/// Why the group was thawed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThawCause {
    /// The agent asked: the reads done while frozen are consistent.
    Requested,
    /// The guard's deadline came first: reads after it cannot be trusted.
    Deadline,
    /// The guard was signalled (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
    /// The guard died, or the connection broke; the agent thawed what the
    /// guard had frozen.
    ConnectionLost,
}

impl std::fmt::Display for ThawCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThawCause::Requested => f.write_str("request"),
            ThawCause::Deadline => f.write_str("deadline"),
            ThawCause::Signal(n) => write!(f, "signal {n}"),
            ThawCause::ConnectionLost => f.write_str("connection lost"),
        }
    }
}

/// What a thaw found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThawReport {
    /// From the first `FIFREEZE` to the last `FITHAW`, as the guard measured
    /// (for [`ThawCause::ConnectionLost`], as the agent measured).
    pub frozen_for: Duration,
    /// Why the group was thawed.
    pub cause: ThawCause,
    /// Filesystems that were no longer frozen when thawed (`FITHAW`:
    /// `EINVAL`): someone else thawed them during the window.
    pub thawed_by_others: Vec<PathBuf>,
}

impl ThawReport {
    /// Whether the guard's deadline thawed before the agent asked.
    pub fn deadline_fired(&self) -> bool {
        self.cause == ThawCause::Deadline
    }

    /// Whether every filesystem stayed frozen until the agent asked, so the
    /// reads done while "frozen" form a consistent point.
    pub fn trustworthy(&self) -> bool {
        self.cause == ThawCause::Requested && self.thawed_by_others.is_empty()
    }
}

/// A frozen consistency group. Thaw it with [`Frozen::thaw`]; dropping it
/// thaws too (best effort, result logged).
#[derive(Debug)]
pub struct Frozen {
    filesystems: Vec<MountedFs>,
    frozen_at: Instant,
    max_frozen: Duration,
    sync_took: Duration,
    freeze_took: Duration,
    oom_protected: bool,
    pid: u32,
    stream: UnixStream,
    events: Receiver<Event>,
    done: bool,
}

impl Frozen {
    /// When the first `FIFREEZE` was issued (writers block from then on).
    pub fn frozen_at(&self) -> Instant {
        self.frozen_at
    }

    /// When the guard thaws by itself.
    pub fn deadline(&self) -> Instant {
        self.frozen_at + self.max_frozen
    }

    /// The filesystems frozen, in freeze order.
    pub fn filesystems(&self) -> &[MountedFs] {
        &self.filesystems
    }

    /// How long the `syncfs` calls before freezing took.
    pub fn sync_took(&self) -> Duration {
        self.sync_took
    }

    /// How long the `FIFREEZE` calls took (part of the frozen window).
    pub fn freeze_took(&self) -> Duration {
        self.freeze_took
    }

    /// Whether the guard could set its `oom_score_adj` to -1000.
    pub fn oom_protected(&self) -> bool {
        self.oom_protected
    }

    /// The guard's process id.
    pub fn guard_pid(&self) -> u32 {
        self.pid
    }

    /// Asks the guard to thaw, and reports how the group was thawed.
    pub fn thaw(mut self) -> Result<ThawReport, FreezeError> {
        self.finish()
    }

    fn mount_point(&self, index: usize) -> PathBuf {
        self.filesystems
            .get(index)
            .map_or_else(|| PathBuf::from("?"), |f| f.mount_point.clone())
    }

    fn finish(&mut self) -> Result<ThawReport, FreezeError> {
        self.done = true;
        // The guard may be gone already (signal, death): the events say so.
        let _ = send_all(self.stream.as_fd(), b"thaw\n");
        let started = Instant::now();
        let limit = GRACE + self.max_frozen;
        let mut by_others = Vec::new();
        let mut failed: Option<(usize, i32)> = None;
        loop {
            let left = limit.saturating_sub(started.elapsed());
            let ev = match self.events.recv_timeout(left) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    return Err(FreezeError::GuardUnresponsive {
                        pid: self.pid,
                        waited: limit,
                        phase: "thawing",
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(FreezeError::GuardExited {
                        pid: self.pid,
                        status: "no answer to thaw".into(),
                    })
                }
            };
            match ev {
                Event::Msg(GuardMsg::ThawFailed { index, errno }) => {
                    if errno == libc::EINVAL {
                        by_others.push(self.mount_point(index));
                    } else {
                        failed.get_or_insert((index, errno));
                    }
                }
                Event::Msg(GuardMsg::Thawed { cause, frozen_us }) => {
                    if let Some((index, errno)) = failed {
                        return Err(FreezeError::ThawFailed {
                            mount_point: self.mount_point(index),
                            cause: io::Error::from_raw_os_error(errno),
                        });
                    }
                    return Ok(ThawReport {
                        frozen_for: Duration::from_micros(frozen_us),
                        cause: match cause {
                            WireCause::Request => ThawCause::Requested,
                            WireCause::Deadline => ThawCause::Deadline,
                            WireCause::Signal(n) => ThawCause::Signal(n),
                            WireCause::Hangup => ThawCause::ConnectionLost,
                        },
                        thawed_by_others: by_others,
                    });
                }
                Event::Lost { rethawed, .. } => {
                    for (index, result) in rethawed {
                        match result {
                            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
                                return Err(FreezeError::ThawFailed {
                                    mount_point: self.mount_point(index),
                                    cause: e,
                                })
                            }
                            _ => {}
                        }
                    }
                    return Ok(ThawReport {
                        frozen_for: self.frozen_at.elapsed(),
                        cause: ThawCause::ConnectionLost,
                        thawed_by_others: by_others,
                    });
                }
                Event::Malformed(line) => {
                    return Err(FreezeError::UnexpectedGuardMessage {
                        pid: self.pid,
                        line,
                    })
                }
                Event::Closed { status } => {
                    return Err(FreezeError::GuardExited {
                        pid: self.pid,
                        status,
                    })
                }
                Event::Msg(_) => {}
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            match self.finish() {
                Ok(r) => tracing::warn!(
                    frozen_ms = r.frozen_for.as_millis() as u64,
                    cause = %r.cause,
                    "consistency group thawed on drop"
                ),
                Err(e) => tracing::error!(error = %e, "thaw on drop failed"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// System calls.

fn errno_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fifreeze(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FIFREEZE takes an int argument it does not read; the fd is open.
    errno_result(unsafe { libc::ioctl(fd.as_raw_fd(), FIFREEZE, 0 as libc::c_int) })
}

fn fithaw(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: as for FIFREEZE.
    errno_result(unsafe { libc::ioctl(fd.as_raw_fd(), FITHAW, 0 as libc::c_int) })
}

fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain system call on an open fd.
    errno_result(unsafe { libc::syncfs(fd.as_raw_fd()) })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `Instant` uses on Linux, shared
/// by all processes, so the guard's timestamps convert to the agent's.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// The `Instant` of a CLOCK_MONOTONIC reading. The clock is read before
/// `Instant::now`, so a pause between the two reads makes the result later,
/// never earlier, than the truth.
fn instant_at_mono_ns(ns: u64) -> Instant {
    let ago = Duration::from_nanos(mono_ns().saturating_sub(ns));
    let now = Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

/// Sends all of `bytes` without raising SIGPIPE if the peer is gone.
fn send_all(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a valid buffer of the given length.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Writes out the dirty data of `filesystems` (`syncfs`), while they run.
///
/// The write tracker sees a write only when it reaches the block device, so
/// what still sits in the page cache is invisible to the pre-copy rounds;
/// flushing before each round's take puts it in that round, and leaves the
/// freeze (which must flush too) little to write while writers wait.
/// Returns how long it took. A mount point that cannot be opened any more
/// is skipped: the freeze will name it.
pub fn flush(filesystems: &[MountedFs]) -> Duration {
    let started = Instant::now();
    for fs in filesystems {
        if let Ok(f) = open_mount_point(&fs.mount_point, fs.mount_id, fs.superblock) {
            let _ = syncfs(f.as_fd());
        }
    }
    started.elapsed()
}

enum OpenFailure {
    Io(io::Error),
    Changed { found: Option<u64> },
}

/// Opens a mount point and checks it is still the mount `mount_id` (or, on
/// kernels without mount ids, on the superblock `sb`).
fn open_mount_point(path: &Path, mount_id: u64, sb: DevNum) -> Result<std::fs::File, OpenFailure> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(OpenFailure::Io)?;
    let of = mounts::mount_of_fd(f.as_fd()).map_err(OpenFailure::Io)?;
    match of.mount_id {
        Some(id) if id != mount_id => Err(OpenFailure::Changed { found: Some(id) }),
        None if sb.major != 0 && of.dev != sb => Err(OpenFailure::Changed { found: None }),
        _ => Ok(f),
    }
}

// ---------------------------------------------------------------------------
// Protocol messages.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Request,
    Open,
    MountChanged,
    Sync,
    Busy,
    Freeze,
    Deadline,
    Signal,
}

const ERROR_KINDS: [(ErrorKind, &str); 8] = [
    (ErrorKind::Request, "request"),
    (ErrorKind::Open, "open"),
    (ErrorKind::MountChanged, "mount-changed"),
    (ErrorKind::Sync, "sync"),
    (ErrorKind::Busy, "busy"),
    (ErrorKind::Freeze, "freeze"),
    (ErrorKind::Deadline, "deadline"),
    (ErrorKind::Signal, "signal"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireCause {
    Request,
    Deadline,
    Signal(i32),
    Hangup,
}

/// A guard → agent line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GuardMsg {
    Synced {
        took_us: u64,
    },
    FsFrozen {
        index: usize,
    },
    Ready {
        start_ns: u64,
        freeze_us: u64,
        oom_protected: bool,
    },
    ThawFailed {
        index: usize,
        errno: i32,
    },
    Error {
        kind: ErrorKind,
        index: Option<usize>,
        errno: i32,
    },
    Thawed {
        cause: WireCause,
        frozen_us: u64,
    },
}

impl GuardMsg {
    fn encode(&self) -> String {
        match self {
            GuardMsg::Synced { took_us } => format!("synced {took_us}\n"),
            GuardMsg::FsFrozen { index } => format!("frozen {index}\n"),
            GuardMsg::Ready {
                start_ns,
                freeze_us,
                oom_protected,
            } => format!(
                "ready {start_ns} {freeze_us} {}\n",
                u8::from(*oom_protected)
            ),
            GuardMsg::ThawFailed { index, errno } => format!("thaw-failed {index} {errno}\n"),
            GuardMsg::Error { kind, index, errno } => {
                let k = ERROR_KINDS
                    .iter()
                    .find(|(x, _)| x == kind)
                    .map_or("request", |(_, s)| s);
                let i = index.map_or_else(|| "-".to_owned(), |i| i.to_string());
                format!("error {k} {i} {errno}\n")
            }
            GuardMsg::Thawed { cause, frozen_us } => {
                let c = match cause {
                    WireCause::Request => "request".to_owned(),
                    WireCause::Deadline => "deadline".to_owned(),
                    WireCause::Signal(n) => format!("signal:{n}"),
                    WireCause::Hangup => "hangup".to_owned(),
                };
                format!("thawed {c} {frozen_us}\n")
            }
        }
    }

    /// Parses one line (without its `\n`); `None` if it is not a message.
    fn parse(line: &[u8]) -> Option<GuardMsg> {
        let line = std::str::from_utf8(line).ok()?;
        let f: Vec<&str> = line.split(' ').collect();
        let index = |s: &str| s.parse::<usize>().ok().filter(|&i| i < MAX_FILESYSTEMS);
        Some(match f.as_slice() {
            ["synced", us] => GuardMsg::Synced {
                took_us: us.parse().ok()?,
            },
            ["frozen", i] => GuardMsg::FsFrozen { index: index(i)? },
            ["ready", ns, us, oom] => GuardMsg::Ready {
                start_ns: ns.parse().ok()?,
                freeze_us: us.parse().ok()?,
                oom_protected: match *oom {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                },
            },
            ["thaw-failed", i, e] => GuardMsg::ThawFailed {
                index: index(i)?,
                errno: e.parse().ok()?,
            },
            ["error", k, i, e] => GuardMsg::Error {
                kind: ERROR_KINDS.iter().find(|(_, s)| s == k)?.0,
                index: if *i == "-" { None } else { Some(index(i)?) },
                errno: e.parse().ok()?,
            },
            ["thawed", c, us] => GuardMsg::Thawed {
                cause: match *c {
                    "request" => WireCause::Request,
                    "deadline" => WireCause::Deadline,
                    "hangup" => WireCause::Hangup,
                    s => WireCause::Signal(s.strip_prefix("signal:")?.parse().ok()?),
                },
                frozen_us: us.parse().ok()?,
            },
            _ => return None,
        })
    }
}

/// The request as the guard receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WireRequest {
    max_frozen: Duration,
    filesystems: Vec<(u64, DevNum, PathBuf)>,
}

impl WireRequest {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(HELLO);
        out.extend_from_slice(
            format!("\nmax-frozen-ms {}\n", self.max_frozen.as_millis()).as_bytes(),
        );
        for (id, sb, path) in &self.filesystems {
            out.extend_from_slice(format!("fs {id} {sb} ").as_bytes());
            out.extend_from_slice(&mounts::escape(path.as_os_str().as_bytes()));
            out.push(b'\n');
        }
        out.extend_from_slice(b"freeze\n");
        out
    }

    /// Parses the lines before `freeze`.
    fn parse(lines: &[Vec<u8>]) -> Option<WireRequest> {
        let (hello, rest) = lines.split_first()?;
        if hello != HELLO {
            return None;
        }
        let (bound, fss) = rest.split_first()?;
        let ms: u64 = std::str::from_utf8(bound.strip_prefix(b"max-frozen-ms ")?)
            .ok()?
            .parse()
            .ok()?;
        let max_frozen = Duration::from_millis(ms);
        if ms == 0 || max_frozen > MAX_BOUND || fss.is_empty() || fss.len() > MAX_FILESYSTEMS {
            return None;
        }
        let mut filesystems = Vec::with_capacity(fss.len());
        for l in fss {
            let l = l.strip_prefix(b"fs ")?;
            let mut parts = l.splitn(3, |&b| b == b' ');
            let id = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
            let sb = DevNum::parse(parts.next()?)?;
            let path = PathBuf::from(<std::ffi::OsStr as OsStrExt>::from_bytes(
                &mounts::unescape(parts.next()?),
            ));
            if !path.is_absolute() {
                return None;
            }
            filesystems.push((id, sb, path));
        }
        Some(WireRequest {
            max_frozen,
            filesystems,
        })
    }
}

// ---------------------------------------------------------------------------
// Agent side.

/// What the watcher thread tells the agent.
#[derive(Debug)]
enum Event {
    Msg(GuardMsg),
    Malformed(String),
    /// The connection ended while filesystems the guard had frozen were not
    /// reported thawed; the watcher thawed them (results per index).
    Lost {
        rethawed: Vec<(usize, io::Result<()>)>,
        status: String,
    },
    /// The connection ended with nothing left frozen.
    Closed {
        status: String,
    },
}

/// Reads the guard's lines until the connection ends, tracks which
/// filesystems the guard holds frozen, and thaws them itself if the guard
/// dies holding them.
fn watch(stream: UnixStream, mut child: Child, fds: Vec<std::fs::File>, tx: Sender<Event>) {
    let mut held = vec![false; fds.len()];
    let mut stuck = vec![false; fds.len()];
    let mut reader = BufReader::new(&stream);
    let mut clean_end = true;
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let msg = line
            .strip_suffix(b"\n")
            .and_then(GuardMsg::parse)
            .filter(|m| match m {
                GuardMsg::FsFrozen { index } | GuardMsg::ThawFailed { index, .. } => {
                    *index < held.len()
                }
                GuardMsg::Error { index, .. } => !matches!(index, Some(i) if *i >= held.len()),
                _ => true,
            });
        let Some(msg) = msg else {
            let _ = tx.send(Event::Malformed(
                String::from_utf8_lossy(&line).chars().take(200).collect(),
            ));
            // Whatever the guard holds, this side thaws below; make the guard
            // see the end of the connection too.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            clean_end = false;
            break;
        };
        match &msg {
            GuardMsg::FsFrozen { index } => held[*index] = true,
            // Not EINVAL: it may still be frozen; try again if the guard
            // goes away.
            GuardMsg::ThawFailed { index, errno } => stuck[*index] = *errno != libc::EINVAL,
            // Everything the guard froze is thawed, except what a
            // thaw-failed line (sent before this one) named.
            GuardMsg::Thawed { .. } | GuardMsg::Error { .. } => held.clone_from(&stuck),
            _ => {}
        }
        let _ = tx.send(Event::Msg(msg));
    }
    let to_thaw: Vec<usize> = (0..held.len()).rev().filter(|&i| held[i]).collect();
    let rethawed: Vec<(usize, io::Result<()>)> = to_thaw
        .into_iter()
        .map(|i| (i, fithaw(fds[i].as_fd())))
        .collect();
    // The guard closes its socket only by exiting, so this wait is short;
    // after a malformed message it may still be alive (it now sees EOF and
    // exits), so report before waiting.
    let status = if clean_end {
        child
            .wait()
            .map_or_else(|e| format!("wait failed: {e}"), |s| s.to_string())
    } else {
        "sent a malformed message".to_owned()
    };
    let _ = tx.send(if rethawed.is_empty() {
        Event::Closed { status }
    } else {
        Event::Lost { rethawed, status }
    });
    if !clean_end {
        let _ = child.wait();
    }
}

fn fault_hold_frozen() -> Option<Duration> {
    let v = std::env::var(FAULT_HOLD_FROZEN_MS).ok()?;
    v.trim().parse().ok().map(Duration::from_millis)
}

/// Freezes every filesystem of `req` through a guard process started from
/// `guard_exe` (normally `/proc/self/exe`), and returns once all are frozen.
/// The filesystems are frozen sorted by mount point, once per superblock.
/// On error nothing this call froze is left frozen (except where
/// [`FreezeError::ThawFailed`] says otherwise).
pub fn freeze(req: &FreezeRequest, guard_exe: &Path) -> Result<Frozen, FreezeError> {
    if req.filesystems.is_empty() {
        return Err(FreezeError::Empty);
    }
    if req.max_frozen < Duration::from_millis(1) || req.max_frozen > MAX_BOUND {
        return Err(FreezeError::Bound {
            bound: req.max_frozen,
            max: MAX_BOUND,
        });
    }
    let mut filesystems = req.filesystems.clone();
    filesystems.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    let mut seen = std::collections::BTreeSet::new();
    filesystems.retain(|f| seen.insert(f.superblock));
    if filesystems.len() > MAX_FILESYSTEMS {
        return Err(FreezeError::TooMany {
            count: filesystems.len(),
            max: MAX_FILESYSTEMS,
        });
    }
    // The agent's own descriptors, for thawing if the guard dies.
    let mut fds = Vec::with_capacity(filesystems.len());
    for f in &filesystems {
        match open_mount_point(&f.mount_point, f.mount_id, f.superblock) {
            Ok(fd) => fds.push(fd),
            Err(OpenFailure::Io(source)) => {
                return Err(FreezeError::Open {
                    mount_point: f.mount_point.clone(),
                    cause: source,
                })
            }
            Err(OpenFailure::Changed { found }) => {
                return Err(FreezeError::MountChanged {
                    mount_point: f.mount_point.clone(),
                    expected: f.mount_id,
                    found,
                })
            }
        }
    }
    let spawn_err = |source| FreezeError::Spawn {
        exe: guard_exe.to_owned(),
        cause: source,
    };
    let (ours, theirs) = UnixStream::pair().map_err(spawn_err)?;
    let child = {
        // The Command owns the guard's end; dropping it at the end of this
        // block closes the agent's copy, so the guard alone holds it.
        let mut cmd = Command::new(guard_exe);
        cmd.arg(GUARD_SUBCOMMAND)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/");
        cmd.spawn().map_err(spawn_err)?
    };
    let pid = child.id();
    let wire = WireRequest {
        max_frozen: req.max_frozen,
        filesystems: filesystems
            .iter()
            .map(|f| (f.mount_id, f.superblock, f.mount_point.clone()))
            .collect(),
    };
    let reader = ours
        .try_clone()
        .map_err(|source| FreezeError::GuardIo { pid, cause: source })?;
    let (tx, rx) = mpsc::channel();
    let watcher_fds = fds;
    std::thread::Builder::new()
        .name("freeze-watch".into())
        .spawn(move || watch(reader, child, watcher_fds, tx))
        .map_err(|source| FreezeError::GuardIo { pid, cause: source })?;
    let abort = |e: FreezeError| {
        // The guard thaws whatever it froze when it sees the end.
        let _ = ours.shutdown(std::net::Shutdown::Both);
        e
    };
    send_all(ours.as_fd(), &wire.encode())
        .map_err(|source| abort(FreezeError::GuardIo { pid, cause: source }))?;

    let mount_point = |i: Option<usize>| {
        i.and_then(|i| filesystems.get(i))
            .map_or_else(|| PathBuf::from("?"), |f| f.mount_point.clone())
    };
    let mut phase = ("syncing", SYNC_TIMEOUT);
    let mut phase_started = Instant::now();
    let mut sync_took = Duration::ZERO;
    let mut thaw_failed: Option<(usize, i32)> = None;
    loop {
        let left = phase.1.saturating_sub(phase_started.elapsed());
        let ev = match rx.recv_timeout(left) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => {
                return Err(abort(FreezeError::GuardUnresponsive {
                    pid,
                    waited: phase.1,
                    phase: phase.0,
                }))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(FreezeError::GuardExited {
                    pid,
                    status: "watcher ended".into(),
                })
            }
        };
        match ev {
            Event::Msg(GuardMsg::Synced { took_us }) => {
                sync_took = Duration::from_micros(took_us);
                phase = ("freezing", req.max_frozen + GRACE);
                phase_started = Instant::now();
            }
            Event::Msg(GuardMsg::FsFrozen { .. }) => {}
            Event::Msg(GuardMsg::ThawFailed { index, errno }) => {
                thaw_failed.get_or_insert((index, errno));
            }
            Event::Msg(GuardMsg::Error { kind, index, errno }) => {
                let mp = mount_point(index);
                if let Some((i, e)) = thaw_failed.filter(|(_, e)| *e != libc::EINVAL) {
                    tracing::error!(mount_point = %mp.display(), ?kind, errno, "freeze failed");
                    return Err(FreezeError::ThawFailed {
                        mount_point: mount_point(Some(i)),
                        cause: io::Error::from_raw_os_error(e),
                    });
                }
                let source = io::Error::from_raw_os_error(errno);
                return Err(match kind {
                    ErrorKind::Request => FreezeError::GuardRefusedRequest { pid },
                    ErrorKind::Open => FreezeError::Open {
                        mount_point: mp,
                        cause: source,
                    },
                    ErrorKind::MountChanged => FreezeError::MountChanged {
                        expected: index
                            .and_then(|i| filesystems.get(i))
                            .map_or(0, |f| f.mount_id),
                        mount_point: mp,
                        found: None,
                    },
                    ErrorKind::Sync => FreezeError::Sync {
                        mount_point: mp,
                        cause: source,
                    },
                    ErrorKind::Busy => FreezeError::AlreadyFrozen { mount_point: mp },
                    ErrorKind::Freeze if errno == libc::EOPNOTSUPP => FreezeError::NotSupported {
                        fs_type: index
                            .and_then(|i| filesystems.get(i))
                            .map_or_else(String::new, |f| f.fs_type.clone()),
                        mount_point: mp,
                        cause: source,
                    },
                    ErrorKind::Freeze => FreezeError::FreezeFailed {
                        mount_point: mp,
                        cause: source,
                    },
                    ErrorKind::Deadline => FreezeError::TooSlow {
                        mount_point: mp,
                        max_frozen: req.max_frozen,
                        took: phase_started.elapsed(),
                    },
                    ErrorKind::Signal => FreezeError::Interrupted { signal: errno },
                });
            }
            Event::Msg(GuardMsg::Ready {
                start_ns,
                freeze_us,
                oom_protected,
            }) => {
                let frozen = Frozen {
                    filesystems,
                    frozen_at: instant_at_mono_ns(start_ns),
                    max_frozen: req.max_frozen,
                    sync_took,
                    freeze_took: Duration::from_micros(freeze_us),
                    oom_protected,
                    pid,
                    stream: ours,
                    events: rx,
                    done: false,
                };
                if let Some(hold) = fault_hold_frozen() {
                    eprintln!(
                        "tideline-agent: {FAULT_HOLD_FROZEN_MS}: holding {} filesystem(s) frozen for {} ms (guard pid {pid})",
                        frozen.filesystems.len(),
                        hold.as_millis()
                    );
                    std::thread::sleep(hold);
                }
                return Ok(frozen);
            }
            Event::Msg(m @ GuardMsg::Thawed { .. }) => {
                return Err(abort(FreezeError::UnexpectedGuardMessage {
                    pid,
                    line: m.encode().trim_end().to_owned(),
                }))
            }
            Event::Malformed(line) => {
                return Err(abort(FreezeError::UnexpectedGuardMessage { pid, line }))
            }
            Event::Lost { rethawed, status } => {
                for (i, r) in rethawed {
                    if let Err(e) = r {
                        if e.raw_os_error() != Some(libc::EINVAL) {
                            return Err(FreezeError::ThawFailed {
                                mount_point: mount_point(Some(i)),
                                cause: e,
                            });
                        }
                    }
                }
                return Err(FreezeError::GuardExited { pid, status });
            }
            Event::Closed { status } => return Err(FreezeError::GuardExited { pid, status }),
        }
    }
}

// ---------------------------------------------------------------------------
// Guard side.

/// Arguments of the hidden `freeze-guard` subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GuardArgs {
    /// Diagnostics (and tests): instead of serving an agent on standard
    /// input, freeze these mount points through a guard, thaw them, and
    /// print how long it took as JSON.
    #[arg(long = "test-freeze", value_name = "MOUNT_POINT", num_args = 1..)]
    pub test_freeze: Vec<PathBuf>,
    /// With --test-freeze: the frozen-time bound, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub max_frozen_ms: u64,
}

/// Entry point of `tideline-agent freeze-guard`; returns the exit code.
pub fn main(args: &GuardArgs) -> i32 {
    if args.test_freeze.is_empty() {
        // SAFETY: the agent starts the guard with its socket as standard
        // input, and nothing else in this process owns fd 0.
        let sock = unsafe { UnixStream::from_raw_fd(0) };
        return run_guard(sock);
    }
    match test_freeze(args) {
        Ok(json) => {
            println!("{json}");
            0
        }
        Err(e) => {
            eprintln!("tideline-agent freeze-guard: {e}");
            1
        }
    }
}

fn test_freeze(args: &GuardArgs) -> Result<serde_json::Value, String> {
    let filesystems = args
        .test_freeze
        .iter()
        .map(|p| mounts::mounted_at(p).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let req = FreezeRequest {
        filesystems,
        max_frozen: Duration::from_millis(args.max_frozen_ms),
    };
    let frozen = freeze(&req, Path::new("/proc/self/exe")).map_err(|e| e.to_string())?;
    let (sync_took, freeze_took) = (frozen.sync_took(), frozen.freeze_took());
    let points: Vec<String> = frozen
        .filesystems()
        .iter()
        .map(|f| f.mount_point.display().to_string())
        .collect();
    let report = frozen.thaw().map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "filesystems": points,
        "sync_ms": sync_took.as_secs_f64() * 1e3,
        "freeze_ms": freeze_took.as_secs_f64() * 1e3,
        "frozen_ms": report.frozen_for.as_secs_f64() * 1e3,
        "cause": report.cause.to_string(),
        "trustworthy": report.trustworthy(),
    }))
}

enum GuardEvent {
    Line(Vec<u8>),
    Eof,
    Signal(i32),
    Timeout,
}

/// The guard's end of the connection: lines from the agent, and signals.
struct GuardConn {
    sock: UnixStream,
    sigfd: SignalFd,
    buf: Vec<u8>,
}

impl GuardConn {
    fn send(&self, m: &GuardMsg) {
        // The agent may be gone; the guard goes on thawing regardless.
        let _ = send_all(self.sock.as_fd(), m.encode().as_bytes());
    }

    /// The next event, waiting at most until `until` (`None`: forever).
    fn next(&mut self, until: Option<Instant>) -> GuardEvent {
        loop {
            if let Ok(Some(si)) = self.sigfd.read_signal() {
                return GuardEvent::Signal(si.ssi_signo as i32);
            }
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=p).collect();
                line.pop();
                return GuardEvent::Line(line);
            }
            if self.buf.len() > MAX_LINE {
                return GuardEvent::Eof;
            }
            let timeout_ms: libc::c_int = match until {
                None => -1,
                Some(t) => {
                    let left = t.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        0
                    } else {
                        // Round up, so the deadline is never early.
                        left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
                    }
                }
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.sigfd.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return GuardEvent::Eof;
            }
            if n == 0 {
                if until.is_some_and(|t| Instant::now() >= t) {
                    return GuardEvent::Timeout;
                }
                continue;
            }
            if fds[1].revents != 0 {
                continue; // read at the top of the loop
            }
            if fds[0].revents != 0 {
                let mut chunk = [0u8; 4096];
                match (&self.sock).read(&mut chunk) {
                    Ok(0) => return GuardEvent::Eof,
                    Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return GuardEvent::Eof,
                }
            }
        }
    }
}

/// Thaws `frozen` (indices, in freeze order) in reverse order, reporting
/// failures.
fn thaw_all(conn: &GuardConn, fds: &[std::fs::File], frozen: &[usize]) {
    for &i in frozen.iter().rev() {
        if let Err(e) = fithaw(fds[i].as_fd()) {
            conn.send(&GuardMsg::ThawFailed {
                index: i,
                errno: e.raw_os_error().unwrap_or(libc::EIO),
            });
        }
    }
}

/// Runs the guard on `sock`; returns the exit code.
pub fn run_guard(sock: UnixStream) -> i32 {
    // First of all: signals become events, and a vanished agent is not fatal.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    if mask.thread_block().is_err() {
        return 2;
    }
    // SAFETY: ignoring SIGPIPE installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let Ok(sigfd) = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
    else {
        return 2;
    };
    let oom_protected = std::fs::write("/proc/self/oom_score_adj", "-1000").is_ok();
    let mut conn = GuardConn {
        sock,
        sigfd,
        buf: Vec::new(),
    };
    let error = |conn: &GuardConn, kind, index, errno| {
        conn.send(&GuardMsg::Error { kind, index, errno });
        1
    };

    // The request.
    let until = Instant::now() + REQUEST_TIMEOUT;
    let mut lines = Vec::new();
    loop {
        match conn.next(Some(until)) {
            GuardEvent::Line(l) if l == b"freeze" => break,
            GuardEvent::Line(l) if lines.len() <= MAX_FILESYSTEMS + 2 => lines.push(l),
            GuardEvent::Line(_) | GuardEvent::Timeout => {
                return error(&conn, ErrorKind::Request, None, 0)
            }
            GuardEvent::Eof | GuardEvent::Signal(_) => return 0,
        }
    }
    let Some(req) = WireRequest::parse(&lines) else {
        return error(&conn, ErrorKind::Request, None, 0);
    };

    // Open everything before freezing anything: no path is resolved later.
    let mut fds = Vec::with_capacity(req.filesystems.len());
    for (i, (id, sb, path)) in req.filesystems.iter().enumerate() {
        match open_mount_point(path, *id, *sb) {
            Ok(f) => fds.push(f),
            Err(OpenFailure::Io(e)) => {
                return error(
                    &conn,
                    ErrorKind::Open,
                    Some(i),
                    e.raw_os_error().unwrap_or(libc::EIO),
                )
            }
            Err(OpenFailure::Changed { .. }) => {
                return error(&conn, ErrorKind::MountChanged, Some(i), 0)
            }
        }
    }
    let started = Instant::now();
    for _ in 0..SYNC_PASSES {
        let pass = Instant::now();
        for (i, f) in fds.iter().enumerate() {
            if let Err(e) = syncfs(f.as_fd()) {
                return error(
                    &conn,
                    ErrorKind::Sync,
                    Some(i),
                    e.raw_os_error().unwrap_or(libc::EIO),
                );
            }
        }
        match conn.next(Some(Instant::now())) {
            GuardEvent::Timeout => {}
            GuardEvent::Signal(n) => return error(&conn, ErrorKind::Signal, None, n),
            GuardEvent::Line(_) | GuardEvent::Eof => return 0,
        }
        if pass.elapsed() < SYNC_QUIET {
            break;
        }
    }
    conn.send(&GuardMsg::Synced {
        took_us: started.elapsed().as_micros() as u64,
    });

    // Freeze, in order; the window and the deadline start now.
    let start = Instant::now();
    let start_ns = mono_ns();
    let deadline = start + req.max_frozen;
    let mut frozen = Vec::with_capacity(fds.len());
    for (i, f) in fds.iter().enumerate() {
        if let Err(e) = fifreeze(f.as_fd()) {
            thaw_all(&conn, &fds, &frozen);
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            let kind = if errno == libc::EBUSY {
                ErrorKind::Busy
            } else {
                ErrorKind::Freeze
            };
            return error(&conn, kind, Some(i), errno);
        }
        frozen.push(i);
        conn.send(&GuardMsg::FsFrozen { index: i });
        if Instant::now() >= deadline {
            thaw_all(&conn, &fds, &frozen);
            return error(&conn, ErrorKind::Deadline, Some(i), 0);
        }
        match conn.next(Some(Instant::now())) {
            GuardEvent::Timeout => {}
            GuardEvent::Signal(n) => {
                thaw_all(&conn, &fds, &frozen);
                return error(&conn, ErrorKind::Signal, None, n);
            }
            GuardEvent::Line(_) | GuardEvent::Eof => {
                thaw_all(&conn, &fds, &frozen);
                return 0;
            }
        }
    }
    conn.send(&GuardMsg::Ready {
        start_ns,
        freeze_us: start.elapsed().as_micros() as u64,
        oom_protected,
    });

    // Frozen: wait for the first of thaw, hangup, signal, deadline.
    let cause = match conn.next(Some(deadline)) {
        GuardEvent::Line(l) if l == b"thaw" => WireCause::Request,
        GuardEvent::Line(_) | GuardEvent::Eof => WireCause::Hangup,
        GuardEvent::Signal(n) => WireCause::Signal(n),
        GuardEvent::Timeout => WireCause::Deadline,
    };
    thaw_all(&conn, &fds, &frozen);
    conn.send(&GuardMsg::Thawed {
        cause,
        frozen_us: start.elapsed().as_micros() as u64,
    });
    if cause == WireCause::Deadline {
        // Let the agent learn that the deadline came first.
        let _ = conn.next(Some(Instant::now() + LINGER_AFTER_DEADLINE));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(
            FIFREEZE,
            nix::request_code_readwrite!(b'X', 119, std::mem::size_of::<libc::c_int>())
        );
        assert_eq!(
            FITHAW,
            nix::request_code_readwrite!(b'X', 120, std::mem::size_of::<libc::c_int>())
        );
    }

    #[test]
    fn guard_messages_round_trip() {
        let msgs = [
            GuardMsg::Synced { took_us: 12 },
            GuardMsg::FsFrozen { index: 3 },
            GuardMsg::Ready {
                start_ns: 123_456_789,
                freeze_us: 40,
                oom_protected: true,
            },
            GuardMsg::Ready {
                start_ns: 1,
                freeze_us: 0,
                oom_protected: false,
            },
            GuardMsg::ThawFailed {
                index: 0,
                errno: 22,
            },
            GuardMsg::Error {
                kind: ErrorKind::Busy,
                index: Some(1),
                errno: 16,
            },
            GuardMsg::Error {
                kind: ErrorKind::Signal,
                index: None,
                errno: 15,
            },
            GuardMsg::Thawed {
                cause: WireCause::Signal(1),
                frozen_us: 99,
            },
            GuardMsg::Thawed {
                cause: WireCause::Deadline,
                frozen_us: 2_000_100,
            },
        ];
        for m in msgs {
            let line = m.encode();
            assert!(line.ends_with('\n'));
            assert_eq!(
                GuardMsg::parse(line.trim_end().as_bytes()),
                Some(m.clone()),
                "{line}"
            );
        }
        for (kind, s) in ERROR_KINDS {
            let m = GuardMsg::Error {
                kind,
                index: None,
                errno: 0,
            };
            assert_eq!(m.encode(), format!("error {s} - 0\n"));
        }
    }

    #[test]
    fn malformed_guard_messages_are_refused() {
        for l in [
            "",
            "frozen",
            "frozen x",
            "frozen 256",
            "ready 1 2 3",
            "ready 1 2",
            "thawed later 5",
            "thawed signal: 5",
            "error nope - 0",
            "error busy 1",
            "synced 1 2",
            "synced -1",
        ] {
            assert_eq!(GuardMsg::parse(l.as_bytes()), None, "{l:?}");
        }
    }

    fn request_lines(r: &WireRequest) -> Vec<Vec<u8>> {
        let bytes = r.encode();
        let mut lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        assert_eq!(lines.pop(), Some(Vec::new()));
        assert_eq!(lines.pop(), Some(b"freeze".to_vec()));
        lines
    }

    #[test]
    fn the_request_round_trips_with_awkward_mount_points() {
        let r = WireRequest {
            max_frozen: Duration::from_millis(2000),
            filesystems: vec![
                (
                    27,
                    DevNum {
                        major: 253,
                        minor: 0,
                    },
                    PathBuf::from("/"),
                ),
                (
                    51,
                    DevNum {
                        major: 0,
                        minor: 41,
                    },
                    PathBuf::from("/srv/vm images/new\nline\\x"),
                ),
            ],
        };
        let lines = request_lines(&r);
        assert_eq!(lines.len(), 4);
        assert_eq!(WireRequest::parse(&lines), Some(r));
    }

    #[test]
    fn requests_out_of_bounds_are_refused() {
        let ok = WireRequest {
            max_frozen: Duration::from_millis(5),
            filesystems: vec![(1, DevNum { major: 7, minor: 0 }, PathBuf::from("/mnt"))],
        };
        assert!(WireRequest::parse(&request_lines(&ok)).is_some());
        let mut bad = ok.clone();
        bad.max_frozen = Duration::ZERO;
        assert!(WireRequest::parse(&request_lines(&bad)).is_none());
        bad.max_frozen = MAX_BOUND + Duration::from_millis(1);
        assert!(WireRequest::parse(&request_lines(&bad)).is_none());
        let mut empty = ok.clone();
        empty.filesystems.clear();
        assert!(WireRequest::parse(&request_lines(&empty)).is_none());
        let mut relative = ok.clone();
        relative.filesystems[0].2 = PathBuf::from("mnt");
        assert!(WireRequest::parse(&request_lines(&relative)).is_none());
        let mut many = ok.clone();
        many.filesystems = vec![ok.filesystems[0].clone(); MAX_FILESYSTEMS + 1];
        assert!(WireRequest::parse(&request_lines(&many)).is_none());
        let mut wrong_version = request_lines(&ok);
        wrong_version[0] = b"tideline-freeze-guard 2".to_vec();
        assert!(WireRequest::parse(&wrong_version).is_none());
    }

    #[test]
    fn requests_are_checked_before_a_guard_starts() {
        let fs = MountedFs {
            mount_point: PathBuf::from("/nonexistent-tideline-mount"),
            device: PathBuf::from("/dev/null"),
            fs_type: "ext4".into(),
            is_root: false,
            mount_id: 1,
            superblock: DevNum { major: 7, minor: 0 },
        };
        let exe = Path::new("/nonexistent-guard");
        let req = |filesystems, ms| FreezeRequest {
            filesystems,
            max_frozen: Duration::from_millis(ms),
        };
        assert!(matches!(
            freeze(&req(vec![], 100), exe),
            Err(FreezeError::Empty)
        ));
        assert!(matches!(
            freeze(&req(vec![fs.clone()], 0), exe),
            Err(FreezeError::Bound { .. })
        ));
        assert!(matches!(
            freeze(&req(vec![fs.clone()], 60_001), exe),
            Err(FreezeError::Bound { .. })
        ));
        match freeze(&req(vec![fs.clone()], 100), exe) {
            Err(e @ FreezeError::Open { .. }) => {
                assert!(e.to_string().contains("/nonexistent-tideline-mount"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // `/` is a mount, but not mount id 1 here (ids start far higher).
        let root = mounts::mounted_at(Path::new("/")).unwrap();
        let mut stale = fs;
        stale.mount_point = root.mount_point.clone();
        stale.mount_id = root.mount_id + 100_000;
        match freeze(&req(vec![stale], 100), exe) {
            Err(FreezeError::MountChanged { found, .. }) => {
                assert_eq!(found, Some(root.mount_id))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn monotonic_timestamps_convert_to_instants() {
        let before = Instant::now();
        let ns = mono_ns();
        let i = instant_at_mono_ns(ns);
        assert!(i >= before && i <= Instant::now());
    }
}
