//! Moving VMs between hosts.
//!
//! - `wire`: the framed, versioned, checksummed protocol;
//! - `transport`: TCP between hosts, Unix sockets on one host;
//! - `auth`: mutual challenge-response on the cluster key;
//! - `secure`: the encrypted, authenticated channel (Noise, cluster key as PSK);
//! - `preflight`: the destination proves it can run the guest;
//! - `source`: quick and live (pre-copy) migration from this host;
//! - `destination`: receiving a VM;
//! - `api`: the typed `vm.migrate` request and the VMM-side migrator;
//! - `figures`: what every migration reports.
//!
//! Everything reaches the VM through `vmm::migration`'s traits
//! (`MigratableVm` on the source, `Destination` on the receiving host), so
//! the logic here is tested against an in-memory fake guest (`tests`).
//!
//! Never two running copies: the source stops for good once it sends
//! `Commit`, and the destination runs the VM only after receiving it. If the
//! source dies exactly at commit (after sending, before the destination
//! confirms), the destination, having the commit, runs the VM, and the source
//! is gone: one copy. If the commit never arrives, the destination discards
//! the VM and the source is gone: no copy runs, and the disk is intact
//! (flushed and handed over before commit) for a restart. Shared-volume
//! leases make that restart safe across hosts: the destination takes the
//! disk's lease with a new fencing epoch at commit, so a source that comes
//! back cannot write.

pub mod api;
pub mod auth;
pub mod destination;
pub mod figures;
pub mod preflight;
pub mod progress;
pub mod secure;
pub mod source;
pub mod transport;
pub mod wire;

#[cfg(test)]
mod tests;

pub use figures::Figures;
pub use transport::Endpoint;
