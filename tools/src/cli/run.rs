//! `ferry run`: boot a VM in this process and run it to the end.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use vmm::boot::BootProtocol;
use vmm::config::{DiskConfig, NetConfig};
use vmm::devices::serial::SerialOutput;
use vmm::{VmConfig, Vmm};

#[derive(Args)]
pub struct RunArgs {
    /// Kernel image: an ELF with a PVH note (the test guest,
    /// target/guest/ferry-guest.elf), a Linux vmlinux, or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk for Linux.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (the test guest reads wss_mib=, dirty_mib_s=,
    /// heartbeat_ms=, tsc_khz=, idle_us=).
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = vmm::config::DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Where the serial console goes: stdout, file:PATH, or null.
    #[arg(long, value_name = "DEST", default_value = "stdout")]
    serial: SerialOutput,
    /// Boot protocol: auto (PVH if the ELF has a PVH note), pvh, or linux64.
    #[arg(long, value_name = "PROTO", default_value = "auto")]
    boot: BootProtocol,
    /// A virtio-net device on an existing tap in this network namespace:
    /// tap=NAME[,mac=MAC] (repeatable). The MAC defaults to one derived
    /// from the tap name.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// A virtio-blk device on a raw image file: PATH[,readonly] (repeatable).
    /// Flush requests are durable (fdatasync).
    #[arg(long, value_name = "PATH[,readonly]")]
    disk: Vec<DiskConfig>,
    /// Start the guest on exactly this CPU baseline (from `ferry cpu-profile
    /// export` or `common`), so it can move to any host that meets it.
    #[arg(long, value_name = "FILE")]
    cpu_profile: Option<PathBuf>,
    /// This host's name in shared-volume disk leases (default: hostname).
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
    /// TTL of the leases on shared-volume disks; the VMM renews them every
    /// third of it and stops writing if it cannot.
    #[arg(long, value_name = "MS", default_value_t = vmm::config::default_lease_ttl_ms())]
    lease_ttl_ms: u64,
    /// Take over the leases of a crashed host's disks once they have
    /// expired (refused while the old owner still renews them).
    #[arg(long)]
    takeover: bool,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, value_name = "PATH", default_value = vmm::vstate::vm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    crate::signals::block();
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        boot: args.boot,
        serial: args.serial,
        kvm_device: args.kvm_device,
        net: args.net,
        disks: args.disk,
        cpu_profile: args.cpu_profile.as_deref().map(vmm::arch::x86_64::cpu_profile::CpuProfile::load).transpose()?,
        host_id: args.host_id.unwrap_or_else(vmm::config::default_host_id),
        lease_ttl_ms: args.lease_ttl_ms,
        takeover: args.takeover,
    };
    serve(Arc::new(Vmm::start(config)?), args.api_sock.as_deref())
}

/// Runs a started VM until it ends: serves the API, turns signals into a
/// clean stop, and returns the exit status. Signals must already be
/// blocked (`signals::block`) before the VM's threads started.
pub fn serve(vmm: Arc<Vmm>, api_sock: Option<&std::path::Path>) -> anyhow::Result<i32> {
    crate::signals::forward_to(vmm.events());
    let api = match api_sock {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            Some(vmm::api::server::ApiServer::start(path, vmm.clone(), Some(super::migrate::ApiMigrator::new()))?)
        }
        None => None,
    };
    let reason = vmm.wait_for_exit();
    vmm.stop();
    drop(api);
    eprintln!("ferry: VM stopped: {reason}");
    Ok(reason.exit_code())
}
