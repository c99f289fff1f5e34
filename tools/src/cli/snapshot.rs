//! `ferry snapshot` and `ferry restore`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use vmm::builder::{self, FromState};
use vmm::config::NetConfig;
use vmm::RunState;

use super::host::{serve, taps_for, HostArgs};

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    api: super::control::ApiArgs,
    /// Directory to write state.bin and memory.bin into (created if needed).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<i32> {
    let dir = std::path::absolute(&args.to).context("bad --to")?;
    let body = serde_json::json!({ "dir": dir }).to_string();
    let r =
        vmm::api::client::request(&args.api.api_sock, "PUT", "vm.snapshot", body.as_bytes(), Duration::from_secs(600))?;
    if !r.is_success() {
        anyhow::bail!("vm.snapshot: {}", r.error_message());
    }
    println!("{}", r.body);
    Ok(0)
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Snapshot directory written by `ferry snapshot`.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Taps for the VM's NICs, in order: tap=NAME (the saved MAC is kept;
    /// a mac= given here must match it). One per NIC.
    #[arg(long, value_name = "tap=NAME")]
    net: Vec<NetConfig>,
    #[command(flatten)]
    host: HostArgs,
    /// Leave the VM paused after restoring (resume it through the API).
    /// A snapshot of a paused VM comes back paused anyway.
    #[arg(long)]
    paused: bool,
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    crate::signals::block();
    args.host.confine()?;
    let (state, ram) = vmm::snapshot::load(&args.from)?;
    let macs: Vec<_> = state.machine.nics.iter().map(|n| n.mac).collect();
    let host = args.host.host_config(taps_for(&args.net, &macs)?, false);
    let run = state.run_state == RunState::Running && !args.paused;
    let vmm =
        Arc::new(builder::build_from_state(host, state, ram, FromState { standby: false, vm: None, threads: None })?);
    if run {
        vmm.resume()?;
    }
    serve(vmm, args.host.api_sock.as_deref(), Some(migrate::api::ApiMigrator::new()))
}
