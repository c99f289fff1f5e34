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

use kvm_bindings::kvm_cpuid_entry2;

use crate::wire::CpuidEntry;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
}

/// Feature registers compared as bit sets: (leaf, subleaf, register).
pub const FEATURE_REGISTERS: &[(u32, u32, Reg)] = &[
    (0x1, 0, Reg::Ecx),
    (0x1, 0, Reg::Edx),
    (0x7, 0, Reg::Ebx),
    (0x7, 0, Reg::Ecx),
    (0x7, 0, Reg::Edx),
    (0x7, 1, Reg::Eax),
    (0xd, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
    (0x8000_0008, 0, Reg::Ebx),
];

/// Bits that say nothing about what the guest can execute: OSXSAVE mirrors
/// the guest's CR4; HYPERVISOR and HTT are set by Ferry's own CPUID
/// normalisation, on any host.
const IGNORED: &[(u32, u32, Reg, u32)] = &[(0x1, 0, Reg::Ecx, 27), (0x1, 0, Reg::Ecx, 31), (0x1, 0, Reg::Edx, 28)];

/// Names of the features a person looks for, by (leaf, subleaf, reg, bit).
pub const FEATURE_NAMES: &[(&str, u32, u32, Reg, u32)] = &[
    ("sse3", 1, 0, Reg::Ecx, 0),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1),
    ("ssse3", 1, 0, Reg::Ecx, 9),
    ("fma", 1, 0, Reg::Ecx, 12),
    ("cx16", 1, 0, Reg::Ecx, 13),
    ("pcid", 1, 0, Reg::Ecx, 17),
    ("sse4_1", 1, 0, Reg::Ecx, 19),
    ("sse4_2", 1, 0, Reg::Ecx, 20),
    ("x2apic", 1, 0, Reg::Ecx, 21),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("f16c", 1, 0, Reg::Ecx, 29),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("fpu", 1, 0, Reg::Edx, 0),
    ("tsc", 1, 0, Reg::Edx, 4),
    ("msr", 1, 0, Reg::Edx, 5),
    ("pae", 1, 0, Reg::Edx, 6),
    ("cx8", 1, 0, Reg::Edx, 8),
    ("apic", 1, 0, Reg::Edx, 9),
    ("sep", 1, 0, Reg::Edx, 11),
    ("pge", 1, 0, Reg::Edx, 13),
    ("cmov", 1, 0, Reg::Edx, 15),
    ("pat", 1, 0, Reg::Edx, 16),
    ("clflush", 1, 0, Reg::Edx, 19),
    ("mmx", 1, 0, Reg::Edx, 23),
    ("fxsr", 1, 0, Reg::Edx, 24),
    ("sse", 1, 0, Reg::Edx, 25),
    ("sse2", 1, 0, Reg::Edx, 26),
    ("ht", 1, 0, Reg::Edx, 28),
    ("fsgsbase", 7, 0, Reg::Ebx, 0),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("hle", 7, 0, Reg::Ebx, 4),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("smep", 7, 0, Reg::Ebx, 7),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("invpcid", 7, 0, Reg::Ebx, 10),
    ("rtm", 7, 0, Reg::Ebx, 11),
    ("mpx", 7, 0, Reg::Ebx, 14),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("avx512dq", 7, 0, Reg::Ebx, 17),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("adx", 7, 0, Reg::Ebx, 19),
    ("smap", 7, 0, Reg::Ebx, 20),
    ("avx512ifma", 7, 0, Reg::Ebx, 21),
    ("clflushopt", 7, 0, Reg::Ebx, 23),
    ("clwb", 7, 0, Reg::Ebx, 24),
    ("avx512pf", 7, 0, Reg::Ebx, 26),
    ("avx512er", 7, 0, Reg::Ebx, 27),
    ("avx512cd", 7, 0, Reg::Ebx, 28),
    ("sha_ni", 7, 0, Reg::Ebx, 29),
    ("avx512bw", 7, 0, Reg::Ebx, 30),
    ("avx512vl", 7, 0, Reg::Ebx, 31),
    ("avx512vbmi", 7, 0, Reg::Ecx, 1),
    ("umip", 7, 0, Reg::Ecx, 2),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("avx512_vbmi2", 7, 0, Reg::Ecx, 6),
    ("gfni", 7, 0, Reg::Ecx, 8),
    ("vaes", 7, 0, Reg::Ecx, 9),
    ("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    ("avx512_vnni", 7, 0, Reg::Ecx, 11),
    ("avx512_bitalg", 7, 0, Reg::Ecx, 12),
    ("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14),
    ("la57", 7, 0, Reg::Ecx, 16),
    ("rdpid", 7, 0, Reg::Ecx, 22),
    ("movdiri", 7, 0, Reg::Ecx, 27),
    ("movdir64b", 7, 0, Reg::Ecx, 28),
    ("avx512_4vnniw", 7, 0, Reg::Edx, 2),
    ("avx512_4fmaps", 7, 0, Reg::Edx, 3),
    ("fsrm", 7, 0, Reg::Edx, 4),
    ("avx512_vp2intersect", 7, 0, Reg::Edx, 8),
    ("md_clear", 7, 0, Reg::Edx, 10),
    ("serialize", 7, 0, Reg::Edx, 14),
    ("tsxldtrk", 7, 0, Reg::Edx, 16),
    ("amx_bf16", 7, 0, Reg::Edx, 22),
    ("avx512_fp16", 7, 0, Reg::Edx, 23),
    ("amx_tile", 7, 0, Reg::Edx, 24),
    ("amx_int8", 7, 0, Reg::Edx, 25),
    ("spec_ctrl", 7, 0, Reg::Edx, 26),
    ("arch_capabilities", 7, 0, Reg::Edx, 29),
    ("ssbd", 7, 0, Reg::Edx, 31),
    ("avx_vnni", 7, 1, Reg::Eax, 4),
    ("avx512_bf16", 7, 1, Reg::Eax, 5),
    ("xsaveopt", 0xd, 1, Reg::Eax, 0),
    ("xsavec", 0xd, 1, Reg::Eax, 1),
    ("xgetbv1", 0xd, 1, Reg::Eax, 2),
    ("xsaves", 0xd, 1, Reg::Eax, 3),
    ("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    ("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    ("sse4a", 0x8000_0001, 0, Reg::Ecx, 6),
    ("3dnowprefetch", 0x8000_0001, 0, Reg::Ecx, 8),
    ("syscall", 0x8000_0001, 0, Reg::Edx, 11),
    ("nx", 0x8000_0001, 0, Reg::Edx, 20),
    ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    ("lm", 0x8000_0001, 0, Reg::Edx, 29),
    ("wbnoinvd", 0x8000_0008, 0, Reg::Ebx, 9),
];

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
        let loc = format!("CPUID.(EAX={:#x},ECX={}):{}[{}]", self.leaf, self.subleaf, self.reg.name(), self.bit);
        match self.name {
            Some(n) => write!(f, "{n}: {loc}"),
            None => write!(f, "{loc}"),
        }
    }
}

pub fn entry(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry { function: e.function, index: e.index, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx }
}

/// Looks a feature up by name (for masks and tests).
pub fn feature(name: &str) -> Option<(u32, u32, Reg, u32)> {
    FEATURE_NAMES.iter().find(|f| f.0 == name).map(|f| (f.1, f.2, f.3, f.4))
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
