//! The cluster shared volume: a directory every host can reach (a local
//! filesystem here; NFSv4 or any POSIX filesystem with working OFD locks
//! across machines) that holds VM disks, their ownership leases and per-VM
//! files.
//!
//! Layout of a volume:
//!
//! ```text
//! volume.json        header: magic, format version, volume id
//! disks/NAME.EXT     disk images (raw, vhd, qcow2); the extension names the format family
//! disks/NAME.json    the disk's record: its format (the authority on open, never the content), size
//! leases/NAME.json   the disk's lease record, replaced atomically (temp + fsync + rename)
//! leases/NAME.lock   never replaced: its OFD lock serialises read-modify-write of the record
//! vms/NAME/          per-VM files (configuration, saved state)
//! ```
//!
//! Three parts: [`volume`] (layout and disk catalogue), [`image`] (disk
//! image formats behind [`image::BlockBackend`]) and [`lease`] (ownership
//! with fencing epochs behind [`lease::LeaseStore`]).

pub mod error;
pub mod image;
pub mod lease;
pub mod volume;

pub mod fsutil;

pub use error::{Error, Qcow2Problem, Result, VhdProblem};
pub use image::{BlockBackend, Cache, Format, Image, OpenMode};
pub use lease::{FileLeaseStore, Lease, LeaseKeeper, LeaseRecord, LeaseStore, Op as LeaseOp, DEFAULT_TTL};
pub use volume::{DiskInfo, DiskRecord, Volume, VolumeHeader, VolumeStatus};
