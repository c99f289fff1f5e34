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
    /// A VHD whose header, footer or block table fails a check; every
    /// field is checked before it is used.
    #[error("{path}: corrupt vhd image: {problem}")]
    BadVhd { path: PathBuf, problem: VhdProblem },
    /// A qcow2 image whose header or metadata layout Ferry refuses before
    /// handing it to `imago`: malformed, or using a feature Ferry does not
    /// support.
    #[error("{path}: qcow2 image refused: {problem}")]
    BadQcow2 { path: PathBuf, problem: Qcow2Problem },
    /// The volume's record of a disk disagrees with the disk's file.
    #[error("{path}: disk record says {recorded} but the image file is {file}")]
    FormatMismatch { path: PathBuf, recorded: String, file: String },
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
    #[error(
        "disk {disk:?}: host {owner:?}'s lease (epoch {epoch}) is renewed by a running VMM or lease holder \
         (last renewal {renewed_ms_ago} ms ago): taking it away by hand would let another host write while that \
         one still does. Stop or migrate the VM first, or pass --force if you know that process is gone"
    )]
    KeptByVmm { disk: String, owner: String, epoch: u64, renewed_ms_ago: u64 },
    #[error("{path}: corrupt lease record: {reason} (remove it only when no host runs the disk)")]
    CorruptLease { path: PathBuf, reason: String },
    #[error("{path}: lock still held by another process after {waited_ms} ms")]
    LockTimeout { path: PathBuf, waited_ms: u64 },
}

/// Why a VHD was refused. Offsets and sizes are in bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VhdProblem {
    #[error("{len} bytes is too short for {what} (at least {min})")]
    TooShort { len: u64, min: u64, what: &'static str },
    #[error("no VHD footer (\"conectix\") {at}")]
    NoFooter { at: &'static str },
    #[error("footer {at} has checksum {stored:#x}, computed {computed:#x}")]
    FooterChecksum { at: &'static str, stored: u32, computed: u32 },
    #[error("disk size {size} exceeds the VHD limit of {max} bytes")]
    DiskTooLarge { size: u64, max: u64 },
    #[error("disk size {size} is not a multiple of 512")]
    SizeNotSectors { size: u64 },
    #[error("disk type {found} where {expected} was expected")]
    DiskType { found: u32, expected: &'static str },
    #[error("truncated: footer says {size} bytes but only {available} precede it")]
    FixedTruncated { size: u64, available: u64 },
    #[error("the footer at offset 0 and the one at the end of the file differ (truncated or tampered?)")]
    FootersDiffer,
    #[error("dynamic header offset {offset:#x} is not sector-aligned or lies outside the metadata area")]
    HeaderOffset { offset: u64 },
    #[error("no dynamic header (\"cxsparse\") at {offset:#x}")]
    NoDynamicHeader { offset: u64 },
    #[error("dynamic header has checksum {stored:#x}, computed {computed:#x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("block size {size} is not a power of two from {min} to {max} bytes")]
    BlockSize { size: u64, min: u64, max: u64 },
    #[error("BAT of {entries} blocks of {block_size} bytes cannot cover a disk of {size} bytes")]
    BatTooSmall { entries: u64, block_size: u64, size: u64 },
    #[error("BAT of {entries} entries is larger than a disk of {size} bytes needs ({max})")]
    BatTooLarge { entries: u64, max: u64, size: u64 },
    #[error("BAT at {offset:#x} ({entries} entries) overlaps the header or footer or runs past the end of the file")]
    BatOutsideFile { offset: u64, entries: u64 },
    #[error("BAT entry {index} points at {start:#x}, outside the data area (truncated?)")]
    BlockOutsideData { index: usize, start: u64 },
    #[error("BAT entries {first} and {second} point at overlapping blocks")]
    BlocksOverlap { first: usize, second: usize },
}

/// Why a qcow2 image was refused. Offsets and sizes are in bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Problem {
    #[error("{len} bytes is too short for {what} (at least {min})")]
    TooShort { len: u64, min: u64, what: &'static str },
    #[error("no qcow2 magic (\"QFI\\xfb\"): found {found:#010x}")]
    Magic { found: u32 },
    #[error("qcow2 version {found} (Ferry reads versions 2 and 3)")]
    Version { found: u32 },
    #[error("cluster_bits {found} is outside {min}..={max}")]
    ClusterBits { found: u32, min: u32, max: u32 },
    #[error("header length {found} is not from {min} to the cluster size {max} in multiples of 8")]
    HeaderLength { found: u32, min: u32, max: u64 },
    #[error("virtual size {size} exceeds Ferry's qcow2 limit of {max} bytes")]
    DiskTooLarge { size: u64, max: u64 },
    #[error(
        "has a backing file (Ferry does not support backing files; `qemu-img convert` it into a standalone image)"
    )]
    BackingFile,
    #[error("encrypted (method {method}; Ferry does not support qcow2 encryption)")]
    Encrypted { method: u32 },
    #[error("{count} internal snapshot(s) (Ferry does not support qcow2 snapshots; `qemu-img snapshot -d` them)")]
    Snapshots { count: u32 },
    #[error("refcount_order {found} ({bits}-bit refcounts); Ferry supports only 4 (16-bit, QEMU's default)")]
    RefcountOrder { found: u32, bits: u64 },
    #[error("incompatible feature bit {bit} ({name}) is set; Ferry does not support it")]
    IncompatibleFeature { bit: u32, name: &'static str },
    #[error("header extension {kind:#010x} ({name}); Ferry does not support it")]
    Extension { kind: u32, name: &'static str },
    #[error("header extensions run past the first cluster (at {offset:#x})")]
    ExtensionsOverflow { offset: u64 },
    #[error("{what} at {offset:#x} is not cluster-aligned")]
    Unaligned { what: &'static str, offset: u64 },
    #[error("{what} at {offset:#x} ({len} bytes) runs past the end of the file ({file_len} bytes)")]
    OutsideFile { what: &'static str, offset: u64, len: u64, file_len: u64 },
    #[error("L1 table of {entries} entries where a disk of {size} bytes needs {needed} (at most {max})")]
    L1Size { entries: u32, needed: u64, max: u64, size: u64 },
    #[error("refcount table of {clusters} clusters is larger than {max} or than the file")]
    RefcountTableSize { clusters: u32, max: u64 },
    #[error("{what} entry {index} has reserved bits set ({entry:#018x})")]
    ReservedBits { what: &'static str, index: u64, entry: u64 },
    #[error("{first} at {first_at:#x} and {second} at {second_at:#x} overlap")]
    Overlap { first: &'static str, first_at: u64, second: &'static str, second_at: u64 },
    #[error("{what} at {offset:#x} has refcount 0: new clusters would be allocated over it")]
    Unreferenced { what: &'static str, offset: u64 },
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
