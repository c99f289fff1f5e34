//! Ferry's cluster: the etcd side. The VMM process never links this crate.
//!
//! - [`store`]: [`Store`], etcd through all its members, every call bounded
//!   in time, retried across members, a write that may have landed reported
//!   as [`Error::OutcomeUnknown`].
//! - [`keys`] and [`records`]: the key schema and the records stored there.
//! - [`ops`]: [`Cluster`], the typed, conditional operations (nodes under
//!   leases, VM records created once, owner changes that compare owner and
//!   epoch, history).
//! - [`lease`]: [`Lease`], kept alive in the background, lost by its own
//!   clock before etcd can expire it.
//! - [`watch`]: [`Watch`], a prefix's changes pushed by etcd.
//! - [`election`]: the leader, by a leased key created only if absent.
//! - [`moves`]: a VM's move between nodes, committed by one transaction.
//! - [`commands`]: commands a node's agent runs for the cluster, and the
//!   health it reports when it starts.

pub mod commands;
pub mod election;
pub mod error;
pub mod keys;
pub mod lease;
pub mod moves;
pub mod ops;
pub mod records;
pub mod store;
pub mod watch;

pub use commands::{CommandOutput, CommandRequest, CommandResult, CommandState, HealthCheck, NodeHealth};
pub use election::{Leadership, LeadershipLost};
pub use error::{Error, Failure, Result};
pub use keys::{ClusterKey, Keys};
pub use lease::{Lease, LeaseState, LostReason};
pub use moves::MoveOutcome;
pub use ops::{Cluster, NodeLease, Takeover, Versioned};
pub use records::{
    EventRecord, HistoryEntry, HistoryKind, IncomingRecord, LeaderRecord, MoveRecord, NodeAdmin, NodeRecord, Owner,
    RestartRecord, SeenUp, VmRecord, VmStatus, FORMAT_VERSION,
};
pub use store::{Effect, Kv, Listing, MemberStatus, Store, StoreConfig};
pub use watch::{Change, ChangeKind, Watch};

pub use records::{ClusterRecord, ClusterSettings, FailbackWindow, ValidationRecord};
