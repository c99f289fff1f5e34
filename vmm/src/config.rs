//! What a VM is made of, split by who decides it:
//!
//! - [`MachineConfig`]: what the guest sees (memory, vCPUs, kernel and
//!   command line, CPU baseline, each device's guest-visible identity). It
//!   travels with the VM inside its saved state, and the cluster stores it.
//! - [`HostConfig`]: this host's choices for running it (which tap backs
//!   each NIC, where the console goes, the KVM device, the host's name in
//!   disk leases). Every host supplies its own; it never travels.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpu_profile::CpuProfile;
use crate::boot::BootProtocol;
use crate::devices::serial::SerialOutput;
use crate::mac::MacAddr;
use crate::vstate::vm::DEFAULT_KVM_DEVICE;

pub const DEFAULT_MEM_MIB: u64 = 128;
pub const MAX_VCPUS: u8 = 64;
/// Guest memory beyond this (1 TiB) is refused before any arithmetic on it.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Shortest disk-lease TTL accepted. The keeper renews every third of the
/// TTL and the fence stops writes once less than a third is left, so a
/// renewal may take up to a third of the TTL before the guest sees I/O
/// errors: at 1 s that is 333 ms, room for a slow fsync on a busy volume.
pub const MIN_LEASE_TTL_MS: u64 = 1000;

/// The guest-visible machine: the same on every host the VM runs on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub boot: BootProtocol,
    /// NICs in device order, by their guest-visible MAC.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// Disks in device order (after the NICs).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Start the guest on exactly this CPU baseline (it travels with the
    /// VM, so a migrated guest keeps it).
    #[serde(default)]
    pub cpu_profile: Option<CpuProfile>,
}

/// A virtio-net device as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    pub mac: MacAddr,
}

/// This host's side of running a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfig {
    /// The tap behind each NIC, in the machine's NIC order.
    #[serde(default)]
    pub taps: Vec<String>,
    pub serial: SerialOutput,
    pub kvm_device: PathBuf,
    /// This host's name in disk leases.
    #[serde(default = "default_host_id")]
    pub host_id: String,
    /// Lease TTL for disks on a shared volume, milliseconds.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// Take the leases of a crashed host's disks once they have expired.
    #[serde(default)]
    pub takeover: bool,
    /// Where disks of VMs that migrate here may live (volumes or
    /// directories); a disk anywhere else is refused by the preflight. The
    /// source names the disks; this host decides what it will open.
    #[serde(default)]
    pub disk_roots: Vec<PathBuf>,
    /// How images on shared volumes use this host's page cache.
    #[serde(default = "default_shared_disk_cache")]
    pub shared_disk_cache: csv_fs::Cache,
    /// Where virtio queue notifications are served (host-local: the guest
    /// sees the same device either way).
    #[serde(default)]
    pub virtio_notify: VirtioNotify,
    /// How dirty pages are tracked for live migration (host-local, fixed
    /// when the VM is made).
    #[serde(default)]
    pub dirty_tracking: crate::vstate::dirty::DirtyTracking,
}

/// `--virtio-notify`: who does a virtio queue's work after the driver
/// writes QUEUE_NOTIFY.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtioNotify {
    /// KVM_IOEVENTFD: the write signals an eventfd inside KVM and the vCPU
    /// goes straight back to the guest; the device thread does the work.
    Ioeventfd,
    /// The write exits to the VMM and the vCPU thread does the work before
    /// it re-enters the guest.
    // Default: the polling test guest spins on its vCPU while the device
    // thread needs a second CPU; on a busy 2-core host that cut its disk
    // writes 3-8x (bench-net), on an idle one the two were even (README,
    // "Queue notifies").
    #[default]
    Vcpu,
}

/// A VM on this host: the machine and how this host runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub machine: MachineConfig,
    pub host: HostConfig,
}

pub fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "host".into())
}

/// Direct: a fenced host must leave nothing behind in its page cache.
pub fn default_shared_disk_cache() -> csv_fs::Cache {
    csv_fs::Cache::Direct
}

pub fn default_lease_ttl_ms() -> u64 {
    10_000
}

/// `--net tap=NAME[,mac=MAC]`: a virtio-net device on an existing tap. The
/// command line's pairing of a NIC with its tap; [`NetConfig::split`] gives
/// the machine's half and the host's half.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    /// None: derived from the tap name (at boot), or the saved MAC (on a
    /// destination or restore).
    pub mac: Option<MacAddr>,
}

impl NetConfig {
    /// The NIC (its MAC, derived from the tap name if none was given) and
    /// the tap behind it.
    pub fn split(&self) -> (NicConfig, String) {
        (NicConfig { mac: self.mac.unwrap_or_else(|| MacAddr::derived_from(&self.tap)) }, self.tap.clone())
    }
}

/// `--disk PATH[,readonly]` or `--disk csv:VOLUME/disks/NAME[,readonly]`:
/// a virtio-blk device on an image (raw, VHD or qcow2). A disk on a shared
/// volume is written only under its ownership lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// The shared volume and disk name, for `csv:` disks.
    #[serde(default)]
    pub volume: Option<VolumeDisk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDisk {
    pub volume: PathBuf,
    pub name: String,
}

impl DiskConfig {
    /// The image file this disk names (on a volume: found by its name).
    pub fn image_path(&self) -> Result<PathBuf, csv_fs::Error> {
        match &self.volume {
            None => Ok(self.path.clone()),
            Some(vd) => csv_fs::Volume::open(&vd.volume).and_then(|v| v.disk_path(&vd.name)),
        }
    }
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_owned()),
                Some(("mac", v)) => mac = Some(v.parse::<MacAddr>()?),
                _ => return Err(format!("bad --net '{s}' (expected tap=NAME[,mac=MAC])")),
            }
        }
        let tap = tap.ok_or_else(|| format!("bad --net '{s}': tap=NAME is required"))?;
        Ok(NetConfig { tap, mac })
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, readonly) = match s.strip_suffix(",readonly") {
            Some(p) => (p, true),
            None => (s, false),
        };
        if path.is_empty() || path.contains(',') {
            return Err(format!("bad --disk '{s}' (expected PATH[,readonly] or csv:VOLUME/disks/NAME[,readonly])"));
        }
        if let Some(rest) = path.strip_prefix("csv:") {
            let (volume, name) = rest
                .rsplit_once("/disks/")
                .filter(|(v, n)| !v.is_empty() && !n.is_empty() && !n.contains('/'))
                .ok_or_else(|| format!("bad --disk '{s}' (expected csv:VOLUME/disks/NAME)"))?;
            let volume = VolumeDisk { volume: PathBuf::from(volume), name: name.to_owned() };
            return Ok(DiskConfig { path: PathBuf::from(rest), readonly, volume: Some(volume) });
        }
        Ok(DiskConfig { path: PathBuf::from(path), readonly, volume: None })
    }
}

impl MachineConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> MachineConfig {
        MachineConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            boot: BootProtocol::Auto,
            nics: Vec::new(),
            disks: Vec::new(),
            cpu_profile: None,
        }
    }

    /// Guest memory in bytes, once [`crate::memory::check_size`] has
    /// bounded `mem_mib` (saturating, so a hostile value cannot wrap).
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib.saturating_mul(crate::memory::MIB)
    }
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            taps: Vec::new(),
            serial: SerialOutput::Stdout,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            host_id: default_host_id(),
            lease_ttl_ms: default_lease_ttl_ms(),
            shared_disk_cache: default_shared_disk_cache(),
            takeover: false,
            disk_roots: Vec::new(),
            virtio_notify: VirtioNotify::default(),
            dirty_tracking: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options_parse() {
        let n: NetConfig = "tap=vm0,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "vm0");
        assert_eq!(n.split().0.mac.to_string(), "52:54:00:00:00:01");
        let n: NetConfig = "tap=vm1".parse().unwrap();
        assert_eq!(n.split(), (NicConfig { mac: MacAddr::derived_from("vm1") }, "vm1".to_owned()));
        assert!("mac=52:54:00:00:00:01".parse::<NetConfig>().unwrap_err().contains("tap=NAME is required"));
        assert!("tap=vm0,speed=10".parse::<NetConfig>().is_err());
        let d: DiskConfig = "/v/d.img,readonly".parse().unwrap();
        assert_eq!((d.path.to_str().unwrap(), d.readonly), ("/v/d.img", true));
        assert!(!"/v/d.img".parse::<DiskConfig>().unwrap().readonly);
        assert!("/v/d.img,rw".parse::<DiskConfig>().is_err());
        let c: DiskConfig = "csv:/vol/disks/web0,readonly".parse().unwrap();
        assert_eq!(c.volume, Some(VolumeDisk { volume: "/vol".into(), name: "web0".into() }));
        assert!(c.readonly);
        assert!("csv:/vol/web0".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn memory_size_never_wraps() {
        let mut m = MachineConfig::new("/k");
        m.mem_mib = u64::MAX;
        assert_eq!(m.mem_bytes(), u64::MAX);
    }
}
