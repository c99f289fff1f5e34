//! `ferry run`: boot a VM in this process and run it to the end.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use vmm::boot::BootProtocol;
use vmm::config::{DiskConfig, MachineConfig, NetConfig};
use vmm::{VmConfig, Vmm};

use anyhow::Context;

use super::host::{serve, taps_for, HostArgs};

#[derive(Args)]
pub struct RunArgs {
    /// Kernel image: an ELF with a PVH note (the test guest,
    /// target/guest/ferry-guest.elf), a Linux vmlinux, or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "machine")]
    kernel: Option<PathBuf>,
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
    /// Boot protocol: auto (PVH if the ELF has a PVH note), pvh, or linux64.
    #[arg(long, value_name = "PROTO", default_value = "auto")]
    boot: BootProtocol,
    /// A virtio-net device on an existing tap in this network namespace:
    /// tap=NAME[,mac=MAC] (repeatable). The MAC defaults to one derived
    /// from the tap name.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// A virtio-blk device on a disk image (raw, VHD or qcow2, by its
    /// extension or content), or on a shared volume's disk under its lease:
    /// PATH[,readonly] or csv:VOLUME/disks/NAME[,readonly] (repeatable).
    /// Flush requests are durable (fdatasync).
    #[arg(long, value_name = "PATH[,readonly]")]
    disk: Vec<DiskConfig>,
    /// Start the guest on exactly this CPU baseline (from `ferry cpu-profile
    /// export` or `common`), so it can move to any host that meets it.
    #[arg(long, value_name = "FILE")]
    cpu_profile: Option<PathBuf>,
    /// Take over the leases of a crashed host's disks once they have
    /// expired (refused while the old owner still renews them).
    #[arg(long)]
    takeover: bool,
    /// The whole guest-visible machine as JSON (a MachineConfig, as the
    /// cluster stores it; what `ferry node run` boots VMs with), instead of
    /// --kernel, --cmdline, --mem-mib, --vcpus, --boot, --disk and
    /// --cpu-profile. `--net tap=NAME` then names one tap per NIC, in order.
    #[arg(long, value_name = "FILE",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "boot", "disk", "cpu_profile"])]
    machine: Option<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    crate::signals::block();
    args.host.confine()?;
    if let Some(path) = &args.machine {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let machine: MachineConfig =
            serde_json::from_str(&text).with_context(|| format!("{} is not a machine config", path.display()))?;
        let macs: Vec<_> = machine.nics.iter().map(|n| n.mac).collect();
        let taps = taps_for(&args.net, &macs)?;
        let config = VmConfig { machine, host: args.host.host_config(taps, args.takeover) };
        let vmm = Arc::new(Vmm::boot(config)?);
        return serve(vmm, args.host.api_sock.as_deref(), Some(migrate::api::ApiMigrator::new()));
    }
    let (nics, taps) = args.net.iter().map(NetConfig::split).unzip();
    let machine = MachineConfig {
        kernel: args.kernel.expect("clap requires --kernel without --machine"),
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        boot: args.boot,
        nics,
        disks: args.disk,
        cpu_profile: args.cpu_profile.as_deref().map(vmm::arch::x86_64::cpu_profile::CpuProfile::load).transpose()?,
    };
    let config = VmConfig { machine, host: args.host.host_config(taps, args.takeover) };
    let vmm = Arc::new(Vmm::boot(config)?);
    serve(vmm, args.host.api_sock.as_deref(), Some(migrate::api::ApiMigrator::new()))
}
