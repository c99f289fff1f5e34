//! Disk image formats behind one small trait, [`BlockBackend`], that
//! virtio-blk can serve from: raw (the fast path), VHD fixed and dynamic
//! (Hyper-V's formats) and qcow2 (through the `imago` crate).

mod file;
pub use file::Cache;
mod qcow2;
mod raw;
mod vhd;

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// What a virtio-blk device needs from an image. Offsets and lengths are in
/// bytes; [`Image`] checks ranges and the open mode before a backend sees a
/// request, so backends only serve in-range requests.
pub trait BlockBackend: Send {
    /// Fills all of `buf` from `offset`; unallocated ranges read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`, allocating as needed.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable (data and metadata).
    fn flush(&mut self) -> Result<()>;
    /// The virtual disk size in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The image formats Ferry reads, writes and creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Raw,
    VhdFixed,
    VhdDynamic,
    Qcow2,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Raw, Format::VhdFixed, Format::VhdDynamic, Format::Qcow2];

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::VhdFixed => "vhd-fixed",
            Format::VhdDynamic => "vhd-dynamic",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The file extension; both VHD kinds share `.vhd` and are told apart
    /// by their footer.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::VhdFixed | Format::VhdDynamic => "vhd",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The name `qemu-img -f` knows the format by.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::VhdFixed | Format::VhdDynamic => "vpc",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "raw" | "img" => Ok(Format::Raw),
            "vhd-fixed" | "fixed-vhd" => Ok(Format::VhdFixed),
            "vhd-dynamic" | "dynamic-vhd" | "vhd" => Ok(Format::VhdDynamic),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown disk format {s:?} (raw, vhd-fixed, vhd-dynamic, qcow2)")),
        }
    }
}

/// How an image is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    ReadWrite,
    ReadOnly,
    /// Opened and validated (and checked writable) but not yet written: a
    /// migration destination holds its disks this way until the source hands
    /// the lease over. [`Image::activate`] re-reads the metadata the source
    /// wrote in the meantime and allows writes.
    Standby,
}

/// An open disk image of any format.
pub struct Image {
    path: PathBuf,
    format: Format,
    mode: OpenMode,
    cache: Cache,
    backend: Box<dyn BlockBackend>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Image {
    /// Opens `path`, its format from [`format_for_path`]: from the name,
    /// never from content the guest can write.
    pub fn open(path: &Path, mode: OpenMode) -> Result<Image> {
        Image::open_as(path, format_for_path(path)?, mode)
    }

    /// Opens `path` as `format`, through the host's page cache.
    pub fn open_as(path: &Path, format: Format, mode: OpenMode) -> Result<Image> {
        Image::open_with(path, format, mode, Cache::Host)
    }

    /// Opens `path` as `format`, using the page cache as `cache` says (a
    /// disk on a shared volume: [`Cache::Direct`]).
    pub fn open_with(path: &Path, format: Format, mode: OpenMode, cache: Cache) -> Result<Image> {
        if mode == OpenMode::Standby {
            // Fail now, not at switchover, if we could never write it.
            std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, e))?;
        }
        let backend = open_backend(path, format, mode == OpenMode::ReadWrite, cache)?;
        tracing::debug!(path = %path.display(), %format, ?mode, ?cache, size = backend.len(), "image opened");
        Ok(Image { path: path.to_owned(), format, mode, cache, backend })
    }

    /// Creates a new image of `size` bytes (a multiple of 512); refuses to
    /// overwrite an existing file.
    pub fn create(path: &Path, format: Format, size: u64) -> Result<()> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(Error::BadSize { size, reason: "must be a non-zero multiple of 512 bytes".into() });
        }
        match format {
            Format::Raw => raw::create(path, size),
            Format::VhdFixed => vhd::create_fixed(path, size),
            Format::VhdDynamic => vhd::create_dynamic(path, size),
            Format::Qcow2 => qcow2::create(path, size),
        }
    }

    /// Standby to read-write: reopens the image so that metadata written by
    /// the previous owner since we opened it (new VHD blocks, qcow2 L2
    /// tables) is seen. Call only once this host holds the disk's lease.
    pub fn activate(&mut self) -> Result<()> {
        if self.mode == OpenMode::ReadWrite {
            return Ok(());
        }
        self.backend = open_backend(&self.path, self.format, true, self.cache)?;
        self.mode = OpenMode::ReadWrite;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets go of the image without writing one more byte: for a host that
    /// lost the disk's lease. The backend is leaked, not dropped, because
    /// dropping imago's qcow2 driver flushes its cached metadata into the
    /// file, over what the disk's new owner may have written. Every later
    /// call fails.
    pub fn abandon(&mut self) {
        let size = self.backend.len();
        let fenced = std::mem::replace(&mut self.backend, Box::new(Abandoned { size }));
        std::mem::forget(fenced);
        self.mode = OpenMode::ReadOnly;
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn mode(&self) -> OpenMode {
        self.mode
    }

    /// Bytes the image occupies on the volume (allocated blocks of the file).
    pub fn allocated_bytes(&self) -> Result<u64> {
        allocated_bytes(&self.path)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let size = self.backend.len();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { path: self.path.clone(), offset, len, size }),
        }
    }
}

impl BlockBackend for Image {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        self.backend.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self.mode {
            OpenMode::ReadWrite => {}
            OpenMode::ReadOnly => return Err(Error::ReadOnly { path: self.path.clone() }),
            OpenMode::Standby => return Err(Error::Standby { path: self.path.clone() }),
        }
        self.check_range(offset, buf.len())?;
        self.backend.write_at(buf, offset)
    }

    fn flush(&mut self) -> Result<()> {
        if self.mode == OpenMode::ReadWrite {
            self.backend.flush()?;
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.backend.len()
    }
}

/// What an abandoned image answers with.
struct Abandoned {
    size: u64,
}

impl Abandoned {
    fn refused() -> Error {
        Error::io(Path::new("(abandoned image)"), std::io::Error::other("the image was abandoned (fenced)"))
    }
}

impl BlockBackend for Abandoned {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(Abandoned::refused())
    }

    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Abandoned::refused())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.size
    }
}

fn open_backend(path: &Path, format: Format, writable: bool, cache: Cache) -> Result<Box<dyn BlockBackend>> {
    Ok(match format {
        Format::Raw => Box::new(raw::Raw::open(path, writable, cache)?),
        Format::VhdFixed => Box::new(vhd::Vhd::open_fixed(path, writable, cache)?),
        Format::VhdDynamic => Box::new(vhd::Vhd::open_dynamic(path, writable, cache)?),
        Format::Qcow2 => Box::new(qcow2::Qcow2::open(path, writable, cache)?),
    })
}

/// The format of a plain image path (one not on a volume, whose disks
/// carry their format in the volume's record): `.qcow2` is qcow2, `.vhd` is
/// VHD (fixed or dynamic by the footer at the end of the file, which the
/// guest cannot write), and anything else (`.raw`, `.img`, a block device,
/// no extension at all) is raw. Content is never probed: a guest on a raw
/// disk that writes a qcow2 header or a VHD footer into it still gets a raw
/// disk holding those bytes on the next open. A qcow2 or VHD image must
/// therefore be named `.qcow2` or `.vhd` to be read as one.
pub fn format_for_path(path: &Path) -> Result<Format> {
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("vhd") => vhd::probe(path)?,
        Some("qcow2") => Format::Qcow2,
        _ => Format::Raw,
    })
}

pub fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(|e| Error::io(path, e))?.blocks() * 512)
}

/// Maps an I/O error from reading a format's structures: a short read
/// means the file is truncated.
fn read_error(path: &Path, format: &'static str, what: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::CorruptImage {
            path: path.to_owned(),
            format,
            reason: format!("truncated: {what} lies past the end of the file"),
        }
    } else {
        Error::io(path, e)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
fn vhd_checksum_for_tests(footer: &[u8; 512]) -> u32 {
    vhd::checksum_for_tests(footer)
}

#[cfg(test)]
fn vhd_header_checksum_for_tests(header: &[u8]) -> u32 {
    vhd::header_checksum_for_tests(header)
}
