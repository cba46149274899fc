//! NBD exports (being written).

use super::{DiskSource, SourceError};

/// Why an NBD export cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Not implemented yet.
    #[error("{uri}: NBD support is not implemented yet")]
    Unsupported {
        /// The URI.
        uri: String,
    },
}

/// An NBD export.
pub struct NbdDisk {
    describe: String,
}

impl NbdDisk {
    /// Connects to an `nbd://` or `nbd+unix://` URI.
    pub fn connect(uri: &str) -> Result<NbdDisk, NbdError> {
        let _ = NbdDisk { describe: String::new() };
        Err(NbdError::Unsupported { uri: uri.to_owned() })
    }

    /// Dirty extents `[start, end)` of `bitmap` within `[offset, offset+len)`.
    pub fn dirty_extents(&self, _bitmap: &str, _offset: u64, _len: u64) -> Result<Vec<(u64, u64)>, NbdError> {
        Ok(Vec::new())
    }
}

impl DiskSource for NbdDisk {
    fn describe(&self) -> &str {
        &self.describe
    }
    fn size(&self) -> u64 {
        0
    }
    fn read_exact_at(&self, _buf: &mut [u8], _offset: u64) -> Result<(), SourceError> {
        Ok(())
    }
    fn next_data(&self, _offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
        Ok(None)
    }
}
