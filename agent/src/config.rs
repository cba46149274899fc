//! The agent's configuration file (`/etc/tideline/agent.toml`).
//!
//! Every key is documented in `docs/operations.md`. Unknown keys are errors,
//! so that a typo never silently falls back to a default.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use tideline_protocol::limits::{valid_block_size, valid_id, DEFAULT_BLOCK_SIZE, MAX_ROUNDS};
use tideline_protocol::Requirement;

use crate::transport::throttle::{parse_day, parse_rate, parse_time, Schedule, Window};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tideline/agent.toml";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration {path}: {cause}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message names the key
    /// and line).
    #[error("invalid configuration {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What the TOML parser reported, with line and column.
        message: String,
    },
    /// A value is out of its domain.
    #[error("invalid configuration {path}: {key}: {message}")]
    Value {
        /// File.
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the controller is.
    pub controller: ControllerSection,
    /// Certificates for mutual TLS.
    pub tls: TlsSection,
    /// Where the agent keeps its block maps and change logs.
    #[serde(default)]
    pub state: StateSection,
    /// Tuning of the sync pipeline.
    #[serde(default)]
    pub sync: SyncSection,
    /// Logging: level and GELF export.
    #[serde(default)]
    pub log: LogSection,
    /// Bandwidth limits on what the agent sends.
    #[serde(default)]
    pub bandwidth: BandwidthSection,
    /// How points of live disks are made consistent.
    #[serde(default)]
    pub consistency: ConsistencySection,
    /// Kernel write tracking.
    #[serde(default)]
    pub tracking: TrackingSection,
    /// Consistency groups: disks frozen together, with their hooks.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSection>,
    /// Protected disks.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSection>,
    /// How failback passes write.
    #[serde(default)]
    pub failback: FailbackSection,
    /// Failback targets: disks of newly created source machines that the
    /// controller may write recovery points into.
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetSection>,
}

/// `[consistency]`: pre-copy rounds and the freeze that make a point of a
/// live disk the disk at one instant (`docs/operations.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencySection {
    /// Freeze the filesystems mounted from protected block devices for the
    /// last copy of each point. Off: points of block devices are read live
    /// and say `none`.
    #[serde(default = "default_true")]
    pub freeze: bool,
    /// Longest the filesystems may stay frozen, in milliseconds. A thaw
    /// guard process enforces it even if the agent dies.
    #[serde(default = "default_max_frozen_ms")]
    pub max_frozen_ms: u64,
    /// Freezes tried per point before it fails (or is committed as `none`,
    /// see `on_freeze_failure`).
    #[serde(default = "default_freeze_attempts")]
    pub freeze_attempts: u32,
    /// Pre-copy rounds after the first copy before the agent tries to
    /// freeze whatever is left.
    #[serde(default = "default_precopy_rounds")]
    pub precopy_rounds: u32,
    /// Most bytes read into memory while frozen (`"256M"`); a larger
    /// remainder means another live round first.
    #[serde(default = "default_freeze_memory")]
    pub freeze_memory: String,
    /// When every freeze attempt failed: `fail` the point (default), or
    /// `commit` it marked `none` (unless a disk's `min_consistency` forbids).
    #[serde(default = "default_on_freeze_failure")]
    pub on_freeze_failure: String,
}

impl Default for ConsistencySection {
    fn default() -> Self {
        ConsistencySection {
            freeze: true,
            max_frozen_ms: default_max_frozen_ms(),
            freeze_attempts: default_freeze_attempts(),
            precopy_rounds: default_precopy_rounds(),
            freeze_memory: default_freeze_memory(),
            on_freeze_failure: default_on_freeze_failure(),
        }
    }
}

impl ConsistencySection {
    /// `freeze_memory` in bytes (validated at load).
    pub fn freeze_memory_bytes(&self) -> u64 {
        parse_rate(&self.freeze_memory).unwrap_or(256 << 20)
    }

    /// Whether a point whose freezes all failed is committed as `none`.
    pub fn commit_unfrozen(&self) -> bool {
        self.on_freeze_failure == "commit"
    }
}

/// `[tracking]`: kernel write tracking with eBPF.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackingSection {
    /// Track writes to protected block devices with the agent's eBPF
    /// program. Off (or unavailable): every sync hash-scans the disk and
    /// points of live block devices say `none`.
    #[serde(default = "default_true")]
    pub ebpf: bool,
    /// Where the program, its links and maps are pinned (bpffs), so that
    /// tracking outlives an agent restart.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
}

impl Default for TrackingSection {
    fn default() -> Self {
        TrackingSection {
            ebpf: true,
            pin_dir: default_pin_dir(),
        }
    }
}

/// `[[group]]`: disks frozen together, and the hooks that make their
/// applications consistent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// Group id; disks name it in `group`.
    pub id: String,
    /// Run before the freeze (flush and lock the application); given the
    /// point, the session and the disks in its environment.
    #[serde(default)]
    pub pre_freeze: Option<PathBuf>,
    /// Run after the thaw (unlock the application), also when the
    /// pre-freeze hook failed.
    #[serde(default)]
    pub post_thaw: Option<PathBuf>,
    /// Seconds a hook may run before it is killed.
    #[serde(default = "default_hook_timeout_secs")]
    pub hook_timeout_secs: u64,
}

/// `[failback]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailbackSection {
    /// Bytes written between flush-and-verify rounds: every round flushes
    /// the target, re-reads what it wrote and checks the digests.
    #[serde(default = "default_verify_bytes")]
    pub verify_bytes: u64,
    /// Blocks of the previous pass's map re-read and checked before the map
    /// is trusted to describe a target (0 = trust it without a check).
    #[serde(default = "default_spot_check_blocks")]
    pub spot_check_blocks: u32,
}

impl Default for FailbackSection {
    fn default() -> Self {
        FailbackSection {
            verify_bytes: default_verify_bytes(),
            spot_check_blocks: default_spot_check_blocks(),
        }
    }
}

/// `[[target]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// Stable id of the target (letters, digits, `.`, `_`, `-`); the
    /// controller names targets by this id.
    pub id: String,
    /// Where the target is: a raw image file, a block device, or an
    /// `nbd://` / `nbd+unix://` URI (e.g. a `qemu-nbd`-served VMDK or
    /// qcow2).
    pub path: PathBuf,
}

/// `[controller]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSection {
    /// `host:port` of the controller (default port 443 when omitted).
    pub address: String,
    /// Name to check the controller's certificate against (default: the
    /// host part of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// First reconnect delay in milliseconds.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay in milliseconds.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Seconds between heartbeats; the link is dropped after three missed.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate (PEM) the controller's certificate must chain to.
    pub ca: PathBuf,
    /// The agent's certificate (PEM); its CN is the agent id.
    pub cert: PathBuf,
    /// The agent's private key (PEM).
    pub key: PathBuf,
}

/// `[state]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// State directory.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            dir: default_state_dir(),
        }
    }
}

/// `[sync]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// zstd level for block payloads (1 = fastest).
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Hash/compress worker threads (default: number of CPUs, at most 4).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Bytes read per batch.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: u32,
    /// Bytes scanned between checkpoints (resume granularity).
    #[serde(default = "default_checkpoint_bytes")]
    pub checkpoint_bytes: u64,
    /// Drop scanned pages from the page cache (`posix_fadvise(DONTNEED)`).
    /// Off by default: it also evicts pages the host's workload had cached.
    #[serde(default)]
    pub drop_page_cache: bool,
    /// Read raw files and block devices with `O_DIRECT`, around the page
    /// cache, so that a scan neither fills the cache nor evicts what the
    /// host's workload cached (buffered reads, with a warning, where the
    /// file system refuses it). On by default; see `docs/operations.md`.
    #[serde(default = "default_direct_io")]
    pub direct_io: bool,
    /// Nice value of the scan threads (-20..=19); absent: inherited.
    #[serde(default)]
    pub nice: Option<i32>,
    /// I/O class of the scan threads: `default`, `best-effort` or `idle`.
    #[serde(default = "default_io_class")]
    pub io_class: String,
    /// Level within `best-effort`, 0 (highest) to 7 (lowest).
    #[serde(default = "default_io_priority")]
    pub io_priority: u8,
}

fn default_direct_io() -> bool {
    true
}
fn default_io_class() -> String {
    "default".into()
}
fn default_io_priority() -> u8 {
    4
}

impl SyncSection {
    /// How raw disks are read: `O_DIRECT` when `direct_io` is set.
    pub fn read_mode(&self) -> crate::source::ReadMode {
        if self.direct_io {
            crate::source::ReadMode::Direct
        } else {
            crate::source::ReadMode::Buffered
        }
    }

    /// The scan threads' priorities.
    pub fn scan_priority(&self) -> crate::sync::priority::ScanPriority {
        use crate::sync::priority::{IoClass, ScanPriority};
        ScanPriority {
            nice: self.nice,
            io: match self.io_class.as_str() {
                "best-effort" => IoClass::BestEffort(self.io_priority),
                "idle" => IoClass::Idle,
                _ => IoClass::Default,
            },
        }
    }
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            compression_level: default_level(),
            workers: None,
            batch_bytes: default_batch_bytes(),
            checkpoint_bytes: default_checkpoint_bytes(),
            drop_page_cache: false,
            direct_io: default_direct_io(),
            nice: None,
            io_class: default_io_class(),
            io_priority: default_io_priority(),
        }
    }
}

impl SyncSection {
    /// Worker threads to use.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(1, 4)
        })
    }
}

/// `[bandwidth]`
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BandwidthSection {
    /// Bytes per second outside every window: `"50M"`, `"512K"`, `"1G"`
    /// (powers of 1024) or a number; `"0"` or absent: unlimited.
    #[serde(default)]
    pub limit: Option<String>,
    /// Time-of-day windows with their own limit; the first that matches wins.
    #[serde(default, rename = "window")]
    pub windows: Vec<WindowSection>,
}

/// `[[bandwidth.window]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSection {
    /// Local time the window opens, `"HH:MM"`.
    pub start: String,
    /// Local time it closes, `"HH:MM"` (earlier than `start`: it spans
    /// midnight).
    pub end: String,
    /// Days it applies on (`"mon"` … `"sun"`); empty: every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// Bytes per second while it is open, as `limit`.
    pub limit: String,
}

impl BandwidthSection {
    /// The schedule these settings describe, or the key that is wrong and
    /// why.
    pub fn schedule(&self) -> Result<Schedule, (String, String)> {
        let rate = |key: String, v: &str| {
            parse_rate(v).ok_or_else(|| {
                (
                    key,
                    format!("{v:?} is not a rate such as \"50M\", \"512K\" or \"0\""),
                )
            })
        };
        let default = match &self.limit {
            Some(v) => rate("bandwidth.limit".into(), v)?,
            None => 0,
        };
        let mut windows = Vec::new();
        for (i, w) in self.windows.iter().enumerate() {
            let key = |k: &str| format!("bandwidth.window[{i}].{k}");
            let time = |k: &str, v: &str| {
                parse_time(v).ok_or_else(|| (key(k), format!("{v:?} is not a time HH:MM")))
            };
            let mut days = Vec::new();
            for d in &w.days {
                days.push(
                    parse_day(d).ok_or_else(|| {
                        (key("days"), format!("{d:?} is not a weekday (mon..sun)"))
                    })?,
                );
            }
            windows.push(Window {
                start: time("start", &w.start)?,
                end: time("end", &w.end)?,
                days,
                limit: rate(key("limit"), &w.limit)?,
            });
        }
        Ok(Schedule { default, windows })
    }
}

/// `[log]`: shared with the controller, see `tideline_service::log`.
pub use tideline_service::log::LogSection;

/// `[[disk]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// Stable id of the disk (letters, digits, `.`, `_`, `-`).
    pub id: String,
    /// Where the disk is: a raw image file or block device, a `.vmdk`
    /// export, or an `nbd://host[:port]/export` or
    /// `nbd+unix:///export?socket=PATH` URI.
    pub path: PathBuf,
    /// Block size in bytes (power of two, 4 KiB to 4 MiB).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// A VMware CBT changed-areas list (JSON, see `docs/operations.md`)
    /// describing this export; when it follows the last committed point,
    /// only its areas are read.
    #[serde(default)]
    pub cbt_file: Option<PathBuf>,
    /// A QEMU dirty bitmap exported over NBD (`qemu-nbd -B NAME`); when it
    /// has tracked since the last committed point, only dirty extents are
    /// read. Only for `nbd://` and `nbd+unix://` disks.
    #[serde(default)]
    pub dirty_bitmap: Option<String>,
    /// Consistency group (`[[group]] id`); disks of one group are frozen
    /// together and share its hooks. Default: `machine`, so all the agent's
    /// disks form one group.
    #[serde(default = "default_group")]
    pub group: String,
    /// The lowest consistency a point of this disk may have to be
    /// committed: `none` (default), `crash` or `application`.
    #[serde(default = "default_min_consistency")]
    pub min_consistency: String,
    /// `hypervisor`: the export (`.vmdk` or `nbd://`) is made from a
    /// hypervisor snapshot, so its points are crash-consistent. Not checked
    /// by the agent: the admin vouches for it.
    #[serde(default)]
    pub snapshot: Option<String>,
}

impl DiskSection {
    /// `min_consistency` (validated at load).
    pub fn requirement(&self) -> Requirement {
        Requirement::parse(&self.min_consistency).unwrap_or_default()
    }
}

fn default_true() -> bool {
    true
}
fn default_max_frozen_ms() -> u64 {
    2000
}
fn default_freeze_attempts() -> u32 {
    3
}
fn default_precopy_rounds() -> u32 {
    8
}
fn default_freeze_memory() -> String {
    "256M".into()
}
fn default_on_freeze_failure() -> String {
    "fail".into()
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/tideline")
}
fn default_hook_timeout_secs() -> u64 {
    30
}
fn default_group() -> String {
    "machine".into()
}
fn default_min_consistency() -> String {
    "none".into()
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_heartbeat_secs() -> u64 {
    15
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tideline")
}
fn default_level() -> i32 {
    1
}
fn default_batch_bytes() -> u32 {
    4 * 1024 * 1024
}
fn default_checkpoint_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_block_size() -> u32 {
    DEFAULT_BLOCK_SIZE
}
fn default_verify_bytes() -> u64 {
    32 * 1024 * 1024
}
fn default_spot_check_blocks() -> u32 {
    64
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            cause: source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text (`path` is for messages;
    /// relative paths in the file are taken relative to its directory).
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.tls.ca,
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
            &mut cfg.state.dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for d in &mut cfg.disks {
            if d.path.is_relative() && !crate::source::is_nbd_uri(&d.path.to_string_lossy()) {
                d.path = base.join(&d.path);
            }
            if let Some(c) = &mut d.cbt_file {
                if c.is_relative() {
                    *c = base.join(&*c);
                }
            }
        }
        for g in &mut cfg.groups {
            for h in [&mut g.pre_freeze, &mut g.post_thaw].into_iter().flatten() {
                if h.is_relative() {
                    *h = base.join(&*h);
                }
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: String| ConfigError::Value {
            path: path.to_owned(),
            key,
            message,
        };
        if self.controller.address.trim().is_empty() {
            return Err(bad("controller.address".into(), "must not be empty".into()));
        }
        if self.controller.reconnect_min_ms == 0
            || self.controller.reconnect_min_ms > self.controller.reconnect_max_ms
        {
            return Err(bad(
                "controller.reconnect_min_ms".into(),
                "must be at least 1 and at most reconnect_max_ms".into(),
            ));
        }
        if self.controller.heartbeat_secs == 0 {
            return Err(bad(
                "controller.heartbeat_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if !(1..=19).contains(&self.sync.compression_level) {
            return Err(bad(
                "sync.compression_level".into(),
                format!("{} is outside 1..=19", self.sync.compression_level),
            ));
        }
        if self.sync.workers == Some(0) {
            return Err(bad("sync.workers".into(), "must be at least 1".into()));
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.sync.batch_bytes) {
            return Err(bad(
                "sync.batch_bytes".into(),
                "must be between 64 KiB and 64 MiB".into(),
            ));
        }
        if self.sync.checkpoint_bytes < 1024 * 1024 {
            return Err(bad(
                "sync.checkpoint_bytes".into(),
                "must be at least 1 MiB (each checkpoint costs an fsync)".into(),
            ));
        }
        if let Err(e) = self.log.validate() {
            return Err(bad(e.key.into(), e.message));
        }
        if self.sync.nice.is_some_and(|n| !(-20..=19).contains(&n)) {
            return Err(bad("sync.nice".into(), "must be between -20 and 19".into()));
        }
        if !["default", "best-effort", "idle"].contains(&self.sync.io_class.as_str()) {
            return Err(bad(
                "sync.io_class".into(),
                format!(
                    "{:?} is not default, best-effort or idle",
                    self.sync.io_class
                ),
            ));
        }
        if self.sync.io_priority > 7 {
            return Err(bad(
                "sync.io_priority".into(),
                "must be between 0 and 7".into(),
            ));
        }
        if let Err((key, message)) = self.bandwidth.schedule() {
            return Err(bad(key, message));
        }
        self.validate_consistency(&bad)?;
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_id(&d.id) {
                return Err(bad(
                    format!("disk[{i}].id"),
                    format!("{:?} must be 1-128 letters, digits, '.', '_' or '-'", d.id),
                ));
            }
            if !seen.insert(d.id.clone()) {
                return Err(bad(
                    format!("disk[{i}].id"),
                    format!("{:?} appears twice", d.id),
                ));
            }
            if d.dirty_bitmap.is_some() && !crate::source::is_nbd_uri(&d.path.to_string_lossy()) {
                return Err(bad(
                    format!("disk[{i}].dirty_bitmap"),
                    "dirty bitmaps are read over NBD: the disk's path must be an nbd:// or nbd+unix:// URI".into(),
                ));
            }
            if d.dirty_bitmap.is_some() && d.cbt_file.is_some() {
                return Err(bad(
                    format!("disk[{i}]"),
                    "set either cbt_file or dirty_bitmap, not both".into(),
                ));
            }
            if !valid_block_size(d.block_size) {
                return Err(bad(
                    format!("disk[{i}].block_size"),
                    format!(
                        "{} is not a power of two between 4 KiB and 4 MiB",
                        d.block_size
                    ),
                ));
            }
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.failback.verify_bytes) {
            return Err(bad(
                "failback.verify_bytes".into(),
                "must be between 1 MiB and 1 GiB".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            if !valid_id(&t.id) {
                return Err(bad(
                    format!("target[{i}].id"),
                    format!("{:?} must be 1-128 letters, digits, '.', '_' or '-'", t.id),
                ));
            }
            if !seen.insert(t.id.clone()) {
                return Err(bad(
                    format!("target[{i}].id"),
                    format!("{:?} appears twice", t.id),
                ));
            }
            if let Some(j) = self.targets[..i].iter().position(|o| o.path == t.path) {
                return Err(bad(
                    format!("target[{i}].path"),
                    format!("{} is also target[{j}]", t.path.display()),
                ));
            }
            if let Some(d) = self.disks.iter().find(|d| d.path == t.path) {
                return Err(bad(
                    format!("target[{i}].path"),
                    format!(
                        "{} is protected disk {:?}: a failback target is written, a protected disk only read",
                        t.path.display(),
                        d.id
                    ),
                ));
            }
            let is_vmdk = t
                .path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"));
            if is_vmdk {
                return Err(bad(
                    format!("target[{i}].path"),
                    format!(
                        "{}: VMDK files are written through an NBD server (qemu-nbd -f vmdk), give its nbd:// URI",
                        t.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_consistency(
        &self,
        bad: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let c = &self.consistency;
        if !(100..=60_000).contains(&c.max_frozen_ms) {
            return Err(bad(
                "consistency.max_frozen_ms".into(),
                format!("{} is outside 100..=60000", c.max_frozen_ms),
            ));
        }
        if !(1..=10).contains(&c.freeze_attempts) {
            return Err(bad(
                "consistency.freeze_attempts".into(),
                "must be between 1 and 10".into(),
            ));
        }
        // Each attempt that fails costs a live round: the first copy, the
        // pre-copy rounds, one per attempt and the last copy must fit.
        if c.precopy_rounds + c.freeze_attempts + 2 > MAX_ROUNDS {
            return Err(bad(
                "consistency.precopy_rounds".into(),
                format!(
                    "with freeze_attempts = {}, at most {}",
                    c.freeze_attempts,
                    MAX_ROUNDS - c.freeze_attempts - 2
                ),
            ));
        }
        match parse_rate(&c.freeze_memory) {
            Some(n) if (1 << 20..=64 << 30).contains(&n) => {}
            _ => {
                return Err(bad(
                    "consistency.freeze_memory".into(),
                    format!("{:?} is not a size from \"1M\" to \"64G\"", c.freeze_memory),
                ))
            }
        }
        if !["fail", "commit"].contains(&c.on_freeze_failure.as_str()) {
            return Err(bad(
                "consistency.on_freeze_failure".into(),
                format!("{:?} is not fail or commit", c.on_freeze_failure),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            if !valid_id(&g.id) {
                return Err(bad(
                    format!("group[{i}].id"),
                    format!("{:?} must be 1-128 letters, digits, '.', '_' or '-'", g.id),
                ));
            }
            if !seen.insert(g.id.as_str()) {
                return Err(bad(
                    format!("group[{i}].id"),
                    format!("{:?} appears twice", g.id),
                ));
            }
            if !(1..=3600).contains(&g.hook_timeout_secs) {
                return Err(bad(
                    format!("group[{i}].hook_timeout_secs"),
                    "must be between 1 and 3600".into(),
                ));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_id(&d.group) {
                return Err(bad(
                    format!("disk[{i}].group"),
                    format!("{:?} is not a valid group id", d.group),
                ));
            }
            if d.group != "machine" && !seen.contains(d.group.as_str()) {
                return Err(bad(
                    format!("disk[{i}].group"),
                    format!("{:?} is not a [[group]] id", d.group),
                ));
            }
            if Requirement::parse(&d.min_consistency).is_none() {
                return Err(bad(
                    format!("disk[{i}].min_consistency"),
                    format!("{:?} is not none, crash or application", d.min_consistency),
                ));
            }
            match d.snapshot.as_deref() {
                None => {}
                Some("hypervisor") => {
                    let p = d.path.to_string_lossy();
                    let export = crate::source::is_nbd_uri(&p)
                        || d.path
                            .extension()
                            .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"));
                    if !export {
                        return Err(bad(
                            format!("disk[{i}].snapshot"),
                            "only an nbd:// export or a .vmdk can be a hypervisor snapshot".into(),
                        ));
                    }
                }
                Some(other) => {
                    return Err(bad(
                        format!("disk[{i}].snapshot"),
                        format!("{other:?} is not \"hypervisor\""),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The group section of a disk's group, if it has one (`machine`
    /// needs none).
    pub fn group(&self, id: &str) -> Option<&GroupSection> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// The controller address with the default port added when missing.
    pub fn controller_addr(&self) -> String {
        let a = self.controller.address.trim();
        if a.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            a.to_owned()
        } else {
            format!("{a}:443")
        }
    }

    /// The name the controller's certificate must carry.
    pub fn server_name(&self) -> String {
        if let Some(n) = &self.controller.server_name {
            return n.clone();
        }
        let addr = self.controller_addr();
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&addr);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[controller]
address = "ctl.example"
[tls]
ca = "ca.crt"
cert = "agent.crt"
key = "agent.key"
[[disk]]
id = "root"
path = "/dev/sda"
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let c = AgentConfig::parse(GOOD, Path::new("/etc/tideline/agent.toml")).unwrap();
        assert_eq!(c.log.gelf_compression, "none");
        assert_eq!(c.log.gelf_chunk_size, crate::gelf::DEFAULT_CHUNK_SIZE);
        assert_eq!(c.controller_addr(), "ctl.example:443");
        assert_eq!(c.server_name(), "ctl.example");
        assert_eq!(c.tls.ca, PathBuf::from("/etc/tideline/ca.crt"));
        assert_eq!(c.disks[0].block_size, DEFAULT_BLOCK_SIZE);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("[tls]", "[tls]\ncipher = \"x\"");
        let e = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cipher") && e.contains("line"), "{e}");
    }

    #[test]
    fn bandwidth_windows_are_checked_and_named() {
        let text = format!("{GOOD}[bandwidth]\nlimit = \"20M\"\n[[bandwidth.window]]\nstart = \"08:00\"\nend = \"18:00\"\ndays = [\"mon\", \"fri\"]\nlimit = \"5M\"\n");
        let c = AgentConfig::parse(&text, Path::new("a.toml")).unwrap();
        let s = c.bandwidth.schedule().unwrap();
        assert_eq!(s.default, 20 << 20);
        assert_eq!(s.windows[0].days, vec![0, 4]);
        let text = text.replace("\"18:00\"", "\"25:00\"");
        let e = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bandwidth.window[0].end"), "{e}");
    }

    #[test]
    fn consistency_settings_are_checked_and_named() {
        let c = AgentConfig::parse(GOOD, Path::new("a.toml")).unwrap();
        assert!(c.consistency.freeze && c.tracking.ebpf);
        assert_eq!(c.consistency.max_frozen_ms, 2000);
        assert_eq!(c.consistency.freeze_memory_bytes(), 256 << 20);
        assert_eq!(c.disks[0].group, "machine");
        assert_eq!(c.disks[0].requirement(), Requirement::None);
        let with =
            |extra: &str| AgentConfig::parse(&format!("{GOOD}{extra}"), Path::new("/etc/t/a.toml"));
        let e = with("group = \"db\"\n").unwrap_err().to_string();
        assert!(e.contains("disk[0].group") && e.contains("db"), "{e}");
        let c = with("group = \"db\"\nmin_consistency = \"crash\"\n[[group]]\nid = \"db\"\npre_freeze = \"hooks/flush\"\n").unwrap();
        assert_eq!(c.disks[0].requirement(), Requirement::Crash);
        assert_eq!(
            c.group("db").and_then(|g| g.pre_freeze.clone()),
            Some(PathBuf::from("/etc/t/hooks/flush"))
        );
        let e = with("min_consistency = \"frozen\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk[0].min_consistency"), "{e}");
        let e = with("snapshot = \"hypervisor\"\n").unwrap_err().to_string();
        assert!(e.contains("disk[0].snapshot"), "{e}");
        let text = GOOD.replace("[tls]", "[consistency]\nmax_frozen_ms = 50\n[tls]");
        let e = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("consistency.max_frozen_ms"), "{e}");
        let text = GOOD.replace("[tls]", "[consistency]\nfreeze_memory = \"lots\"\n[tls]");
        let e = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("consistency.freeze_memory"), "{e}");
    }

    #[test]
    fn bad_block_size_and_duplicate_disk_are_refused() {
        let text = format!("{GOOD}block_size = 1000\n");
        let e = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk[0].block_size"), "{e}");
        let text = format!("{GOOD}[[disk]]\nid = \"root\"\npath = \"/x\"\n");
        let e = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("appears twice"), "{e}");
    }
}
