//! What the guest asks the VMM and KVM at CPL0, before it drops to CPL3.
//!
//! On a PVM host CPUID executed at CPL3 is not intercepted: it returns the
//! host's values, not the table the VMM set (the host's CPU count, no
//! hypervisor leaves). At CPL0 it is intercepted, and so is `wrmsr`, so the
//! few facts the guest needs from the VMM are gathered here, called from
//! `boot.rs` just before the `iretq`. CPL0 code is emulated at about 1-2 us
//! an instruction: this is straight-line code of a few hundred instructions
//! (seven CPUIDs, two WRMSRs, a short bounded wait), and it only records raw
//! values; `clock.rs` and `main.rs` interpret them at CPL3.
//!
//! Nothing here may fault (PVM delivers no exceptions: a fault kills the
//! guest): the kvmclock MSR is touched only when CPUID says KVM offers it,
//! and CPUID itself never faults.

use core::arch::asm;
use core::arch::x86_64::__cpuid_count;
use core::ptr::{addr_of, addr_of_mut};

const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_TSC_FREQUENCY: u32 = 0x4000_0010;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d]; // "KVMKVMKVM\0\0\0"
/// KVM_FEATURE_CLOCKSOURCE2: MSR_KVM_SYSTEM_TIME_NEW is there.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const PVCLOCK_ENABLE: u64 = 1;
/// How many times to look for KVM's first pvclock update before giving up
/// (each look is a handful of emulated instructions: well under 1 ms).
const PVCLOCK_TRIES: u32 = 64;

/// KVM's per-vCPU time info (`struct pvclock_vcpu_time_info`).
#[repr(C, align(4096))]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

/// The raw answers, as read at CPL0. Zero means "not offered".
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Probe {
    /// Set once the CPL0 probe ran.
    pub ran: bool,
    /// CPUID 0: the highest standard leaf.
    pub max_leaf: u32,
    /// CPUID 1 EBX and EDX (logical processor count, HTT).
    pub leaf1_ebx: u32,
    pub leaf1_edx: u32,
    /// CPUID 0xB subleaf 1 EBX and ECX (processors at the core level).
    pub leafb1_ebx: u32,
    pub leafb1_ecx: u32,
    /// CPUID 0x40000000 EAX if the signature is KVM's, else 0.
    pub kvm_max_leaf: u32,
    /// CPUID 0x40000001 EAX: KVM paravirtual features.
    pub kvm_features: u32,
    /// CPUID 0x40000010 EAX: TSC kHz (the VMM fills it from KVM_GET_TSC_KHZ).
    pub hv_tsc_khz: u32,
    /// CPUID 0x15 EAX, EBX, ECX: TSC/crystal ratio and crystal Hz.
    pub leaf15: [u32; 3],
    /// CPUID 0x16 EAX: base MHz.
    pub leaf16_mhz: u32,
    /// kvmclock's scale, if it answered: ns = ((ticks << shift) * mul) >> 32,
    /// a negative shift shifting right.
    pub pvclock_ok: bool,
    pub pvclock_mul: u32,
    pub pvclock_shift: i8,
}

impl Probe {
    /// How many vCPUs the VMM gave us, from its CPUID table: the core-level
    /// count of leaf 0xB, else leaf 1's logical processor count (1 without
    /// HTT). 0 if the probe did not run.
    pub fn cpus(&self) -> u32 {
        const LEVEL_CORE: u32 = 2;
        const EDX_HTT: u32 = 1 << 28;
        let core_level = self.leafb1_ebx & 0xffff;
        if !self.ran {
            0
        } else if core_level != 0 && (self.leafb1_ecx >> 8) & 0xff == LEVEL_CORE {
            core_level
        } else if self.leaf1_edx & EDX_HTT != 0 {
            (self.leaf1_ebx >> 16) & 0xff
        } else {
            1
        }
    }

    const EMPTY: Probe = Probe {
        ran: false,
        max_leaf: 0,
        leaf1_ebx: 0,
        leaf1_edx: 0,
        leafb1_ebx: 0,
        leafb1_ecx: 0,
        kvm_max_leaf: 0,
        kvm_features: 0,
        hv_tsc_khz: 0,
        leaf15: [0; 3],
        leaf16_mhz: 0,
        pvclock_ok: false,
        pvclock_mul: 0,
        pvclock_shift: 0,
    };
}

/// Written once at CPL0 by `cpl0_probe`, read at CPL3 by `get`.
static mut PROBE: Probe = Probe::EMPTY;
/// KVM writes here while kvmclock is enabled (only inside `cpl0_probe`).
static mut PVCLOCK: PvclockTimeInfo = PvclockTimeInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// The probe's results (all zero if it did not run).
pub fn get() -> Probe {
    // SAFETY: PROBE is written only by `cpl0_probe`, which has returned
    // (single vCPU, before `guest_main`); a plain copy of plain data.
    unsafe { addr_of!(PROBE).read() }
}

/// Called from `boot.rs` at CPL0 in long mode, on the boot stack, once.
#[no_mangle]
pub extern "C" fn cpl0_probe() {
    let mut p = Probe::EMPTY;
    // CPUID never faults; a leaf above the maximum returns some other leaf's
    // data, so each is read only when the maximum leaf says it exists.
    p.max_leaf = __cpuid_count(0, 0).eax;
    let l1 = __cpuid_count(1, 0);
    p.leaf1_ebx = l1.ebx;
    p.leaf1_edx = l1.edx;
    if p.max_leaf >= 0xb {
        let lb = __cpuid_count(0xb, 1);
        p.leafb1_ebx = lb.ebx;
        p.leafb1_ecx = lb.ecx;
    }
    if p.max_leaf >= 0x15 {
        let l = __cpuid_count(0x15, 0);
        p.leaf15 = [l.eax, l.ebx, l.ecx];
    }
    if p.max_leaf >= 0x16 {
        p.leaf16_mhz = __cpuid_count(0x16, 0).eax & 0xffff;
    }
    let hv = __cpuid_count(LEAF_HYPERVISOR, 0);
    if [hv.ebx, hv.ecx, hv.edx] == KVM_SIGNATURE && hv.eax >= LEAF_KVM_FEATURES {
        p.kvm_max_leaf = hv.eax;
        p.kvm_features = __cpuid_count(LEAF_KVM_FEATURES, 0).eax;
        if hv.eax >= LEAF_TSC_FREQUENCY {
            p.hv_tsc_khz = __cpuid_count(LEAF_TSC_FREQUENCY, 0).eax;
        }
        if p.kvm_features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
            read_kvmclock(&mut p);
        }
    }
    p.ran = true;
    // SAFETY: the only writer, running once before anything reads PROBE.
    unsafe { addr_of_mut!(PROBE).write(p) }
}

/// Enables kvmclock on PVCLOCK, waits (bounded) for KVM's first update,
/// copies the scale out and disables kvmclock again, so KVM never writes
/// guest memory behind the workload's back (nor dirties a page during a
/// migration) and the vCPU state stays what it was without this probe.
fn read_kvmclock(p: &mut Probe) {
    let info = addr_of_mut!(PVCLOCK);
    // Identity-mapped: the static's address is its guest-physical address.
    // SAFETY: CPUID 0x40000001 says this MSR exists; the value is the
    // physical address of a page-aligned, otherwise unused pvclock struct.
    unsafe { wrmsr(MSR_KVM_SYSTEM_TIME_NEW, info as u64 | PVCLOCK_ENABLE) };
    for _ in 0..PVCLOCK_TRIES {
        // SAFETY: PVCLOCK is a valid static that only KVM writes to while
        // enabled; volatile reads, and the version protocol (odd: update in
        // progress; changed: torn read) makes the copied fields consistent.
        let (v0, mul, shift, v1) = unsafe {
            let v0 = addr_of!((*info).version).read_volatile();
            let mul = addr_of!((*info).tsc_to_system_mul).read_volatile();
            let shift = addr_of!((*info).tsc_shift).read_volatile();
            (v0, mul, shift, addr_of!((*info).version).read_volatile())
        };
        if v0 != 0 && v0 & 1 == 0 && v0 == v1 && mul != 0 {
            p.pvclock_ok = true;
            p.pvclock_mul = mul;
            p.pvclock_shift = shift;
            break;
        }
    }
    // SAFETY: as above; 0 (enable bit clear) turns kvmclock off.
    unsafe { wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0) };
}

/// # Safety
/// CPL0 only, and `msr` must exist (or the guest dies of a #GP).
unsafe fn wrmsr(msr: u32, value: u64) {
    // No `nomem`: enabling kvmclock makes KVM write guest memory.
    asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags));
}
