//! VMDK exports (being written).

use std::path::{Path, PathBuf};

use super::{DiskSource, SourceError};

/// Why a VMDK cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    /// Not implemented yet.
    #[error("{}: VMDK support is not implemented yet", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
    },
}

/// A VMDK disk.
pub struct VmdkDisk {
    describe: String,
}

impl VmdkDisk {
    /// Opens a VMDK (descriptor or sparse extent).
    pub fn open(path: &Path) -> Result<VmdkDisk, VmdkError> {
        let _ = VmdkDisk { describe: String::new() };
        Err(VmdkError::Unsupported { path: path.to_owned() })
    }
}

impl DiskSource for VmdkDisk {
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
