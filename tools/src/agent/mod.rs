//! `ferry node run`: the node agent. One per node; it is the only thing
//! on a node that talks to etcd.
//!
//! - Registers the node under its etcd lease (kept alive in the
//!   background) with what it [`offers`], and keeps that record current.
//! - Watches the cluster's `vms/` keys (an etcd watch: no polling) and
//!   runs exactly the VMs whose owner key names this node, each as its own
//!   `ferry run` VMM ([`process`]), with its taps on the node's VM bridge
//!   ([`tap`]) made before the boot and removed once the VM has left.
//! - Reports each VM's state in `vms/<name>/status`, under its node lease.
//! - Re-adopts running VMMs from their API sockets when it restarts, so
//!   an agent crash never stops or duplicates a VM.
//! - Fences itself: if its lease cannot be renewed until shortly before
//!   it may expire, it kills its VMMs and exits, before any other node
//!   may take the VMs over.

pub mod offers;
pub mod process;
pub mod spec;
pub mod tap;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use cluster::{
    ChangeKind, Cluster, ClusterKey, Error as ClusterError, LeaseState, NodeLease, NodeRecord, Owner, Store,
    StoreConfig, Takeover, VmRecord, VmStatus, FORMAT_VERSION,
};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use process::Event;
use spec::VmSpec;

/// How the agent is configured (`ferry node run`'s flags).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub etcd: String,
    pub cluster: String,
    pub node_id: String,
    pub vm_bridge: String,
    pub state_dir: PathBuf,
    pub lease_ttl: Duration,
    pub disk_lease_ttl_ms: u64,
    pub address: Option<String>,
    pub kvm_device: PathBuf,
}

/// How long a VMM may take to answer its API after being started.
const BOOT_LIMIT: Duration = Duration::from_secs(30);
/// How long a clean stop (`vm.shutdown`) may take before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The fencing margin: the agent kills its VMMs this long before its
/// lease could expire in etcd. `valid_until` is measured from when the
/// last successful renewal was *sent*, so etcd's expiry is never earlier;
/// the margin covers killing the VMMs (a SIGKILL each, milliseconds) and
/// this host's timer running late. A fifth of the TTL, at least 500 ms.
pub fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(500))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Spawned; its API has not answered yet.
    Starting,
    Running,
    /// `vm.shutdown` sent.
    Stopping,
}

/// A VMM this agent supervises.
struct Local {
    pid: u32,
    epoch: u64,
    taps: Vec<String>,
    mem_mib: u64,
    phase: Phase,
    adopted: bool,
}

struct Agent {
    cfg: AgentConfig,
    cluster: Cluster,
    node: NodeLease,
    record: NodeRecord,
    ferry: PathBuf,
    /// What etcd says.
    vms: HashMap<String, VmRecord>,
    owners: HashMap<String, Owner>,
    /// What runs here.
    local: BTreeMap<String, Local>,
    /// VMs whose VMM ended by itself, by the owner epoch they ran under:
    /// not restarted until the owner changes.
    ended: HashMap<String, u64>,
    events_tx: UnboundedSender<Event>,
}

/// Holds an exclusive lock on the state directory for the agent's life:
/// one agent per state dir.
struct StateLock(#[allow(dead_code)] std::fs::File);

fn lock_state_dir(dir: &Path) -> anyhow::Result<StateLock> {
    std::fs::create_dir_all(dir.join("vms")).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another agent is running with state dir {}", dir.display());
    }
    Ok(StateLock(f))
}

/// Runs the agent until a stop signal (exit 0: its VMs keep running, a
/// restarted agent adopts them) or until it must fence itself (exit 3).
pub fn run(cfg: AgentConfig) -> anyhow::Result<i32> {
    cluster::keys::validate_name("node id", &cfg.node_id)?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    crate::signals::block();
    let (sig_tx, sig_rx) = mpsc::unbounded_channel();
    crate::signals::forward_with(move |sig| {
        let _ = sig_tx.send(sig);
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(start(cfg, sig_rx))
}

async fn start(cfg: AgentConfig, signals: UnboundedReceiver<i32>) -> anyhow::Result<i32> {
    let store = Store::connect(StoreConfig::parse_list(&cfg.etcd)).await?;
    let cluster = Cluster::new(store, &cfg.cluster)?;
    let ferry = std::env::current_exe().context("cannot find the ferry binary")?;
    let mut record = NodeRecord {
        v: FORMAT_VERSION,
        id: cfg.node_id.clone(),
        address: cfg.address.clone(),
        ferry_version: env!("CARGO_PKG_VERSION").to_owned(),
        offers: serde_json::Value::Null,
        registered_unix_ms: cluster::records::unix_ms(),
    };
    let cpu = offers::cpu_summary(&cfg.kvm_device);
    let (total, free) = offers::meminfo();
    let offers = offers::Offers {
        mem_total_mib: total,
        mem_free_mib: free,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        vm_bridge: cfg.vm_bridge.clone(),
        vms: 0,
    };
    record.offers = serde_json::to_value(&offers)?;
    let node = register(&cluster, &cfg, &record).await?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut agent = Agent {
        cfg,
        cluster,
        node,
        record,
        ferry,
        vms: HashMap::new(),
        owners: HashMap::new(),
        local: BTreeMap::new(),
        ended: HashMap::new(),
        events_tx,
    };
    agent.run(events_rx, signals).await
}

/// Registers the node. A key still held by the lease this state dir's
/// previous agent recorded (it crashed or was restarted: the state lock
/// says it is gone) is taken over at once; any other live holder is
/// refused.
async fn register(cluster: &Cluster, cfg: &AgentConfig, record: &NodeRecord) -> anyhow::Result<NodeLease> {
    let lease_file = cfg.state_dir.join("node-lease");
    let node = match cluster.register_node(record, cfg.lease_ttl, Takeover::Refuse).await {
        Ok(n) => n,
        Err(ClusterError::NodeHeld { lease, .. }) => {
            let ours = std::fs::read_to_string(&lease_file)
                .ok()
                .and_then(|s| i64::from_str_radix(s.trim(), 16).ok())
                .is_some_and(|l| l == lease);
            if !ours {
                bail!("node {} is registered by another agent (lease {lease:x}) that is still alive", cfg.node_id);
            }
            tracing::info!("node {}: taking over from this node's previous agent (lease {lease:x})", cfg.node_id);
            cluster.register_node(record, cfg.lease_ttl, Takeover::Replace).await?
        }
        Err(e) => return Err(e.into()),
    };
    std::fs::write(&lease_file, format!("{:x}\n", node.lease.id()))?;
    eprintln!(
        "ferry node: {} registered in cluster {} (lease {:x}, TTL {:?})",
        cfg.node_id,
        cfg.cluster,
        node.lease.id(),
        node.lease.ttl()
    );
    Ok(node)
}

impl Agent {
    fn me(&self) -> &str {
        &self.cfg.node_id
    }

    async fn run(
        &mut self,
        mut events: UnboundedReceiver<Event>,
        mut signals: UnboundedReceiver<i32>,
    ) -> anyhow::Result<i32> {
        let mut watch = self.relist().await?;
        self.adopt_all().await;
        let names: Vec<String> = self.owners.keys().chain(self.local.keys()).cloned().collect();
        for name in names {
            self.reconcile(&name).await;
        }
        self.publish().await;
        let mut lease = self.node.lease.subscribe();
        let margin = fence_margin(self.node.lease.ttl());
        eprintln!("ferry node: {} watching for its VMs ({} running here)", self.me(), self.local.len());
        loop {
            let fence_at = match *lease.borrow() {
                LeaseState::Held { valid_until } => valid_until.checked_sub(margin).unwrap_or_else(Instant::now),
                LeaseState::Lost(_) => Instant::now(),
            };
            tokio::select! {
                ch = watch.next() => match ch {
                    Some(Ok(ch)) => self.on_change(ch).await,
                    Some(Err(ClusterError::Compacted { .. })) | None => {
                        tracing::warn!("the VM watch ended; listing again");
                        watch = self.relist().await?;
                        let names: Vec<String> = self.owners.keys().chain(self.local.keys()).cloned().collect();
                        for name in names {
                            self.reconcile(&name).await;
                        }
                    }
                    Some(Err(e)) => tracing::warn!("VM watch: {e} (it keeps trying)"),
                },
                Some(ev) = events.recv() => self.on_event(ev).await,
                r = lease.changed() => {
                    if r.is_err() {
                        // The keepalive task is gone: treat as lost.
                        return Ok(self.fence("the keepalive task ended"));
                    }
                }
                _ = tokio::time::sleep_until(fence_at) => {
                    let why = match self.node.lease.state() {
                        LeaseState::Lost(r) => format!("the node lease is lost: {r}"),
                        LeaseState::Held { .. } => format!("the node lease was not renewed; it may expire within {margin:?}"),
                    };
                    return Ok(self.fence(&why));
                }
                Some(sig) = signals.recv() => {
                    eprintln!(
                        "ferry node: signal {sig}: the agent stops; its {} VM(s) keep running and the next agent adopts them",
                        self.local.len()
                    );
                    return Ok(0);
                }
            }
        }
    }

    /// Kills every VMM (they must stop before anyone may take their VMs
    /// over) and ends the agent.
    fn fence(&mut self, why: &str) -> i32 {
        eprintln!("ferry node: fencing: {why}; killing {} VMM(s)", self.local.len());
        for (name, l) in &self.local {
            tracing::warn!("fencing VM {name} (pid {})", l.pid);
            process::kill(l.pid);
        }
        3
    }

    /// Reads every VM and owner, and watches from just after.
    async fn relist(&mut self) -> anyhow::Result<cluster::Watch> {
        let keys = self.cluster.keys().clone();
        let listing = self.cluster.store().list(&keys.vms_prefix()).await?;
        self.vms.clear();
        self.owners.clear();
        for kv in &listing.kvs {
            match keys.parse(&kv.key) {
                Some(ClusterKey::Vm(n)) => match cluster::records::decode::<VmRecord>(&kv.key, &kv.value) {
                    Ok(r) => {
                        self.vms.insert(n, r);
                    }
                    Err(e) => tracing::warn!("{e}"),
                },
                Some(ClusterKey::VmOwner(n)) => match cluster::records::decode::<Owner>(&kv.key, &kv.value) {
                    Ok(o) => {
                        self.owners.insert(n, o);
                    }
                    Err(e) => tracing::warn!("{e}"),
                },
                _ => {}
            }
        }
        Ok(self.cluster.watch_vms(listing.revision + 1).await?)
    }

    async fn on_change(&mut self, ch: cluster::Change) {
        let name = match self.cluster.keys().parse(&ch.kv.key) {
            Some(ClusterKey::Vm(n)) => {
                match ch.kind {
                    ChangeKind::Put => match cluster::records::decode::<VmRecord>(&ch.kv.key, &ch.kv.value) {
                        Ok(r) => {
                            self.vms.insert(n.clone(), r);
                        }
                        Err(e) => tracing::warn!("{e}"),
                    },
                    ChangeKind::Delete => {
                        self.vms.remove(&n);
                    }
                }
                n
            }
            Some(ClusterKey::VmOwner(n)) => {
                match ch.kind {
                    ChangeKind::Put => match cluster::records::decode::<Owner>(&ch.kv.key, &ch.kv.value) {
                        Ok(o) => {
                            self.owners.insert(n.clone(), o);
                        }
                        Err(e) => tracing::warn!("{e}"),
                    },
                    ChangeKind::Delete => {
                        self.owners.remove(&n);
                    }
                }
                n
            }
            _ => return,
        };
        self.reconcile(&name).await;
    }

    /// The owner epoch under which this node should run `name`, if any.
    fn wanted(&self, name: &str) -> Option<u64> {
        let owner = self.owners.get(name)?;
        if owner.node.as_deref() != Some(self.me()) || !self.vms.contains_key(name) || !self.node.lease.is_held() {
            return None;
        }
        Some(owner.epoch)
    }

    /// Makes what runs here match what etcd says for one VM.
    async fn reconcile(&mut self, name: &str) {
        let wanted = self.wanted(name);
        let phase = self.local.get(name).map(|l| l.phase);
        match (wanted, phase) {
            (Some(epoch), None) => {
                if self.ended.get(name) == Some(&epoch) {
                    return;
                }
                self.ended.remove(name);
                self.boot(name, epoch).await;
            }
            (Some(epoch), Some(Phase::Starting | Phase::Running)) => {
                let l = self.local.get_mut(name).expect("present");
                if l.epoch != epoch {
                    l.epoch = epoch;
                    let state = if l.phase == Phase::Running { "Running" } else { "Starting" };
                    self.status(name, state, "").await;
                }
            }
            (None, Some(Phase::Starting | Phase::Running)) => self.stop(name).await,
            // Stopping: once it has exited, reconcile runs again.
            (_, Some(Phase::Stopping)) | (None, None) => {}
        }
    }

    async fn boot(&mut self, name: &str, epoch: u64) {
        let Some(record) = self.vms.get(name) else { return };
        let spec = match VmSpec::from_record(record) {
            Ok(s) => s,
            Err(e) => {
                self.ended.insert(name.to_owned(), epoch);
                return self
                    .status_epoch(name, epoch, "Failed", &format!("its stored config is unreadable: {e}"))
                    .await;
            }
        };
        let taps: Vec<String> = (0..spec.machine.nics.len()).map(|i| spec::tap_name(name, i)).collect();
        let mut result = Ok(0);
        for (i, tap) in taps.iter().enumerate() {
            if let Err(e) = tap::ensure(tap, spec.bridge(i, &self.cfg.vm_bridge)) {
                result = Err(e);
                break;
            }
        }
        let dir = process::vm_dir(&self.cfg.state_dir, name);
        if result.is_ok() {
            let launch = process::Launch {
                ferry: &self.ferry,
                dir: &dir,
                machine: &spec.machine,
                taps: &taps,
                host_id: &self.cfg.node_id,
                disk_lease_ttl_ms: self.cfg.disk_lease_ttl_ms,
                kvm_device: &self.cfg.kvm_device,
            };
            result = process::spawn(name, &launch, &self.events_tx);
        }
        let pid = match result {
            Ok(pid) => pid,
            Err(e) => {
                taps.iter().for_each(|t| tap::remove(t));
                self.ended.insert(name.to_owned(), epoch);
                return self.status_epoch(name, epoch, "Failed", &format!("{e:#}")).await;
            }
        };
        eprintln!("ferry node: VM {name}: started (pid {pid}, owner epoch {epoch})");
        let mem_mib = spec.machine.mem_mib;
        self.local.insert(name.to_owned(), Local { pid, epoch, taps, mem_mib, phase: Phase::Starting, adopted: false });
        self.status(name, "Starting", "").await;
        let (n, sock, tx) = (name.to_owned(), process::api_sock(&dir), self.events_tx.clone());
        std::thread::spawn(move || process::wait_ready(n, pid, sock, BOOT_LIMIT, tx));
    }

    /// Asks the VMM to stop cleanly; kills it if it has not exited within
    /// [`STOP_LIMIT`].
    async fn stop(&mut self, name: &str) {
        let Some(l) = self.local.get_mut(name) else { return };
        l.phase = Phase::Stopping;
        let pid = l.pid;
        eprintln!("ferry node: VM {name}: its owner is no longer {}; stopping it (pid {pid})", self.cfg.node_id);
        self.status(name, "Stopping", "").await;
        let sock = process::api_sock(&process::vm_dir(&self.cfg.state_dir, name));
        let (n, tx) = (name.to_owned(), self.events_tx.clone());
        tokio::spawn(async move {
            let r = tokio::task::spawn_blocking(move || process::shutdown(&sock)).await;
            if let Ok(Err(e)) = r {
                tracing::warn!("VM {n}: {e}");
            }
            tokio::time::sleep(STOP_LIMIT).await;
            let _ = tx.send(Event::StopOverdue { name: n, pid });
        });
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ready { name, pid, state } => {
                let Some(l) = self.local.get_mut(&name).filter(|l| l.pid == pid) else { return };
                if l.phase == Phase::Starting {
                    l.phase = Phase::Running;
                    eprintln!("ferry node: VM {name}: {state} (pid {pid})");
                    self.status(&name, &state, "").await;
                    self.publish().await;
                }
            }
            Event::NotReady { name, pid, why } => {
                if self.local.get(&name).is_some_and(|l| l.pid == pid && l.phase == Phase::Starting) {
                    tracing::warn!("VM {name}: {why}; killing it");
                    process::kill(pid);
                }
            }
            Event::StopOverdue { name, pid } => {
                if self.local.get(&name).is_some_and(|l| l.pid == pid) && process::alive(pid) {
                    tracing::warn!("VM {name}: no clean stop within {STOP_LIMIT:?}; killing pid {pid}");
                    process::kill(pid);
                }
            }
            Event::Exited { name, pid, code } => {
                if self.local.get(&name).map(|l| l.pid) != Some(pid) {
                    return;
                }
                let l = self.local.remove(&name).expect("present");
                l.taps.iter().for_each(|t| tap::remove(t));
                let how = code.map_or_else(|| "exited".to_owned(), |c| format!("exited with status {c}"));
                if l.phase == Phase::Stopping {
                    eprintln!("ferry node: VM {name}: stopped (VMM {how})");
                    if let Err(e) = self.cluster.delete_vm_status(&name, &self.node).await {
                        tracing::warn!("VM {name}: cannot remove its status: {e}");
                    }
                } else {
                    // It ended on its own (guest shutdown, crash): not
                    // restarted until its owner changes.
                    eprintln!("ferry node: VM {name}: the VMM {how} by itself");
                    self.ended.insert(name.clone(), l.epoch);
                    let state = if code == Some(0) { "Stopped" } else { "Failed" };
                    self.status_epoch(&name, l.epoch, state, &format!("the VMM {how} by itself")).await;
                }
                self.publish().await;
                self.reconcile(&name).await;
            }
        }
    }

    /// Finds the VMMs a previous agent left running.
    async fn adopt_all(&mut self) {
        let root = self.cfg.state_dir.join("vms");
        let Ok(entries) = std::fs::read_dir(&root) else { return };
        for e in entries.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
            if cluster::keys::validate_name("VM name", &name).is_err() {
                continue;
            }
            let dir = e.path();
            let (taps, mem_mib): (Vec<String>, u64) = match std::fs::read(dir.join("machine.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<vmm::config::MachineConfig>(&b).ok())
            {
                Some(m) => ((0..m.nics.len()).map(|i| spec::tap_name(&name, i)).collect(), m.mem_mib),
                None => (vec![], 0),
            };
            let Some((pid, state)) = process::adopt(&name, &dir, &self.events_tx) else {
                // Its VMM is gone (it ended while no agent ran): a tap it
                // left behind goes too, unless the VM is to boot here.
                if self.wanted(&name).is_none() {
                    taps.iter().for_each(|t| tap::remove(t));
                }
                continue;
            };
            let epoch = self.owners.get(&name).map_or(0, |o| o.epoch);
            eprintln!("ferry node: VM {name}: adopted the running VMM (pid {pid}, {state})");
            self.local.insert(name.clone(), Local { pid, epoch, taps, mem_mib, phase: Phase::Running, adopted: true });
            if self.wanted(&name).is_some() {
                self.status(&name, &state, "re-adopted by a restarted agent").await;
            }
        }
    }

    async fn status(&self, name: &str, state: &str, detail: &str) {
        let Some(l) = self.local.get(name) else { return };
        let detail = if detail.is_empty() && l.adopted { "re-adopted by a restarted agent" } else { detail };
        let s = VmStatus {
            v: FORMAT_VERSION,
            node: self.cfg.node_id.clone(),
            epoch: l.epoch,
            state: state.to_owned(),
            pid: Some(l.pid),
            detail: detail.to_owned(),
            since_unix_ms: cluster::records::unix_ms(),
        };
        if let Err(e) = self.cluster.put_vm_status(name, &self.node, &s).await {
            tracing::warn!("VM {name}: cannot publish its status: {e}");
        }
    }

    async fn status_epoch(&self, name: &str, epoch: u64, state: &str, detail: &str) {
        eprintln!("ferry node: VM {name}: {state}: {detail}");
        let s = VmStatus {
            v: FORMAT_VERSION,
            node: self.cfg.node_id.clone(),
            epoch,
            state: state.to_owned(),
            pid: None,
            detail: detail.to_owned(),
            since_unix_ms: cluster::records::unix_ms(),
        };
        if let Err(e) = self.cluster.put_vm_status(name, &self.node, &s).await {
            tracing::warn!("VM {name}: cannot publish its status: {e}");
        }
    }

    /// Rewrites the node record with what it offers now.
    async fn publish(&mut self) {
        let mut o: offers::Offers = serde_json::from_value(self.record.offers.clone()).unwrap_or_default();
        let (total, avail) = offers::meminfo();
        let committed: u64 = self.local.values().map(|l| l.mem_mib).sum();
        o.mem_total_mib = total;
        o.mem_free_mib = avail.min(total.saturating_sub(committed));
        o.vms = self.local.len();
        self.record.offers = serde_json::to_value(&o).unwrap_or_default();
        if let Err(e) = self.cluster.update_node(&self.node, &self.record).await {
            tracing::warn!("cannot update node {}'s record: {e}", self.cfg.node_id);
        }
    }
}
