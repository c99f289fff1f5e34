//! `ferry cluster update`: cluster-aware updating (Windows' CAU). Node
//! after node, never two at once and never below quorum: pause and drain
//! it, run the update command on it, restart its agent (possibly a new
//! binary), wait until it is healthy, resume it with failback. The run
//! holds a lock in etcd (under its own lease: a second run is refused
//! while it lives) and records its progress there, so a run restarted
//! after a crash goes on after the last finished node.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use cluster::{Cluster, Lease, FORMAT_VERSION};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::moving::{self, Failback, MoveResult, OnIncompatible, Parallel, Placement};
use super::vm::{block_on, connect, node_views, EtcdArgs};

#[derive(Args)]
pub struct UpdateArgs {
    /// The update command, run by `sh -c` on each node in turn (inside the
    /// host's namespace with --lab), with FERRY_NODE and FERRY_CLUSTER set.
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
    /// How long a node may take to be healthy after its agent restarts.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    health_timeout: u64,
    /// How long the update command may run on one node.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    command_timeout: u64,
    /// Write update-report.json and update-report.html here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Print the plan (order, which VMs go where, the quorum check) and
    /// change nothing.
    #[arg(long)]
    preview: bool,
    /// The lab whose host namespaces the command runs in.
    #[arg(long, value_name = "NAME")]
    lab: Option<String>,
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
    pub command_status: Option<i32>,
    /// The end of the command's output (its last 64 KiB at most).
    pub command_output: String,
    /// How much it wrote in all.
    pub command_output_bytes: u64,
    pub ferry_version_after: Option<String>,
    pub moves: Vec<MoveResult>,
}

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
    pings_lost: Option<u64>,
    nodes: &'a [NodeReport],
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

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
        return preview(&c, &nodes).await;
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
    let volume = c.cluster_record().await?.map(|r| r.value.volume);
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
        let views = node_views(&c).await?;
        let not_up: Vec<String> =
            views.iter().filter(|v| &v.id != node && v.state == "Down").map(|v| v.id.clone()).collect();
        if !not_up.is_empty() {
            let why = format!(
                "nodes {} are down: updating {node} now could take the cluster below quorum",
                not_up.join(", ")
            );
            eprintln!("ferry: stopping: {why}");
            progress.state = "failed".into();
            reports.push(failed_report(node, why));
            break;
        }
        progress.current = Some(node.clone());
        save(&progress).await;
        eprintln!(
            "ferry: updating node {node} ({} of {})",
            progress.done.len() + progress.failed.len() + 1,
            nodes.len()
        );
        let r = update_node(&c, &a, &command, node, &parallel, settings.failback_window, volume.as_deref()).await;
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
    let moves = reports.iter().map(|r| r.moves.len()).sum();
    let report = Report {
        cluster: &a.etcd.cluster,
        id: &progress.id,
        command: &command,
        state: &progress.state,
        total_ms: ms(started.elapsed()),
        nodes_updated: reports.iter().filter(|r| r.ok).count(),
        nodes_failed: reports.iter().filter(|r| !r.ok).count(),
        moves,
        pings_lost: None,
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
        println!(
            "update {}: {} ({} node(s) updated, {} failed, {} moves, {:.1} s)",
            progress.id,
            progress.state,
            report.nodes_updated,
            report.nodes_failed,
            moves,
            report.total_ms / 1000.0
        );
    }
    Ok(if progress.state == "finished" { 0 } else { 1 })
}

fn failed_report(node: &str, why: String) -> NodeReport {
    NodeReport {
        node: node.into(),
        ok: false,
        error: Some(why),
        drain_ms: 0.0,
        update_ms: 0.0,
        healthy_ms: 0.0,
        failback_ms: 0.0,
        command_status: None,
        command_output: String::new(),
        command_output_bytes: 0,
        ferry_version_after: None,
        moves: vec![],
    }
}

async fn update_node(
    c: &Cluster,
    a: &UpdateArgs,
    command: &str,
    node: &str,
    parallel: &Parallel,
    window: Option<cluster::records::FailbackWindow>,
    volume: Option<&str>,
) -> NodeReport {
    let mut r = failed_report(node, String::new());
    r.error = None;
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
    // 2. The command, on the node.
    let t = Instant::now();
    let mut cmd = match &a.lab {
        Some(lab) => {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", &format!("{lab}-{node}"), "sh", "-c", command]);
            cmd
        }
        None => {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", command]);
            cmd
        }
    };
    cmd.env("FERRY_NODE", node).env("FERRY_CLUSTER", c.keys().prefix());
    let limit_cmd = Duration::from_secs(a.command_timeout);
    // Shown as it comes, each line after the node's name.
    let who = node.to_owned();
    let show = move |l: &[u8]| {
        use std::io::Write;
        // Not eprintln!: a closed terminal must not stop the reader (the
        // command would then die of SIGPIPE mid-update).
        let _ = writeln!(std::io::stderr().lock(), "  {who}| {}", String::from_utf8_lossy(l));
    };
    let out = tokio::task::spawn_blocking(move || run_bounded(cmd, limit_cmd, show)).await;
    r.update_ms = ms(t.elapsed());
    match out {
        Err(e) => return fail(r, format!("the update command: {e}")),
        Ok(Err(e)) => return fail(r, e),
        Ok(Ok(o)) => {
            r.command_status = o.status.and_then(|s| s.code());
            r.command_output = o.tail;
            r.command_output_bytes = o.bytes;
            match o.status {
                None => {
                    let why = format!("the update command ran past {} s and was killed", a.command_timeout);
                    return fail(r, why);
                }
                Some(s) if !s.success() => return fail(r, format!("the update command failed ({s})")),
                Some(_) => {}
            }
        }
    }
    // 3. Restart the agent and wait until it is back and healthy.
    let t = Instant::now();
    let before = match c.node(node).await {
        Ok(n) => n.map_or(0, |n| n.value.registered_unix_ms),
        Err(e) => return fail(r, format!("cannot read node {node}: {e}")),
    };
    if let Err(e) = c.store().put(&c.keys().node_restart(node), b"restart".to_vec(), None).await {
        return fail(r, format!("cannot ask node {node}'s agent to restart: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(a.health_timeout);
    loop {
        if let Ok(Some(n)) = c.node(node).await {
            if n.value.registered_unix_ms > before {
                r.ferry_version_after = Some(n.value.ferry_version);
                break;
            }
        }
        if Instant::now() >= deadline {
            return fail(r, format!("node {node}'s agent did not come back within {} s", a.health_timeout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let (Some(lab), Some(volume)) = (&a.lab, volume) {
        let target =
            super::validate::Target { lab: lab.clone(), hosts: vec![node.to_owned()], volume: vec![volume.to_owned()] };
        let v = tokio::task::spawn_blocking(move || super::validate::run_checks(&target)).await;
        match v {
            Ok(v) if v.ok => {}
            Ok(v) => {
                let failed: Vec<String> = v
                    .checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| format!("{} {}: {}", c.check, c.subject, c.detail))
                    .collect();
                return fail(r, format!("health checks failed: {}", failed.join("; ")));
            }
            Err(e) => return fail(r, format!("health checks: {e}")),
        }
    }
    r.healthy_ms = ms(t.elapsed());
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

/// `--preview`: the order, what each drain would move where, the quorum.
async fn preview(c: &Cluster, nodes: &[String]) -> anyhow::Result<i32> {
    let views = node_views(c).await?;
    let owners = c.vm_owners_and_statuses().await?;
    println!("update plan for {} node(s), one at a time:", nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let down: Vec<&str> =
            views.iter().filter(|v| &v.id != node && v.state == "Down").map(|v| v.id.as_str()).collect();
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
            let to =
                moving::destination_for(vm, node, &place, &preferred, mem).unwrap_or_else(|e| format!("nowhere ({e})"));
            println!("   {vm}: {node} -> {to}, back after the update");
        }
    }
    println!("nothing was changed (--preview)");
    Ok(0)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn html(r: &Report<'_>) -> String {
    let mut rows = String::new();
    for n in r.nodes {
        rows.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td></tr>\n",
            if n.ok { "ok" } else { "bad" },
            esc(&n.node),
            if n.ok { "updated" } else { "FAILED" },
            n.drain_ms,
            n.update_ms,
            n.healthy_ms,
            n.failback_ms,
            n.moves.len(),
            esc(n.error.as_deref().unwrap_or("")),
        ));
        for m in &n.moves {
            rows.push_str(&format!(
                "<tr class=\"move\"><td></td><td colspan=\"7\">{} {} &rarr; {}: {} downtime {} ms {}</td></tr>\n",
                esc(&m.vm),
                esc(&m.from),
                esc(&m.to),
                esc(&m.mode),
                m.figures["downtime_ms"].as_f64().map_or("-".into(), |d| format!("{d:.1}")),
                esc(m.error.as_deref().unwrap_or("")),
            ));
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Ferry cluster update {id}</title><style>\
         body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}\
         tr.bad{{background:#fdd}}tr.move td{{color:#555;font-size:90%}}</style></head><body>\
         <h1>Cluster update {id}: {state}</h1><p>cluster {cluster}, command <code>{cmd}</code>, {nu} node(s) updated, {nf} failed, {mv} moves, {t:.1} s</p>\
         <table><tr><th>node</th><th>result</th><th>drain ms</th><th>update ms</th><th>healthy ms</th><th>failback ms</th><th>moves</th><th>error</th></tr>\n{rows}</table></body></html>\n",
        id = esc(r.id),
        state = esc(r.state),
        cluster = esc(r.cluster),
        cmd = esc(r.command),
        nu = r.nodes_updated,
        nf = r.nodes_failed,
        mv = r.moves,
        t = r.total_ms / 1000.0,
    )
}

/// The report keeps this much of a command's output: its end.
const OUTPUT_TAIL: usize = 64 * 1024;
/// A line longer than this is shown on the terminal in pieces (the
/// pending line must stay bounded too).
const LINE_MAX: usize = 4096;
/// How long the output may stay open once the command has exited (a
/// daemon it started may hold it forever).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// What an update command left.
#[derive(Debug)]
struct CommandOutput {
    /// None when it was killed for running past its time.
    status: Option<std::process::ExitStatus>,
    /// The end of its output (stdout and stderr as written).
    tail: String,
    /// How many bytes it wrote in all.
    bytes: u64,
}

/// The last `cap` bytes written to it.
struct Tail {
    buf: std::collections::VecDeque<u8>,
    cap: usize,
    bytes: u64,
}

impl Tail {
    fn new(cap: usize) -> Tail {
        Tail { buf: Default::default(), cap, bytes: 0 }
    }

    fn push(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        let b = &b[b.len().saturating_sub(self.cap)..];
        let excess = (self.buf.len() + b.len()).saturating_sub(self.cap);
        self.buf.drain(..excess);
        self.buf.extend(b);
    }

    /// As text; once cut, from its first whole line on.
    fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut v = [a, b].concat();
        if self.bytes > v.len() as u64 {
            if let Some(nl) = v.iter().take(LINE_MAX).position(|&c| c == b'\n') {
                v.drain(..=nl);
            }
        }
        String::from_utf8_lossy(&v).into_owned()
    }
}

/// Reads `r` to its end into `tail`, handing each line (without its
/// newline; a long one in pieces) to `line` as it comes.
fn read_output(mut r: impl std::io::Read, tail: &std::sync::Mutex<Tail>, mut line: impl FnMut(&[u8])) {
    let mut chunk = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = vec![];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("reading the update command's output: {e}");
                break;
            }
        };
        tail.lock().unwrap_or_else(|e| e.into_inner()).push(&chunk[..n]);
        for &c in &chunk[..n] {
            if c == b'\n' {
                line(&pending);
                pending.clear();
            } else {
                pending.push(c);
                if pending.len() >= LINE_MAX {
                    line(&pending);
                    pending.clear();
                }
            }
        }
    }
    if !pending.is_empty() {
        line(&pending);
    }
}

/// Runs `cmd` to its end (killing it, and what it started, past `limit`),
/// its stdout and stderr in one pipe read as it runs: a command that
/// prints more than a pipe holds never stalls. Each line goes to `line`.
fn run_bounded(
    mut cmd: std::process::Command,
    limit: Duration,
    line: impl FnMut(&[u8]) + Send + 'static,
) -> Result<CommandOutput, String> {
    use std::os::unix::process::CommandExt;
    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let writer2 = writer.try_clone().map_err(|e| format!("cannot make a pipe: {e}"))?;
    // Its own process group: a Ctrl-C at the terminal reaches ferry's group
    // only, and ferry lets the command (and the node) finish.
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2).process_group(0);
    let spawned = cmd.spawn();
    // Our copies of the write end go now, or the reader never sees the end.
    drop(cmd);
    let mut child = spawned.map_err(|e| format!("cannot run the update command: {e}"))?;
    let tail = Arc::new(std::sync::Mutex::new(Tail::new(OUTPUT_TAIL)));
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let t = tail.clone();
    std::thread::Builder::new()
        .name("update-output".into())
        .spawn(move || {
            read_output(reader, &t, line);
            let _ = done_tx.send(());
        })
        .map_err(|e| format!("cannot start the output reader: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if std::time::Instant::now() >= deadline => {
                // SAFETY: SIGKILL to the process group this child leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    if done.recv_timeout(OUTPUT_GRACE).is_err() {
        tracing::warn!("the update command's output is still open after it ended (a process it started holds it)");
    }
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    Ok(CommandOutput { status, tail: t.text(), bytes: t.bytes })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{run_bounded, Tail, OUTPUT_TAIL};

    fn sh(script: &str) -> std::process::Command {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_command_printing_a_mebibyte_on_both_pipes_completes_with_its_tail() {
        let lines = Arc::new(AtomicUsize::new(0));
        let l = lines.clone();
        // 1 MiB on stdout and 1 MiB on stderr, each far past a pipe buffer.
        let script = "yes 0123456789abcde | head -c 1048576; yes fedcba987654321 | head -c 1048576 >&2; echo last";
        let t = Instant::now();
        let o = run_bounded(sh(script), Duration::from_secs(60), move |_| {
            l.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(o.status.unwrap().success());
        assert_eq!(o.bytes, 2 * 1048576 + 5);
        assert!(o.tail.len() <= OUTPUT_TAIL && o.tail.len() > OUTPUT_TAIL - 100, "{}", o.tail.len());
        assert!(o.tail.starts_with("fedcba987654321\n") && o.tail.ends_with("fedcba987654321\nlast\n"));
        // Every 16-byte line, and "last", shown as it came.
        assert_eq!(lines.load(Ordering::Relaxed), 2 * 1048576 / 16 + 1);
    }

    #[test]
    fn a_command_past_its_time_is_killed_with_what_it_started() {
        let t = Instant::now();
        let o = run_bounded(sh("echo started; sleep 30 & sleep 30"), Duration::from_millis(500), |_| {}).unwrap();
        assert!(o.status.is_none());
        assert_eq!(o.tail, "started\n");
        // The background sleep held the pipe too: it was killed with its group.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_daemon_holding_the_output_does_not_hold_the_run() {
        let t = Instant::now();
        let o = run_bounded(sh("echo hi; sleep 5 &"), Duration::from_secs(60), |_| {}).unwrap();
        assert!(o.status.unwrap().success());
        assert_eq!(o.tail, "hi\n");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_from_a_line_start() {
        let mut t = Tail::new(10);
        t.push(b"aaaa\nbbbb\n");
        assert_eq!(t.text(), "aaaa\nbbbb\n");
        t.push(b"cc\ndd\n");
        assert_eq!((t.text().as_str(), t.bytes), ("cc\ndd\n", 16));
        t.push(&[b'x'; 25]);
        assert_eq!(t.text(), "xxxxxxxxxx");
    }
}
