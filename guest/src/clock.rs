//! TSC frequency: the guest paces itself by rdtsc, which runs natively at CPL3.
//! The frequency itself comes from what `probe.rs` read at CPL0.

use crate::probe::Probe;

/// Used when nothing better answers; it makes every figure the guest
/// reports off by the ratio to the real frequency, and the banner says so.
const GUESS_KHZ: u64 = 2_000_000;

/// Where the frequency came from, for the banner.
pub enum Source {
    CommandLine,
    Kvmclock,
    HypervisorLeaf,
    Cpuid15,
    Cpuid16,
    Guess,
}

impl Source {
    pub fn name(&self) -> &'static str {
        match self {
            Source::CommandLine => "cmdline",
            Source::Kvmclock => "kvmclock",
            Source::HypervisorLeaf => "cpuid-0x40000010",
            Source::Cpuid15 => "cpuid-0x15",
            Source::Cpuid16 => "cpuid-0x16",
            Source::Guess => "guess",
        }
    }
}

/// In order: an explicit `tsc_khz=`, kvmclock's scale (KVM's own figure for
/// this vCPU's TSC), the VMM's 0x40000010 leaf, CPUID 0x15, CPUID 0x16, and
/// a guess.
pub fn tsc_khz(override_khz: u64, p: &Probe) -> (u64, Source) {
    if override_khz != 0 {
        return (override_khz, Source::CommandLine);
    }
    if let Some(khz) = pvclock_khz(p) {
        return (khz, Source::Kvmclock);
    }
    if p.hv_tsc_khz != 0 {
        return (p.hv_tsc_khz as u64, Source::HypervisorLeaf);
    }
    let [denominator, numerator, crystal_hz] = p.leaf15;
    if denominator != 0 && numerator != 0 && crystal_hz != 0 {
        return (crystal_hz as u64 * numerator as u64 / denominator as u64 / 1000, Source::Cpuid15);
    }
    if p.leaf16_mhz != 0 {
        return (p.leaf16_mhz as u64 * 1000, Source::Cpuid16);
    }
    (GUESS_KHZ, Source::Guess)
}

/// kvmclock converts ticks to ns as `((ticks << shift) * mul) >> 32` (a
/// negative shift shifts right), so ticks per ms = 10^6 * 2^32 / mul,
/// shifted the other way. Rounded to the nearest kHz, as Linux's
/// `pvclock_tsc_khz` (which truncates) gives within 1 kHz.
fn pvclock_khz(p: &Probe) -> Option<u64> {
    if !p.pvclock_ok || p.pvclock_mul == 0 || !(-32..=32).contains(&p.pvclock_shift) {
        return None;
    }
    let mut scaled: u128 = (1_000_000u128 << 32) << 32;
    scaled /= p.pvclock_mul as u128;
    if p.pvclock_shift < 0 {
        scaled <<= -p.pvclock_shift as u32;
    } else {
        scaled >>= p.pvclock_shift as u32;
    }
    // `scaled` is kHz << 32.
    let khz = ((scaled + (1 << 31)) >> 32) as u64;
    (khz != 0).then_some(khz)
}
