//! Every failure names the file, disk or host it concerns, so a message is
//! actionable without logs.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// ENOSPC/EDQUOT while writing a record: the previous record is intact
    /// because records are only ever replaced by rename.
    #[error("{path}: volume is full writing {what}; the previous version is intact")]
    VolumeFull { path: PathBuf, what: &'static str },

    #[error("{path}: not a Ferry volume (no volume.json; create one with `ferry volume create`)")]
    NotAVolume { path: PathBuf },
    #[error("{path}: already a Ferry volume")]
    VolumeExists { path: PathBuf },
    #[error("{path}: volume format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("{path}: corrupt volume header: {reason}")]
    CorruptVolume { path: PathBuf, reason: String },
    #[error("invalid {what} name {name:?}: use 1-64 characters from A-Z a-z 0-9 . _ - not starting with '.'")]
    BadName { what: &'static str, name: String },
    #[error("disk {name:?} not found in volume {volume}")]
    NoSuchDisk { name: String, volume: PathBuf },
    #[error("disk {name:?} already exists: {path}")]
    DiskExists { name: String, path: PathBuf },

    #[error("{path}: corrupt {format} image: {reason}")]
    CorruptImage { path: PathBuf, format: &'static str, reason: String },
    #[error("{path}: unsupported image: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("invalid disk size {size}: {reason}")]
    BadSize { size: u64, reason: String },
    #[error("{path}: opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("{path}: opened in standby; activate it (after the lease handoff) before writing")]
    Standby { path: PathBuf },
    #[error("{path}: {len} bytes at offset {offset} run past the end of the disk ({size} bytes)")]
    OutOfRange { path: PathBuf, offset: u64, len: usize, size: u64 },

    #[error("disk {disk:?} is leased by host {owner:?} at epoch {epoch}, {}", expiry(*expires_unix_ms))]
    AlreadyLeased { disk: String, owner: String, epoch: u64, expires_unix_ms: u64 },
    #[error(
        "disk {disk:?}: host {host:?} presented epoch {presented}, but the lease is at epoch {current} ({})",
        owner_text(owner)
    )]
    StaleEpoch { disk: String, host: String, presented: u64, current: u64, owner: Option<String> },
    #[error("disk {disk:?}: lease of host {host:?} at epoch {epoch} expired {} ms ago", now_ms().saturating_sub(*expires_unix_ms))]
    LeaseExpired { disk: String, host: String, epoch: u64, expires_unix_ms: u64 },
    #[error("disk {disk:?} is not leased to host {host:?} ({})", owner_text(owner))]
    NotOwner { disk: String, host: String, owner: Option<String> },
    #[error("{path}: corrupt lease record: {reason} (remove it only when no host runs the disk)")]
    CorruptLease { path: PathBuf, reason: String },
    #[error("{path}: lock still held by another process after {waited_ms} ms")]
    LockTimeout { path: PathBuf, waited_ms: u64 },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}

fn owner_text(owner: &Option<String>) -> String {
    match owner {
        Some(o) => format!("held by {o:?}"),
        None => "released".into(),
    }
}

fn expiry(expires_unix_ms: u64) -> String {
    let now = now_ms();
    if expires_unix_ms > now {
        format!("expires in {:.1} s", (expires_unix_ms - now) as f64 / 1000.0)
    } else {
        format!("expired {:.1} s ago: another host may `takeover`", (now - expires_unix_ms) as f64 / 1000.0)
    }
}

/// Wall-clock milliseconds since the Unix epoch: lease expiry is compared
/// across hosts, so it must be wall time (hosts are assumed NTP-synced).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
