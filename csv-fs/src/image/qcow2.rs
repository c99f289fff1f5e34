//! qcow2 through `imago` (sync mode): QEMU's own format, written in a way
//! `qemu-img check` accepts. Backing files and external data files are
//! refused: a disk on the volume is self-contained.

use std::io;
use std::path::{Path, PathBuf};

use imago::file::File;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Storage};
use imago::{StorageCreateOptions, StorageOpenOptions};

use super::BlockBackend;
use crate::error::{Error, Result};

type Driver = imago::qcow2::Qcow2<File>;

pub struct Qcow2 {
    access: FormatAccess<File>,
    path: PathBuf,
}

/// imago reports bad images as `InvalidData`/`InvalidInput`/`Other`
/// errors with a message; those are corrupt images, not I/O trouble.
fn map_err(path: &Path, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::InvalidData
        | io::ErrorKind::InvalidInput
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::Other => Error::CorruptImage { path: path.to_owned(), format: "qcow2", reason: e.to_string() },
        io::ErrorKind::Unsupported => Error::Unsupported { path: path.to_owned(), reason: e.to_string() },
        _ => Error::io(path, e),
    }
}

impl Qcow2 {
    pub fn open(path: &Path, writable: bool) -> Result<Qcow2> {
        let file =
            File::open(StorageOpenOptions::new().filename(path).write(writable)).map_err(|e| Error::io(path, e))?;
        let driver = Driver::builder(file)
            .backing(None)
            .data_file(None)
            .write(writable)
            .open(DenyImplicitOpenGate::default())
            .map_err(|e| map_err(path, e))?;
        if driver.implicit_backing_file().is_some() || driver.requires_external_data_file() {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: "qcow2 with a backing file or an external data file".into(),
            });
        }
        Ok(Qcow2 { access: FormatAccess::new(driver), path: path.to_owned() })
    }
}

pub fn create(path: &Path, size: u64) -> Result<()> {
    let file = File::create_open(StorageCreateOptions::new().filename(path)).map_err(|e| Error::io(path, e))?;
    let result = Driver::create_builder(file).size(size).create();
    if let Err(e) = result {
        let _ = std::fs::remove_file(path);
        return Err(map_err(path, e));
    }
    // Creation wrote through its own handle; make it durable by path.
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

impl BlockBackend for Qcow2 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.access.read(buf, offset).map_err(|e| map_err(&self.path, e))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.access.write(buf, offset).map_err(|e| map_err(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        // flush writes cached metadata out; sync makes it durable.
        self.access.flush().and_then(|_| self.access.sync()).map_err(|e| map_err(&self.path, e))
    }

    fn len(&self) -> u64 {
        self.access.size()
    }
}
