//! `ferry cluster ...`: the cluster as a whole.

use clap::{Args, Subcommand};

use super::vm::{block_on, connect, node_views, table, vm_rows, vm_views, EtcdArgs, VM_HEADER};

#[derive(Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Nodes (Up, Paused, Draining, Down) with what they offer, and VMs
    /// with their owner and the state their owner's agent reports.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

pub fn cluster(args: ClusterArgs) -> anyhow::Result<i32> {
    match args.command {
        ClusterCommand::Status { json, etcd } => block_on(async {
            let c = connect(&etcd).await?;
            let nodes = node_views(&c).await?;
            let vms = vm_views(&c).await?;
            let leader = c.leader().await?.map(|l| l.value.node);
            if json {
                let v = serde_json::json!({
                    "cluster": etcd.cluster,
                    "leader": leader,
                    "nodes": nodes,
                    "vms": vms,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!("cluster {} (leader: {})", etcd.cluster, leader.as_deref().unwrap_or("none"));
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
