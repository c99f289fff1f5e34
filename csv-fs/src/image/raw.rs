//! Raw images: the virtual disk is the file, byte for byte.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::BlockBackend;
use crate::error::{Error, Result};

pub struct Raw {
    file: File,
    path: PathBuf,
    size: u64,
}

impl Raw {
    pub fn open(path: &Path, writable: bool) -> Result<Raw> {
        let file = OpenOptions::new().read(true).write(writable).open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(Raw { file, path: path.to_owned(), size })
    }
}

/// A sparse file of `size` bytes.
pub fn create(path: &Path, size: u64) -> Result<()> {
    let file =
        OpenOptions::new().write(true).create_new(true).mode(0o644).open(path).map_err(|e| Error::io(path, e))?;
    file.set_len(size).and_then(|_| file.sync_all()).map_err(|e| Error::io(path, e))
}

impl BlockBackend for Raw {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io(&self.path, e))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| Error::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    fn len(&self) -> u64 {
        self.size
    }
}
