//! Disk ownership leases with fencing epochs.
//!
//! Each disk has one [`LeaseRecord`]: its owner host, an epoch that only
//! ever grows, and an expiry the owner keeps pushing out by renewing. Every
//! change of owner (acquire, handoff, takeover) bumps the epoch, so the
//! epoch a host holds is a fencing token: the owner's [`LeaseKeeper`]
//! renews it every third of the TTL, presenting its epoch, and a host that
//! slept through its expiry and came back finds a higher epoch and is
//! refused. The VMM writes a disk only while its keeper reports the lease
//! valid with a third of the TTL to spare (vmm's `devices::disk`); it does
//! not call [`LeaseStore::check`] per write.
//!
//! The state machine lives once, in [`transition`]; a [`LeaseStore`] only
//! has to read a record and replace it atomically ([`LeaseStore::update`]),
//! which the volume does with an OFD lock and rename ([`FileLeaseStore`])
//! and etcd could do with a compare-and-swap transaction.
//!
//! Expiry compares wall-clock time across hosts: hosts must keep their
//! clocks synchronised well within the TTL.

mod file;
mod keeper;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use file::FileLeaseStore;
pub use keeper::LeaseKeeper;

use crate::error::{now_ms, Error, Result};
use crate::fsutil::check_name;

/// How long a lease lives without renewal unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
pub const RECORD_VERSION: u32 = 1;

/// The stored state of one disk's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub version: u32,
    pub disk: String,
    /// The host holding the disk; `None` once released (or never leased).
    pub owner: Option<String>,
    /// The fencing token: bumped on every change of owner, never lowered.
    pub epoch: u64,
    pub expires_unix_ms: u64,
    pub ttl_ms: u64,
    pub updated_unix_ms: u64,
    /// Who held it before the last change of owner (for `disk info`).
    pub previous_owner: Option<String>,
    /// Renewed by a [`LeaseKeeper`] (a running VMM, `lease acquire --hold`),
    /// not by hand: an operator's release or handoff then needs `--force`.
    /// Cleared on every change of owner. Absent in older records.
    #[serde(default)]
    pub kept: bool,
}

impl LeaseRecord {
    pub fn is_expired(&self, now_unix_ms: u64) -> bool {
        now_unix_ms >= self.expires_unix_ms
    }

    /// The owner, if the lease is held and not expired.
    pub fn live_owner(&self, now_unix_ms: u64) -> Option<&str> {
        self.owner.as_deref().filter(|_| !self.is_expired(now_unix_ms))
    }
}

/// What an owner holds: its grant on a disk. `epoch` is the fencing token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub disk: String,
    pub host: String,
    pub epoch: u64,
    pub expires_unix_ms: u64,
    pub ttl_ms: u64,
    /// The record was already marked [`LeaseRecord::kept`] when granted.
    #[serde(default)]
    pub kept: bool,
}

impl Lease {
    pub fn from_record(r: &LeaseRecord) -> Lease {
        Lease {
            disk: r.disk.clone(),
            host: r.owner.clone().unwrap_or_default(),
            epoch: r.epoch,
            expires_unix_ms: r.expires_unix_ms,
            ttl_ms: r.ttl_ms,
            kept: r.kept,
        }
    }
}

/// A change to a lease record.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    /// Take a disk nobody holds. A held lease is refused even if expired:
    /// taking an expired lease is a separate, deliberate [`Op::Takeover`].
    Acquire {
        host: &'a str,
    },
    /// Take a disk whose owner stopped renewing (a crashed host), or a free one.
    Takeover {
        host: &'a str,
    },
    /// A renewal by hand: leaves [`LeaseRecord::kept`] as it was.
    Renew(&'a Lease),
    /// A renewal by a [`LeaseKeeper`]: marks the record kept.
    Keep(&'a Lease),
    Release(&'a Lease),
    /// Give the disk to `to` (migration switchover): epoch + 1.
    Handoff {
        lease: &'a Lease,
        to: &'a str,
    },
}

/// The state machine: the record after `op`, or why `op` is refused.
/// `current` is `None` for a disk never leased.
pub fn transition(disk: &str, current: Option<&LeaseRecord>, op: Op, ttl_ms: u64, now: u64) -> Result<LeaseRecord> {
    let epoch = current.map_or(0, |r| r.epoch);
    let fresh = |owner: &str, epoch: u64, previous: Option<String>| LeaseRecord {
        version: RECORD_VERSION,
        disk: disk.to_owned(),
        owner: Some(owner.to_owned()),
        epoch,
        expires_unix_ms: now + ttl_ms,
        ttl_ms,
        updated_unix_ms: now,
        previous_owner: previous,
        kept: false,
    };
    let held = |r: &LeaseRecord| Error::AlreadyLeased {
        disk: disk.to_owned(),
        owner: r.owner.clone().unwrap_or_default(),
        epoch: r.epoch,
        expires_unix_ms: r.expires_unix_ms,
    };
    match op {
        Op::Acquire { host } => {
            check_name("host", host)?;
            match current {
                Some(r) if r.owner.is_some() => Err(held(r)),
                _ => Ok(fresh(host, epoch + 1, current.and_then(|r| r.previous_owner.clone()))),
            }
        }
        Op::Takeover { host } => {
            check_name("host", host)?;
            match current {
                Some(r) if r.live_owner(now).is_some() => Err(held(r)),
                Some(r) if r.owner.is_some() => {
                    tracing::warn!(
                        disk,
                        from = r.owner.as_deref(),
                        to = host,
                        epoch = epoch + 1,
                        "lease taken over after expiry"
                    );
                    Ok(fresh(host, epoch + 1, r.owner.clone()))
                }
                _ => Ok(fresh(host, epoch + 1, current.and_then(|r| r.previous_owner.clone()))),
            }
        }
        Op::Renew(lease) | Op::Keep(lease) => {
            let r = owned(disk, current, lease)?;
            if r.is_expired(now) {
                // Safe: the epoch is unchanged, so nobody took over meanwhile.
                tracing::warn!(disk, host = lease.host, epoch, "lease renewed after it had expired");
            }
            let kept = r.kept || matches!(op, Op::Keep(_));
            Ok(LeaseRecord { expires_unix_ms: now + ttl_ms, ttl_ms, updated_unix_ms: now, kept, ..r.clone() })
        }
        Op::Release(lease) => {
            let r = owned(disk, current, lease)?;
            Ok(LeaseRecord {
                owner: None,
                kept: false,
                expires_unix_ms: now,
                updated_unix_ms: now,
                previous_owner: r.owner.clone(),
                ..r.clone()
            })
        }
        Op::Handoff { lease, to } => {
            check_name("host", to)?;
            let r = owned(disk, current, lease)?;
            Ok(fresh(to, r.epoch + 1, r.owner.clone()))
        }
    }
}

/// The current record if `lease` is still its owner at its epoch.
fn owned<'r>(disk: &str, current: Option<&'r LeaseRecord>, lease: &Lease) -> Result<&'r LeaseRecord> {
    let not_owner = || Error::NotOwner {
        disk: disk.to_owned(),
        host: lease.host.clone(),
        owner: current.and_then(|r| r.owner.clone()),
    };
    let r = current.ok_or_else(not_owner)?;
    if r.epoch != lease.epoch {
        return Err(Error::StaleEpoch {
            disk: disk.to_owned(),
            host: lease.host.clone(),
            presented: lease.epoch,
            current: r.epoch,
            owner: r.owner.clone(),
        });
    }
    if r.owner.as_deref() != Some(lease.host.as_str()) {
        return Err(not_owner());
    }
    Ok(r)
}

/// Where lease records live. Implementors provide `read` and an atomic
/// read-modify-write, `update`; the operations are built on those.
pub trait LeaseStore: Send + Sync {
    /// The TTL granted by acquire, renew, handoff and takeover.
    fn ttl(&self) -> Duration;

    /// The disk's record; `None` if it was never leased.
    fn read(&self, disk: &str) -> Result<Option<LeaseRecord>>;

    /// Reads the record, lets `next` compute its successor and stores it,
    /// atomically with respect to every other `update` of the same disk,
    /// from any host. If `next` fails, nothing is written.
    fn update(
        &self,
        disk: &str,
        next: &mut dyn FnMut(Option<&LeaseRecord>) -> Result<LeaseRecord>,
    ) -> Result<LeaseRecord>;

    fn apply(&self, disk: &str, op: Op) -> Result<LeaseRecord> {
        check_name("disk", disk)?;
        let ttl_ms = self.ttl().as_millis() as u64;
        self.update(disk, &mut |current| transition(disk, current, op, ttl_ms, now_ms()))
    }

    fn acquire(&self, disk: &str, host: &str) -> Result<Lease> {
        let r = self.apply(disk, Op::Acquire { host })?;
        tracing::info!(disk, host, epoch = r.epoch, "lease acquired");
        Ok(Lease::from_record(&r))
    }

    fn takeover(&self, disk: &str, host: &str) -> Result<Lease> {
        let r = self.apply(disk, Op::Takeover { host })?;
        tracing::info!(disk, host, epoch = r.epoch, from = r.previous_owner.as_deref(), "lease taken");
        Ok(Lease::from_record(&r))
    }

    fn renew(&self, lease: &Lease) -> Result<Lease> {
        let r = self.apply(&lease.disk, Op::Renew(lease))?;
        tracing::debug!(disk = lease.disk, host = lease.host, epoch = r.epoch, "lease renewed");
        Ok(Lease::from_record(&r))
    }

    /// A [`LeaseKeeper`]'s renewal: as `renew`, and marks the record kept.
    fn keep(&self, lease: &Lease) -> Result<Lease> {
        let r = self.apply(&lease.disk, Op::Keep(lease))?;
        tracing::debug!(disk = lease.disk, host = lease.host, epoch = r.epoch, "lease kept");
        Ok(Lease::from_record(&r))
    }

    /// `op` as an operator runs it by hand (`ferry disk lease release`,
    /// `handoff`): refused while a keeper renews the live lease, since its
    /// VMM would go on writing after another host took the disk, unless
    /// `force` (the operator knows that VMM is gone). Decided atomically
    /// with the change.
    fn apply_by_hand(&self, disk: &str, op: Op, force: bool) -> Result<LeaseRecord> {
        check_name("disk", disk)?;
        let ttl_ms = self.ttl().as_millis() as u64;
        self.update(disk, &mut |current| {
            let now = now_ms();
            match current {
                Some(r) if r.kept && r.live_owner(now).is_some() && !force => Err(Error::KeptByVmm {
                    disk: disk.to_owned(),
                    owner: r.owner.clone().unwrap_or_default(),
                    epoch: r.epoch,
                    renewed_ms_ago: now.saturating_sub(r.updated_unix_ms),
                }),
                Some(r) if r.kept && r.live_owner(now).is_some() => {
                    tracing::warn!(disk, owner = r.owner.as_deref(), epoch = r.epoch, "forced past a running keeper");
                    transition(disk, current, op, ttl_ms, now)
                }
                _ => transition(disk, current, op, ttl_ms, now),
            }
        })
    }

    fn release(&self, lease: &Lease) -> Result<()> {
        self.apply(&lease.disk, Op::Release(lease))?;
        tracing::info!(disk = lease.disk, host = lease.host, epoch = lease.epoch, "lease released");
        Ok(())
    }

    /// Hands the disk from `lease`'s host to `to`; returns `to`'s lease.
    fn handoff(&self, lease: &Lease, to: &str) -> Result<Lease> {
        let r = self.apply(&lease.disk, Op::Handoff { lease, to })?;
        tracing::info!(disk = lease.disk, from = lease.host, to, epoch = r.epoch, "lease handed off");
        Ok(Lease::from_record(&r))
    }

    /// The lease `host` holds on `disk` according to the store, renewed at
    /// once (as its keeper would: the record is marked kept): how a
    /// migration destination picks up what the source handed it. The wait for the commit may have used up most of the TTL the
    /// handoff granted, or all of it; renewing is safe even then, because
    /// the renewal compares the epoch, which any takeover would have raised.
    fn adopt(&self, disk: &str, host: &str) -> Result<Lease> {
        check_name("disk", disk)?;
        let r = self.read(disk)?;
        match &r {
            Some(r) if r.owner.as_deref() == Some(host) => self.keep(&Lease::from_record(r)),
            _ => Err(Error::NotOwner { disk: disk.to_owned(), host: host.to_owned(), owner: r.and_then(|r| r.owner) }),
        }
    }

    /// The fence: Ok only if `lease` is still the disk's live lease at its
    /// epoch. Call before each batch of writes.
    fn check(&self, lease: &Lease) -> Result<()> {
        let r = self.read(&lease.disk)?;
        let r = owned(&lease.disk, r.as_ref(), lease)?;
        if r.is_expired(now_ms()) {
            return Err(Error::LeaseExpired {
                disk: lease.disk.clone(),
                host: lease.host.clone(),
                epoch: r.epoch,
                expires_unix_ms: r.expires_unix_ms,
            });
        }
        Ok(())
    }
}

/// A store in memory: for tests, and the reference for what a store must do.
pub struct MemLeaseStore {
    ttl: Duration,
    records: Mutex<HashMap<String, LeaseRecord>>,
}

impl MemLeaseStore {
    pub fn new(ttl: Duration) -> MemLeaseStore {
        MemLeaseStore { ttl, records: Mutex::new(HashMap::new()) }
    }
}

impl LeaseStore for MemLeaseStore {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn read(&self, disk: &str) -> Result<Option<LeaseRecord>> {
        Ok(self.records.lock().unwrap().get(disk).cloned())
    }

    fn update(
        &self,
        disk: &str,
        next: &mut dyn FnMut(Option<&LeaseRecord>) -> Result<LeaseRecord>,
    ) -> Result<LeaseRecord> {
        let mut records = self.records.lock().unwrap();
        let r = next(records.get(disk))?;
        records.insert(disk.to_owned(), r.clone());
        Ok(r)
    }
}

#[cfg(test)]
mod tests;
