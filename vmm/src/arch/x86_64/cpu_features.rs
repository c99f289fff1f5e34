//! Named x86 CPU features: which CPUID registers are feature bit sets, and
//! what each bit is called. Preflight refusals, CPU profiles and diffs all
//! speak these names ("avx512f: CPUID.(EAX=0x7,ECX=0):EBX[16]").

use serde::{Deserialize, Serialize};

/// One CPUID leaf as a guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_bindings::kvm_cpuid_entry2> for CpuidLeaf {
    fn from(e: &kvm_bindings::kvm_cpuid_entry2) -> Self {
        CpuidLeaf { function: e.function, index: e.index, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx }
    }
}

impl CpuidLeaf {
    pub fn reg_mut(&mut self, reg: Reg) -> &mut u32 {
        match reg {
            Reg::Eax => &mut self.eax,
            Reg::Ebx => &mut self.ebx,
            Reg::Ecx => &mut self.ecx,
            Reg::Edx => &mut self.edx,
        }
    }
}

/// A feature's place: (leaf, subleaf, register, bit).
pub fn location(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> String {
    format!("CPUID.(EAX={leaf:#x},ECX={subleaf}):{}[{bit}]", reg.name())
}

/// The feature's name, or its place if it has none here.
pub fn describe(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> String {
    match FEATURE_NAMES.iter().find(|f| (f.1, f.2, f.3, f.4) == (leaf, subleaf, reg, bit)) {
        Some(f) => format!("{}: {}", f.0, location(leaf, subleaf, reg, bit)),
        None => location(leaf, subleaf, reg, bit),
    }
}

/// Looks a feature up by name.
pub fn feature(name: &str) -> Option<(u32, u32, Reg, u32)> {
    FEATURE_NAMES.iter().find(|f| f.0 == name).map(|f| (f.1, f.2, f.3, f.4))
}

/// Every feature bit set in `leaves` that the feature registers hold, with
/// names where known, in table order.
pub fn feature_bits(leaves: &[CpuidLeaf]) -> Vec<(u32, u32, Reg, u32)> {
    let mut out = Vec::new();
    for &(leaf, sub, reg) in FEATURE_REGISTERS {
        if let Some(e) = leaves.iter().find(|e| e.function == leaf && e.index == sub) {
            let v = reg.of(e);
            for bit in 0..32 {
                if v & (1 << bit) != 0 && !IGNORED.contains(&(leaf, sub, reg, bit)) {
                    out.push((leaf, sub, reg, bit));
                }
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    pub fn of(self, e: &CpuidLeaf) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
    pub fn name(self) -> &'static str {
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
pub const IGNORED: &[(u32, u32, Reg, u32)] = &[(0x1, 0, Reg::Ecx, 27), (0x1, 0, Reg::Ecx, 31), (0x1, 0, Reg::Edx, 28)];

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
