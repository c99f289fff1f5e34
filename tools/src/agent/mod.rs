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
//! - Moves VMs as the cluster asks ([`moves`]): as the source it drives
//!   the VMM's live or quick migration and commits it by the etcd
//!   transaction that changes the owner; as the destination it starts
//!   `ferry receive` and runs the VM once the owner key names this node.
//! - Fences itself: if its lease cannot be renewed until shortly before
//!   it may expire, it kills its VMMs and exits, before any other node
//!   may take the VMs over. The next agent records that fence as an
//!   event ([`fence_note`]).
//! - Has a [`watchdog`]: if its main task stops running (stuck in a
//!   syscall, deadlocked), the watchdog thread kills its VMMs and ends
//!   the agent (exit 4).
//! - Runs the commands the cluster asks of the node ([`node_command`]:
//!   an update's command) and reports its [`health`] when it starts.

pub mod fence_note;
pub mod health;
pub mod leader;
pub mod moves;
pub mod node_command;
pub mod offers;
pub mod process;
pub mod spec;
pub mod tap;
pub mod watchdog;
pub mod witness;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cluster::{
    ChangeKind, Cluster, ClusterKey, Error as ClusterError, HistoryEntry, HistoryKind, IncomingRecord, LeaseState,
    MoveRecord, NodeLease, NodeRecord, Owner, Store, StoreConfig, Takeover, VmRecord, VmStatus, FORMAT_VERSION,
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
    /// The cluster's migration key (the same file on every node).
    pub key_file: PathBuf,
    /// A directory on the shared volume for the witness heartbeats (None:
    /// the cluster record's volume, if there is one).
    pub witness: Option<PathBuf>,
    /// Quarantine a node seen down this many times within an hour...
    pub quarantine_after: usize,
    /// ...for this long.
    pub quarantine_for: Duration,
    /// Join the cluster paused (`ferry node run --paused`): the node takes
    /// no VMs until `ferry node resume`.
    pub paused: bool,
    /// The binary and arguments the agent was started with (a restart
    /// runs them again).
    pub exe: PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

/// Test-only: once the file this names exists, the agent's main loop
/// hangs (blocks its thread for good), as a loop stuck in a syscall
/// would; the watchdog then fences the node. The end-to-end tests use it.
pub const TEST_HANG_FILE: &str = "FERRY_AGENT_TEST_HANG_FILE";

/// The test hook's hang ([`TEST_HANG_FILE`]).
fn test_hang() -> ! {
    eprintln!(
        "ferry node: test hook {TEST_HANG_FILE}: the main loop hangs now (at_unix_ms={})",
        cluster::records::unix_ms()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// How long a VMM may take to answer its API after being started.
const BOOT_LIMIT: Duration = Duration::from_secs(30);
/// How long a clean stop (`vm.shutdown`) may take before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long a move's destination may take to listen, and its source to
/// see that, before the move is withdrawn.
const INCOMING_LIMIT: Duration = Duration::from_secs(30);

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
    /// A `ferry receive` waiting for the VM of a move to this node.
    Incoming,
    /// Moving away; `started` once `vm.migrate` was sent.
    MigratingOut {
        started: bool,
    },
}

/// A VMM this agent supervises.
struct Local {
    pid: u32,
    epoch: u64,
    taps: Vec<String>,
    mem_mib: u64,
    phase: Phase,
    adopted: bool,
    /// The move it takes part in (Incoming, MigratingOut).
    mv: Option<MoveRecord>,
    /// The move's gate or oracle socket server.
    server: Option<tokio::task::JoinHandle<()>>,
    /// Incoming and committed: waiting for the VMM's API.
    ready_wait: bool,
}

impl Local {
    fn end_move(&mut self) -> Option<MoveRecord> {
        if let Some(t) = self.server.take() {
            t.abort();
        }
        self.mv.take()
    }
}

struct Agent {
    cfg: AgentConfig,
    cluster: Cluster,
    node: Arc<NodeLease>,
    /// Campaigning for, or holding, the leadership.
    leader: Option<tokio::task::JoinHandle<()>>,
    witness: Option<Arc<witness::Witness>>,
    _witness_stop: Option<Arc<AtomicBool>>,
    record: NodeRecord,
    ferry: PathBuf,
    /// What etcd says.
    vms: HashMap<String, VmRecord>,
    owners: HashMap<String, Owner>,
    moves: HashMap<String, MoveRecord>,
    incomings: HashMap<String, IncomingRecord>,
    /// What runs here.
    local: BTreeMap<String, Local>,
    /// VMs whose VMM ended by itself, by the owner epoch they ran under:
    /// not restarted until the owner changes.
    ended: HashMap<String, u64>,
    events_tx: UnboundedSender<Event>,
    watchdog: Arc<watchdog::Watchdog>,
}

/// Applies one key of a VM to what the agent knows: a put decoded into
/// `map` (a record that does not decode is logged and skipped), a delete
/// removed. Returns the VM's name.
fn apply<T: cluster::records::Record>(
    map: &mut HashMap<String, T>,
    name: String,
    key: &str,
    value: &[u8],
    put: bool,
) -> String {
    if !put {
        map.remove(&name);
        return name;
    }
    match cluster::records::decode::<T>(key, value) {
        Ok(r) => {
            map.insert(name.clone(), r);
        }
        Err(e) => tracing::warn!("{e}"),
    }
    name
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
    // Moves need it; better to say so now than at the first drain.
    migrate::auth::Key::load(&cfg.key_file)
        .with_context(|| format!("the cluster key {} (create it with `ferry keygen`)", cfg.key_file.display()))?;
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
    if cfg.paused {
        // Before the node record exists, so no VM is placed here first.
        pause_before_joining(&cluster, &cfg.node_id).await?;
    }
    let node = Arc::new(register(&cluster, &cfg, &record).await?);
    fence_note::record(&cluster, &cfg.node_id, &cfg.state_dir).await;
    let witness_root = match &cfg.witness {
        Some(w) => Some(w.clone()),
        None => cluster.cluster_record().await.ok().flatten().map(|r| PathBuf::from(r.value.volume)),
    };
    let witness = match witness_root {
        Some(root) => {
            let w = witness::Witness::new(&root, &cfg.cluster, &cfg.node_id)
                .with_context(|| format!("the witness directory under {}", root.display()))?;
            eprintln!("ferry node: witness heartbeats in {}", w.dir().display());
            Some(Arc::new(w))
        }
        None => None,
    };
    let witness_stop = witness.as_ref().map(|w| w.start(node.lease.ttl() / 3));
    // Armed when the main loop starts (Agent::run).
    let dog = watchdog::Watchdog::new(watchdog::deadline_for(node.lease.ttl()));
    let note_dir = cfg.state_dir.clone();
    dog.start(move |why, pids| watchdog::exit_hung(why, pids, &note_dir));
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut agent = Agent {
        cfg,
        cluster,
        node,
        leader: None,
        witness,
        _witness_stop: witness_stop,
        record,
        ferry,
        vms: HashMap::new(),
        owners: HashMap::new(),
        moves: HashMap::new(),
        incomings: HashMap::new(),
        local: BTreeMap::new(),
        ended: HashMap::new(),
        events_tx,
        watchdog: dog.clone(),
    };
    let period = watchdog::period_for(dog.deadline());
    watchdog::petted(&dog, period, agent.run(events_rx, signals)).await
}

/// Marks the node paused (its admin record, which has no lease) before it
/// registers. etcd may still be coming back: retried for a while; the
/// write is a plain put of the same value, so an unknown outcome is
/// simply tried again.
async fn pause_before_joining(cluster: &Cluster, node: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let mut admin = cluster.node_admin(node).await?.unwrap_or_default();
            admin.v = FORMAT_VERSION;
            admin.paused = true;
            cluster.set_node_admin(node, &admin).await
        };
        match attempt.await {
            Ok(()) => {
                eprintln!("ferry node: {node} joins paused: it takes no VMs until `ferry node resume {node}`");
                return Ok(());
            }
            Err(e)
                if Instant::now() < deadline
                    && (e.outcome_unknown() || matches!(e, ClusterError::Unavailable { .. })) =>
            {
                eprintln!("ferry node: cannot mark {node} paused yet ({e}); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context(format!("cannot mark node {node} paused")),
        }
    }
}

/// Registers the node. A key still held by the lease this state dir's
/// previous agent recorded (it crashed or was restarted: the state lock
/// says it is gone) is taken over at once; any other live holder is
/// refused.
async fn register(cluster: &Cluster, cfg: &AgentConfig, record: &NodeRecord) -> anyhow::Result<NodeLease> {
    // etcd may still be coming back (a healed partition, a member
    // restarting): keep trying for a while. After an unknown outcome, a
    // registration half made under a lease this call dropped is gone once
    // that lease's TTL has passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match register_once(cluster, cfg, record).await {
            Err(e) if Instant::now() < deadline => {
                let unknown = e.downcast_ref::<ClusterError>().is_some_and(|c| c.outcome_unknown());
                let transient = unknown
                    || e.downcast_ref::<ClusterError>().is_some_and(|c| matches!(c, ClusterError::Unavailable { .. }));
                if !transient {
                    return Err(e);
                }
                eprintln!("ferry node: cannot register yet ({e}); trying again");
                tokio::time::sleep(if unknown {
                    cfg.lease_ttl + Duration::from_millis(500)
                } else {
                    Duration::from_secs(1)
                })
                .await;
            }
            r => return r,
        }
    }
}

async fn register_once(cluster: &Cluster, cfg: &AgentConfig, record: &NodeRecord) -> anyhow::Result<NodeLease> {
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

    /// Tells the watchdog which VMMs to kill should this loop hang: at
    /// each iteration, and at once when a VMM starts.
    fn track(&self) {
        self.watchdog.track(self.local.values().map(|l| l.pid));
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
        self.campaign();
        self.serve_cluster_requests();
        // A restart asked before this agent started is done by starting.
        let restart_key = self.cluster.keys().node_restart(self.me());
        let _ = self.cluster.store().delete(&restart_key).await;
        let mut restarts = self.cluster.store().watch_prefix(&restart_key, 0).await?;
        let mut lease = self.node.lease.subscribe();
        let margin = fence_margin(self.node.lease.ttl());
        let hang_file = std::env::var_os(TEST_HANG_FILE).map(PathBuf::from);
        let mut hang_check = tokio::time::interval(Duration::from_millis(100));
        self.watchdog.pet();
        eprintln!(
            "ferry node: {} watching for its VMs ({} running here; watchdog deadline {:?})",
            self.me(),
            self.local.len(),
            self.watchdog.deadline()
        );
        loop {
            self.track();
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
                Some(Ok(ch)) = restarts.next() => {
                    if ch.kind == ChangeKind::Put {
                        self.restart_self(&ch.kv.key).await;
                    }
                }
                r = lease.changed() => {
                    if r.is_err() {
                        // The keepalive task is gone: treat as lost.
                        if let Some(code) = self.lease_lost("the keepalive task ended").await {
                            return Ok(code);
                        }
                        lease = self.node.lease.subscribe();
                        watch = self.rejoin().await?;
                    }
                }
                _ = tokio::time::sleep_until(fence_at) => {
                    let why = match self.node.lease.state() {
                        LeaseState::Lost(r) => format!("the node lease is lost: {r}"),
                        LeaseState::Held { .. } => format!("the node lease was not renewed; it may expire within {margin:?}"),
                    };
                    if let Some(code) = self.lease_lost(&why).await {
                        return Ok(code);
                    }
                    lease = self.node.lease.subscribe();
                    watch = self.rejoin().await?;
                }
                _ = hang_check.tick(), if hang_file.is_some() => {
                    if hang_file.as_ref().is_some_and(|f| f.exists()) {
                        test_hang();
                    }
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

    /// `ferry cluster update` asked this agent to restart (the update may
    /// have replaced the binary): it runs the same path and arguments it
    /// was started with, in place of this process. Its VMs keep running
    /// (their own sessions) and the new agent adopts them.
    async fn restart_self(&mut self, key: &str) {
        if let Err(e) = self.cluster.store().delete(key).await {
            tracing::warn!("restart asked, but its request cannot be cleared ({e}); not restarting");
            return;
        }
        let (exe, args) = (&self.cfg.exe, &self.cfg.args);
        eprintln!("ferry node: restarting as asked: {} (its {} VM(s) keep running)", exe.display(), self.local.len());
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new(exe).args(args).exec();
        eprintln!("ferry node: cannot restart {}: {e}; this agent goes on", exe.display());
    }

    /// Reports this start's health checks and serves the commands the
    /// cluster asks of this node, each in its own task (see [`health`],
    /// [`node_command`]).
    fn serve_cluster_requests(&self) {
        let h = health::Settings {
            node: self.cfg.node_id.clone(),
            kvm_device: self.cfg.kvm_device.clone(),
            vm_bridge: self.cfg.vm_bridge.clone(),
            key_file: self.cfg.key_file.clone(),
            volume: self.cfg.witness.clone(),
            registered_unix_ms: self.record.registered_unix_ms,
        };
        tokio::spawn(health::publish(self.cluster.clone(), h));
        let s = node_command::Settings {
            node: self.cfg.node_id.clone(),
            cluster: self.cfg.cluster.clone(),
            state_dir: self.cfg.state_dir.clone(),
        };
        tokio::spawn(node_command::serve(self.cluster.clone(), s));
    }

    /// Starts campaigning for the leadership under the current node lease.
    fn campaign(&mut self) {
        if let Some(t) = self.leader.take() {
            t.abort();
        }
        let cfg = leader::LeaderConfig {
            me: self.cfg.node_id.clone(),
            quarantine_after: self.cfg.quarantine_after,
            quarantine_for: self.cfg.quarantine_for,
        };
        self.leader = Some(tokio::spawn(leader::run(self.cluster.clone(), self.node.clone(), cfg)));
    }

    /// The node lease is (about to be) lost: fences (Some(exit code)), or
    /// returns None once the lease is renewed after all or the node is
    /// registered again under a new one.
    ///
    /// Without a witness it fences at once. With one (see [`witness`]):
    /// - another node alive: the lease gets one more TTL to come back (an
    ///   etcd leader election stalls renewals for a second or two), then
    ///   the node fences. Waiting is safe for VMs with shared disks: a
    ///   leader restarts them only after their disk leases expire, and
    ///   the VMMs renew those until they are killed. (VMs without disks
    ///   restart only [`leader::DISKLESS_WAIT`] after the node is seen
    ///   down, longer than this takes.)
    /// - nobody else alive: no quorum exists anywhere and nobody can
    ///   restart anything, so the VMs keep running until etcd is back.
    async fn lease_lost(&mut self, why: &str) -> Option<i32> {
        let Some(w) = self.witness.clone() else { return Some(self.fence(why)) };
        if let Some(t) = self.leader.take() {
            t.abort();
        }
        let ttl = self.node.lease.ttl();
        let margin = fence_margin(ttl);
        let lost_at = cluster::records::unix_ms();
        let started = Instant::now();
        // A live node beats within two heartbeat periods.
        let window = (ttl / 3) * 2 + Duration::from_millis(300);
        let mut others_since: Option<Instant> = None;
        let mut said_alone = false;
        loop {
            if let LeaseState::Held { valid_until } = self.node.lease.state() {
                if valid_until > Instant::now() + margin {
                    eprintln!("ferry node: the node lease was renewed after all ({why})");
                    return None;
                }
            } else {
                // Bounded, so the witness is looked at every second or so (a
                // lease granted by an attempt given up on expires by itself).
                let attempt = self.cluster.register_node(&self.record, self.cfg.lease_ttl, Takeover::Replace);
                let result = tokio::time::timeout(Duration::from_secs(1), attempt)
                    .await
                    .unwrap_or(Err(ClusterError::Protocol { op: "register node", what: "no answer within 1 s" }));
                match result {
                    Ok(node) => {
                        let _ =
                            std::fs::write(self.cfg.state_dir.join("node-lease"), format!("{:x}\n", node.lease.id()));
                        eprintln!(
                            "ferry node: etcd is back after {:.1} s: {} registered again (lease {:x})",
                            started.elapsed().as_secs_f64(),
                            self.cfg.node_id,
                            node.lease.id()
                        );
                        self.node = Arc::new(node);
                        return None;
                    }
                    Err(e) => tracing::debug!("still no etcd: {e}"),
                }
            }
            match w.alive_since(lost_at) {
                Ok(o) if o.is_empty() => {
                    if !said_alone && started.elapsed() > window {
                        said_alone = true;
                        eprintln!(
                            "ferry node: {why}; but no other node is alive (witness): etcd has no quorum anywhere \
                             and nobody can restart anything, so the {} VM(s) keep running; waiting for etcd",
                            self.local.len()
                        );
                    }
                }
                Ok(o) => {
                    let t = *others_since.get_or_insert_with(Instant::now);
                    if t.elapsed() > ttl {
                        return Some(self.fence(&format!(
                            "{why}; etcd stayed out of reach and nodes {} are alive and may act on this node's VMs",
                            o.join(", ")
                        )));
                    }
                }
                Err(e) => return Some(self.fence(&format!("{why}; the witness cannot be read ({e})"))),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// After a new registration: everything read again, statuses and the
    /// node record published under the new lease, campaigning again.
    async fn rejoin(&mut self) -> anyhow::Result<cluster::Watch> {
        let watch = self.relist().await?;
        let names: Vec<String> = self.owners.keys().chain(self.local.keys()).cloned().collect();
        for name in names {
            self.reconcile(&name).await;
            if self.local.get(&name).is_some_and(|l| l.phase == Phase::Running) {
                self.status(&name, "Running", "").await;
            }
        }
        self.publish().await;
        self.campaign();
        Ok(watch)
    }

    /// Kills every VMM (they must stop before anyone may take their VMs
    /// over) and ends the agent.
    fn fence(&mut self, why: &str) -> i32 {
        const EXIT_FENCED: i32 = 3;
        eprintln!("ferry node: fencing: {why}; killing {} VMM(s)", self.local.len());
        for (name, l) in &self.local {
            tracing::warn!("fencing VM {name} (pid {})", l.pid);
            process::kill(l.pid);
        }
        let note = fence_note::FenceNote {
            at_unix_ms: cluster::records::unix_ms(),
            why: why.to_owned(),
            killed: self.local.keys().cloned().collect(),
            exit_code: EXIT_FENCED,
        };
        if let Err(e) = fence_note::write(&self.cfg.state_dir, &note) {
            tracing::warn!("cannot leave a note of this fence in {}: {e}", self.cfg.state_dir.display());
        }
        EXIT_FENCED
    }

    /// Reads every VM and owner, and watches from just after.
    async fn relist(&mut self) -> anyhow::Result<cluster::Watch> {
        let keys = self.cluster.keys().clone();
        let listing = self.cluster.store().list(&keys.vms_prefix()).await?;
        self.vms.clear();
        self.owners.clear();
        self.moves.clear();
        self.incomings.clear();
        for kv in &listing.kvs {
            let (key, value) = (&kv.key, &kv.value);
            match keys.parse(key) {
                Some(ClusterKey::Vm(n)) => apply(&mut self.vms, n, key, value, true),
                Some(ClusterKey::VmOwner(n)) => apply(&mut self.owners, n, key, value, true),
                Some(ClusterKey::VmMove(n)) => apply(&mut self.moves, n, key, value, true),
                Some(ClusterKey::VmIncoming(n)) => apply(&mut self.incomings, n, key, value, true),
                _ => continue,
            };
        }
        Ok(self.cluster.watch_vms(listing.revision + 1).await?)
    }

    async fn on_change(&mut self, ch: cluster::Change) {
        let (key, value, put) = (&ch.kv.key, &ch.kv.value, ch.kind == ChangeKind::Put);
        let name = match self.cluster.keys().parse(key) {
            Some(ClusterKey::Vm(n)) => apply(&mut self.vms, n, key, value, put),
            Some(ClusterKey::VmOwner(n)) => apply(&mut self.owners, n, key, value, put),
            Some(ClusterKey::VmMove(n)) => apply(&mut self.moves, n, key, value, put),
            Some(ClusterKey::VmIncoming(n)) => apply(&mut self.incomings, n, key, value, put),
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
        self.reconcile_move(name).await;
        let wanted = self.wanted(name);
        let phase = self.local.get(name).map(|l| l.phase);
        match (wanted, phase) {
            // A move's own steps decide (reconcile_move).
            (_, Some(Phase::Incoming | Phase::MigratingOut { .. })) => {}
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
        self.local.insert(
            name.to_owned(),
            Local {
                pid,
                epoch,
                taps,
                mem_mib,
                phase: Phase::Starting,
                adopted: false,
                mv: None,
                server: None,
                ready_wait: false,
            },
        );
        self.track();
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
                if l.phase == Phase::Incoming {
                    l.phase = Phase::Running;
                    let from = l.end_move().map(|m| m.from).unwrap_or_default();
                    eprintln!("ferry node: VM {name}: moved here from {from}; {state} (pid {pid})");
                    self.status(&name, &state, &format!("moved here from {from}")).await;
                    self.publish().await;
                } else if l.phase == Phase::Starting {
                    l.phase = Phase::Running;
                    eprintln!("ferry node: VM {name}: {state} (pid {pid})");
                    self.status(&name, &state, "").await;
                    self.publish().await;
                }
            }
            Event::Listening { name, pid, move_id, endpoint } => {
                let Some(l) = self.local.get(&name).filter(|l| l.pid == pid && l.phase == Phase::Incoming) else {
                    return;
                };
                if l.mv.as_ref().map(|m| m.id.as_str()) != Some(move_id.as_str()) {
                    return;
                }
                eprintln!("ferry node: VM {name}: receiving move {move_id} on {endpoint}");
                let r = IncomingRecord { v: FORMAT_VERSION, move_id, node: self.cfg.node_id.clone(), endpoint };
                if let Err(e) = self.cluster.put_incoming(&name, &self.node, &r).await {
                    tracing::warn!("VM {name}: cannot say where the move is received: {e}");
                }
            }
            Event::MoveDone { name, move_id, result } => self.on_move_done(&name, &move_id, result).await,
            Event::MoveOverdue { name, move_id } => {
                let waiting = self.local.get(&name).is_some_and(|l| {
                    l.phase == Phase::MigratingOut { started: false } && l.mv.as_ref().is_some_and(|m| m.id == move_id)
                });
                if waiting {
                    let why = format!("its destination did not get ready within {INCOMING_LIMIT:?}");
                    self.move_stayed(&name, &why).await;
                }
            }
            Event::NotReady { name, pid, why } => {
                if self
                    .local
                    .get(&name)
                    .is_some_and(|l| l.pid == pid && matches!(l.phase, Phase::Starting | Phase::Incoming))
                {
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
                let mut l = self.local.remove(&name).expect("present");
                l.taps.iter().for_each(|t| tap::remove(t));
                let how = code.map_or_else(|| "exited".to_owned(), |c| format!("exited with status {c}"));
                if let Phase::MigratingOut { .. } = l.phase {
                    // The migration committed (or stopped the VM so it
                    // never runs twice); the owner key says where it is.
                    let to = l.end_move().map(|m| m.to).unwrap_or_default();
                    eprintln!("ferry node: VM {name}: the VMM here {how} after its move to {to}");
                    if let Err(e) = self.cluster.delete_vm_status(&name, &self.node).await {
                        tracing::warn!("VM {name}: cannot remove its status: {e}");
                    }
                } else if l.phase == Phase::Incoming {
                    l.end_move();
                    eprintln!("ferry node: VM {name}: the receiver {how}");
                    if let Err(e) = self.cluster.delete_incoming(&name, &self.node).await {
                        tracing::warn!("VM {name}: cannot remove its incoming record: {e}");
                    }
                } else if l.phase == Phase::Stopping {
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
            self.local.insert(
                name.clone(),
                Local {
                    pid,
                    epoch,
                    taps,
                    mem_mib,
                    phase: Phase::Running,
                    adopted: true,
                    mv: None,
                    server: None,
                    ready_wait: false,
                },
            );
            self.track();
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

/// Moves: this node as a move's source or destination.
impl Agent {
    /// Takes the next step of a move of `name` that concerns this node.
    async fn reconcile_move(&mut self, name: &str) {
        let me = self.cfg.node_id.clone();
        let mv = self.moves.get(name).cloned();
        let local = self.local.get(name).map(|l| (l.phase, l.epoch, l.mv.clone()));
        match (local, mv) {
            // Asked to move a VM that runs here.
            (Some((Phase::Running, epoch, None)), Some(mv)) if mv.from == me => {
                if mv.epoch == epoch {
                    self.begin_move_out(name, mv).await;
                } else {
                    self.withdraw(name, &mv, &format!("it runs on {me} under owner epoch {epoch}, not {}", mv.epoch))
                        .await;
                }
            }
            (Some((Phase::MigratingOut { started: false }, _, Some(ours))), mv) => {
                if mv.as_ref() != Some(&ours) {
                    // Withdrawn before it began: the VM simply stays.
                    tracing::debug!("VM {name}: move {} withdrawn (now asked: {mv:?})", ours.id);
                    self.move_stayed(name, "the move was withdrawn").await;
                } else if let Some(inc) = self.incomings.get(name).filter(|i| i.move_id == ours.id) {
                    let endpoint = inc.endpoint.clone();
                    self.start_migration(name, &ours, &endpoint);
                }
            }
            (Some((Phase::Incoming, epoch, Some(ours))), mv) => {
                if mv.as_ref() == Some(&ours) {
                    return; // still under way
                }
                let owner = self.owners.get(name);
                let l = self.local.get_mut(name).expect("present");
                if owner.is_some_and(|o| o.node.as_deref() == Some(me.as_str()) && o.epoch == epoch) {
                    // Committed: the receiver serves its API once the VM
                    // runs; it becomes Running on Event::Ready.
                    // The oracle stays up until then: the Commit frame may
                    // yet be lost, and the receiver would ask it.
                    if !l.ready_wait {
                        l.ready_wait = true;
                        let (n, pid, tx) = (name.to_owned(), l.pid, self.events_tx.clone());
                        let sock = process::api_sock(&process::vm_dir(&self.cfg.state_dir, name));
                        std::thread::spawn(move || process::wait_ready(n, pid, sock, BOOT_LIMIT, tx));
                    }
                } else {
                    eprintln!("ferry node: VM {name}: move {} ended without this node; stopping the receiver", ours.id);
                    process::kill(l.pid);
                }
            }
            // Asked to take a VM that is not here yet.
            (None, Some(mv)) if mv.to == me => {
                let from_ok = self
                    .owners
                    .get(name)
                    .is_some_and(|o| o.node.as_deref() == Some(mv.from.as_str()) && o.epoch == mv.epoch);
                if from_ok {
                    self.begin_move_in(name, mv).await;
                }
            }
            // A move away from here of a VM that is not running here.
            (None | Some((Phase::Starting | Phase::Stopping, _, _)), Some(mv)) if mv.from == me => {
                self.withdraw(name, &mv, &format!("it is not running on {me}")).await;
            }
            _ => {}
        }
    }

    async fn begin_move_out(&mut self, name: &str, mv: MoveRecord) {
        let dir = process::vm_dir(&self.cfg.state_dir, name);
        let server = match moves::serve_gate(self.cluster.clone(), name.to_owned(), mv.clone(), &dir) {
            Ok(s) => s,
            Err(e) => return self.withdraw(name, &mv, &format!("{e:#}")).await,
        };
        eprintln!("ferry node: VM {name}: {} move {} to {} asked", mv.mode, mv.id, mv.to);
        let l = self.local.get_mut(name).expect("present");
        l.phase = Phase::MigratingOut { started: false };
        l.server = Some(server);
        l.mv = Some(mv.clone());
        self.status(name, "Migrating", &format!("{} move to {}", mv.mode, mv.to)).await;
        let (tx, n, id) = (self.events_tx.clone(), name.to_owned(), mv.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(INCOMING_LIMIT).await;
            let _ = tx.send(Event::MoveOverdue { name: n, move_id: id });
        });
        if let Some(inc) = self.incomings.get(name).filter(|i| i.move_id == mv.id) {
            let endpoint = inc.endpoint.clone();
            self.start_migration(name, &mv, &endpoint);
        }
    }

    fn start_migration(&mut self, name: &str, mv: &MoveRecord, endpoint: &str) {
        let Some(l) = self.local.get_mut(name) else { return };
        l.phase = Phase::MigratingOut { started: true };
        let dir = process::vm_dir(&self.cfg.state_dir, name);
        let call = moves::MigrateCall {
            sock: process::api_sock(&dir),
            endpoint: endpoint.to_owned(),
            mode: if mv.mode == "quick" { migrate::wire::Mode::Quick } else { migrate::wire::Mode::Live },
            key_file: self.cfg.key_file.clone(),
            gate: moves::gate_sock(&dir),
        };
        eprintln!("ferry node: VM {name}: migrating to {} at {endpoint}", mv.to);
        let (tx, n, id) = (self.events_tx.clone(), name.to_owned(), mv.id.clone());
        tokio::task::spawn_blocking(move || {
            let result = moves::migrate(&call);
            let _ = tx.send(Event::MoveDone { name: n, move_id: id, result });
        });
    }

    async fn on_move_done(&mut self, name: &str, move_id: &str, result: Result<serde_json::Value, String>) {
        let Some(l) = self.local.get(name) else { return };
        let Some(mv) = l.mv.clone().filter(|m| m.id == move_id) else { return };
        let sock = process::api_sock(&process::vm_dir(&self.cfg.state_dir, name));
        let still_here = match &result {
            Ok(_) => false,
            // The source VMM decides whether the VM still runs here (off
            // the main task: a slow answer must not look like a hang to
            // the watchdog).
            Err(_) => tokio::task::spawn_blocking(move || process::info(&sock, Duration::from_secs(2)))
                .await
                .is_ok_and(|r| r.is_ok_and(|v| matches!(v["state"].as_str(), Some("Running" | "Paused")))),
        };
        if still_here {
            let why = result.err().unwrap_or_default();
            return self.move_stayed(name, &why).await;
        }
        let mut figures = result.clone().unwrap_or_else(|e| serde_json::json!({ "error": e }));
        if let Some(o) = figures.as_object_mut() {
            o.insert("move_id".into(), mv.id.clone().into());
            o.insert("reason".into(), mv.reason.clone().into());
            o.insert("requested_unix_ms".into(), mv.requested_unix_ms.into());
        }
        let kind = if mv.mode == "quick" { HistoryKind::QuickMove } else { HistoryKind::LiveMove };
        eprintln!(
            "ferry node: VM {name}: moved to {} ({})",
            mv.to,
            match &result {
                Ok(f) => format!(
                    "downtime {:.1} ms, total {:.0} ms",
                    f["downtime_ms"].as_f64().unwrap_or(0.0),
                    f["total_ms"].as_f64().unwrap_or(0.0)
                ),
                Err(e) => format!("after its commit: {e}"),
            }
        );
        self.history(name, &mv, kind, Some(mv.epoch + 1), figures).await;
        // The VMM exits by itself (retired); Event::Exited cleans up.
    }

    /// The move did not happen and the VM runs here as before: withdraw it
    /// and say why.
    async fn move_stayed(&mut self, name: &str, why: &str) {
        let Some(l) = self.local.get_mut(name) else { return };
        let Some(mv) = l.end_move() else { return };
        l.phase = Phase::Running;
        eprintln!("ferry node: VM {name}: move {} to {} failed: {why}; it keeps running here", mv.id, mv.to);
        self.withdraw(name, &mv, why).await;
        self.status(name, "Running", &format!("move to {} failed: {why}", mv.to)).await;
    }

    /// Withdraws a move (if still asked for) and records why it failed.
    async fn withdraw(&mut self, name: &str, mv: &MoveRecord, why: &str) {
        eprintln!("ferry node: VM {name}: withdrawing move {} ({} -> {}): {why}", mv.id, mv.from, mv.to);
        match self.cluster.abort_move(name, mv).await {
            Ok(true) => {
                let figures = serde_json::json!({ "error": why, "move_id": mv.id, "reason": mv.reason });
                self.history(name, mv, HistoryKind::MoveFailed, None, figures).await;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("VM {name}: cannot withdraw move {}: {e}", mv.id),
        }
        if self.moves.get(name) == Some(mv) {
            self.moves.remove(name);
        }
    }

    async fn begin_move_in(&mut self, name: &str, mv: MoveRecord) {
        let me = self.cfg.node_id.clone();
        let refusal = match self.cluster.node_admin(&me).await {
            Ok(Some(a)) if a.paused || a.draining => Some(format!("node {me} is paused: it takes no VMs")),
            Ok(_) => None,
            Err(e) => Some(format!("node {me} cannot read its own settings: {e}")),
        };
        let refusal = refusal.or_else(|| {
            self.cfg.address.is_none().then(|| format!("node {me} has no --address to receive migrations on"))
        });
        if let Some(why) = refusal {
            return self.withdraw(name, &mv, &why).await;
        }
        let Some(record) = self.vms.get(name) else { return };
        let spec = match VmSpec::from_record(record) {
            Ok(s) => s,
            Err(e) => return self.withdraw(name, &mv, &format!("its stored config is unreadable: {e}")).await,
        };
        let taps: Vec<String> = (0..spec.machine.nics.len()).map(|i| spec::tap_name(name, i)).collect();
        let dir = process::vm_dir(&self.cfg.state_dir, name);
        let mut result = Ok(0);
        for (i, tap) in taps.iter().enumerate() {
            if let Err(e) = tap::ensure(tap, spec.bridge(i, &self.cfg.vm_bridge)) {
                result = Err(e);
                break;
            }
        }
        let result = result
            .and_then(|_| std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display())));
        let server = match result {
            Ok(()) => moves::serve_oracle(self.cluster.clone(), name.to_owned(), mv.clone(), &dir),
            Err(e) => Err(e),
        };
        let spawned = server.and_then(|server| {
            let r = moves::Receiver {
                ferry: &self.ferry,
                dir: &dir,
                machine: &spec.machine,
                taps: &taps,
                address: self.cfg.address.as_deref().unwrap_or_default(),
                key_file: &self.cfg.key_file,
                host_id: &me,
                disk_lease_ttl_ms: self.cfg.disk_lease_ttl_ms,
                kvm_device: &self.cfg.kvm_device,
            };
            match moves::spawn_receiver(name, &r, &self.events_tx) {
                Ok(pid) => Ok((pid, server)),
                Err(e) => {
                    server.abort();
                    Err(e)
                }
            }
        });
        let (pid, server) = match spawned {
            Ok(x) => x,
            Err(e) => {
                taps.iter().for_each(|t| tap::remove(t));
                return self.withdraw(name, &mv, &format!("node {me} cannot receive it: {e:#}")).await;
            }
        };
        eprintln!("ferry node: VM {name}: receiving it from {} (move {}, pid {pid})", mv.from, mv.id);
        let (n, tx, id) = (name.to_owned(), self.events_tx.clone(), mv.id.clone());
        let d = dir.clone();
        std::thread::spawn(move || moves::wait_endpoint(n, pid, d, id, INCOMING_LIMIT, tx));
        self.local.insert(
            name.to_owned(),
            Local {
                pid,
                epoch: mv.epoch + 1,
                taps,
                mem_mib: spec.machine.mem_mib,
                phase: Phase::Incoming,
                adopted: false,
                mv: Some(mv),
                server: Some(server),
                ready_wait: false,
            },
        );
        self.track();
    }

    /// Appends a move's entry to the VM's history (its id is the move's).
    async fn history(
        &self,
        name: &str,
        mv: &MoveRecord,
        kind: HistoryKind,
        epoch: Option<u64>,
        figures: serde_json::Value,
    ) {
        let entry = HistoryEntry {
            v: FORMAT_VERSION,
            id: format!("move-{}", mv.id),
            kind,
            at_unix_ms: cluster::records::unix_ms(),
            from: Some(mv.from.clone()),
            to: Some(mv.to.clone()),
            epoch,
            figures,
        };
        if let Err(e) = self.cluster.append_history(name, &entry).await {
            tracing::warn!("VM {name}: history: {e}");
        }
    }
}
