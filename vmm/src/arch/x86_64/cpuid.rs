//! The CPUID a vCPU sees: what KVM supports, made consistent for a VM of
//! `vcpu_count` single-thread cores, with the KVM hypervisor leaves and the
//! TSC frequency leaf the test guest paces itself by.
//! Hand-written: no rust-vmm crate does this normalisation.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
pub const LEAF_HYPERVISOR: u32 = 0x4000_0000;
pub const LEAF_TSC_FREQUENCY: u32 = 0x4000_0010;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
/// The in-kernel LAPIC timer ticks at 1 GHz.
const LAPIC_BUS_KHZ: u32 = 1_000_000;

/// Topology level types for leaves 0xb/0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Rewrites `cpuid` for vCPU `vcpu_id` of `vcpu_count`; `tsc_khz` goes into
/// leaf 0x40000010.
pub fn normalize(cpuid: &mut CpuId, vcpu_id: u8, vcpu_count: u8, tsc_khz: u32) {
    let core_bits = (u32::from(vcpu_count)).next_power_of_two().trailing_zeros();
    let mut has_tsc_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (u32::from(vcpu_id) << 24) | (u32::from(vcpu_count) << 16) | (e.ebx & 0xffff);
                e.ecx |= ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: logical
                // processors sharing this cache - 1 (the package, for L3).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { u32::from(vcpu_count) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((u32::from(vcpu_count) - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = u32::from(vcpu_id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = u32::from(vcpu_count);
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_HYPERVISOR => {
                e.eax = LEAF_TSC_FREQUENCY;
                e.ebx = u32::from_le_bytes(KVM_SIGNATURE[0..4].try_into().unwrap());
                e.ecx = u32::from_le_bytes(KVM_SIGNATURE[4..8].try_into().unwrap());
                e.edx = u32::from_le_bytes(KVM_SIGNATURE[8..12].try_into().unwrap());
            }
            LEAF_TSC_FREQUENCY => {
                has_tsc_leaf = true;
                e.eax = tsc_khz;
                e.ebx = LAPIC_BUS_KHZ;
            }
            _ => {}
        }
    }
    if !has_tsc_leaf && tsc_khz != 0 {
        let entry =
            kvm_cpuid_entry2 { function: LEAF_TSC_FREQUENCY, eax: tsc_khz, ebx: LAPIC_BUS_KHZ, ..Default::default() };
        // A full table only loses the frequency leaf; guests fall back.
        if cpuid.push(entry).is_err() {
            tracing::warn!("CPUID table full: leaf 0x40000010 (TSC frequency) not added");
        }
    }
}

/// Looks up one leaf.
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == function && e.index == index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0x0000_0800, edx: EDX_HTT, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 0, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, ..Default::default() },
            kvm_cpuid_entry2 { function: LEAF_HYPERVISOR, eax: 0x4000_0001, ..Default::default() },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        let mut c = sample();
        normalize(&mut c, 2, 4, 2_000_000);
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(find(&c, 0xb, 1).unwrap().ebx, 4);
        assert_eq!(find(&c, 0xb, 1).unwrap().eax, 2);
        assert_eq!(find(&c, 0xb, 0).unwrap().edx, 2);
    }

    #[test]
    fn tsc_frequency_leaf_is_added_and_announced() {
        let mut c = sample();
        normalize(&mut c, 0, 1, 2_345_678);
        assert_eq!(find(&c, LEAF_HYPERVISOR, 0).unwrap().eax, LEAF_TSC_FREQUENCY);
        assert_eq!(find(&c, LEAF_TSC_FREQUENCY, 0).unwrap().eax, 2_345_678);
        assert_eq!(find(&c, 1, 0).unwrap().edx & EDX_HTT, 0);
    }
}
