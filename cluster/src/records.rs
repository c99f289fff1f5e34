//! The values Ferry stores in etcd: plain serde records, JSON-encoded, each
//! carrying a format version `v`. A reader checks `v` before decoding the
//! rest, so a record written by a newer Ferry is refused by name
//! ([`Error::FormatVersion`]) rather than misread.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The format version this Ferry writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// A record type stored under some key.
pub trait Record: Serialize + DeserializeOwned {
    /// What it is, for error messages.
    const KIND: &'static str;
}

/// Encodes a record. JSON with a fixed field order: the same record always
/// encodes to the same bytes (owner transactions compare them).
pub fn encode<T: Record>(r: &T) -> Vec<u8> {
    serde_json::to_vec(r).expect("cluster records always serialise")
}

/// Decodes the record stored at `key`, checking its format version first.
pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    let err = |source| Error::Decode { key: key.to_owned(), kind: T::KIND, source };
    let Versioned { v } = serde_json::from_slice(bytes).map_err(err)?;
    if v == 0 || v > FORMAT_VERSION {
        return Err(Error::FormatVersion { key: key.to_owned(), kind: T::KIND, found: v, supported: FORMAT_VERSION });
    }
    serde_json::from_slice(bytes).map_err(err)
}

/// A node as its agent publishes it, under the node's lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub v: u32,
    pub id: String,
    /// The node's address for migrations (host:port or IP).
    pub address: Option<String>,
    pub ferry_version: String,
    /// What the node offers (memory free, CPU profile, volumes reachable):
    /// opaque until the agent defines it.
    pub offers: serde_json::Value,
    /// When the agent registered (Unix ms).
    pub registered_unix_ms: u64,
}

impl Record for NodeRecord {
    const KIND: &'static str = "node";
}

/// An operator's settings for a node. Not under a lease: they outlive the
/// agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAdmin {
    pub v: u32,
    /// Takes no new VMs.
    pub paused: bool,
    /// Its VMs are being moved away.
    pub draining: bool,
    /// No VMs are placed on it until then (Unix ms).
    pub quarantined_until_unix_ms: Option<u64>,
    /// The VMs its last drain moved away (what `resume --failback` brings
    /// back).
    #[serde(default)]
    pub drained: Vec<String>,
}

impl Record for NodeAdmin {
    const KIND: &'static str = "node admin";
}

/// A highly available VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub v: u32,
    pub name: String,
    /// The VM's machine config, opaque here (the VMM defines it).
    pub config: serde_json::Value,
    /// Nodes in order of preference.
    pub preferred_owners: Vec<String>,
}

impl Record for VmRecord {
    const KIND: &'static str = "VM";
}

/// Who runs a VM. The epoch grows by one at every change, so a node's
/// stale belief about ownership is detectable, and the epoch can fence
/// disk leases. `node: None` is a stopped VM (the key is never deleted, so
/// epochs never go back).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub v: u32,
    pub node: Option<String>,
    pub epoch: u64,
}

impl Owner {
    pub fn new(node: Option<&str>, epoch: u64) -> Owner {
        Owner { v: FORMAT_VERSION, node: node.map(str::to_owned), epoch }
    }

    /// Same owner and epoch (the format version aside).
    pub fn same(&self, other: &Owner) -> bool {
        self.node == other.node && self.epoch == other.epoch
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(n) => write!(f, "{n}@{}", self.epoch),
            None => write!(f, "(none)@{}", self.epoch),
        }
    }
}

impl Record for Owner {
    const KIND: &'static str = "owner";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    Created,
    Started,
    Stopped,
    LiveMove,
    QuickMove,
    /// A move that did not happen (the VM stayed where it was).
    MoveFailed,
    Failover,
    /// A kind written by a newer Ferry.
    #[serde(other)]
    Other,
}

/// One event in a VM's life (a move with its figures, a start, a failover).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub v: u32,
    /// Chosen by the writer, unique per VM: after an unknown outcome, a
    /// writer finds its entry by id instead of appending it twice.
    pub id: String,
    pub kind: HistoryKind,
    pub at_unix_ms: u64,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The owner epoch the event produced, if it changed the owner.
    pub epoch: Option<u64>,
    /// The migration's figures JSON, detection/fence/restart times, etc.
    pub figures: serde_json::Value,
}

impl Record for HistoryEntry {
    const KIND: &'static str = "history";
}

/// What the agent running a VM reports about it, under that agent's node
/// lease (so it goes when the node does). Informational: the owner key,
/// not this, says who may run the VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub v: u32,
    /// The node whose agent wrote it.
    pub node: String,
    /// The owner epoch the agent runs the VM under.
    pub epoch: u64,
    /// Starting, Running, Paused, Migrating, Stopping, Failed (or the VMM's
    /// own lifecycle state).
    pub state: String,
    /// The VMM process.
    pub pid: Option<u32>,
    /// Anything worth saying (why it failed, that it was re-adopted).
    pub detail: String,
    pub since_unix_ms: u64,
}

impl Record for VmStatus {
    const KIND: &'static str = "VM status";
}

/// A move asked for: the VM goes from `from` (its owner at epoch `epoch`)
/// to `to`. The source's agent drives it; the transaction that commits it
/// changes the owner and deletes this record at once, so whoever is unsure
/// of a move's end reads the owner key (see [`crate::Cluster::commit_move`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub v: u32,
    /// Unique per move (it names the history entry too).
    pub id: String,
    pub from: String,
    pub to: String,
    /// The owner epoch the move starts from; it commits as `epoch + 1`.
    pub epoch: u64,
    /// "live" or "quick".
    pub mode: String,
    /// Who asked: "operator", "drain", "failback".
    pub reason: String,
    pub requested_unix_ms: u64,
}

impl Record for MoveRecord {
    const KIND: &'static str = "move";
}

/// The destination of a move, ready: where its `ferry receive` listens.
/// Under the destination node's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub v: u32,
    pub move_id: String,
    pub node: String,
    /// `tcp:IP:PORT`.
    pub endpoint: String,
}

impl Record for IncomingRecord {
    const KIND: &'static str = "incoming move";
}

/// A failover under way: the leader restarts the VM of a node that went
/// down. Under the leader's node lease (a leader that dies takes it with
/// it; the next one writes its own); deleted once the VM runs again or
/// the restart is given up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRecord {
    pub v: u32,
    /// The node that went down.
    pub from: String,
    /// Where it goes: planned while the leader waits, then the new owner.
    #[serde(default)]
    pub to: Option<String>,
    /// The new owner epoch, once the owner key names `to`.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// What the restart waits for now.
    pub phase: String,
    /// When the leader saw the node down.
    pub since_unix_ms: u64,
    /// The leader doing it.
    pub leader: String,
}

impl Record for RestartRecord {
    const KIND: &'static str = "VM restart";
}

/// Something the cluster leader saw or did (`ferry cluster events`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub v: u32,
    pub at_unix_ms: u64,
    /// node-down, vm-restart-wait, vm-restarted, vm-restart-failed,
    /// node-quarantined, node-up.
    pub kind: String,
    pub node: String,
    #[serde(default)]
    pub vm: Option<String>,
    pub detail: String,
    /// Times and figures (detection, fence wait, restart).
    #[serde(default)]
    pub figures: serde_json::Value,
}

impl Record for EventRecord {
    const KIND: &'static str = "event";
}

/// The nodes a leader saw up, as it last wrote them (no lease: it
/// outlives that leader, so the next one can tell which nodes went down
/// while nobody led).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenUp {
    pub v: u32,
    pub nodes: Vec<String>,
    pub leader: String,
    pub at_unix_ms: u64,
}

impl Record for SeenUp {
    const KIND: &'static str = "nodes seen up";
}

/// The cluster leader, under its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub v: u32,
    pub node: String,
    pub since_unix_ms: u64,
}

impl Record for LeaderRecord {
    const KIND: &'static str = "leader";
}

/// Milliseconds since the Unix epoch, for records.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

// ---- the cluster's own record and its validation (`ferry cluster create`) ----

/// The defaults Hyper-V ships: two live migrations at a time.
pub const DEFAULT_LIVE_MIGRATIONS_PER_NODE: u32 = 2;
pub const DEFAULT_INCOMING_PER_NODE: u32 = 2;

/// When VMs may fail back to their preferred owner: hours of the day (UTC,
/// 0-23), from `start_hour` up to, not including, `end_hour`; a start after
/// the end wraps past midnight (Hyper-V's FailbackWindowStart/End).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackWindow {
    pub start_hour: u8,
    pub end_hour: u8,
}

impl FailbackWindow {
    /// Checks the hours (0-23, start != end).
    pub fn new(start_hour: u8, end_hour: u8) -> Option<FailbackWindow> {
        (start_hour < 24 && end_hour < 24 && start_hour != end_hour).then_some(FailbackWindow { start_hour, end_hour })
    }

    /// True if `hour` (0-23, UTC) is inside the window.
    pub fn contains(&self, hour: u8) -> bool {
        if self.start_hour < self.end_hour {
            (self.start_hour..self.end_hour).contains(&hour)
        } else {
            hour >= self.start_hour || hour < self.end_hour
        }
    }
}

impl fmt::Display for FailbackWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:00-{:02}:00 UTC", self.start_hour, self.end_hour)
    }
}

fn default_live_migrations() -> u32 {
    DEFAULT_LIVE_MIGRATIONS_PER_NODE
}

fn default_incoming() -> u32 {
    DEFAULT_INCOMING_PER_NODE
}

/// The cluster-wide settings drains and failbacks follow. A field missing
/// from a stored record reads as its default, so settings can be added
/// without a new format version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Live migrations out of one node at a time (a drain's parallelism).
    #[serde(default = "default_live_migrations")]
    pub live_migrations_per_node: u32,
    /// Migrations into one node at a time.
    #[serde(default = "default_incoming")]
    pub incoming_per_node: u32,
    /// When failback may happen; None: at any time.
    #[serde(default)]
    pub failback_window: Option<FailbackWindow>,
}

impl Default for ClusterSettings {
    fn default() -> ClusterSettings {
        ClusterSettings {
            live_migrations_per_node: DEFAULT_LIVE_MIGRATIONS_PER_NODE,
            incoming_per_node: DEFAULT_INCOMING_PER_NODE,
            failback_window: None,
        }
    }
}

/// What `ferry cluster create` formed: stored once, never overwritten by a
/// second create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub v: u32,
    pub name: String,
    /// The nodes it was formed with (node ids; in a lab, the host names).
    pub nodes: Vec<String>,
    /// The shared volume's path, the same on every node (VM disks are
    /// stored by path).
    pub volume: String,
    /// The lab whose hosts the nodes are, if it was formed in one (where
    /// `ferry cluster validate` finds them again).
    pub lab: Option<String>,
    pub created_unix_ms: u64,
    /// Formed with `--force` although its validation failed.
    pub forced: bool,
    pub settings: ClusterSettings,
}

impl Record for ClusterRecord {
    const KIND: &'static str = "cluster";
}

/// The last validation of the cluster's nodes (`ferry validate`'s report).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationRecord {
    pub v: u32,
    pub at_unix_ms: u64,
    /// Every check passed.
    pub ok: bool,
    /// The checks that failed, one line each ("volume a: ... -> fix").
    pub failed: Vec<String>,
    /// The full report, as `ferry validate` writes it.
    pub report: serde_json::Value,
}

impl Record for ValidationRecord {
    const KIND: &'static str = "validation";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let o = Owner::new(Some("a"), 3);
        let bytes = encode(&o);
        assert_eq!(std::str::from_utf8(&bytes).unwrap(), r#"{"v":1,"node":"a","epoch":3}"#);
        assert_eq!(decode::<Owner>("k", &bytes).unwrap(), o);
        assert_eq!(encode(&o), bytes, "encoding is deterministic");

        let vm = VmRecord {
            v: FORMAT_VERSION,
            name: "web".into(),
            config: serde_json::json!({"mem_mib": 256, "disks": ["csv:vol/disks/web"]}),
            preferred_owners: vec!["a".into(), "b".into()],
        };
        assert_eq!(decode::<VmRecord>("k", &encode(&vm)).unwrap(), vm);

        let h = HistoryEntry {
            v: 1,
            id: "m1".into(),
            kind: HistoryKind::LiveMove,
            at_unix_ms: 5,
            from: Some("a".into()),
            to: Some("b".into()),
            epoch: Some(4),
            figures: serde_json::json!({"downtime_ms": 4.4}),
        };
        assert_eq!(decode::<HistoryEntry>("k", &encode(&h)).unwrap(), h);
        assert!(encode(&h).windows(9).any(|w| w == b"live_move"));
    }

    #[test]
    fn newer_versions_are_refused_by_name() {
        let e = decode::<Owner>("/k", br#"{"v":2,"node":"a","epoch":1,"extra":true}"#).unwrap_err();
        assert!(matches!(e, Error::FormatVersion { found: 2, supported: 1, .. }), "{e}");
        assert!(matches!(decode::<Owner>("/k", br#"{"v":0,"node":null,"epoch":1}"#), Err(Error::FormatVersion { .. })));
        assert!(matches!(decode::<Owner>("/k", b"not json"), Err(Error::Decode { .. })));
        assert!(matches!(decode::<Owner>("/k", br#"{"v":1}"#), Err(Error::Decode { .. })));
    }

    #[test]
    fn unknown_history_kinds_decode_as_other() {
        let h: HistoryEntry = decode(
            "k",
            br#"{"v":1,"id":"x","kind":"teleport","at_unix_ms":1,"from":null,"to":null,"epoch":null,"figures":{}}"#,
        )
        .unwrap();
        assert_eq!(h.kind, HistoryKind::Other);
    }

    #[test]
    fn owner_display() {
        assert_eq!(Owner::new(Some("b"), 7).to_string(), "b@7");
        assert_eq!(Owner::new(None, 0).to_string(), "(none)@0");
        assert!(Owner::new(Some("b"), 7).same(&Owner { v: 9, node: Some("b".into()), epoch: 7 }));
    }

    #[test]
    fn cluster_records_round_trip_and_settings_default() {
        let c = ClusterRecord {
            v: FORMAT_VERSION,
            name: "c1".into(),
            nodes: vec!["a".into(), "b".into(), "c".into()],
            volume: "/srv/vol".into(),
            lab: Some("cc1".into()),
            created_unix_ms: 5,
            forced: false,
            settings: ClusterSettings { failback_window: FailbackWindow::new(22, 6), ..Default::default() },
        };
        assert_eq!(decode::<ClusterRecord>("k", &encode(&c)).unwrap(), c);
        assert_eq!(c.settings.live_migrations_per_node, 2, "Hyper-V's default");
        // Settings a writer left out read as their defaults.
        let bare: ClusterRecord = decode(
            "k",
            br#"{"v":1,"name":"c","nodes":["a"],"volume":"/v","lab":null,"created_unix_ms":1,"forced":false,"settings":{}}"#,
        )
        .unwrap();
        assert_eq!(bare.settings, ClusterSettings::default());
        let r = ValidationRecord {
            v: FORMAT_VERSION,
            at_unix_ms: 9,
            ok: false,
            failed: vec!["volume a: /nope: not writable -> mount it".into()],
            report: serde_json::json!({"ok": false, "checks": []}),
        };
        assert_eq!(decode::<ValidationRecord>("k", &encode(&r)).unwrap(), r);
    }

    #[test]
    fn failback_windows() {
        let day = FailbackWindow::new(9, 17).unwrap();
        assert!(day.contains(9) && day.contains(16) && !day.contains(17) && !day.contains(3));
        let night = FailbackWindow::new(22, 6).unwrap();
        assert!(
            night.contains(23) && night.contains(0) && night.contains(5) && !night.contains(6) && !night.contains(12)
        );
        assert_eq!(night.to_string(), "22:00-06:00 UTC");
        assert!(FailbackWindow::new(3, 3).is_none() && FailbackWindow::new(0, 24).is_none());
    }
}
