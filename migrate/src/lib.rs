//! Moving VMs between hosts.
//!
//! - `wire`: the framed, versioned, checksummed protocol;
//! - `transport`: TCP between hosts, Unix sockets on one host;
//! - `quick`: quick migration (pause, send state and memory, restore,
//!   commit, resume on the destination);
//! - `figures`: what every migration reports.

pub mod figures;
pub mod quick;
pub mod transport;
pub mod wire;

pub use figures::Figures;
pub use transport::Endpoint;
