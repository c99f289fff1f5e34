//! The cluster crate's errors. Every etcd call ends in one of three ways
//! besides success: it surely did not happen ([`Error::Unavailable`]: no
//! member took it within the deadline), it may or may not have happened
//! ([`Error::OutcomeUnknown`]: a write that timed out or lost its connection
//! after it was sent), or etcd refused it ([`Error::Etcd`]).

use std::time::Duration;

use crate::records::Owner;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why one attempt on one member failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Client(#[from] etcd_client::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no etcd endpoints given")]
    NoEndpoints,
    #[error("invalid etcd endpoint {endpoint:?}: {source}")]
    BadEndpoint { endpoint: String, source: etcd_client::Error },
    #[error("invalid {what} {name:?}: {why}")]
    BadName { what: &'static str, name: String, why: &'static str },
    #[error("etcd {op}: no member answered within {secs:.1} s (last: {endpoint}: {last})", secs = after.as_secs_f64())]
    Unavailable { op: &'static str, after: Duration, endpoint: String, last: Failure },
    /// A write that may or may not have been applied: it was sent, and
    /// then the member timed out or went away. Read back before retrying,
    /// or retry only conditional or idempotent writes.
    #[error("etcd {op} on {endpoint}: outcome unknown ({cause}); read back before acting")]
    OutcomeUnknown { op: &'static str, endpoint: String, cause: Failure },
    #[error("etcd {op} on {endpoint}: {source}")]
    Etcd { op: &'static str, endpoint: String, source: etcd_client::Error },
    #[error("etcd answered {op} with an unexpected response: {what}")]
    Protocol { op: &'static str, what: &'static str },
    #[error("key {key}: value is not a valid {kind} record: {source}")]
    Decode { key: String, kind: &'static str, source: serde_json::Error },
    #[error("key {key}: {kind} record has format version {found}; this Ferry reads versions 1-{supported}")]
    FormatVersion { key: String, kind: &'static str, found: u32, supported: u32 },
    #[error("{key} already exists")]
    AlreadyExists { key: String },
    #[error("no VM named {name:?}")]
    NoSuchVm { name: String },
    #[error("VM {vm:?}: owner is {}, not the expected {expected}", current.as_ref().map_or_else(|| "missing".to_owned(), |c| c.to_string()))]
    StaleOwner { vm: String, expected: Owner, current: Option<Owner> },
    #[error("node {node:?} is registered under another lease ({lease:x}), still alive")]
    NodeHeld { node: String, lease: i64 },
    #[error("lease {lease:x} is lost: {reason}")]
    LeaseLost { lease: i64, reason: crate::lease::LostReason },
    #[error("the watch on {prefix} cannot resume: revision {compacted} was compacted; list again and re-watch")]
    Compacted { prefix: String, compacted: i64 },
    #[error("VM {vm:?} is already moving ({from} -> {to}, move {id})")]
    MoveInFlight { vm: String, id: String, from: String, to: String },
    #[error("VM {vm:?}: move {id} is no longer asked for (it was aborted or already ended)")]
    MoveGone { vm: String, id: String },
    #[error("VM {vm:?}: could not find a free history sequence number after {tries} tries")]
    HistoryContended { vm: String, tries: u32 },
    #[error("no cluster named {name:?} (form it with `ferry cluster create`)")]
    NoSuchCluster { name: String },
}

impl Error {
    /// True if the operation may have been applied (read back first).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown { .. })
    }
}
