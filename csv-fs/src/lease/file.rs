//! Lease records on the volume: `leases/DISK.json`, replaced atomically,
//! with read-modify-write serialised by an OFD lock on `leases/DISK.lock`.
//! The lock file is never replaced, so every host locks the same inode;
//! the record is replaced by rename, so a crash or a full volume leaves
//! either the old or the new record, never a torn one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{LeaseRecord, LeaseStore, RECORD_VERSION};
use crate::error::{Error, Result};
use crate::fsutil::{atomic_write, check_name, read_optional, OfdLock};

pub struct FileLeaseStore {
    dir: PathBuf,
    ttl: Duration,
    lock_timeout: Duration,
}

impl FileLeaseStore {
    /// A store in `dir` (a volume's `leases/`) granting leases of `ttl`.
    pub fn new(dir: &Path, ttl: Duration) -> FileLeaseStore {
        FileLeaseStore { dir: dir.to_owned(), ttl, lock_timeout: Duration::from_secs(5) }
    }

    /// How long to wait for another host's read-modify-write to finish.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> FileLeaseStore {
        self.lock_timeout = timeout;
        self
    }

    pub fn record_path(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{disk}.json"))
    }

    fn lock(&self, disk: &str, exclusive: bool) -> Result<OfdLock> {
        check_name("disk", disk)?;
        OfdLock::acquire(&self.dir.join(format!("{disk}.lock")), exclusive, self.lock_timeout)
    }

    fn load(&self, disk: &str) -> Result<Option<LeaseRecord>> {
        let path = self.record_path(disk);
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| Error::CorruptLease { path: path.clone(), reason };
        let r: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if r.version != RECORD_VERSION {
            return Err(corrupt(format!("record version {} (this build knows {RECORD_VERSION})", r.version)));
        }
        if r.disk != disk {
            return Err(corrupt(format!("record is for disk {:?}", r.disk)));
        }
        Ok(Some(r))
    }
}

impl LeaseStore for FileLeaseStore {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn read(&self, disk: &str) -> Result<Option<LeaseRecord>> {
        // Renames are atomic, but a shared lock also orders this read after
        // any update in flight on NFS, where rename visibility can lag.
        let _lock = self.lock(disk, false)?;
        self.load(disk)
    }

    fn update(
        &self,
        disk: &str,
        next: &mut dyn FnMut(Option<&LeaseRecord>) -> Result<LeaseRecord>,
    ) -> Result<LeaseRecord> {
        let _lock = self.lock(disk, true)?;
        let current = self.load(disk)?;
        let record = next(current.as_ref())?;
        let bytes = serde_json::to_vec_pretty(&record).expect("a lease record serialises");
        atomic_write(&self.record_path(disk), &bytes, "the lease record")?;
        Ok(record)
    }
}
