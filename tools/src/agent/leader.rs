//! The cluster leader's duties: one agent at a time (etcd election, under
//! its node lease) watches the nodes, and when a node's lease expires it
//! restarts that node's VMs elsewhere, fenced first, never twice.
//!
//! For each VM owned by a node that is down, in order:
//! 1. the node's lease has expired (that is how it is seen as down): its
//!    agent fenced itself at least `fence_margin` before that, or it is
//!    dead;
//! 2. every shared-volume disk lease of the VM has expired, plus
//!    [`DISK_MARGIN`]: whatever VMM was left writing has stopped (a VMM
//!    fences itself when it cannot renew, a third of its TTL early);
//! 3. the owner key moves from the dead node to a surviving one (preferred
//!    owners, then free memory; never paused, draining or quarantined) by
//!    the transaction that compares owner and epoch, and the new owner's
//!    agent cold-boots it from its shared disk, taking the leases over
//!    with a higher epoch.
//!
//! A leader that loses its leadership stops at once (the task is dropped,
//! its restart tasks aborted). Every step is an event (`ferry cluster
//! events`), the restart is in the VM's history with its times, and while
//! it is under way `vms/NAME/restart` says so (`ferry cluster status`
//! shows the VM as Restarting: from where, to where, since when).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster::{
    ChangeKind, Cluster, ClusterKey, Error as ClusterError, EventRecord, HistoryEntry, HistoryKind, NodeAdmin,
    NodeLease, Owner, RestartRecord, SeenUp, FORMAT_VERSION,
};

use super::offers::Offers;
use super::spec::VmSpec;

/// After a VM's last disk lease expired, the leader waits this much more
/// before restarting it: covers clock skew between hosts (`ferry validate`
/// refuses more than 100 ms) and a renewal that was in flight.
pub const DISK_MARGIN: Duration = Duration::from_millis(500);

/// A VM without shared disks has no disk lease to prove its old VMM
/// stopped: the leader waits this long after the node went down, longer
/// than a cut-off agent with a TTL of up to 4 s takes to fence (one more
/// TTL of grace after its own deadline; see `Agent::lease_lost`).
pub const DISKLESS_WAIT: Duration = Duration::from_secs(10);

/// What the leader acts with.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub me: String,
    /// A node seen down this many times within an hour is quarantined.
    pub quarantine_after: usize,
    pub quarantine_for: Duration,
}

const HOUR_MS: u64 = 3_600_000;

/// How long the leader keeps saying a restarted VM is Restarting while its
/// new owner boots it (the agent's own boot limit is 30 s).
const BOOT_WAIT: Duration = Duration::from_secs(30);

/// The restart tasks of one term of leadership, aborted with it: a leader
/// that lost its leadership must not go on acting.
#[derive(Default)]
struct Restarts(HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for Restarts {
    fn drop(&mut self) {
        self.0.values().for_each(|t| t.abort());
    }
}

/// Campaigns for as long as the node lease lives; leads while elected.
pub async fn run(cluster: Cluster, node: Arc<NodeLease>, cfg: LeaderConfig) {
    while node.lease.is_held() {
        match cluster.campaign(&node.lease, &cfg.me, Duration::from_secs(3600)).await {
            Ok(Some(leadership)) => {
                eprintln!("ferry node: {} leads the cluster (term {})", cfg.me, leadership.term());
                tokio::select! {
                    why = leadership.lost() => eprintln!("ferry node: {} no longer leads ({why:?})", cfg.me),
                    r = lead(&cluster, &cfg, &node) => {
                        if let Err(e) = r {
                            tracing::warn!("leader duties: {e:#}; starting over");
                        }
                        let _ = leadership.resign().await;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!("campaign: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The leader's loop: nodes coming and going, by an etcd watch.
async fn lead(c: &Cluster, cfg: &LeaderConfig, node: &Arc<NodeLease>) -> anyhow::Result<()> {
    let listing = c.store().list(&c.keys().nodes_prefix()).await?;
    let mut up: HashSet<String> = HashSet::new();
    for kv in &listing.kvs {
        if let Some(ClusterKey::Node(id)) = c.keys().parse(&kv.key) {
            up.insert(id);
        }
    }
    let mut watch = c.watch_nodes(listing.revision + 1).await?;
    let mut restarts = Restarts::default();
    // Nodes that went down while nobody led: those the last leader saw up
    // that are gone (the old leader among them: its node key went with
    // its leader key, before this leader watched). Before any leader said
    // what it saw: the nodes that left VMs behind.
    let mut went_down: Vec<String> = match c.seen_up().await? {
        Some(seen) => seen.nodes.into_iter().filter(|n| !up.contains(n)).collect(),
        None => c
            .vm_owners_and_statuses()
            .await?
            .into_values()
            .filter_map(|(o, _)| o.and_then(|o| o.node))
            .filter(|n| !up.contains(n))
            .collect(),
    };
    went_down.sort();
    went_down.dedup();
    for id in &went_down {
        node_down(c, cfg, id).await;
    }
    record_seen_up(c, cfg, &up).await;
    restart_orphans(c, cfg, node, &up, &mut restarts).await?;
    loop {
        let Some(ch) = watch.next().await else { anyhow::bail!("the node watch ended") };
        let ch = match ch {
            Ok(ch) => ch,
            Err(e @ ClusterError::Compacted { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!("node watch: {e}");
                continue;
            }
        };
        let Some(ClusterKey::Node(id)) = c.keys().parse(&ch.kv.key) else { continue };
        match ch.kind {
            ChangeKind::Put => {
                if up.insert(id.clone()) {
                    event(c, "node-up", &id, None, "registered".into(), serde_json::Value::Null).await;
                    record_seen_up(c, cfg, &up).await;
                }
            }
            ChangeKind::Delete => {
                up.remove(&id);
                node_down(c, cfg, &id).await;
                record_seen_up(c, cfg, &up).await;
                restart_orphans(c, cfg, node, &up, &mut restarts).await?;
            }
        }
        restarts.0.retain(|_, t| !t.is_finished());
    }
}

/// Writes the nodes this leader sees up, for the next leader.
async fn record_seen_up(c: &Cluster, cfg: &LeaderConfig, up: &HashSet<String>) {
    let mut nodes: Vec<String> = up.iter().cloned().collect();
    nodes.sort();
    let seen = SeenUp { v: FORMAT_VERSION, nodes, leader: cfg.me.clone(), at_unix_ms: cluster::records::unix_ms() };
    if let Err(e) = c.set_seen_up(&seen).await {
        tracing::warn!("cannot record the nodes seen up: {e}");
    }
}

async fn event(c: &Cluster, kind: &str, node: &str, vm: Option<&str>, detail: String, figures: serde_json::Value) {
    let e = EventRecord {
        v: FORMAT_VERSION,
        at_unix_ms: cluster::records::unix_ms(),
        kind: kind.into(),
        node: node.into(),
        vm: vm.map(str::to_owned),
        detail: detail.clone(),
        figures,
    };
    eprintln!("ferry node: event {kind} {node}{}: {detail}", vm.map(|v| format!(" {v}")).unwrap_or_default());
    if let Err(e) = c.append_event(&e).await {
        tracing::warn!("cannot record event {kind}: {e}");
    }
}

/// A node's lease expired: record it, and quarantine a node that keeps
/// failing (Hyper-V: 3 times within an hour, for 2 hours).
async fn node_down(c: &Cluster, cfg: &LeaderConfig, id: &str) {
    event(c, "node-down", id, None, "its node lease expired".into(), serde_json::Value::Null).await;
    let now = cluster::records::unix_ms();
    let recent = match c.events().await {
        Ok(ev) => {
            ev.iter().filter(|(_, e)| e.kind == "node-down" && e.node == id && e.at_unix_ms + HOUR_MS > now).count()
        }
        Err(e) => {
            tracing::warn!("cannot count node {id}'s failures: {e}");
            return;
        }
    };
    if recent < cfg.quarantine_after {
        return;
    }
    let mut admin =
        c.node_admin(id).await.ok().flatten().unwrap_or(NodeAdmin { v: FORMAT_VERSION, ..Default::default() });
    let until = now + cfg.quarantine_for.as_millis() as u64;
    admin.quarantined_until_unix_ms = Some(until);
    match c.set_node_admin(id, &admin).await {
        Ok(()) => {
            let detail =
                format!("down {recent} times within an hour: no VMs placed on it for {:?}", cfg.quarantine_for);
            event(c, "node-quarantined", id, None, detail, serde_json::json!({ "until_unix_ms": until })).await
        }
        Err(e) => tracing::warn!("cannot quarantine node {id}: {e}"),
    }
}

/// Starts a restart task for every VM whose owner is a node that is not up.
async fn restart_orphans(
    c: &Cluster,
    cfg: &LeaderConfig,
    lease: &Arc<NodeLease>,
    up: &HashSet<String>,
    restarts: &mut Restarts,
) -> anyhow::Result<()> {
    for (vm, (owner, _)) in c.vm_owners_and_statuses().await? {
        let Some(owner) = owner else { continue };
        let Some(node) = owner.node.clone() else { continue };
        if up.contains(&node) || restarts.0.get(&vm).is_some_and(|t| !t.is_finished()) {
            continue;
        }
        let r = Restart::new(c, lease, &vm, node, &cfg.me);
        restarts.0.insert(vm, tokio::spawn(async move { r.run(owner).await }));
    }
    Ok(())
}

/// The latest moment any of the VM's disk leases is held until, if any is
/// held (Unix ms). Reads the leases on the shared volume.
fn disk_leases_held_until(spec: &VmSpec) -> Result<Option<u64>, String> {
    let mut latest = None;
    for d in &spec.machine.disks {
        let Some(vd) = &d.volume else { continue };
        let vol = csv_fs::Volume::open(&vd.volume).map_err(|e| format!("volume {}: {e}", vd.volume.display()))?;
        use csv_fs::LeaseStore;
        let rec =
            vol.lease_store(Duration::from_secs(1)).read(&vd.name).map_err(|e| format!("disk {}: {e}", vd.name))?;
        if let Some(r) = rec.filter(|r| r.owner.is_some()) {
            latest = latest.max(Some(r.expires_unix_ms));
        }
    }
    Ok(latest)
}

/// One VM's failover, as the leader on `me` (its node lease `lease`) does it.
struct Restart {
    c: Cluster,
    lease: Arc<NodeLease>,
    name: String,
    dead: String,
    me: String,
    /// The revision of its last restart record (0: none).
    said: AtomicI64,
}

impl Restart {
    fn new(c: &Cluster, lease: &Arc<NodeLease>, name: &str, dead: String, me: &str) -> Restart {
        Restart {
            c: c.clone(),
            lease: lease.clone(),
            name: name.to_owned(),
            dead,
            me: me.to_owned(),
            said: AtomicI64::new(0),
        }
    }

    /// Runs it and removes the VM's restart record once it ended: at once
    /// if no owner change was made; once the new owner reports the VM
    /// past Starting otherwise (bounded), by a task of its own, so that a
    /// new restart of the VM (its new owner going down too) is not held
    /// up by this one.
    async fn run(self, owner: Owner) {
        match self.restart(owner).await {
            None => self.unsay().await,
            Some((next, target)) => {
                tokio::spawn(async move {
                    self.until_running(&next, &target).await;
                    self.unsay().await;
                });
            }
        }
    }

    async fn unsay(&self) {
        let rev = self.said.load(Ordering::Relaxed);
        if rev == 0 {
            return;
        }
        if let Err(e) = self.c.delete_restart(&self.name, rev).await {
            tracing::warn!("VM {}: cannot remove its restart record: {e}", self.name);
        }
    }

    /// Waits (at most [`BOOT_WAIT`]) until `target`, owner at `next`,
    /// reports the VM past Starting, or the owner changes again.
    async fn until_running(&self, next: &Owner, target: &str) {
        let name = self.name.as_str();
        let deadline = tokio::time::Instant::now() + BOOT_WAIT;
        while tokio::time::Instant::now() < deadline {
            match self.c.vm_status(name).await {
                Ok(Some(s)) if s.value.node == target && s.value.epoch >= next.epoch && s.value.state != "Starting" => {
                    return
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("VM {name}: {e}"),
            }
            match self.c.owner(name).await {
                Ok(now) if !now.value.same(next) => return,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Publishes what the restart waits for (`ferry cluster status`).
    async fn say(&self, since: u64, to: Option<&str>, epoch: Option<u64>, phase: String) {
        let r = RestartRecord {
            v: FORMAT_VERSION,
            from: self.dead.clone(),
            to: to.map(str::to_owned),
            epoch,
            phase,
            since_unix_ms: since,
            leader: self.me.clone(),
        };
        match self.c.put_restart(&self.name, &self.lease, &r).await {
            Ok(rev) => self.said.store(rev, Ordering::Relaxed),
            Err(e) => tracing::warn!("VM {}: cannot publish its restart: {e}", self.name),
        }
    }

    /// Restarts the VM, owned by the dead node at `owner`, on a surviving
    /// node; returns the new owner if it changed the owner key.
    async fn restart(&self, owner: Owner) -> Option<(Owner, String)> {
        let (c, name, dead) = (&self.c, self.name.as_str(), self.dead.as_str());
        let detected = cluster::records::unix_ms();
        let spec = match c.vm(name).await.ok().flatten().map(|v| VmSpec::from_record(&v.value)) {
            Some(Ok(s)) => s,
            _ => {
                event(
                    c,
                    "vm-restart-failed",
                    dead,
                    Some(name),
                    "its record is unreadable".into(),
                    serde_json::Value::Null,
                )
                .await;
                return None;
            }
        };
        let diskless = spec.machine.disks.iter().all(|d| d.volume.is_none());
        // Where it would go now, for the status (placed again once the
        // disks are quiet).
        let planned = place(c, &spec, dead, name).await.ok();
        let waiting = if diskless {
            format!("waiting {DISKLESS_WAIT:?}: no disk lease proves its VMM stopped")
        } else {
            "waiting for its disk leases to expire".to_owned()
        };
        self.say(detected, planned.as_deref(), None, waiting.clone()).await;
        event(c, "vm-restart-wait", dead, Some(name), waiting, serde_json::Value::Null).await;
        // 1-2: the node stays down and the disks are surely quiet.
        let fenced_at = loop {
            match c.node(dead).await {
                Ok(Some(_)) => {
                    event(
                        c,
                        "vm-restart-cancelled",
                        dead,
                        Some(name),
                        "its node came back".into(),
                        serde_json::Value::Null,
                    )
                    .await;
                    return None;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("node {dead}: {e}"),
            }
            match c.owner(name).await {
                Ok(now) if !now.value.same(&owner) => return None, // someone else moved it
                Ok(_) => {}
                Err(e) => tracing::debug!("VM {name}: {e}"),
            }
            let now = cluster::records::unix_ms();
            if diskless {
                // No disk lease proves the old VMM stopped: give the node's
                // agent its whole fencing decision (see witness.rs) first.
                let until = detected + DISKLESS_WAIT.as_millis() as u64;
                if now < until {
                    tokio::time::sleep(Duration::from_millis(until - now)).await;
                }
                break cluster::records::unix_ms();
            }
            // Off the runtime's workers: a hung volume must not stall the
            // agent's main task (its watchdog would take it for a hang).
            let s = spec.clone();
            let held = tokio::task::spawn_blocking(move || disk_leases_held_until(&s))
                .await
                .unwrap_or_else(|e| Err(format!("the lease reader ended: {e}")));
            let wait_until = match held {
                Ok(held) => held.map_or(now, |t| t + DISK_MARGIN.as_millis() as u64),
                Err(e) => {
                    tracing::warn!("VM {name}: cannot read its disk leases ({e}); trying again");
                    now + 1000
                }
            };
            if now >= wait_until {
                break now;
            }
            tokio::time::sleep(Duration::from_millis((wait_until - now).min(500))).await;
        };
        // 3: a node to run it, then the owner transaction.
        let target = loop {
            match place(c, &spec, dead, name).await {
                Ok(t) => break t,
                Err(why) => {
                    self.say(detected, None, None, format!("waiting for a node: {why}")).await;
                    event(c, "vm-restart-wait", dead, Some(name), why, serde_json::Value::Null).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    match c.owner(name).await {
                        Ok(now) if !now.value.same(&owner) => return None,
                        _ => {}
                    }
                }
            }
        };
        let next = match c.change_owner(name, &owner, Some(&target)).await {
            Ok(o) => o,
            Err(e) if e.outcome_unknown() => match c.owner(name).await {
                Ok(now) if now.value.same(&Owner::new(Some(&target), owner.epoch + 1)) => now.value,
                _ => {
                    tracing::warn!("VM {name}: the restart's owner change had an unknown outcome: {e}");
                    return None;
                }
            },
            Err(e) => {
                tracing::warn!("VM {name}: not restarted: {e}");
                return None;
            }
        };
        let restarted = cluster::records::unix_ms();
        self.say(detected, Some(&target), Some(next.epoch), format!("booting on {target}")).await;
        let figures = serde_json::json!({
            "detected_unix_ms": detected,
            "disks_quiet_unix_ms": fenced_at,
            "restart_unix_ms": restarted,
            "fence_wait_ms": fenced_at.saturating_sub(detected),
            "disk_margin_ms": DISK_MARGIN.as_millis() as u64,
        });
        let entry = HistoryEntry {
            v: FORMAT_VERSION,
            id: format!("failover-{}", next.epoch),
            kind: HistoryKind::Failover,
            at_unix_ms: restarted,
            from: Some(dead.to_owned()),
            to: Some(target.clone()),
            epoch: Some(next.epoch),
            figures: figures.clone(),
        };
        if let Err(e) = c.append_history(name, &entry).await {
            tracing::warn!("VM {name}: history: {e}");
        }
        event(c, "vm-restarted", &target, Some(name), format!("restarted here after node {dead} went down"), figures)
            .await;
        Some((next, target))
    }
}

/// Where a failed node's VM restarts: up, not paused, draining or
/// quarantined, with the memory; preferred owners first, then the most
/// free memory.
async fn place(c: &Cluster, spec: &VmSpec, dead: &str, name: &str) -> Result<String, String> {
    let nodes = c.nodes().await.map_err(|e| e.to_string())?;
    let admins: HashMap<String, NodeAdmin> = c.node_admins().await.map_err(|e| e.to_string())?.into_iter().collect();
    let now = cluster::records::unix_ms();
    let preferred = c.vm(name).await.ok().flatten().map(|v| v.value.preferred_owners).unwrap_or_default();
    let mut fit: Vec<(String, u64)> = vec![];
    for n in nodes {
        let r = n.value;
        if r.id == dead {
            continue;
        }
        let a = admins.get(&r.id);
        if a.is_some_and(|a| a.paused || a.draining || a.quarantined_until_unix_ms.is_some_and(|q| q > now)) {
            continue;
        }
        let free = serde_json::from_value::<Offers>(r.offers).map_or(0, |o| o.mem_free_mib);
        if free >= spec.machine.mem_mib {
            fit.push((r.id, free));
        }
    }
    if let Some(p) = preferred.iter().find(|p| fit.iter().any(|(id, _)| id == *p)) {
        return Ok(p.clone());
    }
    fit.iter()
        .max_by_key(|(id, free)| (*free, std::cmp::Reverse(id.clone())))
        .map(|(id, _)| id.clone())
        .ok_or_else(|| format!("no node that takes VMs has {} MiB free", spec.machine.mem_mib))
}
