//! Small filesystem helpers: atomic record replacement, OFD locks, names.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Replaces `path` with `bytes` so that a reader (or a crash) sees either
/// the old or the new content: write a temp file, fsync it, rename it over
/// `path`, fsync the directory. On ENOSPC the temp file is removed and the
/// old record stays as it was.
pub fn atomic_write(path: &Path, bytes: &[u8], what: &'static str) -> Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("record");
    let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(if is_full(&e) { Error::VolumeFull { path: path.to_owned(), what } } else { Error::io(&tmp, e) });
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(if is_full(&e) { Error::VolumeFull { path: path.to_owned(), what } } else { Error::io(path, e) });
    }
    fsync_dir(dir)
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

pub fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Reads a whole small file; `None` if it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match File::open(path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
            Ok(Some(buf))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// An open file description lock (`F_OFD_SETLK`) on a whole lock file,
/// released when dropped (closing the description releases it). OFD locks,
/// unlike `flock`, are honoured by NFSv4 servers across machines, and unlike
/// classic POSIX locks they belong to the open file, not the process, so
/// two threads of one process exclude each other too.
pub struct OfdLock {
    _file: File,
}

impl OfdLock {
    /// Takes the lock, retrying for at most `timeout` (the holders only keep
    /// it for one read-modify-write, so waiting long means a stuck holder).
    pub fn acquire(path: &Path, exclusive: bool, timeout: Duration) -> Result<OfdLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let start = Instant::now();
        loop {
            // SAFETY: flock is plain data; all-zero is a valid value.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = if exclusive { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            // l_start = l_len = 0: the whole file; l_pid must be 0 for OFD locks.
            // SAFETY: fcntl on a descriptor we own with a valid flock pointer.
            let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if rc == 0 {
                return Ok(OfdLock { _file: file });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) | Some(libc::EINTR) => {}
                _ => return Err(Error::io(path, e)),
            }
            if start.elapsed() >= timeout {
                return Err(Error::LockTimeout {
                    path: path.to_owned(),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Names of disks, VMs and hosts become file names: keep them boring.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName { what, name: name.to_owned() })
    }
}

/// Random bytes for volume ids and VHD unique ids.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).is_err() {
        // Unique enough for an id if /dev/urandom is unavailable.
        let seed = crate::error::now_ms() ^ ((std::process::id() as u64) << 32);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed.rotate_left(i as u32 * 7) >> (i % 8)) as u8;
        }
    }
    buf
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
