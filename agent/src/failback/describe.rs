//! Describing a target: the digest of every block it holds, in block order.
//!
//! A scan cuts the point's range of the target into batches; worker threads
//! each read a batch (holes the target reports are not read: they hold
//! zeros), hash every block and hand the digests back, and the caller gets
//! them in block order, one batch at a time. Memory is one batch buffer per
//! worker. The same hashing serves the verifying re-read after writes.

use std::sync::atomic::{AtomicBool, Ordering};

use tideline_protocol::{Digest, Geometry, ZeroDigests};

use crate::source::{DiskSource, SourceError};

/// Digests of blocks `[first, end)` of `disk`, read with one `pread` per
/// data extent into `buf` (resized as needed). Holes are zero blocks.
pub fn hash_blocks(
    disk: &dyn DiskSource,
    g: &Geometry,
    zeros: &ZeroDigests,
    first: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<Vec<Digest>, SourceError> {
    let start_byte = g.offset(first);
    let end_byte = if end >= g.block_count {
        g.disk_size
    } else {
        g.offset(end)
    };
    let len = (end_byte - start_byte) as usize;
    buf.clear();
    buf.resize(len, 0);
    // Read only the data extents; the rest of `buf` stays zero, and blocks
    // that no extent touches are known zero without looking at them.
    let mut touched = vec![false; (end - first) as usize];
    let mut at = start_byte;
    while at < end_byte {
        let Some((s, e)) = disk.next_data(at)? else {
            break;
        };
        if s >= end_byte {
            break;
        }
        let (s, e) = (s.max(at), e.min(end_byte));
        let lo = (s - start_byte) as usize;
        let hi = (e - start_byte) as usize;
        disk.read_exact_at(&mut buf[lo..hi], s)?;
        let bs = u64::from(g.block_size);
        for b in (s / bs)..e.div_ceil(bs) {
            if let Some(t) = touched.get_mut((b - first) as usize) {
                *t = true;
            }
        }
        at = e;
    }
    let mut out = Vec::with_capacity((end - first) as usize);
    for (b, &read) in (first..end).zip(&touched) {
        let lo = (g.offset(b) - start_byte) as usize;
        let bytes = &buf[lo..lo + g.block_len(b) as usize];
        out.push(if !read || bytes.iter().all(|&x| x == 0) {
            zeros.for_block(b)
        } else {
            Digest::of(bytes)
        });
    }
    Ok(out)
}

/// Scans blocks `[0, g.block_count)` of `disk` with `workers` threads and
/// calls `emit(first_block, digests)` in block order, batch by batch.
/// Stops early, returning `Ok(false)`, when `cancel` turns true.
pub fn scan(
    disk: &dyn DiskSource,
    g: Geometry,
    workers: usize,
    batch_bytes: u64,
    cancel: &AtomicBool,
    emit: &mut dyn FnMut(u64, Vec<Digest>) -> Result<(), SourceError>,
) -> Result<bool, SourceError> {
    let zeros = ZeroDigests::new(g.disk_size, g.block_size);
    let per_batch = (batch_bytes / u64::from(g.block_size)).max(1);
    let workers = workers.max(1) as u64;
    let mut buffers: Vec<Vec<u8>> = (0..workers).map(|_| Vec::new()).collect();
    let mut first = 0u64;
    while first < g.block_count {
        if cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // One round: a batch per worker, joined in order.
        let round: Vec<(u64, u64)> = (0..workers)
            .map(|i| first + i * per_batch)
            .take_while(|&s| s < g.block_count)
            .map(|s| (s, (s + per_batch).min(g.block_count)))
            .collect();
        let results: Vec<Result<Vec<Digest>, SourceError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = round
                .iter()
                .zip(buffers.iter_mut())
                .map(|(&(s, e), buf)| {
                    let zeros = &zeros;
                    let g = &g;
                    scope.spawn(move || hash_blocks(disk, g, zeros, s, e, buf))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SourceError::Read {
                            disk: disk.describe().to_owned(),
                            offset: 0,
                            cause: std::io::Error::other("scan thread panicked"),
                        })
                    })
                })
                .collect()
        });
        for ((s, _), r) in round.iter().zip(results) {
            emit(*s, r?)?;
        }
        first = round.last().map_or(g.block_count, |r| r.1);
    }
    Ok(true)
}

/// Blocks to re-read when checking a map: `n` spread evenly over the disk
/// (first and last included) plus `n` chosen at random.
pub fn spot_check_blocks(block_count: u64, n: u32) -> Vec<u64> {
    use rand::Rng;
    let n = u64::from(n).min(block_count);
    if n == 0 {
        return Vec::new();
    }
    let mut v: Vec<u64> = (0..n)
        .map(|i| i * (block_count - 1) / (n - 1).max(1))
        .collect();
    let mut rng = rand::thread_rng();
    v.extend((0..n).map(|_| rng.gen_range(0..block_count)));
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RawDisk;
    use std::os::unix::fs::FileExt;

    #[test]
    fn scan_matches_per_block_hashes_across_holes_and_a_short_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        let size = 40 * 4096 + 1000;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 5000], 4096 * 3 + 100).unwrap();
        f.write_all_at(&[9u8; 900], size - 900).unwrap();
        drop(f);
        let disk = RawDisk::open(&path).unwrap();
        let g = Geometry::new(size, 4096);
        let bytes = std::fs::read(&path).unwrap();
        let expected: Vec<Digest> = (0..g.block_count)
            .map(|b| {
                let lo = g.offset(b) as usize;
                Digest::of(&bytes[lo..lo + g.block_len(b) as usize])
            })
            .collect();
        for (workers, batch) in [(1, 4096u64), (2, 3 * 4096), (3, 1 << 20)] {
            let mut got = Vec::new();
            let cancel = AtomicBool::new(false);
            let done = scan(&disk, g, workers, batch, &cancel, &mut |first, d| {
                assert_eq!(first, got.len() as u64);
                got.extend(d);
                Ok(())
            })
            .unwrap();
            assert!(done);
            assert_eq!(got, expected, "workers {workers} batch {batch}");
        }
    }

    #[test]
    fn spot_checks_cover_both_ends() {
        let v = spot_check_blocks(1000, 8);
        assert!(v.contains(&0) && v.contains(&999));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(spot_check_blocks(1, 8), vec![0]);
        assert!(spot_check_blocks(10, 0).is_empty());
    }
}
