//! The command line: one module per command family.

mod cluster_cmd;
mod control;
mod cpu;
mod host;
mod lab;
mod migrate;
mod moving;
mod node;
mod ping;
mod run;
mod snapshot;
mod update;
pub(crate) mod validate;
mod vm;
mod volume;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Ferry: a KVM micro-VMM built to move running VMs between hosts.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel (the bundled test guest, or Linux) and run it until it
    /// shuts down, the API asks, or the process gets SIGTERM/SIGINT.
    Run(run::RunArgs),
    /// Show a running VM's state and configuration (JSON).
    Info(control::ApiArgs),
    /// Pause a running VM; returns once no vCPU is in the guest.
    Pause(control::ApiArgs),
    /// Resume a paused VM.
    Resume(control::ApiArgs),
    /// Stop a VM and let its VMM exit.
    Shutdown(control::ApiArgs),
    /// Type a line on a VM's serial console (a newline is added).
    Console {
        #[command(flatten)]
        api: control::ApiArgs,
        /// The text to send, e.g. `verify` for the test guest.
        text: String,
    },
    /// Tell the network where the VM is: a RARP announcement for each NIC's
    /// MAC on its tap (what a migration sends right after switchover).
    Announce(control::ApiArgs),
    /// Save a running VM's state and memory into a directory. The VM is
    /// paused first and left paused.
    Snapshot(snapshot::SnapshotArgs),
    /// Start a VM from a snapshot directory, in this process, on this host.
    Restore(snapshot::RestoreArgs),
    /// Move a running VM to another host's `ferry receive` (live by default)
    /// and print the migration figures. On any failure before the
    /// destination confirms, the VM keeps running here.
    Migrate(migrate::MigrateArgs),
    /// Cancel the VM's running migration before its commit; the VM keeps
    /// running here.
    MigrateCancel(control::ApiArgs),
    /// Wait for one incoming migration, then run the VM here.
    Receive(migrate::ReceiveArgs),
    /// Write a new cluster key for authenticating migrations.
    Keygen(migrate::KeygenArgs),
    /// CPU feature profiles: export this host's, compute a cluster
    /// baseline, compare two.
    CpuProfile(cpu::CpuProfileArgs),
    /// Check that lab hosts can form a cluster (KVM, CPU compatibility,
    /// network, clocks, shared volume) and write a JSON and HTML report.
    Validate(validate::ValidateArgs),
    /// One host's side of `ferry validate` (run inside the host).
    #[command(hide = true)]
    ValidateProbe(validate::ProbeArgs),
    /// Create or inspect a cluster shared volume.
    Volume(volume::VolumeArgs),
    /// Create and inspect disks on a volume, and manage their ownership leases.
    Disk(volume::DiskArgs),
    /// Build, inspect or tear down the lab: network namespaces that play a
    /// switch fabric, two VM hosts and a client on one machine (root).
    Lab(lab::LabArgs),
    /// The node agent (`ferry node run`): runs this node's share of the
    /// cluster's VMs.
    Node(node::NodeArgs),
    /// Highly available VMs, kept in the cluster's etcd: create, start,
    /// stop, list, show, history.
    Vm(vm::VmArgs),
    /// The cluster as a whole: create (after validating its nodes),
    /// validate, status.
    Cluster(cluster_cmd::ClusterArgs),
    /// Measure loss, reply gaps and RTTs to an address, from inside a
    /// network namespace (ICMP echo or UDP probes; root). Prints JSON.
    Ping(ping::PingArgs),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Info(api) => control::info(&api.api_sock),
        Command::Pause(api) => control::put(&api.api_sock, "vm.pause"),
        Command::Resume(api) => control::put(&api.api_sock, "vm.resume"),
        Command::Shutdown(api) => control::put(&api.api_sock, "vm.shutdown"),
        Command::Console { api, text } => control::console(&api.api_sock, &text),
        Command::Announce(api) => control::announce(&api.api_sock),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Restore(args) => snapshot::restore(args),
        Command::Migrate(args) => migrate::migrate(args),
        Command::MigrateCancel(api) => migrate::cancel(&api),
        Command::Receive(args) => migrate::receive(args),
        Command::Keygen(args) => migrate::keygen(args),
        Command::CpuProfile(args) => cpu::cpu_profile(args),
        Command::Validate(args) => validate::validate(args),
        Command::ValidateProbe(args) => validate::probe_main(args),
        Command::Volume(args) => volume::volume(args),
        Command::Disk(args) => volume::disk(args),
        Command::Lab(args) => lab::lab(args),
        Command::Ping(args) => ping::ping(args),
        Command::Node(args) => node::node(args),
        Command::Vm(args) => vm::vm(args),
        Command::Cluster(args) => cluster_cmd::cluster(args),
    }
}

/// Shared by the commands that talk to a running VMM.
fn default_api_sock() -> PathBuf {
    PathBuf::from("/run/ferry/ferry.sock")
}
