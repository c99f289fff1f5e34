//! The key schema: every key Ferry keeps in etcd, under one prefix per
//! cluster, named in this one module.
//!
//! ```text
//! /ferry/<cluster>/nodes/<id>                 NodeRecord, under the node's lease
//! /ferry/<cluster>/nodes/<id>/admin           NodeAdmin (paused, quarantined), no lease
//! /ferry/<cluster>/nodes/<id>/restart         a request that the node's agent restart itself
//! /ferry/<cluster>/update/lock                the running `cluster update`, under its lease
//! /ferry/<cluster>/update/progress            UpdateProgress: the last update's plan and progress
//! /ferry/<cluster>/commands/<id>/request      CommandRequest: a command for the node's agent to run (an update's)
//! /ferry/<cluster>/commands/<id>/result       CommandResult: how the node's agent runs or ran it
//! /ferry/<cluster>/commands/<id>/output/<seq> CommandOutput: its output as the agent streams it
//! /ferry/<cluster>/health/<id>                NodeHealth: the checks the node's agent ran when it started
//! /ferry/<cluster>/vms/<name>                 VmRecord (machine config, preferred owners)
//! /ferry/<cluster>/vms/<name>/owner           Owner {node, epoch}
//! /ferry/<cluster>/vms/<name>/history/<seq>   HistoryEntry, seq zero-padded to 20 digits
//! /ferry/<cluster>/vms/<name>/status          VmStatus, under the running node's lease
//! /ferry/<cluster>/vms/<name>/move            MoveRecord: a move asked for, until it commits or fails
//! /ferry/<cluster>/vms/<name>/incoming        IncomingRecord, under the destination node's lease
//! /ferry/<cluster>/vms/<name>/restart         RestartRecord: a failover under way, under the leader's node lease
//! /ferry/<cluster>/leader                     LeaderRecord, under the leader's lease
//! /ferry/<cluster>/seen-up                    SeenUp: the nodes the last leader saw up, no lease
//! /ferry/<cluster>/cluster                    ClusterRecord (nodes, volume, settings), created once
//! /ferry/<cluster>/validation                 ValidationRecord, the last `ferry validate` report
//! /ferry/<cluster>/events/<seq>               EventRecord (detections, fences, restarts, quarantines)
//! ```
//!
//! Names (cluster, node, VM) never contain '/', so every key parses back
//! to exactly one [`ClusterKey`], and `nodes/a` is never a prefix match for
//! `nodes/ab`'s children (per-object prefixes end in '/').

use crate::error::{Error, Result};

/// The root of all Ferry keys.
pub const ROOT: &str = "/ferry/";

/// Longest cluster, node or VM name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a cluster, node or VM name: 1-63 characters of `a-z0-9_.-`,
/// starting with a letter or digit.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 63 characters")
    } else if !name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')) {
        Some("use only lowercase letters, digits, '_', '.' and '-'")
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        Some("it must start with a letter or digit")
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::BadName { what, name: name.to_owned(), why }),
        None => Ok(()),
    }
}

/// One key of the schema, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterKey {
    Node(String),
    NodeAdmin(String),
    Vm(String),
    VmOwner(String),
    VmHistory(String, u64),
    VmStatus(String),
    VmMove(String),
    VmIncoming(String),
    VmRestart(String),
    Leader,
    SeenUp,
    /// The cluster's own record (`ferry cluster create`).
    ClusterRecord,
    /// The last validation report.
    Validation,
    Event(u64),
    NodeRestart(String),
    UpdateLock,
    UpdateProgress,
    CommandRequest(String),
    CommandResult(String),
    CommandOutput(String, u64),
    NodeHealth(String),
}

/// The keys of one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    /// `/ferry/<cluster>/`
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Result<Keys> {
        validate_name("cluster name", cluster)?;
        Ok(Keys { prefix: format!("{ROOT}{cluster}/") })
    }

    /// `/ferry/<cluster>/`: every key of the cluster starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.prefix)
    }

    pub fn node_admin(&self, id: &str) -> String {
        format!("{}nodes/{id}/admin", self.prefix)
    }

    pub fn vms_prefix(&self) -> String {
        format!("{}vms/", self.prefix)
    }

    pub fn vm(&self, name: &str) -> String {
        format!("{}vms/{name}", self.prefix)
    }

    /// `vms/<name>/`: the VM's owner and history (not the record itself).
    pub fn vm_children(&self, name: &str) -> String {
        format!("{}vms/{name}/", self.prefix)
    }

    pub fn vm_owner(&self, name: &str) -> String {
        format!("{}vms/{name}/owner", self.prefix)
    }

    pub fn vm_history_prefix(&self, name: &str) -> String {
        format!("{}vms/{name}/history/", self.prefix)
    }

    /// Zero-padded, so keys sort in sequence order.
    pub fn vm_history(&self, name: &str, seq: u64) -> String {
        format!("{}vms/{name}/history/{seq:020}", self.prefix)
    }

    /// What the agent running the VM reports (under its node lease).
    pub fn vm_status(&self, name: &str) -> String {
        format!("{}vms/{name}/status", self.prefix)
    }

    /// The move asked for (deleted by the transaction that commits it).
    pub fn vm_move(&self, name: &str) -> String {
        format!("{}vms/{name}/move", self.prefix)
    }

    /// Where the destination of a move listens (under its node lease).
    pub fn vm_incoming(&self, name: &str) -> String {
        format!("{}vms/{name}/incoming", self.prefix)
    }

    /// A failover of the VM under way (under the leader's node lease).
    pub fn vm_restart(&self, name: &str) -> String {
        format!("{}vms/{name}/restart", self.prefix)
    }

    pub fn node_restart(&self, id: &str) -> String {
        format!("{}nodes/{id}/restart", self.prefix)
    }

    pub fn update_lock(&self) -> String {
        format!("{}update/lock", self.prefix)
    }

    pub fn update_progress(&self) -> String {
        format!("{}update/progress", self.prefix)
    }

    /// `commands/<id>/`: a node's command request, result and output.
    /// Not under `nodes/`, whose watchers (the leader) need not wake for
    /// every chunk of output.
    pub fn commands_prefix(&self, id: &str) -> String {
        format!("{}commands/{id}/", self.prefix)
    }

    pub fn command_request(&self, id: &str) -> String {
        format!("{}commands/{id}/request", self.prefix)
    }

    pub fn command_result(&self, id: &str) -> String {
        format!("{}commands/{id}/result", self.prefix)
    }

    pub fn command_output_prefix(&self, id: &str) -> String {
        format!("{}commands/{id}/output/", self.prefix)
    }

    /// Zero-padded, so keys sort in sequence order.
    pub fn command_output(&self, id: &str, seq: u64) -> String {
        format!("{}commands/{id}/output/{seq:020}", self.prefix)
    }

    pub fn node_health(&self, id: &str) -> String {
        format!("{}health/{id}", self.prefix)
    }

    pub fn events_prefix(&self) -> String {
        format!("{}events/", self.prefix)
    }

    /// Zero-padded, so keys sort in sequence order.
    pub fn event(&self, seq: u64) -> String {
        format!("{}events/{seq:020}", self.prefix)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// The nodes the last leader saw up: a new leader learns from it which
    /// nodes went down while nobody led (the old leader among them).
    pub fn seen_up(&self) -> String {
        format!("{}seen-up", self.prefix)
    }

    /// Parses a key of this cluster; None for anything else (another
    /// cluster's key, or a key this version does not know).
    pub fn parse(&self, key: &str) -> Option<ClusterKey> {
        let rest = key.strip_prefix(&self.prefix)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let name_ok = |n: &str| validate_name("name", n).is_ok();
        match parts.as_slice() {
            ["leader"] => Some(ClusterKey::Leader),
            ["seen-up"] => Some(ClusterKey::SeenUp),
            ["nodes", id] if name_ok(id) => Some(ClusterKey::Node((*id).to_owned())),
            ["nodes", id, "admin"] if name_ok(id) => Some(ClusterKey::NodeAdmin((*id).to_owned())),
            ["vms", name] if name_ok(name) => Some(ClusterKey::Vm((*name).to_owned())),
            ["vms", name, "owner"] if name_ok(name) => Some(ClusterKey::VmOwner((*name).to_owned())),
            ["vms", name, "status"] if name_ok(name) => Some(ClusterKey::VmStatus((*name).to_owned())),
            ["vms", name, "move"] if name_ok(name) => Some(ClusterKey::VmMove((*name).to_owned())),
            ["vms", name, "incoming"] if name_ok(name) => Some(ClusterKey::VmIncoming((*name).to_owned())),
            ["vms", name, "restart"] if name_ok(name) => Some(ClusterKey::VmRestart((*name).to_owned())),
            ["vms", name, "history", seq] if name_ok(name) && seq.len() == 20 => {
                Some(ClusterKey::VmHistory((*name).to_owned(), seq.parse().ok()?))
            }
            ["cluster"] => Some(ClusterKey::ClusterRecord),
            ["validation"] => Some(ClusterKey::Validation),
            ["events", seq] if seq.len() == 20 => Some(ClusterKey::Event(seq.parse().ok()?)),
            ["nodes", id, "restart"] if name_ok(id) => Some(ClusterKey::NodeRestart((*id).to_owned())),
            ["update", "lock"] => Some(ClusterKey::UpdateLock),
            ["update", "progress"] => Some(ClusterKey::UpdateProgress),
            ["commands", id, "request"] if name_ok(id) => Some(ClusterKey::CommandRequest((*id).to_owned())),
            ["commands", id, "result"] if name_ok(id) => Some(ClusterKey::CommandResult((*id).to_owned())),
            ["commands", id, "output", seq] if name_ok(id) && seq.len() == 20 => {
                Some(ClusterKey::CommandOutput((*id).to_owned(), seq.parse().ok()?))
            }
            ["health", id] if name_ok(id) => Some(ClusterKey::NodeHealth((*id).to_owned())),
            _ => None,
        }
    }
}

// ---- the cluster's own record and its validation (`ferry cluster create`) ----

impl Keys {
    /// The cluster's name, as given to [`Keys::new`].
    pub fn cluster_name(&self) -> &str {
        &self.prefix[ROOT.len()..self.prefix.len() - 1]
    }

    /// `/ferry/<cluster>/cluster`: what `ferry cluster create` stored.
    pub fn cluster(&self) -> String {
        format!("{}cluster", self.prefix)
    }

    /// `/ferry/<cluster>/validation`: the last validation report.
    pub fn validation(&self) -> String {
        format!("{}validation", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("x", "a").is_ok());
        assert!(validate_name("x", "vm-1.web_2").is_ok());
        assert!(validate_name("x", "").is_err());
        assert!(validate_name("x", "-a").is_err());
        assert!(validate_name("x", "a/b").is_err());
        assert!(validate_name("x", "A").is_err());
        assert!(validate_name("x", &"a".repeat(63)).is_ok());
        assert!(validate_name("x", &"a".repeat(64)).is_err());
        assert!(Keys::new("bad/name").is_err());
    }

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("c1").unwrap();
        assert_eq!(k.node("a"), "/ferry/c1/nodes/a");
        assert_eq!(k.node_admin("a"), "/ferry/c1/nodes/a/admin");
        assert_eq!(k.vm("web"), "/ferry/c1/vms/web");
        assert_eq!(k.vm_owner("web"), "/ferry/c1/vms/web/owner");
        assert_eq!(k.vm_history("web", 7), "/ferry/c1/vms/web/history/00000000000000000007");
        assert_eq!(k.leader(), "/ferry/c1/leader");
        assert_eq!(k.parse(&k.node("a")), Some(ClusterKey::Node("a".into())));
        assert_eq!(k.parse(&k.node_admin("a")), Some(ClusterKey::NodeAdmin("a".into())));
        assert_eq!(k.parse(&k.vm("web")), Some(ClusterKey::Vm("web".into())));
        assert_eq!(k.parse(&k.vm_owner("web")), Some(ClusterKey::VmOwner("web".into())));
        assert_eq!(k.parse(&k.vm_history("web", u64::MAX)), Some(ClusterKey::VmHistory("web".into(), u64::MAX)));
        assert_eq!(k.parse(&k.leader()), Some(ClusterKey::Leader));
        assert_eq!(k.vm_status("web"), "/ferry/c1/vms/web/status");
        assert_eq!(k.parse(&k.vm_status("web")), Some(ClusterKey::VmStatus("web".into())));
        assert_eq!(k.parse(&k.vm_move("web")), Some(ClusterKey::VmMove("web".into())));
        assert_eq!(k.parse(&k.vm_incoming("web")), Some(ClusterKey::VmIncoming("web".into())));
        assert_eq!(k.vm_restart("web"), "/ferry/c1/vms/web/restart");
        assert_eq!(k.parse(&k.vm_restart("web")), Some(ClusterKey::VmRestart("web".into())));
    }

    #[test]
    fn foreign_keys_do_not_parse() {
        let k = Keys::new("c1").unwrap();
        let other = Keys::new("c11").unwrap();
        assert_eq!(k.parse(&other.node("a")), None);
        assert!(!other.node("a").starts_with(k.prefix()));
        assert_eq!(k.parse("/ferry/c1/vms/web/unknown"), None);
        assert_eq!(k.parse("/ferry/c1/vms/web/history/7"), None);
        assert_eq!(k.parse("/ferry/c1/nodes/"), None);
        // A node's children prefix never matches another node's keys.
        assert!(!k.node_admin("ab").starts_with(&format!("{}/", k.node("a"))));
        assert!(!k.vm_owner("web2").starts_with(&k.vm_children("web")));
    }

    #[test]
    fn history_keys_sort_in_sequence_order() {
        let k = Keys::new("c").unwrap();
        let mut keys: Vec<String> = [10u64, 9, 100, 1].iter().map(|&s| k.vm_history("v", s)).collect();
        keys.sort();
        let seqs: Vec<u64> = keys
            .iter()
            .map(|key| match k.parse(key) {
                Some(ClusterKey::VmHistory(_, s)) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, [1, 9, 10, 100]);
    }

    #[test]
    fn cluster_and_validation_keys_round_trip() {
        let k = Keys::new("c1").unwrap();
        assert_eq!(k.cluster(), "/ferry/c1/cluster");
        assert_eq!(k.validation(), "/ferry/c1/validation");
        assert_eq!(k.cluster_name(), "c1");
        assert_eq!(k.parse(&k.cluster()), Some(ClusterKey::ClusterRecord));
        assert_eq!(k.parse(&k.validation()), Some(ClusterKey::Validation));
        assert_eq!(k.parse(&k.event(42)), Some(ClusterKey::Event(42)));
        assert_eq!(k.parse(&k.node_restart("a")), Some(ClusterKey::NodeRestart("a".into())));
        assert_eq!(k.parse(&k.update_lock()), Some(ClusterKey::UpdateLock));
        assert_eq!(k.parse(&k.command_request("a")), Some(ClusterKey::CommandRequest("a".into())));
        assert_eq!(k.parse(&k.command_result("a")), Some(ClusterKey::CommandResult("a".into())));
        assert_eq!(k.parse(&k.command_output("a", 3)), Some(ClusterKey::CommandOutput("a".into(), 3)));
        assert!(k.command_output("a", 3).starts_with(&k.command_output_prefix("a")));
        assert!(k.command_result("a").starts_with(&k.commands_prefix("a")));
        assert!(!k.command_request("ab").starts_with(&k.commands_prefix("a")));
        assert_eq!(k.parse(&k.node_health("a")), Some(ClusterKey::NodeHealth("a".into())));
        assert_eq!(k.parse(&k.seen_up()), Some(ClusterKey::SeenUp));
        assert_eq!(k.parse("/ferry/c1/cluster/x"), None);
        assert_eq!(Keys::new("c11").unwrap().parse(&k.cluster()), None);
    }
}
