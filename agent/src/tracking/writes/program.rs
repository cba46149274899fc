//! The BPF program, its pins and the pin directory.
//!
//! Pins under the pin directory (`/sys/fs/bpf/tideline` by default):
//!
//! ```text
//! disks-v1            outer BPF_MAP_TYPE_HASH_OF_MAPS: whole-disk dev_t -> disk map
//! rq-complete-v1      bpf_link of tp_btf/block_rq_complete
//! bio-queue-v1        bpf_link of tp_btf/block_bio_queue
//! bio-complete-v1     bpf_link of tp_btf/block_bio_complete
//! disk-<maj>-<min>    each disk map (layout.rs), also reachable through disks-v1
//! ```
//!
//! A pinned link keeps its program attached with no process holding it, so
//! tracking goes on while the agent is stopped or restarting. The `-v1`
//! suffix is the version of the program's contract (the outer map's key and
//! the disk map layout): an agent whose program has another version finds
//! none of its own pins, removes the others and loads afresh, so two
//! programs never write one map.
//!
//! Names have no dot: bpffs reserves dotted names for itself and refuses
//! even to look them up (EPERM).
//!
//! Every change to the pins is made under an exclusive `flock` of the pin
//! directory itself (bpffs holds no regular files), so two agents or two
//! handles in one process never interleave their changes.

use std::fs::{self, File};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ErrorKind, Link, MapCore, MapHandle, MapType};

use super::error::{bpf_err, io_err, TrackerError};

#[allow(clippy::all, clippy::pedantic, unused_imports, unreachable_pub)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/write_tracker.skel.rs"));
}
use skel::WriteTrackerSkelBuilder;

/// The pin directory used when the configuration names none.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tideline";

/// Pin name of the outer map.
const OUTER_PIN: &str = "disks-v1";
/// Pin names of the three links, in the order the programs are attached.
const LINK_PINS: [&str; 3] = ["rq-complete-v1", "bio-queue-v1", "bio-complete-v1"];

/// Pin names of links of any version start with one of these.
const LINK_PREFIXES: [&str; 3] = ["rq-complete-v", "bio-queue-v", "bio-complete-v"];

fn is_link(name: &str) -> bool {
    LINK_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `statfs.f_type` of a bpf file system.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Paths of the pins under one pin directory.
#[derive(Clone, Debug)]
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// The pins under `dir`.
    pub fn new(dir: &Path) -> PinDir {
        PinDir {
            dir: dir.to_path_buf(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The outer map's pin.
    pub fn outer(&self) -> PathBuf {
        self.dir.join(OUTER_PIN)
    }

    /// The links' pins.
    pub fn links(&self) -> [PathBuf; 3] {
        LINK_PINS.map(|n| self.dir.join(n))
    }

    /// A disk map's pin, by the disk's kernel `dev_t`.
    pub fn disk(&self, key: u32) -> PathBuf {
        self.dir
            .join(format!("disk-{}-{}", key >> 20, key & ((1 << 20) - 1)))
    }

    /// Whether `name` is a pin this module makes (of any version).
    fn is_ours(name: &str) -> bool {
        name.starts_with("disk-") || name.starts_with("disks-v") || is_link(name)
    }
}

/// An exclusive lock on the pin directory, held while pins change.
pub struct PinLock {
    _dir: File,
}

impl PinLock {
    /// Waits for the lock (other holders keep it for milliseconds).
    pub fn acquire(dir: &Path) -> Result<PinLock, TrackerError> {
        let file = File::open(dir).map_err(io_err("open pin directory", dir))?;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(PinLock { _dir: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err("lock pin directory", dir)(e));
            }
        }
    }
}

/// Makes sure `dir` can hold pins: it must be on a bpf file system; when
/// it is under `/sys/fs/bpf` and nothing is mounted there, mounts one.
pub fn ensure_bpffs(dir: &Path) -> Result<(), TrackerError> {
    if on_bpffs(dir)? {
        return Ok(());
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if dir.starts_with(mount_point) && mount_point.is_dir() && !on_bpffs(mount_point)? {
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| TrackerError::Unavailable {
            reason: format!(
                "no bpf file system is mounted at {} and mounting one failed ({e}); \
                 mount it (mount -t bpf bpf {}) or run the agent as root",
                mount_point.display(),
                mount_point.display()
            ),
        })?;
        if on_bpffs(dir)? {
            return Ok(());
        }
    }
    Err(TrackerError::Unavailable {
        reason: format!(
            "the pin directory {} is not on a bpf file system (mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        ),
    })
}

/// Whether the nearest existing ancestor of `path` is on a bpf file system.
fn on_bpffs(path: &Path) -> Result<bool, TrackerError> {
    let mut probe = path;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => return Ok(false),
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|_| {
        TrackerError::Unavailable {
            reason: format!("the pin directory {} contains a NUL byte", path.display()),
        }
    })?;
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` is large enough for statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_err("statfs", probe)(std::io::Error::last_os_error()));
    }
    // SAFETY: statfs succeeded and filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type as u32 == BPF_FS_MAGIC)
}

/// Opens the pinned outer map, if there is a usable one.
pub fn open_outer(pins: &PinDir) -> Option<MapHandle> {
    let path = pins.outer();
    if !path.exists() {
        return None;
    }
    match MapHandle::from_pinned_path(&path) {
        Ok(m)
            if m.map_type() == MapType::HashOfMaps && m.key_size() == 4 && m.value_size() == 4 =>
        {
            Some(m)
        }
        Ok(m) => {
            tracing::warn!(pin = %path.display(), map_type = ?m.map_type(), "pinned outer map is not the tracker's; replacing it");
            None
        }
        Err(e) => {
            tracing::warn!(pin = %path.display(), error = %e, "cannot open the pinned outer map; replacing it");
            None
        }
    }
}

/// The link pins that are missing or hold no link.
pub fn missing_links(pins: &PinDir) -> Vec<PathBuf> {
    pins.links()
        .into_iter()
        .filter(|p| !(p.exists() && Link::open(p).and_then(|l| l.info().map(|_| ())).is_ok()))
        .collect()
}

/// The kernel id of a map.
pub fn map_id(map: &MapHandle, what: &Path) -> Result<u32, TrackerError> {
    map.info()
        .map(|i| i.info.id)
        .map_err(bpf_err("query", what.display()))
}

/// Loads the program (reusing `outer` when given, else creating and
/// pinning a new outer map), attaches its three programs and pins their
/// links in place of any earlier ones. Returns the outer map.
pub fn load_and_attach(
    pins: &PinDir,
    outer: Option<&MapHandle>,
) -> Result<MapHandle, TrackerError> {
    let builder = WriteTrackerSkelBuilder::default();
    let mut storage = MaybeUninit::uninit();
    let mut open = builder.open(&mut storage).map_err(load_error)?;
    if let Some(outer) = outer {
        use std::os::fd::AsFd;
        open.maps
            .tl_disks
            .reuse_fd(outer.as_fd())
            .map_err(bpf_err("reuse the outer map", pins.outer().display()))?;
    }
    let skel = open.load().map_err(load_error)?;
    let new_outer =
        MapHandle::try_from(&skel.maps.tl_disks).map_err(bpf_err("duplicate", "the outer map"))?;
    let mut links = [
        skel.progs.tl_rq_complete.attach(),
        skel.progs.tl_bio_queue.attach(),
        skel.progs.tl_bio_complete.attach(),
    ]
    .into_iter()
    .zip(LINK_PINS)
    .map(|(l, name)| l.map_err(|e| attach_error(name, e)))
    .collect::<Result<Vec<Link>, TrackerError>>()?;
    // All three are attached before any older link is unpinned: no write
    // passes between the old links and the new ones.
    for (link, path) in links.iter_mut().zip(pins.links()) {
        remove_pin(&path)?;
        link.pin(&path).map_err(bpf_err("pin", path.display()))?;
    }
    let mut new_outer = new_outer;
    if outer.is_none() {
        let path = pins.outer();
        remove_pin(&path)?;
        new_outer
            .pin(&path)
            .map_err(bpf_err("pin", path.display()))?;
    }
    // Dropping the links and the skeleton closes their descriptors; the
    // pins keep the programs attached.
    Ok(new_outer)
}

/// Removes the pins this module makes (of any version) from `dir`, except
/// `keep`.
pub fn remove_pins(dir: &Path, keep: &[PathBuf]) -> Result<(), TrackerError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut names: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        if PinDir::is_ours(&name.to_string_lossy()) && !keep.contains(&entry.path()) {
            names.push(entry.path());
        }
    }
    // Links first: a program is detached before the maps it writes go.
    names.sort_by_key(|p| !p.file_name().is_some_and(|n| is_link(&n.to_string_lossy())));
    let mut prog_ids = Vec::new();
    for p in names {
        if p.file_name().is_some_and(|n| is_link(&n.to_string_lossy())) {
            if let Some(info) = Link::open(&p).ok().and_then(|l| l.info().ok()) {
                prog_ids.push(info.prog_id);
            }
        }
        remove_pin(&p)?;
    }
    wait_programs_gone(&prog_ids);
    Ok(())
}

/// Waits (up to two seconds) until the programs `ids` no longer exist. An
/// unpinned link is freed only after an RCU grace period (bpffs frees its
/// inodes that way) and then in a work queue, and tracing links cannot be
/// detached explicitly (EOPNOTSUPP), so without this the program would
/// still see writes for a moment after `remove` returned. A link drops its
/// program after unregistering it from the tracepoint, so a program that is
/// gone is detached. Looking a program up by id needs CAP_SYS_ADMIN;
/// without it this waits 100 ms.
fn wait_programs_gone(ids: &[u32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for &id in ids {
        loop {
            // SAFETY: a plain syscall wrapper; a returned fd is closed at once.
            let fd = unsafe { libbpf_rs::libbpf_sys::bpf_prog_get_fd_by_id(id) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::NotFound {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                break;
            }
            // SAFETY: closing the descriptor just returned to us.
            unsafe { libc::close(fd) };
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    program = id,
                    "an unpinned program is still loaded after 2 s"
                );
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// Removes one pin; a missing one is fine.
pub fn remove_pin(path: &Path) -> Result<(), TrackerError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("unpin", path)(e)),
    }
}

fn load_error(e: libbpf_rs::Error) -> TrackerError {
    let reason = match e.kind() {
        ErrorKind::PermissionDenied => format!(
            "the kernel refused to load the eBPF program ({e}): run the agent as root, \
             or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN"
        ),
        _ => format!(
            "the kernel refused the eBPF write tracker ({e}); it needs Linux 5.12 or later \
             with BTF (CONFIG_DEBUG_INFO_BTF) and BTF tracepoints; the verifier's report is in \
             the agent's log"
        ),
    };
    TrackerError::Unavailable { reason }
}

fn attach_error(name: &str, e: libbpf_rs::Error) -> TrackerError {
    TrackerError::Unavailable {
        reason: format!(
            "cannot attach the write tracker's {name} program ({e}): the kernel needs \
             BTF tracepoints (tp_btf) for the block layer"
        ),
    }
}

/// Sends libbpf's messages to the agent's log instead of stderr.
pub fn route_libbpf_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        fn log(level: libbpf_rs::PrintLevel, msg: String) {
            let msg = msg.trim_end();
            match level {
                libbpf_rs::PrintLevel::Warn => tracing::warn!(target: "libbpf", "{msg}"),
                libbpf_rs::PrintLevel::Info => tracing::debug!(target: "libbpf", "{msg}"),
                libbpf_rs::PrintLevel::Debug => tracing::trace!(target: "libbpf", "{msg}"),
            }
        }
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Info, log)));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names() {
        let p = PinDir::new(Path::new("/sys/fs/bpf/t"));
        assert_eq!(p.disk((7 << 20) | 3), Path::new("/sys/fs/bpf/t/disk-7-3"));
        assert_eq!(p.outer(), Path::new("/sys/fs/bpf/t/disks-v1"));
        for n in [
            "disk-7-3",
            "disks-v1",
            "disks-v2",
            "rq-complete-v1",
            "bio-queue-v9",
        ] {
            assert!(PinDir::is_ours(n), "{n}");
        }
        for n in ["other", "rq-complete", "tideline"] {
            assert!(!PinDir::is_ours(n), "{n}");
        }
    }

    #[test]
    fn a_pin_dir_off_bpffs_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        match ensure_bpffs(&dir.path().join("pins")) {
            Err(TrackerError::Unavailable { reason }) => {
                assert!(reason.contains("not on a bpf file system"), "{reason}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
