//! CPU profiles: the CPU features a host's KVM offers, as readable JSON,
//! and the cluster baseline (their intersection) a guest can be started on
//! so it can move to any host that meets it (Hyper-V's processor
//! compatibility mode, VMware's EVC).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use super::cpu_features::{describe, feature_bits, CpuidLeaf, FEATURE_NAMES, FEATURE_REGISTERS};

pub const FORMAT: &str = "ferry-cpu-profile";
pub const VERSION: u32 = 1;

/// Feature MSRs worth recording (KVM_GET_MSR_FEATURE_INDEX_LIST names them).
const FEATURE_MSRS: &[(u32, &str)] = &[(0x10a, "IA32_ARCH_CAPABILITIES"), (0xcf, "IA32_CORE_CAPABILITIES")];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read CPU profile {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a Ferry CPU profile: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("CPU profile {path} has version {found}; this ferry reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("profiles of different CPU vendors have no common baseline: {0}")]
    Vendors(String),
    #[error("no profiles given")]
    Empty,
    #[error("KVM cannot {op}: {source}")]
    Kvm { op: &'static str, source: kvm_ioctls::Error },
}

/// One feature register leaf, values as hex strings for people to read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileLeaf {
    pub function: String,
    pub index: u32,
    pub eax: String,
    pub ebx: String,
    pub ecx: String,
    pub edx: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuProfile {
    pub format: String,
    pub version: u32,
    /// Where it came from: a host name, or "common(a, b)".
    pub source: String,
    pub vendor: String,
    /// The named features present, for people (the leaves are the truth).
    pub features: Vec<String>,
    pub leaves: Vec<ProfileLeaf>,
    #[serde(default)]
    pub msrs: BTreeMap<String, String>,
}

fn hex(v: u32) -> String {
    format!("{v:#010x}")
}

fn unhex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn vendor_of(leaves: &[CpuidLeaf]) -> String {
    leaves
        .iter()
        .find(|e| e.function == 0)
        .map(|e| {
            let b: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default()
}

impl CpuProfile {
    /// A profile of `leaves` (leaf 0 and the feature registers are kept).
    pub fn from_leaves(source: &str, leaves: &[CpuidLeaf], msrs: BTreeMap<String, String>) -> CpuProfile {
        let kept: Vec<CpuidLeaf> = leaves
            .iter()
            .filter(|e| {
                (e.function == 0 && e.index == 0)
                    || FEATURE_REGISTERS.iter().any(|f| (f.0, f.1) == (e.function, e.index))
            })
            .copied()
            .collect();
        let features = feature_bits(&kept)
            .into_iter()
            .filter_map(|(l, s, r, b)| {
                FEATURE_NAMES.iter().find(|f| (f.1, f.2, f.3, f.4) == (l, s, r, b)).map(|f| f.0.to_owned())
            })
            .collect();
        CpuProfile {
            format: FORMAT.into(),
            version: VERSION,
            source: source.into(),
            vendor: vendor_of(&kept),
            features,
            leaves: kept
                .iter()
                .map(|e| ProfileLeaf {
                    function: format!("{:#x}", e.function),
                    index: e.index,
                    eax: hex(e.eax),
                    ebx: hex(e.ebx),
                    ecx: hex(e.ecx),
                    edx: hex(e.edx),
                })
                .collect(),
            msrs,
        }
    }

    /// What this host's KVM offers a vCPU: the supported CPUID as set on a
    /// scratch vCPU and read back (PVM adds host bits on the way), plus the
    /// feature MSRs.
    pub fn of_host(kvm: &Kvm, source: &str) -> Result<CpuProfile, Error> {
        let err = |op| move |source| Error::Kvm { op, source };
        let leaves = effective_cpuid(kvm).map_err(err("report what a vCPU offers"))?;
        let mut msrs = BTreeMap::new();
        if let Ok(list) = kvm.get_msr_feature_index_list() {
            for &(index, name) in FEATURE_MSRS {
                if list.as_slice().contains(&index) {
                    let mut m =
                        Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).expect("one entry");
                    if kvm.get_msrs(&mut m) == Ok(1) {
                        msrs.insert(name.to_owned(), format!("{:#x}", m.as_slice()[0].data));
                    }
                }
            }
        }
        Ok(CpuProfile::from_leaves(source, &leaves, msrs))
    }

    pub fn leaves(&self) -> Vec<CpuidLeaf> {
        self.leaves
            .iter()
            .map(|l| CpuidLeaf {
                function: unhex(&l.function).unwrap_or(u32::MAX),
                index: l.index,
                eax: unhex(&l.eax).unwrap_or(0),
                ebx: unhex(&l.ebx).unwrap_or(0),
                ecx: unhex(&l.ecx).unwrap_or(0),
                edx: unhex(&l.edx).unwrap_or(0),
            })
            .collect()
    }

    pub fn load(path: &Path) -> Result<CpuProfile, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
        let malformed = |reason: String| Error::Malformed { path: path.to_owned(), reason };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(malformed(format!("its \"format\" is not \"{FORMAT}\"")));
        }
        let version = v.get("version").and_then(|n| n.as_u64()).unwrap_or(0) as u32;
        if version != VERSION {
            return Err(Error::Version { path: path.to_owned(), found: version });
        }
        let p: CpuProfile = serde_json::from_value(v).map_err(|e| malformed(e.to_string()))?;
        for l in &p.leaves {
            for (what, s) in
                [("function", &l.function), ("eax", &l.eax), ("ebx", &l.ebx), ("ecx", &l.ecx), ("edx", &l.edx)]
            {
                if unhex(s).is_none() {
                    return Err(malformed(format!("leaf {} has a bad {what} value '{s}'", l.function)));
                }
            }
        }
        Ok(p)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("profile serialises")
    }

    /// The features every profile has: the cluster baseline.
    pub fn common(profiles: &[CpuProfile]) -> Result<CpuProfile, Error> {
        let first = profiles.first().ok_or(Error::Empty)?;
        if let Some(other) = profiles.iter().find(|p| p.vendor != first.vendor) {
            return Err(Error::Vendors(format!(
                "{} is {}, {} is {}",
                first.source, first.vendor, other.source, other.vendor
            )));
        }
        let mut leaves = first.leaves();
        for p in &profiles[1..] {
            let theirs = p.leaves();
            for l in leaves.iter_mut().filter(|l| l.function != 0) {
                match theirs.iter().find(|t| t.function == l.function && t.index == l.index) {
                    Some(t) => {
                        l.eax &= t.eax;
                        l.ebx &= t.ebx;
                        l.ecx &= t.ecx;
                        l.edx &= t.edx;
                    }
                    None => *l = CpuidLeaf { eax: 0, ebx: 0, ecx: 0, edx: 0, ..*l },
                }
            }
        }
        let msrs = first
            .msrs
            .iter()
            .filter_map(|(k, v)| {
                let mut acc = u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()?;
                for p in &profiles[1..] {
                    acc &= u64::from_str_radix(p.msrs.get(k)?.trim_start_matches("0x"), 16).ok()?;
                }
                Some((k.clone(), format!("{acc:#x}")))
            })
            .collect();
        let names: Vec<&str> = profiles.iter().map(|p| p.source.as_str()).collect();
        Ok(CpuProfile::from_leaves(&format!("common({})", names.join(", ")), &leaves, msrs))
    }

    /// Features in `self` and not in `other`, and the reverse, by name
    /// (or register bit where unnamed).
    pub fn diff(&self, other: &CpuProfile) -> (Vec<String>, Vec<String>) {
        let (a, b) = (feature_bits(&self.leaves()), feature_bits(&other.leaves()));
        let only = |x: &[(u32, u32, super::cpu_features::Reg, u32)],
                    y: &[(u32, u32, super::cpu_features::Reg, u32)]| {
            x.iter().filter(|f| !y.contains(f)).map(|&(l, s, r, bit)| describe(l, s, r, bit)).collect()
        };
        (only(&a, &b), only(&b, &a))
    }

    /// Restricts a vCPU's CPUID to this profile: every feature register is
    /// ANDed with the profile's (a leaf the profile lacks offers nothing).
    pub fn apply(&self, cpuid: &mut [kvm_cpuid_entry2]) {
        let mine = self.leaves();
        for e in cpuid.iter_mut() {
            let key = (e.function, e.index);
            for &(leaf, sub, reg) in FEATURE_REGISTERS.iter().filter(|f| (f.0, f.1) == key) {
                let allowed =
                    mine.iter().find(|m| m.function == leaf && m.index == sub).map(|m| reg.of(m)).unwrap_or(0);
                let mut l = CpuidLeaf::from(&*e);
                *l.reg_mut(reg) &= allowed;
                (e.eax, e.ebx, e.ecx, e.edx) = (l.eax, l.ebx, l.ecx, l.edx);
            }
        }
    }

    /// The same, on plain leaves (a destination masking what it offers).
    pub fn apply_leaves(&self, leaves: &mut [CpuidLeaf]) {
        let mine = self.leaves();
        for e in leaves.iter_mut() {
            let key = (e.function, e.index);
            for &(leaf, sub, reg) in FEATURE_REGISTERS.iter().filter(|f| (f.0, f.1) == key) {
                let allowed =
                    mine.iter().find(|m| m.function == leaf && m.index == sub).map(|m| reg.of(m)).unwrap_or(0);
                *e.reg_mut(reg) &= allowed;
            }
        }
    }
}

/// What a vCPU on this host offers: KVM's supported CPUID set on a scratch
/// vCPU and read back.
pub fn effective_cpuid(kvm: &Kvm) -> Result<Vec<CpuidLeaf>, kvm_ioctls::Error> {
    probe_vcpu(kvm).map(|(leaves, _)| leaves)
}

/// The same, and that scratch vCPU's TSC frequency in kHz (0 if unknown):
/// one scratch VM answers both questions a preflight asks.
pub fn probe_vcpu(kvm: &Kvm) -> Result<(Vec<CpuidLeaf>, u32), kvm_ioctls::Error> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let vm = kvm.create_vm()?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&supported)?;
    let leaves = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?.as_slice().iter().map(CpuidLeaf::from).collect();
    Ok((leaves, vcpu.get_tsc_khz().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ebx: u32, ecx: u32) -> CpuidLeaf {
        CpuidLeaf { function, index, eax: 0, ebx, ecx, edx: 0 }
    }

    fn vendor() -> CpuidLeaf {
        // "GenuineIntel"
        CpuidLeaf { function: 0, index: 0, eax: 0x1f, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69 }
    }

    #[test]
    fn common_diff_and_apply_on_crafted_profiles() {
        let big = CpuProfile::from_leaves(
            "big",
            &[vendor(), leaf(7, 0, (1 << 16) | (1 << 5), 0), leaf(1, 0, 0, 1 << 20)],
            BTreeMap::new(),
        );
        let small = CpuProfile::from_leaves(
            "small",
            &[vendor(), leaf(7, 0, 1 << 5, 0), leaf(1, 0, 0, 1 << 20)],
            BTreeMap::new(),
        );
        assert!(big.features.contains(&"avx512f".to_owned()) && big.features.contains(&"avx2".to_owned()));
        assert_eq!(big.vendor, "GenuineIntel");

        let base = CpuProfile::common(&[big.clone(), small.clone()]).unwrap();
        assert_eq!(base.source, "common(big, small)");
        assert!(!base.features.contains(&"avx512f".to_owned()) && base.features.contains(&"avx2".to_owned()));

        let (only_big, only_small) = big.diff(&small);
        assert_eq!(only_big, vec!["avx512f: CPUID.(EAX=0x7,ECX=0):EBX[16]".to_owned()]);
        assert!(only_small.is_empty());

        let mut cpuid =
            [kvm_cpuid_entry2 { function: 7, index: 0, ebx: (1 << 16) | (1 << 5) | (1 << 3), ..Default::default() }];
        base.apply(&mut cpuid);
        assert_eq!(cpuid[0].ebx, 1 << 5, "only the baseline's features stay");
    }

    #[test]
    fn bad_profiles_are_named() {
        let dir = std::env::temp_dir().join(format!("ferry-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let e = CpuProfile::load(&write("a.json", "{ not json")).unwrap_err();
        assert!(e.to_string().contains("is not a Ferry CPU profile"), "{e}");
        let e = CpuProfile::load(&write("b.json", r#"{"format":"ferry-cpu-profile","version":7}"#)).unwrap_err();
        assert!(e.to_string().contains("has version 7; this ferry reads version 1"), "{e}");
        let good = CpuProfile::from_leaves("x", &[vendor()], BTreeMap::new()).to_json();
        assert!(CpuProfile::load(&write("c.json", &good)).is_ok());
        let bad = good.replace("0x0000001f", "0xzz");
        let e = CpuProfile::load(&write("d.json", &bad)).unwrap_err();
        assert!(e.to_string().contains("bad eax value"), "{e}");
        let amd = CpuProfile::from_leaves("amd", &[CpuidLeaf { ebx: 0x6874_7541, ..vendor() }], BTreeMap::new());
        let intel = CpuProfile::from_leaves("intel", &[vendor()], BTreeMap::new());
        assert!(matches!(CpuProfile::common(&[intel, amd]), Err(Error::Vendors(_))));
        let _ = std::fs::remove_dir_all(dir);
    }
}
