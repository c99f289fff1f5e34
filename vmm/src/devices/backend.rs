//! The host side of a device, apart from its virtio model: what a VM does
//! with its backends when it moves or stops (flush, hand over, take,
//! give up, announce). A disk ([`super::disk::Disk`]) and a NIC's tap
//! implement it; the virtio devices expose theirs through
//! [`super::virtio::VirtioDevice::backend_mut`].

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("disk {disk}: this host no longer owns it ({why})")]
    NotOwner { disk: PathBuf, why: String },
    #[error("disk {disk}: flush failed: {source}")]
    Flush { disk: PathBuf, source: csv_fs::Error },
    #[error("disk {disk}: lease: {source}")]
    Lease { disk: PathBuf, source: csv_fs::Error },
    #[error("disk {disk}: {why}")]
    Lost { disk: PathBuf, why: String },
    #[error("disk {disk} is in use by another VMM")]
    Locked { disk: PathBuf },
    #[error("disk {disk}: cannot take it: {source}")]
    Activate { disk: PathBuf, source: csv_fs::Error },
    #[error("cannot announce the guest on {tap}: {source}")]
    Announce { tap: String, source: std::io::Error },
}

pub trait Backend: Send {
    /// Makes completed writes durable (ahead of a handoff, outside the
    /// downtime window, so the final flush has little left to do).
    fn flush(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Hands the backend to `to_host` at a migration's commit (a disk:
    /// its lease, epoch + 1, or the host-local lock released). Flushed
    /// first by the caller.
    fn release(&mut self, _to_host: &str) -> Result<(), BackendError> {
        Ok(())
    }
    /// Undoes a `release` whose commit never happened: the backend is this
    /// host's again (a disk: the lease handed back, epoch + 1, its keeper
    /// running; or the local lock retaken).
    fn reclaim(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Takes a backend opened in standby (a migration destination, after
    /// the source's commit).
    fn acquire(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// The VM stopped for good here: give the backend up (a shared disk:
    /// flush and release its lease so the next host can start at once).
    fn close(&mut self) {}
    /// Tells the network where the guest is (a NIC: RARP on its tap).
    fn announce(&mut self) -> Result<bool, BackendError> {
        Ok(false)
    }
}
