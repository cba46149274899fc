//! `tideline-agent dump`: a disk as the agent reads it, written out as a
//! sparse raw image.
//!
//! It goes through the same [`DiskSource`] as a sync (holes skipped, VMDK
//! grains inflated, NBD block status honoured), so an administrator can
//! compare what the agent sees with what another tool sees, and the
//! benchmark can set the readers against `qemu-img convert -O raw`. Chunks of
//! 4 MiB are read by several threads and written at their offsets.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::source::DiskSource;

/// Bytes per chunk.
const CHUNK: u64 = 4 << 20;

/// What a dump did.
#[derive(Debug, Default, Clone, Copy)]
pub struct DumpStats {
    /// Disk size in bytes.
    pub size: u64,
    /// Bytes read from the source (data extents).
    pub bytes_read: u64,
}

/// Writes `source` to `out` as a sparse raw image with `threads` readers.
pub fn dump(source: &dyn DiskSource, out: &Path, threads: usize) -> std::io::Result<DumpStats> {
    let size = source.size();
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(out)?;
    file.set_len(size)?;
    let next = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let failure: Mutex<Option<std::io::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut buf = vec![0u8; CHUNK as usize];
                loop {
                    let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                    if start >= size || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let end = (start + CHUNK).min(size);
                    match copy_chunk(source, &file, start, end, &mut buf, &read) {
                        // A hole past this chunk: every worker skips to the
                        // chunk holding the next data, so a sparse disk
                        // costs its data, not its size.
                        Ok(Some(data)) => {
                            next.fetch_max(data - data % CHUNK, Ordering::Relaxed);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    file.sync_all()?;
    Ok(DumpStats {
        size,
        bytes_read: read.into_inner(),
    })
}

/// Copies the data of `[start, end)`; returns where the next data after
/// `end` starts, when the source says so on the way (`None`: not known, or
/// no more data).
fn copy_chunk(
    source: &dyn DiskSource,
    file: &std::fs::File,
    start: u64,
    end: u64,
    buf: &mut [u8],
    read: &AtomicU64,
) -> std::io::Result<Option<u64>> {
    let mut pos = start;
    while pos < end {
        let Some((ds, de)) = source.next_data(pos).map_err(std::io::Error::other)? else {
            return Ok(None);
        };
        if ds >= end {
            return Ok(Some(ds));
        }
        let (s, e) = (ds.max(pos), de.min(end));
        if e > s {
            let part = &mut buf[..(e - s) as usize];
            source
                .read_exact_at(part, s)
                .map_err(std::io::Error::other)?;
            // Zeros stay holes in the output, as they are in the source.
            if !crate::sync::pipeline::is_all_zero(part) {
                file.write_all_at(part, s)?;
            }
            read.fetch_add(e - s, Ordering::Relaxed);
        }
        pos = de.max(pos + 1);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_of_a_sparse_raw_file_is_identical_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(20 << 20).unwrap();
        f.write_all_at(&[5u8; 100_000], 3 << 20).unwrap();
        f.write_all_at(&[9u8; 10], (20 << 20) - 10).unwrap();
        drop(f);
        let disk = crate::source::RawDisk::open(&src).unwrap();
        let out = dir.path().join("out.raw");
        let stats = dump(&disk, &out, 3).unwrap();
        assert_eq!(stats.size, 20 << 20);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 4 << 20);
    }
}
