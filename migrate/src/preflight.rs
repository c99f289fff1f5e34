//! Preflight: before any memory moves, the destination proves it can run
//! the guest, or names exactly why not.
//!
//! - CPUID: every feature bit the guest was given must be offered by this
//!   host's KVM (bitwise subset of the feature registers); the vendor must
//!   match. A refusal names each missing feature and its register bit.
//! - TSC: the same frequency within 250 ppm, or a KVM that can scale it.
//! - Memory: the guest's RAM must fit in what this host has available.
//! - Backends: each tap exists here, each disk image exists with the size
//!   the guest knows.

use vmm::arch::x86_64::cpu_features::CpuidLeaf as CpuidEntry;
pub use vmm::arch::x86_64::cpu_features::{feature, Reg, FEATURE_NAMES, FEATURE_REGISTERS, IGNORED};
use vmm::arch::x86_64::cpu_profile::CpuProfile;
use vmm::migration::{HostOffer, Requirements};

/// How a destination judges a guest's CPU beyond what its KVM offers.
#[derive(Clone, Debug, Default)]
pub struct CpuPolicy {
    /// Features to treat as absent here, as if KVM lacked them (testing a
    /// lesser host without one).
    pub hide_features: Vec<String>,
    /// Offer no more than this profile, as a host whose KVM offered only
    /// that would.
    pub profile: Option<CpuProfile>,
}

/// Every CPU and clock reason this host cannot run the guest.
pub fn check_cpu(req: &Requirements, offer: &HostOffer, policy: &CpuPolicy) -> Vec<String> {
    let mut problems = Vec::new();
    let mut offered = offer.cpuid.clone();
    if let Err(e) = mask(&mut offered, &policy.hide_features) {
        problems.push(e);
    }
    if let Some(profile) = &policy.profile {
        profile.apply_leaves(&mut offered);
    }
    let (missing, vendor) = compare_cpuid(&req.guest_cpuid, &offered);
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
        problems.push(format!("missing CPU features: {}", names.join(", ")));
    }
    problems.extend(vendor);
    let (g, h) = (req.tsc_khz, offer.tsc_khz);
    if g != 0 && h.abs_diff(g) > g / 4000 && !offer.tsc_scaling {
        problems.push(format!("guest TSC runs at {g} kHz, this host at {h} kHz, and KVM here cannot scale it"));
    }
    problems
}

/// One feature the guest has and this host does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub name: Option<&'static str>,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u32,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&vmm::arch::x86_64::cpu_features::describe(self.leaf, self.subleaf, self.reg, self.bit))
    }
}

/// Clears the named features from `host`, as if this host's KVM lacked them.
pub fn mask(host: &mut [CpuidEntry], names: &[String]) -> Result<(), String> {
    for name in names {
        let (leaf, sub, reg, bit) = feature(name).ok_or_else(|| format!("unknown CPU feature '{name}'"))?;
        for e in host.iter_mut().filter(|e| e.function == leaf && e.index == sub) {
            let r = match reg {
                Reg::Eax => &mut e.eax,
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *r &= !(1 << bit);
        }
    }
    Ok(())
}

/// The guest's features this host does not offer, and vendor mismatches.
pub fn compare_cpuid(guest: &[CpuidEntry], host: &[CpuidEntry]) -> (Vec<Missing>, Option<String>) {
    let find =
        |set: &[CpuidEntry], leaf: u32, sub: u32| set.iter().find(|e| e.function == leaf && e.index == sub).copied();
    let mut missing = Vec::new();
    for &(leaf, sub, reg) in FEATURE_REGISTERS {
        let Some(g) = find(guest, leaf, sub) else { continue };
        let h = find(host, leaf, sub).map(|e| reg.of(&e)).unwrap_or(0);
        let lacking = reg.of(&g) & !h;
        for bit in 0..32 {
            if lacking & (1 << bit) == 0 || IGNORED.contains(&(leaf, sub, reg, bit)) {
                continue;
            }
            let name = FEATURE_NAMES.iter().find(|f| (f.1, f.2, f.3, f.4) == (leaf, sub, reg, bit)).map(|f| f.0);
            missing.push(Missing { name, leaf, subleaf: sub, reg, bit });
        }
    }
    let vendor = |s: &[CpuidEntry]| {
        find(s, 0, 0).map(|e| {
            let b: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            String::from_utf8_lossy(&b).into_owned()
        })
    };
    let vendor_mismatch = match (vendor(guest), vendor(host)) {
        (Some(g), Some(h)) if g != h => Some(format!("CPU vendor differs: guest {g}, this host {h}")),
        _ => None,
    };
    (missing, vendor_mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, ebx: u32, ecx: u32) -> CpuidEntry {
        CpuidEntry { function, index, eax: 0, ebx, ecx, edx: 0 }
    }

    #[test]
    fn missing_features_are_named_with_their_bits() {
        let guest = [e(7, 0, (1 << 16) | (1 << 5), 0), e(1, 0, 0, (1 << 28) | (1 << 31))];
        let host = [e(7, 0, 1 << 5, 0), e(1, 0, 0, 1 << 28)];
        let (missing, vendor) = compare_cpuid(&guest, &host);
        assert_eq!(missing.len(), 1, "{missing:?} (the hypervisor bit is ours, ignored)");
        assert_eq!(missing[0].to_string(), "avx512f: CPUID.(EAX=0x7,ECX=0):EBX[16]");
        assert!(vendor.is_none());
    }

    #[test]
    fn a_mask_makes_a_lesser_host() {
        let mut host = vec![e(7, 0, (1 << 16) | (1 << 5), 0)];
        mask(&mut host, &["avx2".into()]).unwrap();
        assert_eq!(host[0].ebx, 1 << 16);
        assert!(mask(&mut host, &["warp_drive".into()]).unwrap_err().contains("warp_drive"));
        let guest = [e(7, 0, 1 << 5, 0)];
        let (missing, _) = compare_cpuid(&guest, &host);
        assert_eq!(missing[0].name, Some("avx2"));
    }
}
