//! A disk image and who may write it: the host-local lock for a plain
//! image, the ownership lease (with its fencing epoch and keeper) for a
//! disk on a shared volume, and standby for a migration destination that
//! holds the image open until the source hands it over. virtio-blk
//! ([`super::virtio::blk`]) speaks the protocol on top of this.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use csv_fs::image::{BlockBackend, Image, OpenMode};
use csv_fs::volume::Volume;
use csv_fs::{Lease, LeaseKeeper, LeaseStore};

use super::backend::{Backend, BackendError};
use crate::config::DiskConfig;

pub const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk image {path} does not exist")]
    Missing { path: PathBuf },
    #[error("disk image {path} is read-only (add ',readonly' to attach it read-only): {source}")]
    ReadOnly { path: PathBuf, source: std::io::Error },
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("disk image {path} is {size} bytes: a disk must be a non-zero multiple of 512 bytes")]
    BadSize { path: PathBuf, size: u64 },
    #[error("disk image {path} is in use by another VMM")]
    Locked { path: PathBuf },
    #[error("{0}")]
    Image(csv_fs::Error),
    #[error("{0}")]
    Lease(csv_fs::Error),
}

/// Who this host is to the volume's lease store.
#[derive(Clone, Debug)]
pub struct HostSide {
    pub host_id: String,
    pub lease_ttl: std::time::Duration,
    /// Take a crashed host's expired lease rather than refusing it.
    pub takeover: bool,
    /// How shared-volume images use the page cache (direct: nothing a
    /// fenced host wrote can reach the volume later).
    pub shared_cache: csv_fs::Cache,
}

/// A disk on a shared volume: written only while its lease is live. The
/// keeper renews it; a lease that is lost or past its expiry stops all
/// writes (self-fencing) before another host can have taken the disk.
struct Fence {
    store: Arc<dyn LeaseStore>,
    disk: String,
    host: String,
    keeper: Option<LeaseKeeper>,
    /// The grant made to another host by the last handoff, until its
    /// commit: what `reclaim` hands back to this host.
    handed: Option<Lease>,
    /// Logged once, when writes are first refused.
    refused: bool,
}

impl Fence {
    fn start(&mut self, lease: Lease) {
        let confine = || crate::seccomp::apply(crate::seccomp::ThreadKind::LeaseKeeper).map_err(|e| e.to_string());
        self.keeper = Some(LeaseKeeper::start_with(self.store.clone(), lease, confine));
    }

    /// Why this host may not write now, if it may not.
    fn refusal(&self) -> Option<String> {
        let Some(keeper) = &self.keeper else {
            return Some("no lease held (standby)".into());
        };
        match keeper.validity() {
            Err(why) => Some(why),
            // Stop a third of the TTL before expiry: a healthy keeper renews
            // every third, and the margin covers a stall between this check
            // and the write, so nothing lands after another host may take over.
            Ok((left, ttl)) if left <= ttl / 3 => {
                Some(format!("lease not renewed in time ({} ms of it left)", left.as_millis()))
            }
            Ok(_) => None,
        }
    }
}

pub struct Disk {
    image: Image,
    /// A second descriptor on the image file for the host-local flock.
    lock_file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    fence: Option<Fence>,
    /// Which file this is, beyond its path (see [`identity_of`]).
    identity: String,
}

/// What tells one disk image from another file at the same path: the
/// volume's id and the disk's name for a disk on a shared volume, and the
/// file's inode (the same on every host that mounts the same filesystem)
/// for both.
pub fn identity_of(path: &Path, volume: Option<(&Volume, &str)>) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path)?.ino();
    Ok(match volume {
        Some((v, name)) => format!("volume {} disk {name} inode {ino}", v.id()),
        None => format!("inode {ino}"),
    })
}

fn image_error(path: &Path, e: csv_fs::Error) -> Error {
    match e {
        csv_fs::Error::Io { source, .. } => match source.raw_os_error() {
            Some(libc::ENOENT) => Error::Missing { path: path.to_owned() },
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => {
                Error::ReadOnly { path: path.to_owned(), source }
            }
            _ => Error::Open { path: path.to_owned(), source },
        },
        other => Error::Image(other),
    }
}

impl Disk {
    /// Opens `path`, taking an exclusive lock so no second VMM on this host
    /// writes the same image.
    pub fn open(path: &Path, readonly: bool) -> Result<Disk, Error> {
        let disk = Disk::open_standby(path, readonly)?;
        disk.lock()?;
        disk.activated()
    }

    /// Opens `path` without taking its lock or writing: a migration
    /// destination holds the image this way until the source hands it over.
    pub fn open_standby(path: &Path, readonly: bool) -> Result<Disk, Error> {
        Disk::open_standby_as(path, None, readonly, csv_fs::Cache::Host)
    }

    /// The same with the format given (a volume's record of how the disk
    /// was created); None: by the path's extension. Never by content.
    fn open_standby_as(
        path: &Path,
        format: Option<csv_fs::Format>,
        readonly: bool,
        cache: csv_fs::Cache,
    ) -> Result<Disk, Error> {
        if !path.exists() {
            return Err(Error::Missing { path: path.to_owned() });
        }
        let mode = if readonly { OpenMode::ReadOnly } else { OpenMode::Standby };
        let image = match format {
            Some(f) => Image::open_with(path, f, mode, cache),
            None => Image::open(path, mode),
        }
        .map_err(|e| image_error(path, e))?;
        let lock_file = File::open(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let size = image.len();
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(Error::BadSize { path: path.to_owned(), size });
        }
        let identity = identity_of(path, None).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        Ok(Disk { image, lock_file, path: path.to_owned(), sectors: size / SECTOR, readonly, fence: None, identity })
    }

    /// Opens a configured disk: on a shared volume under its lease
    /// (acquired, or taken over with `host.takeover`), else under the
    /// host-local lock. `standby` defers both to [`Backend::acquire`].
    pub fn from_config(cfg: &DiskConfig, host: &HostSide, standby: bool) -> Result<Disk, Error> {
        let Some(vd) = &cfg.volume else {
            return if standby {
                Disk::open_standby(&cfg.path, cfg.readonly)
            } else {
                Disk::open(&cfg.path, cfg.readonly)
            };
        };
        let volume = Volume::open(&vd.volume).map_err(Error::Image)?;
        let path = volume.disk_path(&vd.name).map_err(Error::Image)?;
        let format = volume.disk_format(&vd.name).map_err(Error::Image)?;
        let mut disk = Disk::open_standby_as(&path, Some(format), cfg.readonly, host.shared_cache)?;
        disk.identity = identity_of(&path, Some((&volume, &vd.name)))
            .map_err(|source| Error::Open { path: path.clone(), source })?;
        let store: Arc<dyn LeaseStore> = Arc::new(volume.lease_store(host.lease_ttl));
        disk.fence = Some(Fence {
            store,
            disk: vd.name.clone(),
            host: host.host_id.clone(),
            keeper: None,
            handed: None,
            refused: false,
        });
        if standby || cfg.readonly {
            return Ok(disk);
        }
        let fence = disk.fence.as_mut().expect("set above");
        let lease = if host.takeover {
            fence.store.takeover(&vd.name, &host.host_id)
        } else {
            fence.store.acquire(&vd.name, &host.host_id)
        }
        .map_err(Error::Lease)?;
        fence.start(lease);
        // No host-local flock here: the lease is the authority, and a hung
        // previous owner on the same kernel must not block a takeover.
        disk.activated()
    }

    fn activated(mut self) -> Result<Disk, Error> {
        if !self.readonly {
            self.image.activate().map_err(Error::Image)?;
        }
        Ok(self)
    }

    /// Takes the image's host-local lock (exclusive unless read-only).
    pub fn lock(&self) -> Result<(), Error> {
        let lock = if self.readonly { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(self.lock_file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(Error::Locked { path: self.path.clone() });
        }
        Ok(())
    }

    /// True if writes may go to the image now; logs the first refusal.
    pub fn may_write(&mut self) -> bool {
        if self.readonly {
            return false;
        }
        let Some(fence) = &mut self.fence else { return true };
        match fence.refusal() {
            None => true,
            Some(why) => {
                if !fence.refused {
                    fence.refused = true;
                    tracing::error!(
                        "disk {} on the shared volume: writes refused, this host no longer owns it ({why}); \
                         the guest sees I/O errors (self-fencing)",
                        fence.disk
                    );
                }
                false
            }
        }
    }

    /// Why this host may not write, for errors (None: it may).
    fn ownership_problem(&mut self) -> Option<String> {
        if self.readonly || self.may_write() {
            return None;
        }
        Some(self.fence.as_ref().and_then(|f| f.refusal()).unwrap_or_else(|| "lease lost".into()))
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), csv_fs::Error> {
        self.image.read_at(buf, offset)
    }

    /// Writes guest data; refused (false) unless this host may write.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> bool {
        self.may_write() && self.image.write_at(buf, offset).is_ok()
    }

    /// A guest FLUSH: durable, and only by an owner.
    pub fn guest_flush(&mut self) -> bool {
        if !self.readonly && !self.may_write() {
            return false;
        }
        match self.image.flush() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("disk {}: flush failed: {e}", self.path.display());
                false
            }
        }
    }

    /// The lease epoch this disk is written under (shared-volume disks).
    pub fn lease_epoch(&self) -> Option<u64> {
        self.fence.as_ref().and_then(|f| f.keeper.as_ref()).and_then(|k| k.lease().ok()).map(|l| l.epoch)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn format_name(&self) -> &'static str {
        self.image.format().name()
    }
}

impl Backend for Disk {
    fn flush(&mut self) -> Result<(), BackendError> {
        if self.readonly {
            return Ok(());
        }
        if let Some(why) = self.ownership_problem() {
            return Err(BackendError::NotOwner { disk: self.path.clone(), why });
        }
        self.image.flush().map_err(|source| BackendError::Flush { disk: self.path.clone(), source })
    }

    /// The lease to `to_host` (epoch + 1) or the local lock released. The
    /// caller has flushed (`Vmm::release_backends` flushes every disk
    /// before any handoff).
    fn release(&mut self, to_host: &str) -> Result<(), BackendError> {
        if let Some(why) = self.ownership_problem() {
            return Err(BackendError::NotOwner { disk: self.path.clone(), why });
        }
        let disk = self.path.clone();
        if let (Some(fence), false) = (&mut self.fence, self.readonly) {
            let lease = fence
                .keeper
                .take()
                .ok_or_else(|| BackendError::Lost { disk: disk.clone(), why: "no lease to hand over".into() })?
                .stop()
                .map_err(|why| BackendError::Lost {
                    disk: disk.clone(),
                    why: format!("lease lost before handoff: {why}"),
                })?;
            let handed = match injected_handoff_failure(&fence.disk) {
                Some(e) => Err(e),
                None => fence.store.handoff(&lease, to_host),
            };
            match handed {
                Ok(handed) => fence.handed = Some(handed),
                Err(source) => {
                    // Still ours at the old epoch: keep renewing it.
                    fence.start(lease);
                    return Err(BackendError::Lease { disk, source });
                }
            }
        }
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.lock_file.as_raw_fd(), libc::LOCK_UN) };
        Ok(())
    }

    fn reclaim(&mut self) -> Result<(), BackendError> {
        let disk = self.path.clone();
        match &mut self.fence {
            Some(fence) => {
                if let Some(handed) = fence.handed.take() {
                    let host = fence.host.clone();
                    let lease = fence
                        .store
                        .handoff(&handed, &host)
                        .map_err(|source| BackendError::Lease { disk: disk.clone(), source })?;
                    fence.start(lease);
                    fence.refused = false;
                }
            }
            None => self.lock().map_err(|_| BackendError::Locked { disk })?,
        }
        Ok(())
    }

    /// Adopts the lease the source handed this host (or takes the local
    /// lock) and re-reads the image. A disk already held (an earlier call
    /// that took some disks and failed on another) is left as it is.
    fn acquire(&mut self) -> Result<(), BackendError> {
        let disk = self.path.clone();
        match &mut self.fence {
            Some(fence) if fence.keeper.is_some() => return Ok(()),
            Some(fence) => {
                if !self.readonly {
                    let lease = fence
                        .store
                        .adopt(&fence.disk, &fence.host)
                        .map_err(|source| BackendError::Lease { disk: disk.clone(), source })?;
                    fence.start(lease);
                }
            }
            None => self.lock().map_err(|_| BackendError::Locked { disk: disk.clone() })?,
        }
        if !self.readonly {
            self.image.activate().map_err(|source| BackendError::Activate { disk, source })?;
        }
        Ok(())
    }

    /// Gives a shared disk back, so the next host can acquire it at once
    /// instead of waiting for a takeover. (After a handoff the keeper is
    /// gone and there is nothing to release.)
    fn close(&mut self) {
        // A host that lost the lease (or handed it over) must not even flush
        // (qcow2 metadata), nor let the image's drop do it.
        let handed = self.fence.as_ref().is_some_and(|f| f.handed.is_some());
        let owned = !handed && (self.readonly || self.may_write());
        if !owned {
            self.image.abandon();
        }
        if let Some(fence) = &mut self.fence {
            if let Some(keeper) = fence.keeper.take() {
                if let (true, Ok(lease)) = (owned, keeper.stop()) {
                    let _ = self.image.flush();
                    if let Err(e) = fence.store.release(&lease) {
                        tracing::warn!("disk {}: lease not released: {e}", fence.disk);
                    }
                }
            }
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.close();
    }
}

/// Failure injection for the end-to-end tests (`FERRY_TEST_FAIL_HANDOFF=NAME`):
/// the handoff of shared disk NAME fails as a full volume would fail it,
/// after any disk before it was handed over. No real failure can be timed
/// to land between two disks' handoffs inside a switchover.
fn injected_handoff_failure(disk: &str) -> Option<csv_fs::Error> {
    let name = std::env::var("FERRY_TEST_FAIL_HANDOFF").ok()?;
    (name == disk).then(|| csv_fs::Error::VolumeFull {
        path: PathBuf::from(format!("leases/{disk} (FERRY_TEST_FAIL_HANDOFF)")),
        what: "the lease record",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_checks_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("ferry-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.img");
        assert!(matches!(Disk::open(&missing, false), Err(Error::Missing { .. })));
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = Disk::open(&odd, false).err().unwrap();
        assert!(e.to_string().contains("1000 bytes"), "{e}");
        let good = dir.join("good.img");
        std::fs::write(&good, vec![0u8; 4096]).unwrap();
        let d = Disk::open(&good, false).unwrap();
        assert_eq!(d.sectors(), 8);
        assert!(matches!(Disk::open(&good, false), Err(Error::Locked { .. })), "a second writer is refused");
        drop(d);
        assert!(Disk::open(&good, true).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
