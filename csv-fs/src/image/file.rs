//! The file under raw and VHD images, and how it meets the host's page
//! cache.
//!
//! On a shared volume a host that loses its lease must not write the image
//! any more, not even later: a write sitting dirty in the page cache would
//! reach the volume whenever the kernel writes it back, possibly after
//! another host took the disk over. [`Cache::Direct`] therefore bypasses
//! the page cache (`O_DIRECT`, QEMU's `cache=none`, what libvirt requires
//! for migrating on shared storage): a write that returned is at the
//! volume, and reads see what other hosts wrote. `O_DIRECT` needs offsets,
//! lengths and memory aligned to the volume's block size; aligned requests
//! go straight through (memory bounced through an aligned buffer when the
//! caller's is not), the rare unaligned ones (VHD metadata: a 4-byte BAT
//! entry) are written through the page cache and synced at once, so
//! nothing dirty stays behind. A filesystem without `O_DIRECT` gets the
//! same guarantee by syncing after every write (write-through).

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

/// How an image uses the host's page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cache {
    /// Reads and writes through the page cache; `flush` makes writes
    /// durable. For a disk only this host ever opens.
    #[default]
    Host,
    /// Nothing of the image is cached on the host (see the module docs).
    Direct,
}

/// How an open image file does its I/O.
enum Io {
    Buffered,
    /// `O_DIRECT` on this second descriptor, with this offset, length and
    /// memory alignment.
    Direct {
        file: File,
        align: usize,
    },
    /// No `O_DIRECT` here: every write is synced before it returns.
    WriteThrough,
}

pub struct ImageFile {
    /// Through the page cache: metadata, unaligned requests, sync.
    buffered: File,
    io: Io,
    /// The aligned buffer for guest memory `O_DIRECT` cannot take, kept
    /// between requests (up to [`KEEP_BOUNCE`]) rather than allocated and
    /// zeroed for each. Uncontended: one vCPU does a disk's I/O.
    bounce: Mutex<Bounce>,
}

/// The largest bounce buffer kept for the next request.
const KEEP_BOUNCE: usize = 16 << 20;

impl ImageFile {
    pub fn open(path: &Path, writable: bool, cache: Cache) -> io::Result<ImageFile> {
        let buffered = OpenOptions::new().read(true).write(writable).open(path)?;
        let io = match cache {
            Cache::Host => Io::Buffered,
            Cache::Direct => {
                let opened = OpenOptions::new().read(true).write(writable).custom_flags(libc::O_DIRECT).open(path);
                match opened {
                    Ok(file) => Io::Direct { align: direct_alignment(&file, buffered.metadata()?.len()), file },
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::warn!(path = %path.display(), "no O_DIRECT on this filesystem: writing through");
                        Io::WriteThrough
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        Ok(ImageFile { buffered, io, bounce: Mutex::new(Bounce::new(0, 1)) })
    }

    /// The direct descriptor and its alignment, if this request may use it.
    fn aligned(&self, offset: u64, len: usize) -> Option<(&File, usize)> {
        match &self.io {
            Io::Direct { file, align }
                if offset.is_multiple_of(*align as u64) && len.is_multiple_of(*align) && len > 0 =>
            {
                Some((file, *align))
            }
            _ => None,
        }
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.aligned(offset, buf.len()) {
            Some((f, align)) if is_aligned(buf.as_ptr(), align) => f.read_exact_at(buf, offset),
            Some((f, align)) => self.bounced(buf.len(), align, |b| {
                f.read_exact_at(b, offset)?;
                buf.copy_from_slice(b);
                Ok(())
            }),
            None => self.buffered.read_exact_at(buf, offset),
        }
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.aligned(offset, buf.len()) {
            Some((f, align)) if is_aligned(buf.as_ptr(), align) => f.write_all_at(buf, offset),
            Some((f, align)) => self.bounced(buf.len(), align, |b| {
                b.copy_from_slice(buf);
                f.write_all_at(b, offset)
            }),
            None if matches!(self.io, Io::Buffered) => self.buffered.write_all_at(buf, offset),
            // Unaligned under O_DIRECT, or no O_DIRECT at all: through the
            // cache, and out of it before returning.
            None => {
                self.buffered.write_all_at(buf, offset)?;
                self.buffered.sync_data()
            }
        }
    }

    /// Runs `io` on an `align`-aligned buffer of `len` bytes.
    fn bounced(&self, len: usize, align: usize, io: impl FnOnce(&mut [u8]) -> io::Result<()>) -> io::Result<()> {
        if len > KEEP_BOUNCE {
            return io(Bounce::new(len, align).as_mut());
        }
        let mut kept = self.bounce.lock().unwrap_or_else(|p| p.into_inner());
        if !kept.fits(len, align) {
            *kept = Bounce::new(len.max(64 << 10), align);
        }
        io(&mut kept.as_mut()[..len])
    }

    pub fn sync_data(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    pub fn sync_all(&self) -> io::Result<()> {
        self.buffered.sync_all()
    }

    pub fn metadata(&self) -> io::Result<Metadata> {
        self.buffered.metadata()
    }
}

fn is_aligned(p: *const u8, align: usize) -> bool {
    (p as usize).is_multiple_of(align)
}

/// The alignment `O_DIRECT` needs on `file`: 512 if a 512-byte read at a
/// 512-aligned (but not 4096-aligned) address works, else 4096.
fn direct_alignment(file: &File, len: u64) -> usize {
    if len < 512 {
        return 4096;
    }
    let mut bounce = Bounce::new(1024, 4096);
    let probe = &mut bounce.as_mut()[512..];
    match file.read_at(probe, 0) {
        Ok(_) => 512,
        Err(_) => 4096,
    }
}

/// A heap buffer of `len` bytes starting at an `align`-aligned address
/// (safe code: over-allocated and sliced).
struct Bounce {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Bounce {
    /// Whether `len` bytes at `align` fit (the start stays aligned as long
    /// as the buffer is not moved, and it never is).
    fn fits(&self, len: usize, align: usize) -> bool {
        len <= self.len && is_aligned(self.buf[self.start..].as_ptr(), align)
    }

    fn new(len: usize, align: usize) -> Bounce {
        let buf = vec![0u8; len + align];
        let start = buf.as_ptr().align_offset(align);
        Bounce { buf, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str, len: usize) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("csv-fs-file-{tag}-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; len]).unwrap();
        p
    }

    #[test]
    fn direct_io_takes_any_buffer_offset_and_length() {
        let p = scratch("direct", 1 << 20);
        let f = ImageFile::open(&p, true, Cache::Direct).unwrap();
        assert!(!matches!(f.io, Io::Buffered), "Cache::Direct must not use the page cache for data");
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        // Aligned, aligned with an unaligned buffer, and unaligned.
        for (off, slice) in [(4096u64, &data[..8192]), (8192 * 4, &data[1..4097]), (3, &data[5..1000])] {
            f.write_all_at(slice, off).unwrap();
            let mut back = vec![0u8; slice.len() + 1];
            f.read_exact_at(&mut back[1..], off).unwrap();
            assert_eq!(&back[1..], slice, "at {off}");
        }
        // What a direct write put there is what a fresh buffered reader sees.
        let plain = ImageFile::open(&p, false, Cache::Host).unwrap();
        let mut back = vec![0u8; 8192];
        plain.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(&back[..], &data[..8192]);
        std::fs::remove_file(&p).unwrap();
    }
}
