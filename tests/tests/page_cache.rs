//! `[sync] direct_io`: a full scan of a raw image reads around the page
//! cache (`O_DIRECT`), so it neither fills the cache with the image nor
//! evicts what the host had cached; with `direct_io = false` the same scan
//! leaves the image cached, which shows the measurement can see it.
//!
//! Residency is read with mincore(2) on a mapping of each file. The files
//! live on a disk-backed file system: tmpfs refuses O_DIRECT (the agent then
//! falls back to buffered reads) and its pages are always resident.

use anyhow::{ensure, Context, Result};
use rand::{RngCore, SeedableRng};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use tideline_tests::*;

/// 96 MiB and a partial last page: the tail needs O_DIRECT's care.
const IMAGE_SIZE: u64 = 96 * 1024 * 1024 + 2500;
const HOT_SIZE: u64 = 16 * 1024 * 1024;
const TMPFS_MAGIC: i64 = 0x0102_1994;

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

/// Pages of `path` resident in the page cache, and the file's page count.
fn resident_pages(path: &Path) -> Result<(u64, u64)> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len();
    let pages = len.div_ceil(page_size());
    if len == 0 {
        return Ok((0, 0));
    }
    // SAFETY: a fresh read-only shared mapping of an open file; mincore
    // only inspects it (no page is touched, so none is faulted in), and it
    // is unmapped before returning.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        ensure!(addr != libc::MAP_FAILED, "mmap {}", path.display());
        let mut vec = vec![0u8; pages as usize];
        let rc = libc::mincore(addr, len as usize, vec.as_mut_ptr());
        libc::munmap(addr, len as usize);
        ensure!(
            rc == 0,
            "mincore {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Ok((vec.iter().filter(|&&b| b & 1 == 1).count() as u64, pages))
    }
}

fn resident_fraction(path: &Path) -> Result<f64> {
    let (cached, pages) = resident_pages(path)?;
    Ok(cached as f64 / pages.max(1) as f64)
}

/// Writes `size` incompressible bytes (no holes), flushes them and drops
/// them from the page cache.
fn write_cold(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    // Clean pages go at once; a few may sit in per-CPU LRU batches, so ask
    // again after a moment.
    for _ in 0..3 {
        nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )?;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// A directory on a disk-backed file system for the images: the world's
/// own when it is not tmpfs, else one under the cargo target directory.
fn disk_backed_dir(w: &World) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    let is_tmpfs = |p: &Path| -> Result<bool> {
        Ok(nix::sys::statfs::statfs(p)?.filesystem_type().0 as i64 == TMPFS_MAGIC)
    };
    if !is_tmpfs(w.dir.path())? {
        return Ok((w.dir.path().to_owned(), None));
    }
    let dir = tempfile::Builder::new()
        .prefix("tideline-page-cache-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    ensure!(
        !is_tmpfs(dir.path())?,
        "no disk-backed directory for the test images"
    );
    Ok((dir.path().to_owned(), Some(dir)))
}

#[test]
fn direct_io_scan_leaves_the_page_cache_alone() -> Result<()> {
    let mut w = World::new(&["direct", "buffered"])?;
    w.start_controller()?;
    let (dir, _keep) = disk_backed_dir(&w)?;

    // The host's working set: a file read once, so cached.
    let hot = dir.join("hot.dat");
    write_cold(&hot, HOT_SIZE, 1)?;
    File::open(&hot)?.read_to_end(&mut Vec::new())?;
    let hot_before = resident_fraction(&hot)?;
    ensure!(
        hot_before >= 0.9,
        "hot file only {hot_before:.3} cached after reading it"
    );

    // direct_io = true: a full scan of a cold image.
    let image = dir.join("direct.raw");
    write_cold(&image, IMAGE_SIZE, 2)?;
    let (cold_pages, pages) = resident_pages(&image)?;
    ensure!(
        cold_pages * 20 < pages,
        "image not evicted before the scan: {cold_pages}/{pages} pages cached"
    );
    let disks = [DiskSpec {
        id: "d".into(),
        path: image.clone(),
        block_size: 65536,
    }];
    w.start_agent(
        "direct",
        &disks,
        "[sync]\ndirect_io = true\ndrop_page_cache = false\n",
    )?;
    w.wait_connected("direct")?;
    w.sync("direct")?;
    let (after, _) = resident_pages(&image)?;
    let hot_after = resident_fraction(&hot)?;
    let log = w.log("agent-direct.log");
    assert!(
        !log.contains("refuses O_DIRECT"),
        "the agent fell back to buffered reads:\n{log}"
    );
    // O_DIRECT reads never populate the cache: at most what was left over
    // from writing the image (plus a page of slack).
    assert!(
        after <= cold_pages + 1,
        "direct scan cached the image: {after}/{pages} pages (before: {cold_pages})"
    );
    assert!(
        hot_after >= 0.9,
        "hot file evicted by the direct scan: {hot_after:.3} cached (before {hot_before:.3})"
    );
    // And the point is the image, tail included.
    let exported = w.export("direct", "d", "latest")?;
    assert_same(&exported, &image);
    eprintln!(
        "direct_io = true: image {after}/{pages} pages cached after the scan, hot file {:.1}%",
        hot_after * 100.0
    );

    // direct_io = false: the same scan through the page cache leaves the
    // image there.
    let image = dir.join("buffered.raw");
    write_cold(&image, IMAGE_SIZE, 3)?;
    let disks = [DiskSpec {
        id: "d".into(),
        path: image.clone(),
        block_size: 65536,
    }];
    w.start_agent(
        "buffered",
        &disks,
        "[sync]\ndirect_io = false\ndrop_page_cache = false\n",
    )?;
    w.wait_connected("buffered")?;
    w.sync("buffered")?;
    let buffered = resident_fraction(&image)?;
    eprintln!(
        "direct_io = false: image {:.1}% cached after the scan",
        buffered * 100.0
    );
    assert!(
        buffered >= 0.9,
        "buffered scan left only {buffered:.3} of the image cached; the measurement cannot tell the modes apart"
    );
    Ok(())
}
