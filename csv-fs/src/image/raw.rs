//! Raw images: the virtual disk is the file, byte for byte.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::file::{Cache, ImageFile};
use super::BlockBackend;
use crate::error::{Error, Result};

pub struct Raw {
    file: ImageFile,
    path: PathBuf,
    size: u64,
}

impl Raw {
    pub fn open(path: &Path, writable: bool, cache: Cache) -> Result<Raw> {
        let file = ImageFile::open(path, writable, cache).map_err(|e| Error::io(path, e))?;
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
