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
//!    owners, then free memory; never one that is paused, draining or
//!    quarantined, or lacks a CPU feature of the VM's profile) by
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

use vmm::arch::x86_64::cpu_profile::CpuProfile;

use super::offers::{self, Offers};
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
/// quarantined, with the memory and the VM's CPU features; preferred
/// owners first, then the most free memory.
async fn place(c: &Cluster, spec: &VmSpec, dead: &str, name: &str) -> Result<String, String> {
    let nodes = c.nodes().await.map_err(|e| e.to_string())?;
    let admins: HashMap<String, NodeAdmin> = c.node_admins().await.map_err(|e| e.to_string())?.into_iter().collect();
    let now = cluster::records::unix_ms();
    let preferred = c.vm(name).await.ok().flatten().map(|v| v.value.preferred_owners).unwrap_or_default();
    let candidates: Vec<Candidate> = nodes
        .into_iter()
        .map(|n| n.value)
        .filter(|r| r.id != dead)
        .map(|r| {
            let a = admins.get(&r.id);
            let excluded = match a {
                Some(a) if a.quarantined_until_unix_ms.is_some_and(|q| q > now) => Some("quarantined"),
                Some(a) if a.draining => Some("draining"),
                Some(a) if a.paused => Some("paused"),
                _ => None,
            };
            let offers = serde_json::from_value::<Offers>(r.offers).unwrap_or_default();
            Candidate { id: r.id, excluded, mem_free_mib: offers.mem_free_mib, cpu: offers.cpu }
        })
        .collect();
    choose(&candidates, spec.machine.mem_mib, spec.machine.cpu_profile.as_ref(), &preferred)
}

/// A surviving node as placement sees it.
#[derive(Clone, Debug)]
struct Candidate {
    id: String,
    /// Why it takes no VMs (paused, draining, quarantined), if so.
    excluded: Option<&'static str>,
    mem_free_mib: u64,
    cpu: Option<offers::CpuSummary>,
}

/// The placement decision: of the nodes that take VMs, have `mem_mib`
/// free and offer every CPU feature of the VM's profile (a VM without one
/// boots on whatever CPU its node has), the first of `preferred`, else
/// the one with the most free memory (ties: the lowest id). The error
/// names why each node was passed over.
fn choose(
    candidates: &[Candidate],
    mem_mib: u64,
    cpu_profile: Option<&CpuProfile>,
    preferred: &[String],
) -> Result<String, String> {
    let mut fit: Vec<&Candidate> = vec![];
    let mut passed_over = vec![];
    for n in candidates {
        let why = if let Some(x) = n.excluded {
            Some(x.to_owned())
        } else if n.mem_free_mib < mem_mib {
            Some(format!("{} MiB free", n.mem_free_mib))
        } else {
            cpu_profile.and_then(|p| match &n.cpu {
                None => Some("its CPU is unknown".to_owned()),
                Some(cpu) => cpu.cannot_offer(p),
            })
        };
        match why {
            None => fit.push(n),
            Some(why) => passed_over.push(format!("{}: {why}", n.id)),
        }
    }
    if let Some(p) = preferred.iter().find(|p| fit.iter().any(|n| n.id == **p)) {
        return Ok(p.clone());
    }
    if let Some(n) = fit.iter().max_by_key(|n| (n.mem_free_mib, std::cmp::Reverse(&n.id))) {
        return Ok(n.id.clone());
    }
    let cpu = if cpu_profile.is_some() { " and the VM's CPU features" } else { "" };
    let why = if passed_over.is_empty() { "no other node is up".to_owned() } else { passed_over.join("; ") };
    Err(format!("no node that takes VMs has {mem_mib} MiB free{cpu} ({why})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::arch::x86_64::cpu_features::CpuidLeaf;

    /// A profile with leaf 0 (GenuineIntel) and leaf 7's EBX as given
    /// (bit 5 avx2, bit 16 avx512f).
    fn profile(leaf7_ebx: u32) -> CpuProfile {
        let vendor =
            CpuidLeaf { function: 0, index: 0, eax: 0xd, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69 };
        let leaf7 = CpuidLeaf { function: 7, index: 0, eax: 0, ebx: leaf7_ebx, ecx: 0, edx: 0 };
        CpuProfile::from_leaves("test", &[vendor, leaf7], Default::default())
    }

    fn node(id: &str, free: u64, leaf7_ebx: u32) -> Candidate {
        let p = profile(leaf7_ebx);
        let cpu = offers::CpuSummary {
            vendor: p.vendor,
            features: p.features.len(),
            digest: String::new(),
            leaves: p.leaves,
        };
        Candidate { id: id.into(), excluded: None, mem_free_mib: free, cpu: Some(cpu) }
    }

    const AVX2: u32 = 1 << 5;
    const AVX512F: u32 = 1 << 16;

    #[test]
    fn preferred_owners_first_then_the_most_free_memory() {
        let nodes = [node("a", 4000, AVX2), node("b", 1000, AVX2), node("c", 2000, AVX2)];
        assert_eq!(choose(&nodes, 512, None, &["c".into(), "b".into()]), Ok("c".into()));
        assert_eq!(choose(&nodes, 512, None, &[]), Ok("a".into()));
        assert_eq!(choose(&nodes, 1500, None, &["b".into()]), Ok("a".into()), "b lacks the memory");
        let tie = [node("b", 1000, AVX2), node("a", 1000, AVX2)];
        assert_eq!(choose(&tie, 512, None, &[]), Ok("a".into()));
    }

    #[test]
    fn nodes_that_lack_the_vms_cpu_features_are_passed_over() {
        let wants_avx512 = profile(AVX2 | AVX512F);
        let nodes = [node("a", 8000, AVX2), node("b", 1000, AVX2 | AVX512F), node("c", 2000, AVX2 | AVX512F)];
        // a has the most memory and is preferred, but not the CPU.
        assert_eq!(choose(&nodes, 512, Some(&wants_avx512), &["a".into()]), Ok("c".into()));
        // A baseline every node meets: the usual order.
        assert_eq!(choose(&nodes, 512, Some(&profile(AVX2)), &[]), Ok("a".into()));
        let err = choose(&nodes[..1], 512, Some(&wants_avx512), &[]).unwrap_err();
        assert!(err.contains("and the VM's CPU features") && err.contains("a: lacks avx512f"), "{err}");
    }

    #[test]
    fn unknown_cpus_and_excluded_nodes_take_nothing_and_say_why() {
        let mut unknown = node("a", 8000, AVX2);
        unknown.cpu = None;
        let mut old_agent = node("b", 8000, AVX2);
        old_agent.cpu.as_mut().unwrap().leaves.clear();
        let mut paused = node("c", 8000, AVX2);
        paused.excluded = Some("paused");
        let nodes = [unknown.clone(), old_agent, paused];
        let err = choose(&nodes, 512, Some(&profile(AVX2)), &[]).unwrap_err();
        assert!(err.contains("a: its CPU is unknown"), "{err}");
        assert!(err.contains("b: its CPU features are not published"), "{err}");
        assert!(err.contains("c: paused"), "{err}");
        // A VM without a CPU profile does not care what the CPU is.
        assert_eq!(choose(&nodes, 512, None, &[]), Ok("a".into()));
        assert!(choose(&[], 512, None, &[]).unwrap_err().contains("no other node is up"));
    }

    #[test]
    fn another_vendor_never_fits() {
        let mut amd = node("a", 8000, AVX2 | AVX512F);
        amd.cpu.as_mut().unwrap().vendor = "AuthenticAMD".into();
        let err = choose(&[amd], 512, Some(&profile(AVX2)), &[]).unwrap_err();
        assert!(err.contains("its CPU is AuthenticAMD, the VM's profile GenuineIntel"), "{err}");
    }
}
