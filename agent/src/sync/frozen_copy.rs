//! The last copy of a point, read while the filesystems are frozen.
//!
//! The freeze must be short, so the blocks that changed since the previous
//! round are only *read* while frozen, into memory ([`capture`]); hashing,
//! compressing and sending happen after the thaw, from the captured bytes.
//! [`FrozenCopy`] serves them to the scan pipeline as a [`DiskSource`]
//! whose only data are the captured extents: the final round scans it with
//! those extents as its active set, so nothing outside them is read, and
//! what is read is the disk as it was at the instant of the freeze.

use std::time::Instant;

use crate::source::{DiskSource, SourceError};

/// Bytes read per `pread` while capturing.
const CAPTURE_CHUNK: u64 = 4 << 20;

/// Extents of a disk held in memory, as they were when captured.
pub struct FrozenCopy {
    describe: String,
    size: u64,
    /// `(start, bytes)`, sorted by start, not overlapping.
    extents: Vec<(u64, Vec<u8>)>,
}

/// Why a capture stopped before it read everything.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The remainder does not fit the memory allowed for it.
    #[error("{bytes} bytes changed since the last round, more than the {limit} allowed in memory while frozen")]
    TooLarge {
        /// Bytes to read.
        bytes: u64,
        /// `[consistency] freeze_memory`.
        limit: u64,
    },
    /// Reading took longer than the freeze may last.
    #[error("the freeze's time ran out after reading {read} of the {bytes} bytes changed since the last round")]
    Overran {
        /// Bytes read by then.
        read: u64,
        /// Bytes to read.
        bytes: u64,
    },
    /// The disk could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Reads `extents` (byte ranges, sorted, merged) of `source` into memory,
/// giving up when the total exceeds `memory_limit` or the reads pass
/// `deadline`.
pub fn capture(
    source: &dyn DiskSource,
    extents: &[(u64, u64)],
    memory_limit: u64,
    deadline: Instant,
) -> Result<FrozenCopy, CaptureError> {
    let bytes: u64 = extents.iter().map(|(s, e)| e - s).sum();
    if bytes > memory_limit {
        return Err(CaptureError::TooLarge {
            bytes,
            limit: memory_limit,
        });
    }
    let mut out = Vec::with_capacity(extents.len());
    let mut read = 0u64;
    for &(start, end) in extents {
        let mut buf = vec![0u8; (end - start) as usize];
        let mut at = start;
        while at < end {
            if Instant::now() > deadline {
                return Err(CaptureError::Overran { read, bytes });
            }
            let n = (end - at).min(CAPTURE_CHUNK);
            let o = (at - start) as usize;
            source.read_exact_at(&mut buf[o..o + n as usize], at)?;
            at += n;
            read += n;
        }
        out.push((start, buf));
    }
    Ok(FrozenCopy {
        describe: format!("{} (as frozen)", source.describe()),
        size: source.size(),
        extents: out,
    })
}

impl FrozenCopy {
    /// The captured byte extents.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        self.extents
            .iter()
            .map(|(s, b)| (*s, s + b.len() as u64))
            .collect()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

impl DiskSource for FrozenCopy {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// Serves reads that lie within one captured extent; anything else is
    /// a bug in the caller, reported as a short read rather than as data.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        let i = self.extents.partition_point(|(s, _)| *s <= offset);
        let hit = i
            .checked_sub(1)
            .map(|i| &self.extents[i])
            .filter(|(s, b)| offset + buf.len() as u64 <= s + b.len() as u64);
        match hit {
            Some((s, b)) => {
                let o = (offset - s) as usize;
                buf.copy_from_slice(&b[o..o + buf.len()]);
                Ok(())
            }
            None => Err(SourceError::ShortRead {
                disk: self.describe.clone(),
                offset,
                len: buf.len(),
                size: self.size,
            }),
        }
    }

    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
        let i = self
            .extents
            .partition_point(|(s, b)| s + b.len() as u64 <= offset);
        Ok(self
            .extents
            .get(i)
            .map(|(s, b)| ((*s).max(offset), s + b.len() as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RawDisk;
    use std::time::Duration;

    fn disk(bytes: &[u8]) -> (tempfile::NamedTempFile, RawDisk) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let d = RawDisk::open(f.path()).unwrap();
        (f, d)
    }

    #[test]
    fn serves_exactly_what_was_captured() {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (_f, d) = disk(&data);
        let far = Instant::now() + Duration::from_secs(60);
        let copy = capture(&d, &[(4096, 8192), (16384, 20000)], 1 << 20, far).unwrap();
        assert_eq!(copy.bytes(), 4096 + 3616);
        assert_eq!(copy.extents(), vec![(4096, 8192), (16384, 20000)]);
        let mut buf = vec![0u8; 100];
        copy.read_exact_at(&mut buf, 17000).unwrap();
        assert_eq!(buf, data[17000..17100]);
        // Outside, or across the end of, a captured extent.
        assert!(copy.read_exact_at(&mut buf, 0).is_err());
        assert!(copy.read_exact_at(&mut buf, 8150).is_err());
        assert_eq!(copy.next_data(0).unwrap(), Some((4096, 8192)));
        assert_eq!(copy.next_data(5000).unwrap(), Some((5000, 8192)));
        assert_eq!(copy.next_data(8192).unwrap(), Some((16384, 20000)));
        assert_eq!(copy.next_data(20000).unwrap(), None);
    }

    #[test]
    fn refuses_more_than_the_memory_limit_and_stops_at_the_deadline() {
        let (_f, d) = disk(&vec![1u8; 1 << 20]);
        let far = Instant::now() + Duration::from_secs(60);
        assert!(matches!(
            capture(&d, &[(0, 1 << 20)], 4096, far),
            Err(CaptureError::TooLarge { .. })
        ));
        let past = Instant::now() - Duration::from_millis(1);
        assert!(matches!(
            capture(&d, &[(0, 4096)], 1 << 20, past),
            Err(CaptureError::Overran { .. })
        ));
    }
}
