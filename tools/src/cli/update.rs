//! `ferry cluster update`: cluster-aware updating (Windows' CAU). Node
//! after node, never two at once and never while another node is down
//! (quorum): pause and drain it, have its agent run the update command on
//! it (`crate::agent::node_command`), restart its agent (possibly a new
//! binary), wait until the new agent has registered and its health checks
//! passed (`crate::agent::health`), resume it with failback. The run
//! holds a lock in etcd (under its own lease: a second run is refused
//! while it lives) and records its progress there, so a run restarted
//! after a crash goes on after the last finished node.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use cluster::{
    ChangeKind, Cluster, ClusterKey, CommandOutput, CommandRequest, CommandResult, CommandState, HealthCheck, Lease,
    NodeHealth, FORMAT_VERSION,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::moving::{self, Failback, MoveResult, OnIncompatible, Parallel, Placement};
use super::vm::{block_on, connect, node_views, EtcdArgs};

#[derive(Args)]
pub struct UpdateArgs {
    /// The update command. Each node's agent runs it on its node by
    /// `sh -c`, as the agent's user (root), with FERRY_NODE, FERRY_CLUSTER
    /// and FERRY_UPDATE_RUN set; its output is shown here as it comes.
    #[arg(long, value_name = "CMD", required_unless_present = "preview")]
    run: Option<String>,
    /// Nodes to update, in order [default: every node, by name].
    #[arg(long, value_name = "NODE,...", value_delimiter = ',')]
    nodes: Vec<String>,
    /// Go on after this many nodes failed; the run stops past it.
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_failed_nodes: usize,
    #[arg(long, value_enum, default_value = "immediate")]
    failback: Failback,
    /// How long a node may take, from its agent's restart, until its new
    /// agent has registered and reported its health checks passed.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    health_timeout: u64,
    /// How long the update command may run on one node (its agent then
    /// kills it with everything it started).
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    command_timeout: u64,
    /// Ping these VMs (ICMP, from where this command runs) throughout the
    /// run: each move's figures then have the pings sent and lost while
    /// it was under way, and the report each VM's totals.
    #[arg(long, value_name = "VM=IP,...", value_delimiter = ',', value_parser = parse_ping)]
    ping: Vec<(String, std::net::Ipv4Addr)>,
    #[arg(long, value_name = "MS", default_value_t = 10)]
    ping_interval_ms: u64,
    /// Write update-report.json and update-report.html here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Print the plan (order, which VMs go where, the quorum check) and
    /// change nothing.
    #[arg(long)]
    preview: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// The last update's plan and progress (`update/progress`, no lease).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateProgress {
    pub v: u32,
    pub id: String,
    pub nodes: Vec<String>,
    pub done: Vec<String>,
    pub failed: Vec<String>,
    pub current: Option<String>,
    /// running, finished, failed, interrupted.
    pub state: String,
    pub started_unix_ms: u64,
}

/// One node's part of the report.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub node: String,
    pub ok: bool,
    pub error: Option<String>,
    pub drain_ms: f64,
    pub update_ms: f64,
    pub healthy_ms: f64,
    pub failback_ms: f64,
    /// From the drain's start to the failback's end (or the failure).
    pub total_ms: f64,
    /// How the command ended (None: it never ran).
    pub command_state: Option<CommandState>,
    pub command_status: Option<i32>,
    /// The end of the command's output (its last 64 KiB at most).
    pub command_output: String,
    /// How much it wrote in all.
    pub command_output_bytes: u64,
    pub ferry_version_after: Option<String>,
    /// The checks the node's new agent reported (None: it never did).
    pub health: Option<Vec<HealthCheck>>,
    pub moves: Vec<MoveResult>,
}

/// The whole run, as the report files and `--json` give it.
#[derive(Serialize)]
struct Report<'a> {
    cluster: &'a str,
    id: &'a str,
    command: &'a str,
    state: &'a str,
    total_ms: f64,
    nodes_updated: usize,
    nodes_failed: usize,
    moves: usize,
    moves_failed: usize,
    /// Sums over the nodes of this run.
    drain_ms: f64,
    update_ms: f64,
    healthy_ms: f64,
    failback_ms: f64,
    /// Over the moves that reported a downtime.
    downtime_ms_max: Option<f64>,
    downtime_ms_total: f64,
    /// With --ping: lost in all, and the most lost during one move (None:
    /// nothing was pinged).
    pings_lost: Option<u64>,
    pings_lost_max_per_move: Option<u64>,
    pings: &'a [PingReport],
    nodes: &'a [NodeReport],
}

/// One VM pinged throughout the run (--ping).
#[derive(Clone, Debug, Serialize)]
struct PingReport {
    vm: String,
    target: String,
    interval_ms: u64,
    sent: u64,
    lost: u64,
    /// Of those lost, sent while one of the VM's moves was under way.
    lost_during_moves: u64,
    /// The pinger failed (no root, say): nothing was measured.
    error: Option<String>,
}

/// A reply later than this counts as lost (as `ferry ping`'s default).
const PING_TIMEOUT: Duration = Duration::from_millis(200);

fn parse_ping(s: &str) -> Result<(String, std::net::Ipv4Addr), String> {
    let (vm, ip) = s.split_once('=').ok_or("give VM=IPV4")?;
    cluster::keys::validate_name("VM name", vm).map_err(|e| e.to_string())?;
    Ok((vm.to_owned(), ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?))
}

/// Of `probes`, those sent from `from_ms` to `to_ms` (Unix ms): how many,
/// and how many went unanswered.
fn pings_within(probes: &[crate::ping::Sent], from_ms: u64, to_ms: u64) -> (u64, u64) {
    let within = probes.iter().filter(|p| (from_ms..=to_ms).contains(&p.unix_ms));
    within.fold((0, 0), |(sent, lost), p| (sent + 1, lost + u64::from(!p.answered)))
}

/// Adds `pings_sent` and `pings_lost` to each move of a pinged VM, from
/// the probes sent while it was under way; returns each VM's totals.
fn attribute_pings(
    reports: &mut [NodeReport],
    pinged: Vec<(String, std::net::Ipv4Addr, Result<Vec<crate::ping::Sent>, String>)>,
    interval_ms: u64,
) -> Vec<PingReport> {
    let mut out = vec![];
    for (vm, ip, probes) in pinged {
        let probes = match probes {
            Ok(p) => p,
            Err(e) => {
                let none = PingReport {
                    vm,
                    target: ip.to_string(),
                    interval_ms,
                    sent: 0,
                    lost: 0,
                    lost_during_moves: 0,
                    error: Some(e),
                };
                out.push(none);
                continue;
            }
        };
        let mut during = 0;
        for m in reports.iter_mut().flat_map(|r| r.moves.iter_mut()).filter(|m| m.vm == vm) {
            let (sent, lost) = pings_within(&probes, m.requested_unix_ms, m.ended_unix_ms);
            during += lost;
            if !m.figures.is_object() {
                m.figures = serde_json::json!({});
            }
            m.figures["pings_sent"] = sent.into();
            m.figures["pings_lost"] = lost.into();
        }
        out.push(PingReport {
            vm,
            target: ip.to_string(),
            interval_ms,
            sent: probes.len() as u64,
            lost: probes.iter().filter(|p| !p.answered).count() as u64,
            lost_during_moves: during,
            error: None,
        });
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How long a node's agent may take to take up the command (it may be
/// restarting).
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long after the command's timeout its end may take to be recorded.
const END_GRACE: Duration = Duration::from_secs(30);

pub fn update(a: UpdateArgs) -> anyhow::Result<i32> {
    // Armed once the lock is held: from then on a signal only asks the run
    // to stop between nodes; before, nothing has changed and it just exits.
    let stop = Arc::new(Stop::default());
    let s = stop.clone();
    crate::signals::block();
    crate::signals::forward_with(move |sig| {
        if sig != libc::SIGINT && sig != libc::SIGTERM {
            return;
        }
        if !s.armed.load(Ordering::SeqCst) {
            std::process::exit(128 + sig);
        }
        if !s.asked.swap(true, Ordering::SeqCst) {
            eprintln!(
                "ferry: interrupted: the update stops once the current node is back or paused \
                 (never in the middle of a drain)"
            );
        } else {
            eprintln!("ferry: still finishing the current node; the update stops after it");
        }
    });
    block_on(async move { run(a, stop).await })
}

/// A run's interruption: `armed` while it may change the cluster,
/// `asked` once a SIGINT or SIGTERM came.
#[derive(Default)]
struct Stop {
    armed: AtomicBool,
    asked: AtomicBool,
}

/// Nodes other than `node` that are down (Down, or Down and quarantined).
fn down_besides(views: &[super::vm::NodeView], node: Option<&str>) -> Vec<String> {
    views.iter().filter(|v| Some(v.id.as_str()) != node && v.state.starts_with("Down")).map(|v| v.id.clone()).collect()
}

async fn run(a: UpdateArgs, stop: Arc<Stop>) -> anyhow::Result<i32> {
    let c = connect(&a.etcd).await?;
    let all = node_views(&c).await?;
    let mut nodes = if a.nodes.is_empty() { all.iter().map(|n| n.id.clone()).collect() } else { a.nodes.clone() };
    nodes.dedup();
    for n in &nodes {
        cluster::keys::validate_name("node id", n)?;
        if !all.iter().any(|v| &v.id == n) {
            bail!("unknown node {n}");
        }
    }
    if a.preview {
        return preview(&c, &nodes, a.failback).await;
    }
    // Quorum: with a node already down, taking another out (an update may
    // reboot it, and its etcd member with it) could leave etcd without a
    // majority. Refused before anything changes.
    let down = down_besides(&all, None);
    if !down.is_empty() {
        bail!(
            "refusing to update: node(s) {} down; taking another node out now could take the cluster below \
             quorum (bring them back first)",
            down.join(", ")
        );
    }
    let command = a.run.clone().expect("clap requires --run");
    // The lock: one run at a time, for as long as this process lives.
    let lease = Lease::grant(c.store(), Duration::from_secs(10)).await?;
    let me = format!("pid {} started {}", std::process::id(), cluster::records::unix_ms());
    if let Some(holder) = c.take_update_lock(&lease, &me).await? {
        bail!("an update of cluster {} is already running ({holder}); wait for it to end", a.etcd.cluster);
    }
    stop.armed.store(true, Ordering::SeqCst);
    let progress_key = c.keys().update_progress();
    let previous: Option<UpdateProgress> = c
        .store()
        .get(&progress_key)
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
        .filter(|p: &UpdateProgress| p.state == "running" || p.state == "interrupted");
    let mut progress = match previous.filter(|p| p.nodes == nodes) {
        Some(mut p) => {
            eprintln!("ferry: resuming update {} after {} node(s): {}", p.id, p.done.len(), p.done.join(", "));
            // It runs again: an "interrupted" left as it was would end this
            // run as interrupted too, however far it got.
            p.state = "running".into();
            p
        }
        None => UpdateProgress {
            v: FORMAT_VERSION,
            id: format!("update-{}", cluster::records::unix_ms()),
            nodes: nodes.clone(),
            done: vec![],
            failed: vec![],
            current: None,
            state: "running".into(),
            started_unix_ms: cluster::records::unix_ms(),
        },
    };
    let save = |p: &UpdateProgress| {
        let (c, key, v) = (c.clone(), progress_key.clone(), serde_json::to_vec(p).expect("serialises"));
        async move {
            if let Err(e) = c.store().put(&key, v, None).await {
                tracing::warn!("cannot record the update's progress: {e}");
            }
        }
    };
    save(&progress).await;
    let settings = c.settings().await?;
    let parallel = Parallel {
        per_source: settings.live_migrations_per_node as usize,
        per_destination: settings.incoming_per_node as usize,
    };
    let ping_stop = Arc::new(AtomicBool::new(false));
    let pingers: Vec<_> = a
        .ping
        .iter()
        .map(|(vm, ip)| {
            let (ip, stop, interval) = (*ip, ping_stop.clone(), Duration::from_millis(a.ping_interval_ms));
            let h = std::thread::spawn(move || {
                crate::ping::follow(ip, interval, PING_TIMEOUT, &stop).map_err(|e| e.to_string())
            });
            (vm.clone(), ip, h)
        })
        .collect();
    let started = Instant::now();
    let mut reports: Vec<NodeReport> = vec![];
    let pending: Vec<String> =
        nodes.iter().filter(|n| !progress.done.contains(n) && !progress.failed.contains(n)).cloned().collect();
    for node in &pending {
        if stop.asked.load(Ordering::SeqCst) {
            progress.state = "interrupted".into();
            eprintln!("ferry: update {} interrupted before node {node}; run it again to go on from there", progress.id);
            break;
        }
        if progress.failed.len() > a.max_failed_nodes {
            break;
        }
        // Never two nodes at once: every other node must be up.
        let not_up = down_besides(&node_views(&c).await?, Some(node));
        if !not_up.is_empty() {
            let why = format!(
                "nodes {} are down: updating {node} now could take the cluster below quorum",
                not_up.join(", ")
            );
            eprintln!("ferry: stopping: {why}");
            progress.state = "failed".into();
            reports.push(node_report(node));
            reports.last_mut().expect("pushed").error = Some(why);
            break;
        }
        progress.current = Some(node.clone());
        save(&progress).await;
        eprintln!(
            "ferry: updating node {node} ({} of {})",
            progress.done.len() + progress.failed.len() + 1,
            nodes.len()
        );
        let r = update_node(&c, &a, &command, &progress.id, node, &parallel, settings.failback_window).await;
        eprintln!(
            "ferry: node {node}: {}",
            if r.ok { "updated".to_owned() } else { format!("FAILED: {}", r.error.clone().unwrap_or_default()) }
        );
        if r.ok {
            progress.done.push(node.clone());
        } else {
            progress.failed.push(node.clone());
        }
        progress.current = None;
        save(&progress).await;
        reports.push(r);
    }
    if progress.state == "running" {
        let all_done = progress.done.len() == nodes.len();
        progress.state = if all_done { "finished".into() } else { "failed".into() };
    }
    save(&progress).await;
    let _ = lease.revoke().await;
    ping_stop.store(true, Ordering::SeqCst);
    let pinged: Vec<_> = pingers
        .into_iter()
        .map(|(vm, ip, h)| (vm, ip, h.join().unwrap_or_else(|_| Err("the pinger panicked".into()))))
        .collect();
    let pings = attribute_pings(&mut reports, pinged, a.ping_interval_ms);
    for p in pings.iter().filter(|p| p.error.is_some()) {
        eprintln!("ferry: pinging {} ({}) failed: {}", p.vm, p.target, p.error.as_deref().unwrap_or(""));
    }
    let measured: Vec<&PingReport> = pings.iter().filter(|p| p.error.is_none()).collect();
    let all_moves = || reports.iter().flat_map(|r| &r.moves);
    let sum = |f: fn(&NodeReport) -> f64| reports.iter().map(f).sum::<f64>();
    let downtimes: Vec<f64> = all_moves().filter_map(|m| m.figures["downtime_ms"].as_f64()).collect();
    let report = Report {
        cluster: &a.etcd.cluster,
        id: &progress.id,
        command: &command,
        state: &progress.state,
        total_ms: ms(started.elapsed()),
        nodes_updated: reports.iter().filter(|r| r.ok).count(),
        nodes_failed: reports.iter().filter(|r| !r.ok).count(),
        moves: all_moves().count(),
        moves_failed: all_moves().filter(|m| !m.ok).count(),
        drain_ms: sum(|r| r.drain_ms),
        update_ms: sum(|r| r.update_ms),
        healthy_ms: sum(|r| r.healthy_ms),
        failback_ms: sum(|r| r.failback_ms),
        downtime_ms_max: downtimes.iter().copied().reduce(f64::max),
        downtime_ms_total: downtimes.iter().sum(),
        pings_lost: (!measured.is_empty()).then(|| measured.iter().map(|p| p.lost).sum()),
        pings_lost_max_per_move: all_moves().filter_map(|m| m.figures["pings_lost"].as_u64()).max(),
        pings: &pings,
        nodes: &reports,
    };
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("update-report.json"), serde_json::to_vec_pretty(&report)?)?;
        std::fs::write(dir.join("update-report.html"), html(&report))?;
        eprintln!("ferry: report in {}", dir.join("update-report.{json,html}").display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for r in &reports {
            println!(
                "{:<8} {:<6} drain {:>7.0} ms  update {:>7.0} ms  healthy {:>7.0} ms  failback {:>7.0} ms  {} move(s){}",
                r.node,
                if r.ok { "ok" } else { "FAILED" },
                r.drain_ms,
                r.update_ms,
                r.healthy_ms,
                r.failback_ms,
                r.moves.len(),
                r.error.as_ref().map(|e| format!("  {e}")).unwrap_or_default()
            );
        }
        for p in &measured {
            println!(
                "pinged {} ({}): {} lost of {} ({} during its moves)",
                p.vm, p.target, p.lost, p.sent, p.lost_during_moves
            );
        }
        println!(
            "update {}: {} ({} node(s) updated, {} failed, {} moves, {:.1} s)",
            progress.id,
            progress.state,
            report.nodes_updated,
            report.nodes_failed,
            report.moves,
            report.total_ms / 1000.0
        );
    }
    Ok(if progress.state == "finished" { 0 } else { 1 })
}

/// A node's report before anything happened to it.
fn node_report(node: &str) -> NodeReport {
    NodeReport {
        node: node.into(),
        ok: false,
        error: None,
        drain_ms: 0.0,
        update_ms: 0.0,
        healthy_ms: 0.0,
        failback_ms: 0.0,
        total_ms: 0.0,
        command_state: None,
        command_status: None,
        command_output: String::new(),
        command_output_bytes: 0,
        ferry_version_after: None,
        health: None,
        moves: vec![],
    }
}

async fn update_node(
    c: &Cluster,
    a: &UpdateArgs,
    command: &str,
    run: &str,
    node: &str,
    parallel: &Parallel,
    window: Option<cluster::records::FailbackWindow>,
) -> NodeReport {
    let started = Instant::now();
    let mut r = update_node_steps(c, a, command, run, node, parallel, window, node_report(node)).await;
    r.total_ms = ms(started.elapsed());
    r
}

#[allow(clippy::too_many_arguments)]
async fn update_node_steps(
    c: &Cluster,
    a: &UpdateArgs,
    command: &str,
    run: &str,
    node: &str,
    parallel: &Parallel,
    window: Option<cluster::records::FailbackWindow>,
    mut r: NodeReport,
) -> NodeReport {
    let limit = Duration::from_secs(1800);
    // 1. Drain.
    let t = Instant::now();
    match moving::pause_node(c, node, true, parallel, OnIncompatible::Quick, limit).await {
        Ok(moves) => r.moves = moves,
        Err(e) => return fail(r, format!("drain: {e:#}")),
    }
    r.drain_ms = ms(t.elapsed());
    if let Some(m) = r.moves.iter().find(|m| !m.ok) {
        let why = format!("drain: VM {} could not leave: {}", m.vm, m.error.clone().unwrap_or_default());
        return fail(r, why);
    }
    // 2. The command, run by the node's agent.
    let t = Instant::now();
    let out = run_on_node(c, node, run, command, a.command_timeout).await;
    r.update_ms = ms(t.elapsed());
    match out {
        Err(e) => return fail(r, format!("the update command: {e:#}")),
        Ok(res) => {
            r.command_state = Some(res.state);
            r.command_status = res.exit_code;
            r.command_output = res.output_tail.clone();
            r.command_output_bytes = res.output_bytes;
            if let Some(why) = command_failure(&res, a.command_timeout) {
                return fail(r, why);
            }
        }
    }
    // 3. Restart the agent and wait until it is back and healthy.
    let t = Instant::now();
    let health = restart_and_check(c, node, Duration::from_secs(a.health_timeout)).await;
    r.healthy_ms = ms(t.elapsed());
    match health {
        Ok(h) => {
            r.ferry_version_after = Some(h.ferry_version);
            r.health = Some(h.checks);
        }
        Err((why, h)) => {
            r.health = h.map(|h| h.checks);
            return fail(r, why);
        }
    }
    // 4. Resume with failback.
    let t = Instant::now();
    match moving::resume_node(c, node, a.failback, parallel, window, limit).await {
        Ok(moves) => {
            if let Some(m) = moves.iter().find(|m| !m.ok) {
                r.error = Some(format!("failback: VM {} stayed away: {}", m.vm, m.error.clone().unwrap_or_default()));
            }
            r.moves.extend(moves);
        }
        Err(e) => r.error = Some(format!("resume: {e:#}")),
    }
    r.failback_ms = ms(t.elapsed());
    r.ok = r.error.is_none();
    r
}

fn fail(mut r: NodeReport, why: String) -> NodeReport {
    r.ok = false;
    r.error = Some(why);
    r
}

/// Why a command's result fails its node (None: it succeeded).
fn command_failure(res: &CommandResult, timeout_secs: u64) -> Option<String> {
    if res.succeeded() {
        return None;
    }
    let detail = if res.detail.is_empty() { String::new() } else { format!(": {}", res.detail) };
    Some(match res.state {
        CommandState::Exited => match (res.exit_code, res.signal) {
            (Some(code), _) => format!("the update command failed (exit status {code})"),
            (None, Some(sig)) => format!("the update command failed (killed by signal {sig})"),
            (None, None) => "the update command failed".to_owned(),
        },
        CommandState::TimedOut => format!("the update command ran past {timeout_secs} s and was killed"),
        CommandState::Lost => format!("the update command's end is unknown{detail}"),
        CommandState::Refused => format!("the node's agent did not run the update command{detail}"),
        CommandState::Running | CommandState::Other => format!("the update command ended as {:?}{detail}", res.state),
    })
}

/// Asks `node`'s agent to run `command` as run `run` and waits for its
/// end, showing its output as it comes. A run the agent has already
/// finished (a resumed update) is not run again: its result is returned.
async fn run_on_node(
    c: &Cluster,
    node: &str,
    run: &str,
    command: &str,
    timeout_secs: u64,
) -> anyhow::Result<CommandResult> {
    let req = CommandRequest {
        v: FORMAT_VERSION,
        run: run.to_owned(),
        command: command.to_owned(),
        timeout_secs,
        requested_unix_ms: cluster::records::unix_ms(),
        requested_by: format!("cluster update {run}"),
    };
    // An idempotent put: after an unknown outcome, putting it again is safe.
    let mut tries = 0;
    let rev = loop {
        match c.put_command_request(node, &req).await {
            Err(e) if e.outcome_unknown() && tries < 3 => tries += 1,
            r => break r?,
        }
    };
    let mut watch = c.watch_commands(node, rev + 1).await?;
    let mut shown = Shown::new(node);
    let mut taken = false;
    let start_deadline = Instant::now() + START_LIMIT;
    let deadline = Instant::now() + Duration::from_secs(timeout_secs) + END_GRACE;
    let ours = |res: &CommandResult| res.run == run;
    if let Some(res) = c.command_result(node).await?.map(|r| r.value).filter(ours) {
        if res.state.is_final() {
            return Ok(res);
        }
        taken = true;
    }
    loop {
        let limit = if taken { deadline } else { start_deadline.min(deadline) };
        let left = limit.saturating_duration_since(Instant::now());
        if left.is_zero() {
            shown.flush();
            if taken {
                bail!("node {node}'s agent recorded no end of it within {END_GRACE:?} of its timeout");
            }
            let other = c.command_result(node).await?.map(|r| r.value).filter(|r| !ours(r));
            match other.filter(|o| o.state == CommandState::Running) {
                Some(o) => bail!(
                    "node {node}'s agent is still running the command of run {} (started {:.0} s ago); try again \
                     once it has ended",
                    o.run,
                    cluster::records::unix_ms().saturating_sub(o.started_unix_ms) as f64 / 1000.0
                ),
                None => bail!(
                    "node {node}'s agent did not take it up within {START_LIMIT:?} (is the agent running, and a \
                     Ferry whose agents run update commands?)"
                ),
            }
        }
        let ch = match watch.next_within(left.min(Duration::from_secs(1))).await {
            Some(Ok(ch)) if ch.kind == ChangeKind::Put => ch,
            Some(Err(e @ cluster::Error::Compacted { .. })) => {
                // Output lost to compaction is only not shown; the result is read again.
                tracing::warn!("{e}");
                watch = c.watch_commands(node, 0).await?;
                if let Some(res) = c.command_result(node).await?.map(|r| r.value).filter(ours) {
                    taken = true;
                    if res.state.is_final() {
                        shown.flush();
                        return Ok(res);
                    }
                }
                continue;
            }
            _ => continue,
        };
        match c.keys().parse(&ch.kv.key) {
            Some(ClusterKey::CommandOutput(..)) => {
                if let Ok(o) = cluster::records::decode::<CommandOutput>(&ch.kv.key, &ch.kv.value) {
                    if o.run == run {
                        shown.push(&o.text);
                    }
                }
            }
            Some(ClusterKey::CommandResult(_)) => {
                let Ok(res) = cluster::records::decode::<CommandResult>(&ch.kv.key, &ch.kv.value) else { continue };
                if ours(&res) {
                    taken = true;
                    if res.state.is_final() {
                        shown.flush();
                        // Streamed output has served its purpose; the result keeps its end.
                        let _ = c.delete_command_output(node).await;
                        return Ok(res);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A command's output shown on the terminal line by line, each line after
/// its node's name (`  a| ...`); a very long line in pieces.
struct Shown {
    prefix: String,
    pending: String,
}

/// A line longer than this is shown in pieces.
const LINE_MAX: usize = 4096;

impl Shown {
    fn new(node: &str) -> Shown {
        Shown { prefix: format!("  {node}| "), pending: String::new() }
    }

    fn push(&mut self, text: &str) {
        for c in text.chars() {
            if c == '\n' {
                self.line();
            } else {
                self.pending.push(c);
                if self.pending.len() >= LINE_MAX {
                    self.line();
                }
            }
        }
    }

    fn line(&mut self) {
        use std::io::Write;
        // Not eprintln!: a closed terminal must not stop the update.
        let _ = writeln!(std::io::stderr().lock(), "{}{}", self.prefix, self.pending);
        self.pending.clear();
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.line();
        }
    }
}

/// Asks `node`'s agent to restart and waits, at most `limit`, until the
/// new agent has registered and reported its health checks; they must
/// pass. On failure: why, and the checks if they came.
async fn restart_and_check(
    c: &Cluster,
    node: &str,
    limit: Duration,
) -> Result<NodeHealth, (String, Option<NodeHealth>)> {
    let deadline = Instant::now() + limit;
    let before = match c.node(node).await {
        Ok(n) => n.map_or(0, |n| n.value.registered_unix_ms),
        Err(e) => return Err((format!("cannot read node {node}: {e}"), None)),
    };
    if let Err(e) = c.store().put(&c.keys().node_restart(node), b"restart".to_vec(), None).await {
        return Err((format!("cannot ask node {node}'s agent to restart: {e}"), None));
    }
    let mut registered: Option<u64> = None;
    loop {
        if registered.is_none() {
            if let Ok(Some(n)) = c.node(node).await {
                registered = Some(n.value.registered_unix_ms).filter(|&at| at > before);
            }
        }
        if let Some(at) = registered {
            if let Ok(Some(h)) = c.node_health(node).await {
                let h = h.value;
                if h.registered_unix_ms == at {
                    if h.ok {
                        return Ok(h);
                    }
                    let failed: Vec<String> =
                        h.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.check, c.detail)).collect();
                    return Err((format!("node {node}'s health checks failed: {}", failed.join("; ")), Some(h)));
                }
            }
        }
        if Instant::now() >= deadline {
            let why = match registered {
                None => format!("node {node}'s agent did not come back within {} s", limit.as_secs()),
                Some(_) => {
                    format!("node {node}'s agent came back but reported no health checks within {} s", limit.as_secs())
                }
            };
            return Err((why, None));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where a VM drained off `node` ends up after the node's update, by the
/// failback mode (resume_node's rules).
fn after_update(failback: Failback, node: &str, to: &str, preferred: &[String]) -> String {
    match failback {
        Failback::Immediate => format!("back to {node} after its update"),
        Failback::Policy if preferred.first().map(String::as_str) == Some(node) => {
            format!("back to {node} after its update (its first preferred owner)")
        }
        Failback::Policy => format!("stays on {to} ({node} is not its first preferred owner)"),
        Failback::None => format!("stays on {to} (no failback)"),
    }
}

/// `--preview`: the order, what each drain would move where and what
/// comes back, the quorum.
async fn preview(c: &Cluster, nodes: &[String], failback: Failback) -> anyhow::Result<i32> {
    let views = node_views(c).await?;
    let owners = c.vm_owners_and_statuses().await?;
    let mode = format!("{failback:?}").to_lowercase();
    println!("update plan for {} node(s), one at a time, failback {mode}:", nodes.len());
    let down = down_besides(&views, None);
    if !down.is_empty() {
        println!("REFUSED: node(s) {} down: the run would not start (quorum)", down.join(", "));
    }
    if failback == Failback::Policy {
        if let Some(w) = c.settings().await?.failback_window {
            let hour = ((cluster::records::unix_ms() / 3_600_000) % 24) as u8;
            if !w.contains(hour) {
                println!("note: outside the failback window ({w}) a node would stay paused after its update");
            }
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let down = down_besides(&views, Some(node));
        let quorum = if down.is_empty() {
            "others up: quorum kept".to_owned()
        } else {
            format!("REFUSED: {} down", down.join(", "))
        };
        println!("{}. node {node} ({quorum})", i + 1);
        let place = Placement { nodes: views.clone(), reserved: Default::default(), max_incoming: usize::MAX };
        for (vm, (owner, _)) in &owners {
            if owner.as_ref().and_then(|o| o.node.as_deref()) != Some(node.as_str()) {
                continue;
            }
            let rec = c.vm(vm).await?.map(|v| v.value);
            let (preferred, mem) = rec
                .as_ref()
                .map(|r| {
                    let mem = crate::agent::spec::VmSpec::from_record(r).map_or(0, |s| s.machine.mem_mib);
                    (r.preferred_owners.clone(), mem)
                })
                .unwrap_or_default();
            match moving::destination_for(vm, node, &place, &preferred, mem) {
                Ok(to) => println!("   {vm}: {node} -> {to}, {}", after_update(failback, node, &to, &preferred)),
                Err(e) => println!("   {vm}: {node} -> nowhere ({e}): the drain would fail"),
            }
        }
    }
    println!("nothing was changed (--preview)");
    Ok(0)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A figure of a move, or "-" where it was not measured.
fn figure(m: &MoveResult, key: &str, decimals: usize) -> String {
    match &m.figures[key] {
        serde_json::Value::Number(n) => n.as_f64().map_or("-".into(), |x| format!("{x:.decimals$}")),
        _ => "-".into(),
    }
}

/// The report as one HTML page with no external assets.
fn html(r: &Report<'_>) -> String {
    let mut nodes = String::new();
    let mut details = String::new();
    for n in r.nodes {
        nodes.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td></tr>\n",
            if n.ok { "ok" } else { "bad" },
            esc(&n.node),
            if n.ok { "updated" } else { "FAILED" },
            n.drain_ms,
            n.update_ms,
            n.healthy_ms,
            n.failback_ms,
            n.total_ms,
            n.moves.len(),
            esc(n.error.as_deref().unwrap_or("")),
        ));
        details.push_str(&format!("<h2>Node {}</h2>\n", esc(&n.node)));
        if n.moves.is_empty() {
            details.push_str("<p>No VM moved.</p>\n");
        } else {
            details.push_str(
                "<table><tr><th>VM</th><th>from</th><th>to</th><th>why</th><th>mode</th><th>result</th>\
                 <th>downtime ms</th><th>total ms</th><th>pings lost</th><th>error</th></tr>\n",
            );
            for m in &n.moves {
                details.push_str(&format!(
                    "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                    if m.ok { "ok" } else { "bad" },
                    esc(&m.vm),
                    esc(&m.from),
                    esc(&m.to),
                    esc(m.figures["reason"].as_str().unwrap_or("")),
                    esc(&m.mode),
                    if m.ok { "moved" } else { "FAILED" },
                    figure(m, "downtime_ms", 1),
                    figure(m, "total_ms", 0),
                    figure(m, "pings_lost", 0),
                    esc(m.error.as_deref().unwrap_or("")),
                ));
            }
            details.push_str("</table>\n");
        }
        if let Some(h) = &n.health {
            let failed: Vec<String> =
                h.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", esc(&c.check), esc(&c.detail))).collect();
            details.push_str(&format!(
                "<p>Health checks after the agent's restart: {} of {} passed{}.</p>\n",
                h.len() - failed.len(),
                h.len(),
                if failed.is_empty() { String::new() } else { format!("; FAILED: {}", failed.join("; ")) }
            ));
        }
        if let Some(state) = n.command_state {
            let kept = n.command_output.len() as u64;
            details.push_str(&format!(
                "<details{}><summary>Command output ({:?}, exit status {}; {} bytes{})</summary><pre>{}</pre></details>\n",
                if n.ok { "" } else { " open" },
                state,
                n.command_status.map_or("-".into(), |s| s.to_string()),
                n.command_output_bytes,
                if kept < n.command_output_bytes { format!(", the last {kept} shown") } else { String::new() },
                esc(&n.command_output),
            ));
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Ferry cluster update {id}</title><style>\
         body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:0.5em 0}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}tr.bad{{background:#fdd}}\
         tr.total td{{font-weight:bold}}pre{{background:#f6f6f6;padding:0.5em;max-height:30em;overflow:auto}}</style></head><body>\
         <h1>Cluster update {id}: {state}</h1><p>Cluster {cluster}, command <code>{cmd}</code>: {nu} node(s) updated, \
         {nf} failed, {mv} moves ({mf} failed), downtime {dt:.1} ms in all (longest {dmax}), {t:.1} s.</p>\
         {pings}<table><tr><th>node</th><th>result</th><th>drain ms</th><th>update ms</th><th>healthy ms</th><th>failback ms</th>\
         <th>total ms</th><th>moves</th><th>error</th></tr>\n{nodes}\
         <tr class=\"total\"><td>all</td><td></td><td>{d:.0}</td><td>{u:.0}</td><td>{h:.0}</td><td>{f:.0}</td><td>{tm:.0}</td><td>{mv}</td><td></td></tr>\
         </table>\n{details}</body></html>\n",
        id = esc(r.id),
        state = esc(r.state),
        cluster = esc(r.cluster),
        cmd = esc(r.command),
        nu = r.nodes_updated,
        nf = r.nodes_failed,
        mv = r.moves,
        mf = r.moves_failed,
        dt = r.downtime_ms_total,
        dmax = r.downtime_ms_max.map_or("-".into(), |d| format!("{d:.1} ms")),
        t = r.total_ms / 1000.0,
        d = r.drain_ms,
        u = r.update_ms,
        h = r.healthy_ms,
        f = r.failback_ms,
        tm = r.total_ms,
        pings = ping_lines(r.pings),
    )
}

/// The pinged VMs' totals, one paragraph (none without --ping).
fn ping_lines(pings: &[PingReport]) -> String {
    let lines: Vec<String> = pings
        .iter()
        .map(|p| match &p.error {
            Some(e) => format!("{} ({}): not measured: {}", esc(&p.vm), esc(&p.target), esc(e)),
            None => format!(
                "{} ({}): {} of {} pings lost ({} during its moves)",
                esc(&p.vm),
                esc(&p.target),
                p.lost,
                p.sent,
                p.lost_during_moves
            ),
        })
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let interval = pings[0].interval_ms;
    format!("<p>Pinged every {interval} ms from where the update ran: {}.</p>", lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_with<'a>(nodes: &'a [NodeReport]) -> Report<'a> {
        Report {
            cluster: "c",
            id: "update-1",
            command: "apt-get <upgrade>",
            state: "failed",
            total_ms: 1000.0,
            nodes_updated: 0,
            nodes_failed: 1,
            moves: 1,
            moves_failed: 0,
            drain_ms: 1.0,
            update_ms: 2.0,
            healthy_ms: 0.0,
            failback_ms: 0.0,
            downtime_ms_max: Some(20.0),
            downtime_ms_total: 20.0,
            pings_lost: None,
            pings_lost_max_per_move: None,
            pings: &[],
            nodes,
        }
    }

    #[test]
    fn the_html_report_shows_a_failed_command_output_escaped_and_each_move() {
        let mut n = node_report("b");
        n.error = Some("the update command failed (exit status 1)".into());
        n.command_state = Some(CommandState::Exited);
        n.command_status = Some(1);
        n.command_output = "E: <dpkg> was interrupted & failed\n".into();
        n.command_output_bytes = 35;
        n.moves.push(MoveResult {
            vm: "app0".into(),
            id: "m".into(),
            from: "b".into(),
            to: "a".into(),
            mode: "live".into(),
            ok: true,
            error: None,
            requested_unix_ms: 1,
            ended_unix_ms: 2,
            figures: serde_json::json!({"downtime_ms": 21.25, "total_ms": 95.4, "reason": "drain"}),
        });
        let nodes = [n];
        let h = html(&report_with(&nodes));
        assert!(h.contains("<details open><summary>Command output (Exited, exit status 1; 35 bytes)"), "{h}");
        assert!(h.contains("E: &lt;dpkg&gt; was interrupted &amp; failed"), "{h}");
        assert!(h.contains("<code>apt-get &lt;upgrade&gt;</code>"), "{h}");
        assert!(h.contains("<td>app0</td><td>b</td><td>a</td><td>drain</td><td>live</td><td>moved</td><td>21.2</td><td>95</td><td>-</td>"), "{h}");
        assert!(!h.contains("http"), "no external assets");
    }

    #[test]
    fn pings_lost_are_counted_against_the_move_under_way_when_they_were_sent() {
        use crate::ping::Sent;
        let probes: Vec<Sent> =
            (0..100).map(|i| Sent { unix_ms: 1000 + i * 10, answered: !(30..32).contains(&i) && i != 90 }).collect();
        assert_eq!(pings_within(&probes, 1250, 1400), (16, 2));
        let mut n = node_report("a");
        let mv = |vm: &str, from: u64, to: u64| MoveResult {
            vm: vm.into(),
            id: String::new(),
            from: "a".into(),
            to: "b".into(),
            mode: "live".into(),
            ok: true,
            error: None,
            requested_unix_ms: from,
            ended_unix_ms: to,
            figures: serde_json::Value::Null,
        };
        n.moves = vec![mv("app0", 1250, 1400), mv("app1", 1250, 1400), mv("app0", 1500, 1600)];
        let ip = std::net::Ipv4Addr::new(10, 0, 0, 1);
        let mut nodes = [n];
        let p = attribute_pings(&mut nodes, vec![("app0".into(), ip, Ok(probes))], 10);
        assert_eq!((p[0].sent, p[0].lost, p[0].lost_during_moves), (100, 3, 2), "the loss at 1900 was outside");
        let m = &nodes[0].moves;
        assert_eq!((m[0].figures["pings_sent"].as_u64(), m[0].figures["pings_lost"].as_u64()), (Some(16), Some(2)));
        assert_eq!(m[1].figures["pings_lost"], serde_json::Value::Null, "app1 was not pinged");
        assert_eq!(m[2].figures["pings_lost"].as_u64(), Some(0));
        assert!(parse_ping("app0=10.0.0.1").is_ok() && parse_ping("app0").is_err() && parse_ping("app0=x").is_err());
    }

    #[test]
    fn the_preview_says_where_vms_end_up_by_failback_mode() {
        let pref = ["a".to_owned(), "b".to_owned()];
        assert_eq!(after_update(Failback::Immediate, "b", "c", &pref), "back to b after its update");
        assert_eq!(
            after_update(Failback::Policy, "a", "b", &pref),
            "back to a after its update (its first preferred owner)"
        );
        assert_eq!(after_update(Failback::Policy, "b", "a", &pref), "stays on a (b is not its first preferred owner)");
        assert_eq!(after_update(Failback::None, "a", "b", &pref), "stays on b (no failback)");
    }

    #[test]
    fn a_command_result_fails_its_node_unless_it_exited_0() {
        let res = |state, exit_code, signal| CommandResult {
            v: 1,
            run: "u".into(),
            state,
            exit_code,
            signal,
            started_unix_ms: 0,
            ended_unix_ms: Some(1),
            output_tail: String::new(),
            output_bytes: 0,
            detail: "runner gone".into(),
        };
        assert_eq!(command_failure(&res(CommandState::Exited, Some(0), None), 60), None);
        assert_eq!(
            command_failure(&res(CommandState::Exited, Some(2), None), 60).unwrap(),
            "the update command failed (exit status 2)"
        );
        assert_eq!(
            command_failure(&res(CommandState::TimedOut, None, Some(9)), 60).unwrap(),
            "the update command ran past 60 s and was killed"
        );
        assert_eq!(
            command_failure(&res(CommandState::Lost, None, None), 60).unwrap(),
            "the update command's end is unknown: runner gone"
        );
    }
}
