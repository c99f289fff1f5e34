//! What every VMM-running command shares: this host's side of a VM
//! (`HostArgs`, turned into a `HostConfig`) and `serve`, which runs a VM to
//! its end with the API on a socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use vmm::api::server::{ApiServer, Migrator};
use vmm::config::{HostConfig, NetConfig, VirtioNotify};
use vmm::devices::serial::SerialOutput;
use vmm::Vmm;

/// This host's choices for a VM it runs: a booted one (`ferry run`), a
/// restored one (`ferry restore`) or a received one (`ferry receive`).
#[derive(Args, Clone)]
pub struct HostArgs {
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
    /// TTL of the leases on shared-volume disks; the VMM renews them every
    /// third of it and stops writing once less than a third is left
    /// (at least 1000: a renewal then has 333 ms before writes stop).
    #[arg(long, value_name = "MS", default_value_t = vmm::config::default_lease_ttl_ms(),
          value_parser = clap::value_parser!(u64).range(vmm::config::MIN_LEASE_TTL_MS..))]
    pub lease_ttl_ms: u64,
    /// Confine each VMM thread to the syscalls its kind uses (seccomp; a
    /// forbidden syscall stops the VMM and names it). `off` is for
    /// debugging only (and for tracing what the threads do: see README).
    #[arg(long, value_name = "on|off", default_value = "on", env = "FERRY_SECCOMP")]
    pub seccomp: Switch,
    /// How disk images on a shared volume use this host's page cache:
    /// `direct` (O_DIRECT: nothing of the image stays cached here, so a
    /// fenced host leaves no write behind that could reach the volume after
    /// a takeover) or `host` (cached; faster for some loads, unsafe for
    /// failover: for measuring what direct costs).
    #[arg(long, value_name = "direct|host", default_value = "direct")]
    pub shared_disk_cache: DiskCacheArg,
    /// Who serves a virtio queue notify: `ioeventfd` (KVM signals an
    /// eventfd and the guest runs on; the device thread does the work: for
    /// guests that take interrupts) or `vcpu` (the notify exits to the VMM
    /// and the vCPU does the work before it re-enters the guest). `vcpu` by
    /// default: a polling guest spins on its vCPU meanwhile, so the device
    /// thread needs another CPU; on a busy host its disk writes dropped
    /// 3-8x that way (README).
    #[arg(long, value_name = "ioeventfd|vcpu", default_value = "vcpu", env = "FERRY_VIRTIO_NOTIFY")]
    pub virtio_notify: VirtioNotifyArg,
    /// How a live migration finds the pages the guest wrote: `log` (KVM's
    /// dirty bitmap per memory slot, scanned each round) or `ring` (KVM's
    /// dirty ring per vCPU, 65536 entries; `ring:N` for N: each round costs
    /// what was dirtied, not a scan of all memory, and a vCPU whose ring
    /// fills exits to make room). Fixed when the VM is made here.
    #[arg(long, value_name = "log|ring[:N]", default_value = "log", env = "FERRY_DIRTY_TRACKING")]
    pub dirty_tracking: vmm::vstate::dirty::DirtyTracking,
}

/// `--virtio-notify`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VirtioNotifyArg {
    Ioeventfd,
    Vcpu,
}

/// `--shared-disk-cache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskCacheArg {
    Direct,
    Host,
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl HostArgs {
    /// Turns seccomp on for the threads this process starts from now on,
    /// unless `--seccomp off`. Call before the VM's (or the migration
    /// listener's) threads start.
    pub fn confine(&self) -> anyhow::Result<()> {
        if self.seccomp == Switch::On {
            vmm::seccomp::enable()?;
        } else {
            eprintln!("ferry: seccomp is off (--seccomp off): the VMM's threads are not confined");
        }
        Ok(())
    }

    /// This host's config for a VM whose NICs are backed by `taps`.
    pub fn host_config(&self, taps: Vec<String>, takeover: bool) -> HostConfig {
        HostConfig {
            taps,
            serial: self.serial.clone(),
            kvm_device: self.kvm_device.clone(),
            host_id: self.host_id.clone().unwrap_or_else(vmm::config::default_host_id),
            lease_ttl_ms: self.lease_ttl_ms,
            takeover,
            disk_roots: Vec::new(),
            shared_disk_cache: match self.shared_disk_cache {
                DiskCacheArg::Direct => csv_fs::Cache::Direct,
                DiskCacheArg::Host => csv_fs::Cache::Host,
            },
            virtio_notify: match self.virtio_notify {
                VirtioNotifyArg::Ioeventfd => VirtioNotify::Ioeventfd,
                VirtioNotifyArg::Vcpu => VirtioNotify::Vcpu,
            },
            dirty_tracking: self.dirty_tracking,
        }
    }
}

/// The taps given with `--net` for a restored or received VM: the MAC
/// comes from the saved machine, so a `mac=` given here must match it.
pub fn taps_for(net: &[NetConfig], macs: &[vmm::mac::MacAddr]) -> anyhow::Result<Vec<String>> {
    if net.len() != macs.len() {
        anyhow::bail!(
            "the VM has {} NIC(s); --net tap=NAME was given {} time(s) (one per NIC, in order)",
            macs.len(),
            net.len()
        );
    }
    for (n, mac) in net.iter().zip(macs) {
        if let Some(given) = n.mac.filter(|m| m != mac) {
            anyhow::bail!("--net tap={},mac={given}: the VM's NIC has MAC {mac}", n.tap);
        }
    }
    Ok(net.iter().map(|n| n.tap.clone()).collect())
}

/// Runs a started VM until it ends: serves the API (with `migrator` for
/// `vm.migrate`), turns signals into a clean stop, and returns the exit
/// status. Signals must already be blocked (`signals::block`) before the
/// VM's threads started.
pub fn serve(vmm: Arc<Vmm>, api_sock: Option<&Path>, migrator: Option<Arc<dyn Migrator>>) -> anyhow::Result<i32> {
    crate::signals::forward_to(vmm.events());
    let api = match api_sock {
        // Creates a missing directory 0700 itself (not create_dir_all's umask).
        Some(path) => Some(ApiServer::start(path, vmm.clone(), migrator)?),
        None => None,
    };
    let reason = vmm.wait_for_exit();
    vmm.stop();
    drop(api);
    eprintln!("ferry: VM stopped: {reason}");
    Ok(reason.exit_code())
}
