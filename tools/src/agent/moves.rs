//! The agent's side of a move committed by the cluster (see
//! `cluster::moves` for the records and the commit transaction).
//!
//! - On the source node: [`serve_gate`] answers the VMM's commit gate by
//!   running the commit transaction, and [`migrate`] drives the VMM's
//!   `vm.migrate` to the destination's endpoint.
//! - On the destination node: [`spawn_receiver`] starts `ferry receive`
//!   with the VM's taps and disks, [`wait_endpoint`] learns where it
//!   listens, and [`serve_oracle`] tells the receiving VMM how a move whose
//!   Commit frame never came ended.
//!
//! Both sockets live in the VM's directory and answer one JSON line each
//! way (`migrate::source::gate`, `migrate::destination::oracle`).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use cluster::{Cluster, Error as ClusterError, MoveOutcome, MoveRecord};
use migrate::destination::oracle;
use migrate::source::gate;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc::UnboundedSender;

use super::process::{self, Event};

pub fn gate_sock(dir: &Path) -> PathBuf {
    dir.join("gate.sock")
}

pub fn oracle_sock(dir: &Path) -> PathBuf {
    dir.join("oracle.sock")
}

fn endpoint_file(dir: &Path) -> PathBuf {
    dir.join("endpoint")
}

/// Binds a Unix socket for one move, replacing a stale one.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Serves one JSON line per connection until the task is aborted.
async fn serve_lines<F, Fut>(listener: UnixListener, answer: F)
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let answer = answer.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let mut reply = answer(line).await;
            reply.push('\n');
            let _ = w.write_all(reply.as_bytes()).await;
        });
    }
}

/// The source's commit gate for move `mv` of VM `name`: commit only by the
/// cluster's transaction. Returns the serving task (abort it when the move
/// ends).
pub fn serve_gate(
    cluster: Cluster,
    name: String,
    mv: MoveRecord,
    dir: &Path,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(&gate_sock(dir))?;
    Ok(tokio::spawn(serve_lines(listener, move |line| {
        let (cluster, name, mv) = (cluster.clone(), name.clone(), mv.clone());
        async move {
            let answer = match serde_json::from_str::<gate::Ask>(line.trim()) {
                Err(e) => refuse(format!("bad question: {e}")),
                Ok(ask) if ask.to_host != mv.to => refuse(format!(
                    "the migration goes to {}, but the cluster moves VM {name} to {}",
                    ask.to_host, mv.to
                )),
                Ok(_) => commit(&cluster, &name, &mv).await,
            };
            serde_json::to_string(&answer).expect("serialises")
        }
    })))
}

fn refuse(reason: String) -> gate::Answer {
    gate::Answer { commit: false, uncertain: false, reason }
}

/// Runs the commit transaction; resolves an unknown outcome before
/// answering, and says "uncertain" only if even that fails.
async fn commit(cluster: &Cluster, name: &str, mv: &MoveRecord) -> gate::Answer {
    let t = Instant::now();
    let r = cluster.commit_move(name, mv).await;
    let answer = match r {
        Ok(owner) => gate::Answer { commit: true, uncertain: false, reason: format!("owner is now {owner}") },
        Err(e @ (ClusterError::MoveGone { .. } | ClusterError::StaleOwner { .. } | ClusterError::NoSuchVm { .. })) => {
            refuse(e.to_string())
        }
        // Surely not applied, and only this gate commits the move.
        Err(e @ (ClusterError::Unavailable { .. } | ClusterError::Etcd { .. })) => refuse(e.to_string()),
        Err(e) => match cluster.resolve_move(name, mv).await {
            Ok(MoveOutcome::Committed(owner)) => {
                gate::Answer { commit: true, uncertain: false, reason: format!("owner is now {owner} (after: {e})") }
            }
            Ok(MoveOutcome::Aborted) => refuse(format!("the commit did not happen ({e}); the move is withdrawn")),
            Err(r) => gate::Answer { commit: false, uncertain: true, reason: format!("{e}; then {r}") },
        },
    };
    tracing::info!("VM {name}: commit gate for move {} answered {} in {:?}", mv.id, answer.commit, t.elapsed());
    answer
}

/// The destination's commit oracle for move `mv`.
pub fn serve_oracle(
    cluster: Cluster,
    name: String,
    mv: MoveRecord,
    dir: &Path,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(&oracle_sock(dir))?;
    Ok(tokio::spawn(serve_lines(listener, move |_line| {
        let (cluster, name, mv) = (cluster.clone(), name.clone(), mv.clone());
        async move {
            let answer = match cluster.resolve_move(&name, &mv).await {
                Ok(MoveOutcome::Committed(owner)) => {
                    oracle::Answer { committed: true, reason: format!("owner is {owner}") }
                }
                Ok(MoveOutcome::Aborted) => {
                    oracle::Answer { committed: false, reason: format!("move {} did not commit", mv.id) }
                }
                Err(e) => oracle::Answer { committed: false, reason: format!("etcd cannot tell: {e}") },
            };
            eprintln!("ferry node: VM {name}: the receiving VMM asked how move {} ended: {}", mv.id, answer.reason);
            serde_json::to_string(&answer).expect("serialises")
        }
    })))
}

/// How a `ferry receive` is started on this node.
pub struct Receiver<'a> {
    pub ferry: &'a Path,
    pub dir: &'a Path,
    pub machine: &'a vmm::config::MachineConfig,
    pub taps: &'a [String],
    pub address: &'a str,
    pub key_file: &'a Path,
    pub host_id: &'a str,
    pub disk_lease_ttl_ms: u64,
    pub kvm_device: &'a Path,
}

/// Starts `ferry receive` in its own session (as [`process::spawn`] does a
/// `ferry run`): listening on this node's address, a port the kernel
/// picks, disks allowed only on the volumes the VM's record names.
pub fn spawn_receiver(name: &str, r: &Receiver<'_>, events: &UnboundedSender<Event>) -> anyhow::Result<u32> {
    std::fs::create_dir_all(r.dir).with_context(|| format!("cannot create {}", r.dir.display()))?;
    // For a restarted agent: what this VMM runs.
    std::fs::write(r.dir.join("machine.json"), serde_json::to_vec_pretty(r.machine)?)?;
    let sock = process::api_sock(r.dir);
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(endpoint_file(r.dir));
    let log = OpenOptions::new().create(true).append(true).open(r.dir.join("vmm.log"))?;
    let mut cmd = Command::new(r.ferry);
    cmd.arg("receive").arg("--listen").arg(format!("tcp:{}:0", r.address));
    cmd.arg("--endpoint-file").arg(endpoint_file(r.dir));
    cmd.arg("--commit-oracle").arg(oracle_sock(r.dir));
    cmd.arg("--key-file").arg(r.key_file);
    for tap in r.taps {
        cmd.arg("--net").arg(format!("tap={tap}"));
    }
    let mut roots: Vec<&Path> =
        r.machine.disks.iter().filter_map(|d| d.volume.as_ref().map(|v| v.volume.as_path())).collect();
    roots.dedup();
    for root in roots {
        cmd.arg("--allow-disks").arg(root);
    }
    cmd.arg("--api-sock").arg(&sock);
    cmd.arg("--serial").arg(format!("file:{}", r.dir.join("serial.log").display()));
    cmd.args(["--host-id", r.host_id, "--lease-ttl-ms", &r.disk_lease_ttl_ms.to_string()]);
    cmd.arg("--kvm-device").arg(r.kvm_device);
    process::start(name, cmd, r.dir, log, events)
}

/// Waits (at most `limit`) for the receiver's endpoint file; reports
/// [`Event::Listening`] or [`Event::NotReady`].
pub fn wait_endpoint(
    name: String,
    pid: u32,
    dir: PathBuf,
    move_id: String,
    limit: Duration,
    events: UnboundedSender<Event>,
) {
    let deadline = Instant::now() + limit;
    let file = endpoint_file(&dir);
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(&file) {
            let endpoint = s.trim().to_owned();
            if !endpoint.is_empty() {
                let _ = events.send(Event::Listening { name, pid, move_id, endpoint });
                return;
            }
        }
        if !process::alive(pid) {
            return; // Event::Exited says the rest.
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = events.send(Event::NotReady { name, pid, why: format!("ferry receive did not listen within {limit:?}") });
}

/// What a move asks the source VMM to do.
pub struct MigrateCall {
    pub sock: PathBuf,
    pub endpoint: String,
    pub mode: migrate::wire::Mode,
    pub key_file: PathBuf,
    pub gate: PathBuf,
}

/// Drives `vm.migrate` on the source VMM (blocking; run it on a thread).
/// Ok: the figures JSON; Err: why it failed.
pub fn migrate(call: &MigrateCall) -> Result<serde_json::Value, String> {
    let to: migrate::Endpoint = call.endpoint.parse().map_err(|e| format!("bad endpoint {}: {e}", call.endpoint))?;
    let mut req = migrate::api::MigrateRequest::new(&to);
    req.mode = call.mode;
    req.key_file = call.key_file.clone();
    req.commit_gate = Some(call.gate.clone());
    let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    let r = vmm::api::client::request(&call.sock, "PUT", "vm.migrate", &body, Duration::from_secs(24 * 3600))
        .map_err(|e| format!("the VMM's API: {e}"))?;
    if !r.is_success() {
        return Err(r.error_message());
    }
    serde_json::from_str(&r.body).map_err(|e| format!("bad figures: {e}"))
}
