//! `ferry cluster ...`: the cluster as a whole: forming it (`create`,
//! after `ferry validate`'s checks), re-validating it, its status.

use anyhow::bail;
use clap::{Args, Subcommand};
use cluster::records::{DEFAULT_INCOMING_PER_NODE, DEFAULT_LIVE_MIGRATIONS_PER_NODE};
use cluster::{
    Cluster, ClusterRecord, ClusterSettings, Error as ClusterError, FailbackWindow, ValidationRecord, FORMAT_VERSION,
};

use super::validate::{run_checks, Target, Validation};
use super::vm::{block_on, connect, node_views, table, vm_rows, vm_views, EtcdArgs, VM_HEADER};

#[derive(Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Form a cluster: run `ferry validate`'s checks on its nodes and
    /// volume first, and store the cluster (nodes, volume, settings) and
    /// the report in etcd only if every check passed (or with --force).
    /// A failed check is named with what to do about it.
    Create(CreateArgs),
    /// Run the validation again on the cluster's stored nodes and volume
    /// and store the new report; exits 1 if any check failed.
    Validate {
        /// The lab whose hosts the nodes are (default: the one stored at
        /// create).
        #[arg(long, value_name = "NAME")]
        lab: Option<String>,
        /// Print the stored report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Cluster-aware updating: node after node, drain it, run --run CMD
    /// on it, restart its agent, wait until healthy, resume with failback.
    Update(super::update::UpdateArgs),
    /// What the cluster leader saw and did: nodes down and back, VM
    /// restarts with their times, quarantines.
    Events {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Nodes (Up, Paused, Draining, Quarantined, Down) with what they offer, and VMs
    /// with their owner and the state their owner's agent reports, or
    /// Restarting (from, to, since when) while the leader restarts a down
    /// node's VM elsewhere.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

pub fn cluster(args: ClusterArgs) -> anyhow::Result<i32> {
    match args.command {
        ClusterCommand::Create(a) => create(a),
        ClusterCommand::Validate { lab, json, etcd } => {
            block_on(async { revalidate(&connect(&etcd).await?, lab, json).await })
        }
        ClusterCommand::Update(a) => super::update::update(a),
        ClusterCommand::Events { json, etcd } => block_on(async {
            let c = connect(&etcd).await?;
            let ev = c.events().await?;
            if json {
                let v: Vec<_> = ev.iter().map(|(seq, e)| serde_json::json!({"seq": seq, "event": e})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = ev
                .iter()
                .map(|(seq, e)| {
                    vec![
                        seq.to_string(),
                        e.at_unix_ms.to_string(),
                        e.kind.clone(),
                        e.node.clone(),
                        e.vm.clone().unwrap_or_else(|| "-".into()),
                        e.detail.clone(),
                    ]
                })
                .collect();
            table(&["SEQ", "AT_UNIX_MS", "KIND", "NODE", "VM", "DETAIL"], &rows);
            Ok(0)
        }),
        ClusterCommand::Status { json, etcd } => block_on(async {
            let c = connect(&etcd).await?;
            let nodes = node_views(&c).await?;
            let vms = vm_views(&c).await?;
            let leader = c.leader().await?.map(|l| l.value.node);
            let etcd_leader = c.store().etcd_leader().await?;
            let record = c.cluster_record().await?.map(|r| r.value);
            let settings = record.as_ref().map_or_else(ClusterSettings::default, |r| r.settings.clone());
            let validation = c.validation().await?.map(|v| validation_summary(&v.value));
            let update: Option<super::update::UpdateProgress> =
                c.store().get(&c.keys().update_progress()).await?.and_then(|kv| serde_json::from_slice(&kv.value).ok());
            let update_running = c.store().get(&c.keys().update_lock()).await?.is_some();
            if json {
                let v = serde_json::json!({
                    "cluster": etcd.cluster,
                    "record": record,
                    "settings": settings,
                    "validation": validation,
                    "leader": leader,
                    "etcd_leader": etcd_leader,
                    "update": update.as_ref().map(|u| serde_json::json!({"progress": u, "running": update_running})),
                    "nodes": nodes,
                    "vms": vms,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!(
                "cluster {} (leader: {}, etcd leader: {})",
                etcd.cluster,
                leader.as_deref().unwrap_or("none"),
                etcd_leader.as_deref().unwrap_or("none")
            );
            if let Some(u) = &update {
                println!(
                    "update {}: {}{}; done: {}{}",
                    u.id,
                    if update_running { "running" } else { u.state.as_str() },
                    u.current.as_ref().map(|n| format!(", now on node {n}")).unwrap_or_default(),
                    if u.done.is_empty() { "-".to_owned() } else { u.done.join(", ") },
                    if u.failed.is_empty() { String::new() } else { format!("; failed: {}", u.failed.join(", ")) }
                );
            }
            match &record {
                Some(r) => println!(
                    "formed {} with nodes {}; volume {}{}",
                    ago(r.created_unix_ms),
                    r.nodes.join(", "),
                    r.volume,
                    if r.forced { " (forced past a failed validation)" } else { "" }
                ),
                None => println!("not formed with `ferry cluster create` (settings are the defaults)"),
            }
            println!("settings: {}", settings_line(&settings));
            if let Some(v) = &validation {
                println!("last validation: {}", v.line);
                for f in &v.failed {
                    println!("  FAILED {f}");
                }
            }
            println!();
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let o = n.offers.as_ref();
                    vec![
                        n.id.clone(),
                        n.state.clone(),
                        o.map_or_else(|| "-".into(), |o| format!("{}/{}", o.mem_free_mib, o.mem_total_mib)),
                        o.map_or_else(|| "-".into(), |o| o.cpus.to_string()),
                        o.and_then(|o| o.cpu.as_ref()).map_or_else(
                            || "-".into(),
                            |c| format!("{} {} features {}", c.vendor, c.features, c.digest),
                        ),
                        o.map_or_else(|| "-".into(), |o| o.vms.to_string()),
                        n.ferry_version.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            table(&["NODE", "STATE", "MEM_FREE/TOTAL_MIB", "CPUS", "CPU_PROFILE", "VMS", "VERSION"], &rows);
            println!();
            table(&VM_HEADER, &vm_rows(&vms));
            Ok(0)
        }),
    }
}

/// `ferry cluster create`'s arguments. `--name` is the cluster's name;
/// `--cluster`, as the other commands spell it, is accepted too.
#[derive(Args)]
pub struct CreateArgs {
    /// The cluster's name (its keys live under /ferry/NAME/).
    #[arg(long, value_name = "NAME", required_unless_present = "cluster")]
    name: Option<String>,
    /// The same as --name; if both are given they must agree.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// etcd client URLs, comma-separated (a bare host:port gets http://).
    #[arg(long, value_name = "URL,...")]
    etcd: String,
    /// The cluster's nodes, comma-separated: node ids, which in a lab are
    /// its host names (a,b,c).
    #[arg(long, value_name = "NODE,...", value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// The shared volume, mounted at this absolute path on every node (VM
    /// disks are stored by path).
    #[arg(long, value_name = "PATH")]
    volume: String,
    /// The lab whose hosts the nodes are (`ferry lab up --name NAME`).
    #[arg(long, value_name = "NAME", default_value = "ferry")]
    lab: String,
    /// Form the cluster even if validation fails (the failed report is
    /// stored with it, and the record says it was forced).
    #[arg(long)]
    force: bool,
    /// Live migrations out of one node at a time (a drain's parallelism).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIVE_MIGRATIONS_PER_NODE)]
    live_migrations_per_node: u32,
    /// Migrations into one node at a time.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_INCOMING_PER_NODE)]
    incoming_per_node: u32,
    /// Hours of the day (UTC) when VMs may fail back, START-END (e.g.
    /// 22-6); without it, at any time.
    #[arg(long, value_name = "START-END")]
    failback_window: Option<String>,
    /// Print the stored record and report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_window(s: &str) -> anyhow::Result<FailbackWindow> {
    let parsed = s.split_once('-').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed.and_then(|(a, b)| FailbackWindow::new(a, b)) {
        Some(w) => Ok(w),
        None => bail!("--failback-window {s}: expected START-END, two different hours 0-23 (e.g. 22-6)"),
    }
}

/// The cluster's name from --name and --cluster.
fn cluster_name(a: &CreateArgs) -> anyhow::Result<String> {
    match (&a.name, &a.cluster) {
        (Some(n), Some(c)) if n != c => bail!("--name {n} and --cluster {c} disagree: give one cluster name"),
        (Some(n), _) | (None, Some(n)) => Ok(n.clone()),
        (None, None) => bail!("give the cluster's name with --name"),
    }
}

/// Runs the checks off the async runtime (they block for seconds: probes,
/// a bandwidth test, a held lock) and makes the record to store.
async fn validate_nodes(target: Target) -> anyhow::Result<(Validation, ValidationRecord)> {
    let v = tokio::task::spawn_blocking(move || run_checks(&target)).await?;
    let record = ValidationRecord {
        v: FORMAT_VERSION,
        at_unix_ms: cluster::records::unix_ms(),
        ok: v.ok,
        failed: v.failed().map(|c| c.line()).collect(),
        report: v.report.clone(),
    };
    Ok((v, record))
}

fn create(a: CreateArgs) -> anyhow::Result<i32> {
    let name = cluster_name(&a)?;
    cluster::keys::validate_name("cluster name", &name)?;
    let mut nodes: Vec<String> = vec![];
    for n in a.nodes.iter().filter(|n| !n.is_empty()) {
        cluster::keys::validate_name("node id", n)?;
        if nodes.contains(n) {
            bail!("node {n} is named twice in --nodes");
        }
        nodes.push(n.clone());
    }
    if nodes.is_empty() {
        bail!("--nodes: name at least one node");
    }
    if !a.volume.starts_with('/') {
        bail!("--volume {}: give the absolute path every node mounts the shared volume at", a.volume);
    }
    if a.live_migrations_per_node == 0 || a.incoming_per_node == 0 {
        bail!("--live-migrations-per-node and --incoming-per-node: at least 1");
    }
    let settings = ClusterSettings {
        live_migrations_per_node: a.live_migrations_per_node,
        incoming_per_node: a.incoming_per_node,
        failback_window: a.failback_window.as_deref().map(parse_window).transpose()?,
    };
    let etcd = EtcdArgs { etcd: a.etcd.clone(), cluster: name.clone() };
    block_on(async {
        let c = connect(&etcd).await?;
        // Checked first so a second create says so at once rather than
        // after a validation; the create's transaction is what decides.
        if c.cluster_record().await?.is_some() {
            bail!("cluster {name} already exists");
        }
        let target = Target { lab: a.lab.clone(), hosts: nodes.clone(), volume: vec![a.volume.clone()] };
        let (v, validation) = validate_nodes(target).await?;
        for f in v.failed() {
            eprintln!("FAILED {}", f.line());
        }
        if !v.ok && !a.force {
            if a.json {
                let out = serde_json::json!({"created": false, "record": null, "validation": validation});
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            eprintln!(
                "ferry: cluster {name} not created: {} of {} checks failed (above); fix them and run again, or form it anyway with --force",
                validation.failed.len(),
                v.checks.len()
            );
            return Ok(1);
        }
        let record = ClusterRecord {
            v: FORMAT_VERSION,
            name: name.clone(),
            nodes,
            volume: a.volume.clone(),
            lab: Some(a.lab.clone()),
            created_unix_ms: cluster::records::unix_ms(),
            forced: !v.ok,
            settings,
        };
        match c.create_cluster(&record, &validation).await {
            Ok(_) => {}
            Err(ClusterError::AlreadyExists { .. }) => bail!("cluster {name} already exists"),
            Err(e) => return Err(e.into()),
        }
        if a.json {
            let out = serde_json::json!({"created": true, "record": record, "validation": validation});
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "cluster {name} created: nodes {}; volume {}; validation {} ({} checks){}",
                record.nodes.join(", "),
                record.volume,
                if v.ok { "passed" } else { "FAILED" },
                v.checks.len(),
                if v.ok { "" } else { ", formed anyway (--force)" }
            );
            println!("settings: {}", settings_line(&record.settings));
        }
        Ok(0)
    })
}

/// `ferry cluster validate`: the stored nodes and volume, checked again.
async fn revalidate(c: &Cluster, lab: Option<String>, json: bool) -> anyhow::Result<i32> {
    let name = c.keys().cluster_name().to_owned();
    let Some(record) = c.cluster_record().await? else {
        return Err(ClusterError::NoSuchCluster { name }.into());
    };
    let record = record.value;
    let lab = lab.or(record.lab.clone()).unwrap_or_else(|| "ferry".to_owned());
    let target = Target { lab, hosts: record.nodes.clone(), volume: vec![record.volume.clone()] };
    let (v, validation) = validate_nodes(target).await?;
    c.put_validation(&validation).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&validation)?);
    } else {
        let rows: Vec<Vec<String>> = v
            .checks
            .iter()
            .map(|c| {
                vec![
                    if c.ok { "passed" } else { "FAILED" }.to_owned(),
                    c.check.clone(),
                    c.subject.clone(),
                    if c.ok { c.detail.clone() } else { format!("{} -> {}", c.detail, c.fix) },
                ]
            })
            .collect();
        table(&["RESULT", "CHECK", "SUBJECT", "DETAIL"], &rows);
    }
    for f in v.failed() {
        eprintln!("FAILED {}", f.line());
    }
    if v.ok {
        if !json {
            println!("cluster {name}: validation passed ({} checks); report stored", v.checks.len());
        }
        Ok(0)
    } else {
        eprintln!(
            "ferry: cluster {name}: validation FAILED ({} of {} checks); report stored",
            validation.failed.len(),
            v.checks.len()
        );
        Ok(1)
    }
}

/// The last validation, as `cluster status` shows it.
#[derive(serde::Serialize)]
struct ValidationSummary {
    ok: bool,
    at_unix_ms: u64,
    checks: usize,
    failed: Vec<String>,
    #[serde(skip)]
    line: String,
}

fn validation_summary(v: &ValidationRecord) -> ValidationSummary {
    let checks = v.report["checks"].as_array().map_or(0, Vec::len);
    let line = if v.ok {
        format!("passed {} ({checks} checks)", ago(v.at_unix_ms))
    } else {
        format!("FAILED {} ({} of {checks} checks failed)", ago(v.at_unix_ms), v.failed.len())
    };
    ValidationSummary { ok: v.ok, at_unix_ms: v.at_unix_ms, checks, failed: v.failed.clone(), line }
}

fn settings_line(s: &ClusterSettings) -> String {
    format!(
        "{} live migration(s) per node at a time, {} incoming per node, failback {}",
        s.live_migrations_per_node,
        s.incoming_per_node,
        s.failback_window.map_or_else(|| "at any time".to_owned(), |w| format!("within {w}"))
    )
}

/// "12 s ago", for a Unix ms time.
fn ago(unix_ms: u64) -> String {
    let s = cluster::records::unix_ms().saturating_sub(unix_ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}
