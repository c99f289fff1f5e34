//! `ferry snapshot` and `ferry restore`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use vmm::config::NetConfig;
use vmm::devices::serial::SerialOutput;
use vmm::Vmm;

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

/// Host-side choices a restored or received VM takes instead of the saved
/// ones (the guest-visible config travels with the state).
#[derive(Args, Clone)]
pub struct HostArgs {
    /// Taps for the VM's NICs, in order: tap=NAME (the saved MAC is kept;
    /// a mac= given here must match it). Defaults to the saved tap names.
    #[arg(long, value_name = "tap=NAME")]
    pub net: Vec<NetConfig>,
    /// Where the serial console goes: stdout, file:PATH, or null.
    #[arg(long, value_name = "DEST", default_value = "stdout")]
    pub serial: SerialOutput,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, value_name = "PATH", default_value = vmm::vstate::vm::DEFAULT_KVM_DEVICE)]
    pub kvm_device: PathBuf,
    /// This host's name in shared-volume disk leases (default: hostname).
    #[arg(long, value_name = "NAME")]
    pub host_id: Option<String>,
}

impl HostArgs {
    /// The saved config with this host's taps, console and KVM device.
    pub fn apply(&self, mut config: vmm::VmConfig) -> anyhow::Result<vmm::VmConfig> {
        if !self.net.is_empty() {
            if self.net.len() != config.net.len() {
                anyhow::bail!("the VM has {} NIC(s); --net was given {} time(s)", config.net.len(), self.net.len());
            }
            for (saved, here) in config.net.iter_mut().zip(&self.net) {
                saved.tap = here.tap.clone();
            }
        }
        config.serial = self.serial.clone();
        config.kvm_device = self.kvm_device.clone();
        config.host_id = self.host_id.clone().unwrap_or_else(vmm::config::default_host_id);
        config.takeover = false;
        Ok(config)
    }
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Snapshot directory written by `ferry snapshot`.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    #[command(flatten)]
    host: HostArgs,
    /// Leave the VM paused after restoring (resume it through the API).
    #[arg(long)]
    paused: bool,
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    crate::signals::block();
    let (state, ram) = vmm::snapshot::load(&args.from)?;
    let config = args.host.apply(state.config.clone())?;
    let vmm = Vmm::restore(config, state, ram, args.paused)?;
    super::run::serve(std::sync::Arc::new(vmm), args.host.api_sock.as_deref())
}
