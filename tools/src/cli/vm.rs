//! `ferry vm ...`: highly available VMs, stored in the cluster's etcd.
//! These commands only read and write etcd; the node agents do the rest.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use cluster::{Cluster, Error as ClusterError, HistoryEntry, HistoryKind, Owner, VmRecord, VmStatus, FORMAT_VERSION};
use vmm::boot::BootProtocol;
use vmm::config::{DiskConfig, MachineConfig, NicConfig};
use vmm::mac::MacAddr;

use crate::agent::offers::Offers;
use crate::agent::spec::VmSpec;

/// Which cluster, through which etcd.
#[derive(Args, Clone)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (a bare host:port gets http://).
    #[arg(long, value_name = "URL,...")]
    pub etcd: String,
    /// The cluster's name (its keys live under /ferry/NAME/).
    #[arg(long, value_name = "NAME")]
    pub cluster: String,
}

/// Runs a command's future on a small runtime of its own.
pub fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(fut)
}

pub async fn connect(etcd: &EtcdArgs) -> anyhow::Result<Cluster> {
    let store = cluster::Store::connect(cluster::StoreConfig::parse_list(&etcd.etcd)).await?;
    Ok(Cluster::new(store, &etcd.cluster)?)
}

#[derive(Args)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Make a VM highly available: store its machine in the cluster
    /// (stopped; `ferry vm start` runs it).
    Create(CreateArgs),
    /// Run a stopped VM on a node: --on NODE, else its first preferred
    /// owner that is up, else the up node with the most free memory.
    Start {
        name: String,
        #[arg(long, value_name = "NODE")]
        on: Option<String>,
        /// Return once the node's agent reports the VM running.
        #[arg(long)]
        wait: bool,
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout_secs: u64,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Stop a VM: its owner becomes none, and its node's agent shuts the
    /// VMM down cleanly (releasing its disk leases).
    Stop {
        name: String,
        /// Return once the node's agent reports the VM gone.
        #[arg(long)]
        wait: bool,
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout_secs: u64,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Move a running VM to another node (live by default), committed by
    /// the cluster: --to NODE, else its preferred owners, else the node
    /// with the most free memory. Waits for the end and prints the figures.
    Move {
        name: String,
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        #[arg(long, value_enum, default_value = "live")]
        mode: super::moving::MoveMode,
        /// Return once the move is asked for.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout_secs: u64,
        /// Print the result (with the migration's figures) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// List the cluster's VMs with their owner and state.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Show one VM: its machine, preferred owners, owner and state.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// A VM's history: creation, starts, stops and moves with their figures.
    History {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// `--net mac=MAC[,bridge=BRIDGE]`.
#[derive(Clone, Debug)]
struct NicArg {
    mac: Option<MacAddr>,
    bridge: Option<String>,
}

impl std::str::FromStr for NicArg {
    type Err = String;
    fn from_str(s: &str) -> Result<NicArg, String> {
        let mut n = NicArg { mac: None, bridge: None };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("mac", v)) => n.mac = Some(v.parse()?),
                Some(("bridge", v)) if !v.is_empty() => n.bridge = Some(v.to_owned()),
                _ => return Err(format!("bad --net '{s}' (expected mac=MAC[,bridge=BRIDGE])")),
            }
        }
        Ok(n)
    }
}

#[derive(Args)]
struct CreateArgs {
    name: String,
    /// Kernel image; the same path must exist on every node.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    #[arg(long, value_name = "N", default_value_t = vmm::config::DEFAULT_MEM_MIB)]
    mem_mib: u64,
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    #[arg(long, value_name = "PROTO", default_value = "auto")]
    boot: BootProtocol,
    /// A disk on a cluster shared volume: csv:VOLUME/disks/NAME[,readonly]
    /// (repeatable). Disks elsewhere are refused: every node must reach it.
    #[arg(long, value_name = "csv:VOLUME/disks/NAME")]
    disk: Vec<DiskConfig>,
    /// A NIC: mac=MAC[,bridge=BRIDGE] (repeatable); its tap goes on BRIDGE,
    /// or on the node's VM bridge. Without mac=, one is derived from the
    /// VM's name.
    #[arg(long, value_name = "mac=MAC[,bridge=BRIDGE]")]
    net: Vec<NicArg>,
    /// Nodes to run it on, in order of preference.
    #[arg(long, value_name = "NODE,...", value_delimiter = ',')]
    preferred_owners: Vec<String>,
    /// Start the guest on this CPU baseline (from `ferry cpu-profile`).
    #[arg(long, value_name = "FILE")]
    cpu_profile: Option<PathBuf>,
    #[command(flatten)]
    etcd: EtcdArgs,
}

pub fn vm(args: VmArgs) -> anyhow::Result<i32> {
    match args.command {
        VmCommand::Create(a) => create(a),
        VmCommand::Start { name, on, wait, timeout_secs, etcd } => block_on(async {
            start(&connect(&etcd).await?, &name, on.as_deref(), wait.then(|| secs(timeout_secs))).await
        }),
        VmCommand::Stop { name, wait, timeout_secs, etcd } => {
            block_on(async { stop(&connect(&etcd).await?, &name, wait.then(|| secs(timeout_secs))).await })
        }
        VmCommand::Move { name, to, mode, no_wait, timeout_secs, json, etcd } => block_on(async {
            let c = connect(&etcd).await?;
            let wait = (!no_wait).then(|| secs(timeout_secs));
            super::moving::move_one(&c, &name, to.as_deref(), mode, wait, json).await
        }),
        VmCommand::List { json, etcd } => block_on(async { list(&connect(&etcd).await?, json).await }),
        VmCommand::Show { name, json, etcd } => block_on(async { show(&connect(&etcd).await?, &name, json).await }),
        VmCommand::History { name, json, etcd } => {
            block_on(async { history(&connect(&etcd).await?, &name, json).await })
        }
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn create(a: CreateArgs) -> anyhow::Result<i32> {
    cluster::keys::validate_name("VM name", &a.name)?;
    let kernel = std::fs::canonicalize(&a.kernel).with_context(|| format!("kernel {}", a.kernel.display()))?;
    let initrd = a
        .initrd
        .as_ref()
        .map(|p| std::fs::canonicalize(p).with_context(|| format!("initrd {}", p.display())))
        .transpose()?;
    let mut disks = vec![];
    for d in a.disk {
        let Some(vd) = &d.volume else {
            bail!(
                "disk {} is not on a shared volume: every node must reach it (use csv:VOLUME/disks/NAME)",
                d.path.display()
            );
        };
        let volume = csv_fs::Volume::open(&vd.volume).with_context(|| {
            format!("disk csv:{}: {} is not a shared volume", d.path.display(), vd.volume.display())
        })?;
        volume.disk_path(&vd.name).with_context(|| format!("disk csv:{}", d.path.display()))?;
        let root = volume.root().to_owned();
        let readonly = d.readonly;
        disks.push(DiskConfig {
            path: root.join("disks").join(&vd.name),
            readonly,
            volume: Some(vmm::config::VolumeDisk { volume: root, name: vd.name.clone() }),
        });
    }
    let nics: Vec<NicConfig> = a
        .net
        .iter()
        .enumerate()
        .map(|(i, n)| NicConfig { mac: n.mac.unwrap_or_else(|| MacAddr::derived_from(&format!("{}/{i}", a.name))) })
        .collect();
    let bridges = a.net.iter().map(|n| n.bridge.clone()).collect();
    let cpu_profile = a.cpu_profile.as_deref().map(vmm::arch::x86_64::cpu_profile::CpuProfile::load).transpose()?;
    let machine = MachineConfig {
        kernel,
        initrd,
        cmdline: a.cmdline,
        mem_mib: a.mem_mib,
        vcpus: a.vcpus,
        boot: a.boot,
        nics,
        disks,
        cpu_profile,
    };
    if machine.vcpus == 0 || machine.vcpus > vmm::config::MAX_VCPUS {
        bail!("--vcpus {}: between 1 and {}", machine.vcpus, vmm::config::MAX_VCPUS);
    }
    if machine.mem_mib == 0 || machine.mem_mib > vmm::config::MAX_MEM_MIB {
        bail!("--mem-mib {}: between 1 and {}", machine.mem_mib, vmm::config::MAX_MEM_MIB);
    }
    let record = VmRecord {
        v: FORMAT_VERSION,
        name: a.name.clone(),
        config: VmSpec { machine, bridges }.to_value(),
        preferred_owners: a.preferred_owners,
    };
    block_on(async {
        let c = connect(&a.etcd).await?;
        let name = &record.name;
        match c.create_vm(&record).await {
            Ok(_) => {}
            Err(ClusterError::AlreadyExists { .. }) => bail!("VM {name} already exists in cluster {}", a.etcd.cluster),
            Err(e) if e.outcome_unknown() => {
                // Conditional: read back whether it landed.
                match c.vm(name).await? {
                    Some(v) if v.value == record => {}
                    Some(_) => bail!("VM {name} already exists in cluster {}", a.etcd.cluster),
                    None => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        let entry =
            history_entry(&format!("create-{}", cluster::records::unix_ms()), HistoryKind::Created, None, None, None);
        if let Err(e) = c.append_history(name, &entry).await {
            tracing::warn!("VM {name}: history: {e}");
        }
        println!("VM {name} created (stopped); `ferry vm start {name}` runs it");
        Ok(0)
    })
}

fn history_entry(
    id: &str,
    kind: HistoryKind,
    from: Option<&str>,
    to: Option<&str>,
    epoch: Option<u64>,
) -> HistoryEntry {
    HistoryEntry {
        v: FORMAT_VERSION,
        id: id.to_owned(),
        kind,
        at_unix_ms: cluster::records::unix_ms(),
        from: from.map(str::to_owned),
        to: to.map(str::to_owned),
        epoch,
        figures: serde_json::json!({}),
    }
}

/// A node as the cluster sees it now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeView {
    pub id: String,
    /// Up, Paused, Draining, Quarantined or Down.
    pub state: String,
    pub offers: Option<Offers>,
    pub ferry_version: Option<String>,
    pub address: Option<String>,
}

/// Every node the cluster knows of: registered ones (Up, or Paused and
/// Draining by their admin settings) and, as Down, those only named by an
/// admin setting, an owner, a status or a preferred-owner list.
pub async fn node_views(c: &Cluster) -> anyhow::Result<Vec<NodeView>> {
    use std::collections::BTreeMap;
    let mut out: BTreeMap<String, NodeView> = BTreeMap::new();
    let down = |id: &str| NodeView {
        id: id.to_owned(),
        state: "Down".into(),
        offers: None,
        ferry_version: None,
        address: None,
    };
    for n in c.nodes().await? {
        let r = n.value;
        out.insert(
            r.id.clone(),
            NodeView {
                id: r.id.clone(),
                state: "Up".into(),
                offers: serde_json::from_value(r.offers).ok(),
                ferry_version: Some(r.ferry_version),
                address: r.address,
            },
        );
    }
    for (id, admin) in c.node_admins().await? {
        let v = out.entry(id.clone()).or_insert_with(|| down(&id));
        let quarantined = admin.quarantined_until_unix_ms.is_some_and(|q| q > cluster::records::unix_ms());
        if quarantined {
            v.state = if v.state == "Down" { "Down,Quarantined".into() } else { "Quarantined".into() };
        } else if v.state == "Up" && admin.draining {
            v.state = "Draining".into();
        } else if v.state == "Up" && admin.paused {
            v.state = "Paused".into();
        }
    }
    let mut named: Vec<String> = vec![];
    for v in c.vms().await? {
        named.extend(v.value.preferred_owners);
    }
    for (o, s) in c.vm_owners_and_statuses().await?.into_values() {
        named.extend(o.and_then(|o| o.node));
        named.extend(s.map(|s| s.node));
    }
    for id in named {
        out.entry(id.clone()).or_insert_with(|| down(&id));
    }
    Ok(out.into_values().collect())
}

async fn record_of(c: &Cluster, name: &str) -> anyhow::Result<VmRecord> {
    cluster::keys::validate_name("VM name", name)?;
    match c.vm(name).await? {
        Some(v) => Ok(v.value),
        None => bail!("no VM named {name} in this cluster"),
    }
}

/// Changes the owner; after an unknown outcome, reads it back to learn
/// whether the change was made.
async fn set_owner(c: &Cluster, name: &str, from: &Owner, to: Option<&str>) -> anyhow::Result<Owner> {
    match c.change_owner(name, from, to).await {
        Ok(o) => Ok(o),
        Err(e) if e.outcome_unknown() => {
            let now = c.owner(name).await?.value;
            if now.same(&Owner::new(to, from.epoch + 1)) {
                Ok(now)
            } else if now.same(from) {
                bail!("VM {name}: the owner change did not happen ({e}); try again")
            } else {
                bail!("VM {name}: its owner changed meanwhile to {now}")
            }
        }
        Err(ClusterError::StaleOwner { current, .. }) => bail!(
            "VM {name}: its owner changed meanwhile to {}; try again",
            current.map_or_else(|| "(missing)".to_owned(), |o| o.to_string())
        ),
        Err(e) => Err(e.into()),
    }
}

/// Where `start` runs a VM needing `mem_mib`.
fn choose_node(
    name: &str,
    nodes: &[NodeView],
    preferred: &[String],
    on: Option<&str>,
    mem_mib: u64,
) -> anyhow::Result<String> {
    let up: Vec<&NodeView> = nodes.iter().filter(|n| n.state == "Up").collect();
    let up_names = || up.iter().map(|n| n.id.as_str()).collect::<Vec<_>>().join(", ");
    let free = |n: &NodeView| n.offers.as_ref().map_or(0, |o| o.mem_free_mib);
    if let Some(on) = on {
        cluster::keys::validate_name("node id", on)?;
        let Some(n) = nodes.iter().find(|n| n.id == on) else {
            bail!("unknown node {on} (nodes up: {})", up_names());
        };
        match n.state.as_str() {
            "Up" => {}
            "Down" => bail!("node {on} is down (nodes up: {})", up_names()),
            s => bail!("node {on} is {}: it takes no new VMs", s.to_lowercase()),
        }
        if free(n) < mem_mib {
            bail!("node {on} offers {} MiB free; VM {name} needs {mem_mib} MiB", free(n));
        }
        return Ok(on.to_owned());
    }
    let fits = |n: &&&NodeView| free(n) >= mem_mib;
    if let Some(n) = preferred.iter().find_map(|p| up.iter().find(|n| &n.id == p).filter(fits)) {
        return Ok(n.id.clone());
    }
    match up.iter().filter(fits).max_by_key(|n| (free(n), std::cmp::Reverse(n.id.clone()))) {
        Some(n) => Ok(n.id.clone()),
        None if up.is_empty() => bail!("no node is up to run VM {name}"),
        None => bail!("no node up ({}) has {mem_mib} MiB free for VM {name}", up_names()),
    }
}

async fn start(c: &Cluster, name: &str, on: Option<&str>, wait: Option<Duration>) -> anyhow::Result<i32> {
    let record = record_of(c, name).await?;
    let spec = VmSpec::from_record(&record).with_context(|| format!("VM {name}: its stored config"))?;
    let owner = c.owner(name).await?.value;
    if let Some(cur) = &owner.node {
        if on.is_some_and(|n| n != cur) {
            bail!("VM {name} is already running on node {cur} (moves come with `ferry vm move`)");
        }
        println!("VM {name} is already started on node {cur}");
        return Ok(0);
    }
    let nodes = node_views(c).await?;
    let node = choose_node(name, &nodes, &record.preferred_owners, on, spec.machine.mem_mib)?;
    let new = set_owner(c, name, &owner, Some(&node)).await?;
    let entry =
        history_entry(&format!("start-{}", new.epoch), HistoryKind::Started, None, Some(&node), Some(new.epoch));
    if let Err(e) = c.append_history(name, &entry).await {
        tracing::warn!("VM {name}: history: {e}");
    }
    if let Some(limit) = wait {
        let s = wait_status(c, name, limit, |s| {
            s.is_some_and(|s| s.node == node && s.epoch == new.epoch && !matches!(s.state.as_str(), "Starting"))
        })
        .await?;
        match s {
            Some(Some(s)) if matches!(s.state.as_str(), "Failed" | "Stopped") => {
                bail!("VM {name} did not start on node {node}: {}", s.detail)
            }
            Some(_) => {}
            None => bail!("VM {name}: node {node}'s agent reported nothing within {limit:?}"),
        }
        println!("VM {name} running on node {node} (owner epoch {})", new.epoch);
    } else {
        println!("VM {name} starting on node {node} (owner epoch {})", new.epoch);
    }
    Ok(0)
}

async fn stop(c: &Cluster, name: &str, wait: Option<Duration>) -> anyhow::Result<i32> {
    record_of(c, name).await?;
    let owner = c.owner(name).await?.value;
    let Some(from) = owner.node.clone() else {
        println!("VM {name} is already stopped");
        return Ok(0);
    };
    let new = set_owner(c, name, &owner, None).await?;
    let entry = history_entry(&format!("stop-{}", new.epoch), HistoryKind::Stopped, Some(&from), None, Some(new.epoch));
    if let Err(e) = c.append_history(name, &entry).await {
        tracing::warn!("VM {name}: history: {e}");
    }
    if let Some(limit) = wait {
        let r = wait_status(c, name, limit, |s| match s {
            None => true,
            Some(s) => s.node != from || s.epoch > owner.epoch,
        })
        .await?;
        if r.is_none() {
            bail!("VM {name}: node {from}'s agent did not report it stopped within {limit:?}");
        }
        println!("VM {name} stopped (was on node {from})");
    } else {
        println!("VM {name} stopping on node {from}");
    }
    Ok(0)
}

/// Waits (at most `limit`, by an etcd watch) until the VM's status
/// satisfies `done`; Some(status at that point) or None on timeout.
async fn wait_status(
    c: &Cluster,
    name: &str,
    limit: Duration,
    done: impl Fn(Option<&VmStatus>) -> bool,
) -> anyhow::Result<Option<Option<VmStatus>>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut w = c.store().watch_prefix(&c.keys().vm_status(name), 0).await?;
    loop {
        let s = c.vm_status(name).await?.map(|v| v.value);
        if done(s.as_ref()) {
            return Ok(Some(s));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || w.next_within(left).await.is_none() {
            return Ok(None);
        }
    }
}

/// One VM as `list` and `cluster status` show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VmView {
    pub name: String,
    pub owner: Option<String>,
    pub epoch: u64,
    /// What the owner's agent reports (Starting, Running, ...); "Stopped"
    /// without an owner; "Restarting" while the leader restarts it after
    /// its node went down; "Unknown" if the owner reports nothing.
    pub state: String,
    pub reported_by: Option<String>,
    pub pid: Option<u32>,
    pub detail: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub preferred_owners: Vec<String>,
    /// A failover under way (state Restarting): from the node that went
    /// down, to where, since when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<cluster::RestartRecord>,
}

pub async fn vm_views(c: &Cluster) -> anyhow::Result<Vec<VmView>> {
    let mut states = c.vm_owners_and_statuses().await?;
    let mut restarts = c.restarts().await?;
    let mut out = vec![];
    for v in c.vms().await? {
        let r = v.value;
        let (owner, status) = states.remove(&r.name).unwrap_or_default();
        let restart = restarts.remove(&r.name).filter(|x| restart_current(x, owner.as_ref(), status.as_ref()));
        let spec = VmSpec::from_record(&r).ok();
        let owner_node = owner.as_ref().and_then(|o| o.node.clone());
        let state = match (&owner_node, &status) {
            _ if restart.is_some() => "Restarting".into(),
            (_, Some(s)) => s.state.clone(),
            (None, None) => "Stopped".into(),
            (Some(_), None) => "Unknown".into(),
        };
        let detail = match &restart {
            Some(x) => restart_detail(x, cluster::records::unix_ms()),
            None => status.as_ref().map(|s| s.detail.clone()).unwrap_or_default(),
        };
        out.push(VmView {
            name: r.name.clone(),
            owner: owner_node,
            epoch: owner.map_or(0, |o| o.epoch),
            state,
            reported_by: status.as_ref().map(|s| s.node.clone()),
            pid: status.as_ref().and_then(|s| s.pid),
            detail,
            mem_mib: spec.as_ref().map_or(0, |s| s.machine.mem_mib),
            vcpus: spec.as_ref().map_or(0, |s| s.machine.vcpus),
            preferred_owners: r.preferred_owners,
            restart,
        });
    }
    Ok(out)
}

/// Whether a restart record still describes the VM: its owner is still
/// the node that went down, or is the restart's new owner whose agent
/// does not yet report it past Starting. (A record a deposed leader left
/// behind describes nothing.)
fn restart_current(r: &cluster::RestartRecord, owner: Option<&Owner>, status: Option<&VmStatus>) -> bool {
    let Some(owner) = owner else { return false };
    match r.epoch {
        None => owner.node.as_deref() == Some(r.from.as_str()),
        Some(e) => {
            owner.epoch == e
                && owner.node == r.to
                && !status.is_some_and(|s| {
                    s.epoch >= e && s.node == owner.node.as_deref().unwrap_or_default() && s.state != "Starting"
                })
        }
    }
}

/// "from a (down 2.1 s ago) to b: waiting for its disk leases to expire".
fn restart_detail(r: &cluster::RestartRecord, now_unix_ms: u64) -> String {
    format!(
        "from {} (down {:.1} s ago) to {}: {}",
        r.from,
        now_unix_ms.saturating_sub(r.since_unix_ms) as f64 / 1000.0,
        r.to.as_deref().unwrap_or("(no node yet)"),
        r.phase
    )
}

/// Prints rows as columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn vm_rows(vms: &[VmView]) -> Vec<Vec<String>> {
    vms.iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.owner.clone().unwrap_or_else(|| "-".into()),
                v.epoch.to_string(),
                v.state.clone(),
                v.mem_mib.to_string(),
                v.vcpus.to_string(),
                if v.preferred_owners.is_empty() { "-".into() } else { v.preferred_owners.join(",") },
                v.detail.clone(),
            ]
        })
        .collect()
}

pub const VM_HEADER: [&str; 8] = ["NAME", "OWNER", "EPOCH", "STATE", "MEM_MIB", "VCPUS", "PREFERRED", "DETAIL"];

async fn list(c: &Cluster, json: bool) -> anyhow::Result<i32> {
    let vms = vm_views(c).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
    } else {
        table(&VM_HEADER, &vm_rows(&vms));
    }
    Ok(0)
}

async fn show(c: &Cluster, name: &str, json: bool) -> anyhow::Result<i32> {
    let record = record_of(c, name).await?;
    let owner = c.owner(name).await?.value;
    let status = c.vm_status(name).await?.map(|v| v.value);
    if json {
        let v = serde_json::json!({"record": record, "owner": owner, "status": status});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let spec = VmSpec::from_record(&record).with_context(|| format!("VM {name}: its stored config"))?;
    let m = &spec.machine;
    println!("name:             {name}");
    println!("owner:            {owner}");
    match &status {
        Some(s) => println!(
            "state:            {} (reported by {}, pid {}){}",
            s.state,
            s.node,
            s.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            if s.detail.is_empty() { String::new() } else { format!(": {}", s.detail) }
        ),
        None => println!("state:            {}", if owner.node.is_some() { "Unknown" } else { "Stopped" }),
    }
    println!("preferred owners: {}", record.preferred_owners.join(", "));
    println!("kernel:           {}", m.kernel.display());
    println!("cmdline:          {}", m.cmdline);
    println!("memory:           {} MiB, {} vCPU(s)", m.mem_mib, m.vcpus);
    for (i, n) in m.nics.iter().enumerate() {
        println!("nic {i}:            mac {}, bridge {}", n.mac, spec.bridge(i, "(the node's)"));
    }
    for (i, d) in m.disks.iter().enumerate() {
        println!("disk {i}:           csv:{}{}", d.path.display(), if d.readonly { ",readonly" } else { "" });
    }
    if let Some(p) = &m.cpu_profile {
        println!("cpu profile:      {} ({} features)", p.source, p.features.len());
    }
    Ok(0)
}

async fn history(c: &Cluster, name: &str, json: bool) -> anyhow::Result<i32> {
    record_of(c, name).await?;
    let h = c.history(name).await?;
    if json {
        let v: Vec<_> = h.iter().map(|(seq, e)| serde_json::json!({"seq": seq, "entry": e})).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = h
        .iter()
        .map(|(seq, e)| {
            vec![
                seq.to_string(),
                e.at_unix_ms.to_string(),
                serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                e.from.clone().unwrap_or_else(|| "-".into()),
                e.to.clone().unwrap_or_else(|| "-".into()),
                e.epoch.map_or_else(|| "-".into(), |x| x.to_string()),
                if e.figures.as_object().is_some_and(|o| o.is_empty()) { String::new() } else { e.figures.to_string() },
            ]
        })
        .collect();
    table(&["SEQ", "AT_UNIX_MS", "KIND", "FROM", "TO", "EPOCH", "FIGURES"], &rows);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart(epoch: Option<u64>) -> cluster::RestartRecord {
        cluster::RestartRecord {
            v: FORMAT_VERSION,
            from: "a".into(),
            to: Some("b".into()),
            epoch,
            phase: "waiting for its disk leases to expire".into(),
            since_unix_ms: 10_000,
            leader: "c".into(),
        }
    }

    fn status(node: &str, epoch: u64, state: &str) -> VmStatus {
        VmStatus {
            v: FORMAT_VERSION,
            node: node.into(),
            epoch,
            state: state.into(),
            pid: None,
            detail: String::new(),
            since_unix_ms: 0,
        }
    }

    #[test]
    fn a_restart_shows_until_the_new_owner_reports_the_vm_past_starting() {
        let (on_a, on_b) = (Owner::new(Some("a"), 4), Owner::new(Some("b"), 5));
        // Waiting: the owner is still the node that went down.
        assert!(restart_current(&restart(None), Some(&on_a), None));
        // Moved by someone else meanwhile: stale.
        assert!(!restart_current(&restart(None), Some(&on_b), None));
        // Owner changed, booting: still restarting while b says Starting.
        assert!(restart_current(&restart(Some(5)), Some(&on_b), None));
        assert!(restart_current(&restart(Some(5)), Some(&on_b), Some(&status("b", 5, "Starting"))));
        assert!(!restart_current(&restart(Some(5)), Some(&on_b), Some(&status("b", 5, "Running"))));
        // A later owner: the record describes nothing now.
        assert!(!restart_current(&restart(Some(5)), Some(&Owner::new(Some("b"), 6)), None));
        assert!(!restart_current(&restart(None), None, None));
        assert_eq!(
            restart_detail(&restart(None), 12_345),
            "from a (down 2.3 s ago) to b: waiting for its disk leases to expire"
        );
    }
}
