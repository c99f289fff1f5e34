//! `ferry node run`: the node agent (see `crate::agent`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::agent::{self, AgentConfig};

#[derive(Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
}

const RUN_HELP: &str = "\
Run this node's agent: it registers the node in the cluster under an etcd
lease, publishes what the node offers, and runs exactly the VMs whose owner
key names this node, each as its own `ferry run` VMM (API socket, console
and logs under --state-dir/vms/NAME/), with its taps on --vm-bridge.

Stopping or killing the agent leaves its VMs running; the next agent started
with the same --state-dir adopts them from their API sockets. If the agent
cannot renew its node lease, it kills its VMMs and exits with status 3
(fencing), so that no other node can start a VM while it still runs here;
with a witness (--witness, or the cluster's volume) it first checks whether
any other node is alive: if none is, no quorum exists anywhere, nobody can
restart its VMs, and they keep running until etcd is back. A watchdog thread
fences the node too (kills its VMMs, exit status 4) if the agent's own main
loop stops running for the lease TTL minus the fencing margin (2.4 s at the
default 3 s): stuck in a syscall or deadlocked; waiting on etcd is not a
hang. One agent leads
the cluster and restarts a down node's VMs elsewhere once their disk leases
have expired (plus 500 ms). The cluster update (`ferry cluster update`)
asks the agent to run its command on the node (as the agent's user: whoever
can write the cluster's etcd keys can run commands here) and then to restart
itself: it runs the same path and arguments again. At each start the agent
stores its health checks for the update to wait on.

Under systemd (KillMode=process: stopping or restarting the unit must not
take the VMs with it):

  # /etc/systemd/system/ferry-node.service
  [Unit]
  Description=Ferry node agent
  After=network-online.target
  Wants=network-online.target

  [Service]
  ExecStart=/usr/local/bin/ferry node run \\
      --etcd http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379 \\
      --cluster prod --node-id %H --vm-bridge br0 --state-dir /var/lib/ferry/node
  Restart=always
  RestartSec=2
  KillMode=process

  [Install]
  WantedBy=multi-user.target

Then: systemctl daemon-reload && systemctl enable --now ferry-node";

#[derive(Subcommand)]
enum NodeCommand {
    /// Run this node's agent (a daemon; see --help for a systemd unit).
    #[command(long_about = RUN_HELP)]
    Run(RunArgs),
    /// Pause a node: it takes no new VMs. With --drain, every VM leaves it
    /// by live migration first (at most --parallel at a time); returns when
    /// the node is empty, or names the VMs that could not leave and why.
    Pause {
        node: String,
        #[arg(long)]
        drain: bool,
        /// Moves out of the node at once [default: the cluster's setting,
        /// live_migrations_per_node: 2, as Hyper-V].
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Moves into one destination at once [default: the cluster's
        /// incoming_per_node: 2].
        #[arg(long, value_name = "N")]
        per_destination: Option<usize>,
        /// A VM whose live move the destination refuses (CPU, devices):
        /// move it by quick migration, or leave it and fail.
        #[arg(long, value_enum, default_value = "quick")]
        on_incompatible: super::moving::OnIncompatible,
        #[arg(long, value_name = "SECS", default_value_t = 1800)]
        timeout_secs: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: super::vm::EtcdArgs,
    },
    /// Resume a paused node; --failback brings back the VMs its last drain
    /// moved away: all of them (immediate), those whose first preferred
    /// owner it is (policy), or none.
    Resume {
        node: String,
        #[arg(long, value_enum, default_value = "none")]
        failback: super::moving::Failback,
        /// Moves at once [default: the cluster's live_migrations_per_node].
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Lift the node's quarantine (set after it failed 3 times within
        /// an hour) so VMs are placed on it again.
        #[arg(long)]
        clear_quarantine: bool,
        #[arg(long, value_name = "SECS", default_value_t = 1800)]
        timeout_secs: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: super::vm::EtcdArgs,
    },
    /// The agent's runner of a command the cluster asked for (an update's):
    /// runs DIR/command by `sh -c`, its output in DIR/output, its end in
    /// DIR/status.json. Not for direct use.
    #[command(hide = true)]
    CommandRunner {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_name = "SECS")]
        timeout_secs: u64,
    },
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    etcd: super::vm::EtcdArgs,
    /// This node's id in the cluster (also its name in disk leases).
    #[arg(long, value_name = "ID")]
    node_id: String,
    /// The bridge the node's VM taps are attached to.
    #[arg(long, value_name = "BRIDGE", default_value = "br0")]
    vm_bridge: String,
    /// Where the agent keeps its VMs' sockets, consoles and logs (one agent
    /// per directory).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ferry/node")]
    state_dir: PathBuf,
    /// TTL of the node's etcd lease (whole seconds, at least 1), renewed
    /// every third of it.
    #[arg(long, value_name = "MS", default_value_t = 3_000)]
    lease_ttl_ms: u64,
    /// TTL of the shared-volume disk leases its VMMs hold (a failed node's
    /// VMs restart elsewhere once these have expired); at least 1000.
    #[arg(long, value_name = "MS", default_value_t = 3_000,
          value_parser = clap::value_parser!(u64).range(vmm::config::MIN_LEASE_TTL_MS..))]
    disk_lease_ttl_ms: u64,
    /// The node's address for migrations, published in its record.
    #[arg(long, value_name = "IP")]
    address: Option<String>,
    /// The KVM device its VMMs use.
    #[arg(long, value_name = "PATH", default_value = vmm::vstate::vm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
    /// The cluster's migration key (`ferry keygen`; the same file on every
    /// node): moves between nodes are encrypted and authenticated with it.
    #[arg(long, value_name = "PATH", default_value = migrate::auth::DEFAULT_KEY_FILE)]
    key_file: PathBuf,
    /// A directory on the shared volume every node mounts, for the
    /// witness heartbeats that tell a node cut off from etcd whether
    /// anyone else is alive [default: the cluster record's volume].
    #[arg(long, value_name = "DIR")]
    witness: Option<PathBuf>,
    /// Quarantine a node seen down this many times within an hour (the
    /// leader's setting: give every agent the same).
    #[arg(long, value_name = "N", default_value_t = 3)]
    quarantine_after: usize,
    /// How long a quarantine lasts.
    #[arg(long, value_name = "SECS", default_value_t = 7200)]
    quarantine_secs: u64,
    /// Join paused: the node takes no VMs (no placement, failover, drain
    /// or failback puts one on it) until `ferry node resume NODE`; for a
    /// node coming back from a failure or repair. Without it a node
    /// keeps the setting it had (paused stays paused).
    #[arg(long)]
    paused: bool,
}

pub fn node(args: NodeArgs) -> anyhow::Result<i32> {
    use super::moving::{self, Parallel};
    use super::vm::{block_on, connect};
    match args.command {
        NodeCommand::Pause { node, drain, parallel, per_destination, on_incompatible, timeout_secs, json, etcd } => {
            block_on(async {
                let c = connect(&etcd).await?;
                let set = c.settings().await?;
                let p = Parallel {
                    per_source: parallel.unwrap_or(set.live_migrations_per_node as usize),
                    per_destination: per_destination.unwrap_or(set.incoming_per_node as usize),
                };
                moving::pause(&c, &node, drain, p, on_incompatible, Duration::from_secs(timeout_secs), json).await
            })
        }
        NodeCommand::Resume { node, failback, parallel, clear_quarantine, timeout_secs, json, etcd } => {
            block_on(async {
                let c = connect(&etcd).await?;
                if clear_quarantine {
                    if let Some(mut a) = c.node_admin(&node).await? {
                        if a.quarantined_until_unix_ms.take().is_some() {
                            c.set_node_admin(&node, &a).await?;
                            println!("node {node}: quarantine lifted");
                        }
                    }
                }
                let set = c.settings().await?;
                let p = Parallel {
                    per_source: parallel.unwrap_or(set.live_migrations_per_node as usize),
                    per_destination: set.incoming_per_node as usize,
                };
                moving::resume(&c, &node, failback, p, set.failback_window, Duration::from_secs(timeout_secs), json)
                    .await
            })
        }
        NodeCommand::CommandRunner { dir, timeout_secs } => {
            agent::node_command::runner_main(&dir, Duration::from_secs(timeout_secs))
        }
        NodeCommand::Run(a) => {
            if a.lease_ttl_ms < 1000 {
                anyhow::bail!("--lease-ttl-ms {}: etcd leases last at least 1000 ms", a.lease_ttl_ms);
            }
            let state_dir =
                if a.state_dir.is_absolute() { a.state_dir } else { std::env::current_dir()?.join(a.state_dir) };
            agent::run(AgentConfig {
                etcd: a.etcd.etcd,
                cluster: a.etcd.cluster,
                node_id: a.node_id,
                vm_bridge: a.vm_bridge,
                state_dir,
                lease_ttl: Duration::from_millis(a.lease_ttl_ms),
                disk_lease_ttl_ms: a.disk_lease_ttl_ms,
                address: a.address,
                kvm_device: a.kvm_device,
                key_file: std::path::absolute(&a.key_file)?,
                witness: a.witness.as_deref().map(std::path::absolute).transpose()?,
                quarantine_after: a.quarantine_after,
                quarantine_for: Duration::from_secs(a.quarantine_secs),
                paused: a.paused,
                exe: started_from()?,
                args: std::env::args_os().skip(1).collect(),
            })
        }
    }
}

/// The path this process was started from, as given (not /proc/self/exe,
/// which names the old file once an update has replaced it).
fn started_from() -> anyhow::Result<PathBuf> {
    let argv0 = std::env::args_os().next().map(PathBuf::from).unwrap_or_default();
    if argv0.components().count() > 1 {
        return Ok(std::path::absolute(&argv0)?);
    }
    // A bare name: found on PATH; the resolved path is what to run again.
    Ok(std::env::current_exe()?)
}
