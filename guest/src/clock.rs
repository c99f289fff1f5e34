//! TSC frequency: the guest paces itself by rdtsc, which runs natively at CPL3.

use crate::io::cpuid;

/// Where the frequency came from, for the banner.
pub enum Source {
    CommandLine,
    HypervisorLeaf,
    Cpuid15,
    Cpuid16,
    Guess,
}

impl Source {
    pub fn name(&self) -> &'static str {
        match self {
            Source::CommandLine => "cmdline",
            Source::HypervisorLeaf => "cpuid-0x40000010",
            Source::Cpuid15 => "cpuid-0x15",
            Source::Cpuid16 => "cpuid-0x16",
            Source::Guess => "guess",
        }
    }
}

pub fn tsc_khz(override_khz: u64) -> (u64, Source) {
    if override_khz != 0 {
        return (override_khz, Source::CommandLine);
    }
    // The VMM fills the KVM/VMware timing leaf from KVM_GET_TSC_KHZ.
    let hv = cpuid(0x4000_0000, 0);
    if hv.eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0).eax;
        if khz != 0 {
            return (khz as u64, Source::HypervisorLeaf);
        }
    }
    let max = cpuid(0, 0).eax;
    if max >= 0x15 {
        let l = cpuid(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return (l.ecx as u64 * l.ebx as u64 / l.eax as u64 / 1000, Source::Cpuid15);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return (mhz as u64 * 1000, Source::Cpuid16);
        }
    }
    (2_000_000, Source::Guess)
}
