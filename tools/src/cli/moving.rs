//! Moves the cluster makes: `ferry vm move`, `ferry node pause --drain`
//! and `ferry node resume --failback`. These commands only ask (a move
//! record in etcd, see `cluster::moves`) and watch; the source and
//! destination agents do the move and commit it.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum;
use cluster::{Cluster, Error as ClusterError, HistoryKind, MoveRecord, NodeAdmin, FORMAT_VERSION};
use serde::Serialize;
use tokio::time::Instant;

use super::vm::{node_views, NodeView};
use crate::agent::spec::VmSpec;

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MoveMode {
    Live,
    Quick,
}

impl MoveMode {
    fn as_str(self) -> &'static str {
        match self {
            MoveMode::Live => "live",
            MoveMode::Quick => "quick",
        }
    }
}

/// What a drain does with a VM whose live move the destination refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnIncompatible {
    /// Move it by quick migration instead.
    Quick,
    /// Leave it where it is and report it.
    Fail,
}

/// `resume --failback`, Hyper-V's three choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Failback {
    /// Bring back every VM the drain moved away.
    Immediate,
    /// Bring back those whose first preferred owner is this node.
    Policy,
    /// Leave them where they are.
    None,
}

/// How one move ended, as the commands print it.
#[derive(Clone, Debug, Serialize)]
pub struct MoveResult {
    pub vm: String,
    pub id: String,
    pub from: String,
    pub to: String,
    pub mode: String,
    pub ok: bool,
    pub error: Option<String>,
    /// Unix ms: asked, and ended (as recorded).
    pub requested_unix_ms: u64,
    pub ended_unix_ms: u64,
    /// The migration's figures (downtime, rounds, bytes, ...).
    pub figures: serde_json::Value,
}

fn new_move_id(vm: &str) -> String {
    format!("{vm}-{}-{}", cluster::records::unix_ms(), std::process::id())
}

/// A node can take VMs: up and neither paused nor draining.
fn takes_vms(n: &NodeView) -> bool {
    n.state == "Up"
}

fn free_mib(n: &NodeView) -> u64 {
    n.offers.as_ref().map_or(0, |o| o.mem_free_mib)
}

/// Chooses where VM `name` (on `from`, needing `mem_mib`) goes: its
/// preferred owners in order, then the node with the most free memory
/// (after `reserved` MiB already promised to moves under way), among nodes
/// that take VMs and have fewer than `max_incoming` moves arriving.
fn choose_destination(
    name: &str,
    from: &str,
    nodes: &[NodeView],
    preferred: &[String],
    mem_mib: u64,
    reserved: &HashMap<String, (u64, usize)>,
    max_incoming: usize,
) -> Result<String, String> {
    let room = |n: &NodeView| {
        let (mib, count) = reserved.get(&n.id).copied().unwrap_or_default();
        (free_mib(n).saturating_sub(mib), count)
    };
    let fits = |n: &&NodeView| {
        let (free, count) = room(n);
        n.id != from && takes_vms(n) && free >= mem_mib && count < max_incoming
    };
    if let Some(n) = preferred.iter().find_map(|p| nodes.iter().find(|n| &n.id == p).filter(fits)) {
        return Ok(n.id.clone());
    }
    if let Some(n) = nodes.iter().filter(fits).max_by_key(|n| (room(n).0, std::cmp::Reverse(n.id.clone()))) {
        return Ok(n.id.clone());
    }
    let others: Vec<&NodeView> = nodes.iter().filter(|n| n.id != from).collect();
    if !others.iter().any(|n| takes_vms(n)) {
        return Err(format!("no other node takes VMs ({})", describe(&others)));
    }
    if others.iter().any(|n| takes_vms(n) && room(n).0 >= mem_mib) {
        return Err("every node that could take it is already receiving".into());
    }
    Err(format!("no node that takes VMs has {mem_mib} MiB free for VM {name} ({})", describe(&others)))
}

/// Where VM `name` on `from` would go now (for plans).
pub fn destination_for(
    name: &str,
    from: &str,
    place: &Placement,
    preferred: &[String],
    mem_mib: u64,
) -> Result<String, String> {
    let others: Vec<NodeView> = place.nodes.iter().filter(|n| n.id != from).cloned().collect();
    choose_destination(name, from, &others, preferred, mem_mib, &place.reserved, place.max_incoming)
}

fn describe(nodes: &[&NodeView]) -> String {
    nodes
        .iter()
        .map(|n| format!("{} {} {} MiB free", n.id, n.state.to_lowercase(), free_mib(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What placement knows: the nodes now, and what moves under way have
/// already promised each (MiB, moves arriving).
pub struct Placement {
    pub nodes: Vec<NodeView>,
    pub reserved: HashMap<String, (u64, usize)>,
    pub max_incoming: usize,
}

/// Checks and asks for one move; returns the record asked for.
pub async fn ask(
    c: &Cluster,
    name: &str,
    to: Option<&str>,
    mode: MoveMode,
    reason: &str,
    place: &Placement,
) -> anyhow::Result<MoveRecord> {
    let (nodes, reserved, max_incoming) = (&place.nodes, &place.reserved, place.max_incoming);
    cluster::keys::validate_name("VM name", name)?;
    let Some(record) = c.vm(name).await? else { bail!("no VM named {name} in this cluster") };
    let record = record.value;
    let spec = VmSpec::from_record(&record).with_context(|| format!("VM {name}: its stored config"))?;
    let owner = c.owner(name).await?.value;
    let Some(from) = owner.node.clone() else { bail!("VM {name} is stopped: `ferry vm start {name}` runs it") };
    match c.vm_status(name).await?.map(|s| s.value) {
        Some(s) if s.node == from && s.state == "Running" => {}
        Some(s) => bail!("VM {name} is {} on node {from}; only a running VM moves", s.state.to_lowercase()),
        None => bail!("VM {name}: node {from} reports nothing about it (is its agent up?)"),
    }
    let to = match to {
        Some(to) => {
            cluster::keys::validate_name("node id", to)?;
            let Some(n) = nodes.iter().find(|n| n.id == to) else {
                bail!("unknown node {to}");
            };
            if to == from {
                bail!("VM {name} already runs on node {to}");
            }
            match n.state.as_str() {
                "Up" => {}
                "Down" => bail!("node {to} is down"),
                s => bail!("node {to} is {}: it takes no VMs", s.to_lowercase()),
            }
            if free_mib(n) < spec.machine.mem_mib {
                bail!("node {to} offers {} MiB free; VM {name} needs {} MiB", free_mib(n), spec.machine.mem_mib);
            }
            to.to_owned()
        }
        None => choose_destination(
            name,
            &from,
            nodes,
            &record.preferred_owners,
            spec.machine.mem_mib,
            reserved,
            max_incoming,
        )
        .map_err(|e| anyhow::anyhow!("VM {name} has nowhere to go: {e}"))?,
    };
    let mv = MoveRecord {
        v: FORMAT_VERSION,
        id: new_move_id(name),
        from: from.clone(),
        to,
        epoch: owner.epoch,
        mode: mode.as_str().into(),
        reason: reason.into(),
        requested_unix_ms: cluster::records::unix_ms(),
    };
    match c.request_move(name, &mv).await {
        Ok(()) => Ok(mv),
        Err(e) if e.outcome_unknown() => match c.pending_move(name).await? {
            Some(p) if p.value == mv => Ok(mv),
            _ => bail!("VM {name}: asking for the move had an unknown outcome and it is not recorded: {e}"),
        },
        Err(ClusterError::MoveInFlight { from, to, .. }) => bail!("VM {name} is already moving ({from} -> {to})"),
        Err(ClusterError::StaleOwner { current, .. }) => bail!(
            "VM {name}: its owner changed meanwhile (now {}); try again",
            current.map_or_else(|| "(missing)".to_owned(), |o| o.to_string())
        ),
        Err(e) => Err(e.into()),
    }
}

/// The end of `mv`, if it has ended (its record is gone) and the agent
/// that ended it has recorded it (or `grace_over`: it had its time).
async fn ended(c: &Cluster, name: &str, mv: &MoveRecord, grace_over: bool) -> anyhow::Result<Ended> {
    if c.pending_move(name).await?.is_some_and(|p| p.value.id == mv.id) {
        return Ok(Ended::Pending);
    }
    let id = format!("move-{}", mv.id);
    let entry = c.history(name).await?.into_iter().rev().map(|(_, e)| e).find(|e| e.id == id);
    let owner = c.owner(name).await?.value;
    let committed = owner.same(&cluster::Owner::new(Some(&mv.to), mv.epoch + 1))
        || entry.as_ref().is_some_and(|e| matches!(e.kind, HistoryKind::LiveMove | HistoryKind::QuickMove));
    // The agent that ended it writes the entry just after (for a
    // committed move, once the migration has returned its figures).
    if entry.is_none() && !grace_over {
        return Ok(Ended::Gone);
    }
    // A committed move is over once the destination runs the VM.
    if committed && !grace_over {
        let status = c.vm_status(name).await?.map(|s| s.value);
        if !status.is_some_and(|s| s.node == mv.to && s.epoch == mv.epoch + 1 && s.state == "Running") {
            return Ok(Ended::Gone);
        }
    }
    let figures = entry.as_ref().map_or(serde_json::Value::Null, |e| e.figures.clone());
    let error = if committed {
        figures["error"].as_str().map(str::to_owned)
    } else {
        Some(figures["error"].as_str().unwrap_or("the move was withdrawn").to_owned())
    };
    Ok(Ended::Done(MoveResult {
        vm: name.to_owned(),
        id: mv.id.clone(),
        from: mv.from.clone(),
        to: mv.to.clone(),
        mode: mv.mode.clone(),
        ok: committed,
        error,
        requested_unix_ms: mv.requested_unix_ms,
        ended_unix_ms: entry.map_or_else(cluster::records::unix_ms, |e| e.at_unix_ms),
        figures,
    }))
}

enum Ended {
    Pending,
    /// Its record is gone; its history entry is not written yet.
    Gone,
    Done(MoveResult),
}

/// How long after a move's record is gone its history entry may take.
const RECORD_GRACE: Duration = Duration::from_secs(10);

/// Waits (by a watch on the VMs' keys) until every move in `moves` ended
/// or `limit` passed; calls `done` for each as it ends.
async fn wait_any(
    c: &Cluster,
    moves: &mut BTreeMap<String, MoveRecord>,
    limit: Instant,
) -> anyhow::Result<Vec<MoveResult>> {
    let mut w = c.watch_vms(0).await?;
    let mut gone: HashMap<String, Instant> = HashMap::new();
    loop {
        let mut out = vec![];
        for (name, mv) in moves.iter() {
            let grace_over = gone.get(name).is_some_and(|t| t.elapsed() > RECORD_GRACE);
            match ended(c, name, mv, grace_over).await? {
                Ended::Pending => {}
                Ended::Gone => {
                    gone.entry(name.clone()).or_insert_with(Instant::now);
                }
                Ended::Done(r) => out.push(r),
            }
        }
        if !out.is_empty() {
            for r in &out {
                moves.remove(&r.vm);
            }
            return Ok(out);
        }
        let left = limit.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "moves still under way after the time limit: {}",
                moves.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        // Any change under vms/ (or a second) wakes us to look again.
        let _ = w.next_within(left.min(Duration::from_secs(1))).await;
    }
}

fn print_result(r: &MoveResult) {
    if r.ok {
        let f = &r.figures;
        println!(
            "{:<12} {} -> {}  {} move: total {:.0} ms, downtime {:.1} ms, {} rounds, {:.1} MiB",
            r.vm,
            r.from,
            r.to,
            r.mode,
            f["total_ms"].as_f64().unwrap_or(0.0),
            f["downtime_ms"].as_f64().unwrap_or(0.0),
            f["rounds"],
            f["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0
        );
    } else {
        println!("{:<12} {} -> {}  FAILED: {}", r.vm, r.from, r.to, r.error.as_deref().unwrap_or("?"));
    }
}

/// `ferry vm move`.
pub async fn move_one(
    c: &Cluster,
    name: &str,
    to: Option<&str>,
    mode: MoveMode,
    wait: Option<Duration>,
    json: bool,
) -> anyhow::Result<i32> {
    let nodes = node_views(c).await?;
    let place = Placement { nodes, reserved: HashMap::new(), max_incoming: usize::MAX };
    let mv = ask(c, name, to, mode, "operator", &place).await?;
    let Some(limit) = wait else {
        println!("VM {name}: {} move {} -> {} asked (move {})", mv.mode, mv.from, mv.to, mv.id);
        return Ok(0);
    };
    if std::io::stderr().is_terminal() {
        eprintln!("VM {name}: {} move {} -> {} ...", mv.mode, mv.from, mv.to);
    }
    let mut moves = BTreeMap::from([(name.to_owned(), mv)]);
    let r = wait_any(c, &mut moves, Instant::now() + limit).await?.remove(0);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_result(&r);
    }
    Ok(if r.ok { 0 } else { 1 })
}

/// The cluster's moves-at-a-time settings.
pub struct Parallel {
    /// Moves out of the drained node at once (Hyper-V: 2).
    pub per_source: usize,
    /// Moves into one node at once.
    pub per_destination: usize,
}

/// Moves `vms` (name, chosen destination or None) with at most
/// `parallel.per_source` under way; refused live moves are retried as
/// quick ones if `on_incompatible` says so. Returns every result.
async fn move_many(
    c: &Cluster,
    vms: Vec<(String, Option<String>)>,
    reason: &str,
    parallel: &Parallel,
    on_incompatible: OnIncompatible,
    limit: Duration,
) -> anyhow::Result<Vec<MoveResult>> {
    let deadline = Instant::now() + limit;
    let mut queue: std::collections::VecDeque<(String, Option<String>, MoveMode)> =
        vms.into_iter().map(|(n, to)| (n, to, MoveMode::Live)).collect();
    let mut under_way: BTreeMap<String, MoveRecord> = BTreeMap::new();
    let mut results = vec![];
    let mut mem_of: HashMap<String, u64> = HashMap::new();
    while !queue.is_empty() || !under_way.is_empty() {
        let mut refused_now = 0;
        while under_way.len() < parallel.per_source.max(1) && queue.len() > refused_now {
            let (name, to, mode) = queue.pop_front().expect("non-empty");
            let nodes = node_views(c).await?;
            let mut reserved: HashMap<String, (u64, usize)> = HashMap::new();
            for (n, mv) in &under_way {
                let e = reserved.entry(mv.to.clone()).or_default();
                e.0 += mem_of.get(n).copied().unwrap_or(0);
                e.1 += 1;
            }
            // If a destination is full of arrivals, wait for one to land.
            let place = Placement { nodes, reserved, max_incoming: parallel.per_destination };
            match ask(c, &name, to.as_deref(), mode, reason, &place).await {
                Ok(mv) => {
                    eprintln!("  {name}: {} move {} -> {} started", mv.mode, mv.from, mv.to);
                    if let Some(rec) = c.vm(&name).await? {
                        if let Ok(spec) = VmSpec::from_record(&rec.value) {
                            mem_of.insert(name.clone(), spec.machine.mem_mib);
                        }
                    }
                    under_way.insert(name, mv);
                }
                Err(e) if !under_way.is_empty() && e.to_string().contains("already receiving") => {
                    queue.push_front((name, to, mode));
                    refused_now = queue.len();
                }
                Err(e) => {
                    eprintln!("  {name}: cannot move: {e:#}");
                    results.push(MoveResult {
                        vm: name,
                        id: String::new(),
                        from: String::new(),
                        to: to.unwrap_or_default(),
                        mode: mode.as_str().into(),
                        ok: false,
                        error: Some(format!("{e:#}")),
                        requested_unix_ms: cluster::records::unix_ms(),
                        ended_unix_ms: cluster::records::unix_ms(),
                        figures: serde_json::Value::Null,
                    });
                }
            }
        }
        if under_way.is_empty() {
            continue;
        }
        for r in wait_any(c, &mut under_way, deadline).await? {
            let refused = r.error.as_deref().is_some_and(|e| e.contains("refused the migration"));
            if !r.ok && refused && r.mode == "live" && on_incompatible == OnIncompatible::Quick {
                eprintln!("  {}: live move refused ({}); trying a quick move", r.vm, r.error.as_deref().unwrap_or(""));
                queue.push_back((r.vm.clone(), None, MoveMode::Quick));
            }
            match (&r.ok, &r.error) {
                (true, _) => eprintln!(
                    "  {}: moved to {} (downtime {:.1} ms)",
                    r.vm,
                    r.to,
                    r.figures["downtime_ms"].as_f64().unwrap_or(0.0)
                ),
                (false, e) => eprintln!("  {}: move to {} failed: {}", r.vm, r.to, e.as_deref().unwrap_or("?")),
            }
            results.push(r);
        }
    }
    Ok(results)
}

async fn admin_of(c: &Cluster, node: &str) -> anyhow::Result<NodeAdmin> {
    Ok(c.node_admin(node).await?.unwrap_or(NodeAdmin { v: FORMAT_VERSION, ..Default::default() }))
}

fn known_node(nodes: &[NodeView], node: &str) -> anyhow::Result<()> {
    cluster::keys::validate_name("node id", node)?;
    if !nodes.iter().any(|n| n.id == node) {
        bail!("unknown node {node}");
    }
    Ok(())
}

/// A summary printed at the end of a drain or a failback.
#[derive(Serialize)]
struct Summary<'a> {
    node: &'a str,
    action: &'a str,
    total_ms: f64,
    moved: usize,
    failed: usize,
    moves: &'a [MoveResult],
}

fn report(node: &str, action: &str, started: Instant, results: &[MoveResult], json: bool) -> anyhow::Result<i32> {
    let failed = results.iter().filter(|r| !r.ok).count();
    let s = Summary {
        node,
        action,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        moved: results.len() - failed,
        failed,
        moves: results,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        for r in results {
            print_result(r);
        }
        println!("node {node}: {action}: {} moved, {} could not, in {:.1} s", s.moved, failed, s.total_ms / 1000.0);
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// `ferry node pause NODE [--drain]`.
pub async fn pause(
    c: &Cluster,
    node: &str,
    drain: bool,
    parallel: Parallel,
    on_incompatible: OnIncompatible,
    limit: Duration,
    json: bool,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    let results = pause_node(c, node, drain, &parallel, on_incompatible, limit).await?;
    if !drain {
        println!("node {node} paused: it takes no new VMs (its VMs keep running)");
        return Ok(0);
    }
    report(node, "drain", started, &results, json)
}

/// Pauses `node` and, with `drain`, moves every VM away; the node stays
/// paused whatever happens. Returns every move's result.
pub async fn pause_node(
    c: &Cluster,
    node: &str,
    drain: bool,
    parallel: &Parallel,
    on_incompatible: OnIncompatible,
    limit: Duration,
) -> anyhow::Result<Vec<MoveResult>> {
    let nodes = node_views(c).await?;
    known_node(&nodes, node)?;
    let mut admin = admin_of(c, node).await?;
    admin.v = FORMAT_VERSION;
    admin.paused = true;
    admin.draining = drain;
    if drain {
        admin.drained.clear();
    }
    c.set_node_admin(node, &admin).await?;
    if !drain {
        return Ok(vec![]);
    }
    let mut vms: Vec<String> = vec![];
    for (name, (owner, _)) in c.vm_owners_and_statuses().await? {
        if owner.and_then(|o| o.node).as_deref() == Some(node) {
            vms.push(name);
        }
    }
    eprintln!("node {node}: draining {} VM(s), {} at a time", vms.len(), parallel.per_source);
    let results =
        move_many(c, vms.into_iter().map(|n| (n, None)).collect(), "drain", parallel, on_incompatible, limit).await;
    // Whatever happened, the node is no longer draining; it stays paused.
    let mut admin = admin_of(c, node).await?;
    admin.draining = false;
    if let Ok(results) = &results {
        admin.drained = results.iter().filter(|r| r.ok).map(|r| r.vm.clone()).collect();
        admin.drained.dedup();
    }
    c.set_node_admin(node, &admin).await?;
    results
}

/// `ferry node resume NODE --failback ...`.
pub async fn resume(
    c: &Cluster,
    node: &str,
    failback: Failback,
    parallel: Parallel,
    window: Option<cluster::records::FailbackWindow>,
    limit: Duration,
    json: bool,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    let results = resume_node(c, node, failback, &parallel, window, limit).await?;
    if results.is_empty() {
        println!("node {node} resumed (failback {}: nothing to bring back)", format!("{failback:?}").to_lowercase());
        return Ok(0);
    }
    report(node, "failback", started, &results, json)
}

/// Resumes `node` and brings back what `failback` says; returns the moves.
pub async fn resume_node(
    c: &Cluster,
    node: &str,
    failback: Failback,
    parallel: &Parallel,
    window: Option<cluster::records::FailbackWindow>,
    limit: Duration,
) -> anyhow::Result<Vec<MoveResult>> {
    let nodes = node_views(c).await?;
    known_node(&nodes, node)?;
    // The cluster's failback window holds back `policy` failback (as
    // Hyper-V's does); `immediate` is the operator's explicit choice.
    let hour = ((cluster::records::unix_ms() / 3_600_000) % 24) as u8;
    if let Some(w) = window.filter(|w| failback == Failback::Policy && !w.contains(hour)) {
        bail!(
            "node {node}: {hour:02}:00 UTC is outside the cluster's failback window ({:02}-{:02} UTC): nothing \
             resumed; run it again inside the window or use --failback immediate",
            w.start_hour,
            w.end_hour
        );
    }
    let mut admin = admin_of(c, node).await?;
    let drained = std::mem::take(&mut admin.drained);
    admin.v = FORMAT_VERSION;
    admin.paused = false;
    admin.draining = false;
    c.set_node_admin(node, &admin).await?;
    let mut back = vec![];
    if failback != Failback::None {
        for name in &drained {
            let Some(rec) = c.vm(name).await? else { continue };
            if failback == Failback::Policy && rec.value.preferred_owners.first().map(String::as_str) != Some(node) {
                continue;
            }
            let owner = c.owner(name).await?.value;
            if owner.node.as_deref().is_some_and(|n| n != node) {
                back.push((name.clone(), Some(node.to_owned())));
            }
        }
    }
    if back.is_empty() {
        return Ok(vec![]);
    }
    eprintln!("node {node}: resumed; failing back {} VM(s)", back.len());
    move_many(c, back, "failback", parallel, OnIncompatible::Fail, limit).await
}
