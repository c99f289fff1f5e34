//! What a node offers the cluster, published in its node record: memory
//! free, a summary of its CPU profile, its VM bridge, the Ferry version.

use std::path::Path;

use serde::{Deserialize, Serialize};
use vmm::arch::x86_64::cpu_profile::{CpuProfile, ProfileLeaf};

/// The `offers` of a [`cluster::NodeRecord`] written by `ferry node run`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Offers {
    pub mem_total_mib: u64,
    /// MemAvailable, less the memory of VMs this agent has started whose
    /// guests have not touched it yet.
    pub mem_free_mib: u64,
    pub cpus: usize,
    /// None when this node's KVM could not be asked.
    pub cpu: Option<CpuSummary>,
    pub vm_bridge: String,
    /// VMs this agent runs now.
    pub vms: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSummary {
    pub vendor: String,
    /// How many named CPU features KVM offers a guest here.
    pub features: usize,
    /// FNV-1a of the profile's CPUID leaves: equal digests, equal CPUs.
    pub digest: String,
    /// The profile's feature leaves (what placement compares a VM's CPU
    /// profile against); empty in records of agents before they were
    /// published.
    #[serde(default)]
    pub leaves: Vec<ProfileLeaf>,
}

impl CpuSummary {
    /// Why this node cannot offer a guest started on `wanted` (its vendor,
    /// or the features it lacks, by name), or None if it can.
    pub fn cannot_offer(&self, wanted: &CpuProfile) -> Option<String> {
        if self.leaves.is_empty() {
            return Some("its CPU features are not published".into());
        }
        if !wanted.vendor.is_empty() && wanted.vendor != self.vendor {
            return Some(format!("its CPU is {}, the VM's profile {}", self.vendor, wanted.vendor));
        }
        let mine = CpuProfile {
            format: vmm::arch::x86_64::cpu_profile::FORMAT.into(),
            version: vmm::arch::x86_64::cpu_profile::VERSION,
            source: "node".into(),
            vendor: self.vendor.clone(),
            features: vec![],
            leaves: self.leaves.clone(),
            msrs: Default::default(),
        };
        let (missing, _) = wanted.diff(&mine);
        (!missing.is_empty()).then(|| format!("lacks {}", missing.join(", ")))
    }
}

/// (MemTotal, MemAvailable) in MiB, from /proc/meminfo.
pub fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// This node's CPU profile, summarised (None if KVM cannot be opened).
pub fn cpu_summary(kvm_device: &Path) -> Option<CpuSummary> {
    let kvm = vmm::vstate::vm::open_kvm(kvm_device).ok()?;
    let p = CpuProfile::of_host(&kvm, "node").ok()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serde_json::to_vec(&p.leaves).unwrap_or_default() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Some(CpuSummary { vendor: p.vendor, features: p.features.len(), digest: format!("{h:016x}"), leaves: p.leaves })
}
