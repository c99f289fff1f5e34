//! One vCPU's architectural state, in the orders KVM needs.
//!
//! Save: cpuid2, mp_state (first: it may flush pending events), regs,
//! sregs, xsave, xcrs, debugregs, lapic, MSRs (from KVM_GET_MSR_INDEX_LIST,
//! in chunks), vcpu_events (last), tsc_khz.
//! Restore: cpuid, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic,
//! MSRs (IA32_TSC before TSC_DEADLINE), vcpu_events, then KVMCLOCK_CTRL.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs read per KVM_GET_MSRS call.
const MSR_CHUNK: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM cannot {op} for vCPU {id}: {source}")]
    Kvm { id: u8, op: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {id}: the saved CPUID has {0} entries, more than KVM takes", .entries)]
    Cpuid { id: u8, entries: usize },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC frequency; 0 if KVM could not say.
    pub tsc_khz: u32,
}

/// Reads every MSR in `index_list` that KVM will give, skipping the ones it
/// refuses (KVM_GET_MSRS stops at the first it cannot read).
fn save_msrs(fd: &VcpuFd, id: u8, index_list: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(index_list.len());
    let mut pending: &[u32] = index_list;
    while !pending.is_empty() {
        let chunk = &pending[..pending.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).expect("chunk fits");
        let n = fd.get_msrs(&mut msrs).map_err(|source| Error::Kvm { id, op: "read MSRs", source })?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the one KVM refused (if any) and go on after it.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        pending = &pending[consumed..];
    }
    Ok(out)
}

impl VcpuState {
    pub fn save(fd: &VcpuFd, id: u8, msr_index_list: &[u32]) -> Result<VcpuState, Error> {
        let kvm = |op| move |source| Error::Kvm { id, op, source };
        let cpuid = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm("read CPUID"))?;
        let mp_state = fd.get_mp_state().map_err(kvm("read mp_state"))?;
        let regs = fd.get_regs().map_err(kvm("read registers"))?;
        let sregs = fd.get_sregs().map_err(kvm("read special registers"))?;
        let xsave = fd.get_xsave().map_err(kvm("read xsave"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("read xcrs"))?;
        let debugregs = fd.get_debug_regs().map_err(kvm("read debug registers"))?;
        let lapic = fd.get_lapic().map_err(kvm("read the local APIC"))?;
        let msrs = save_msrs(fd, id, msr_index_list)?;
        let vcpu_events = fd.get_vcpu_events().map_err(kvm("read vcpu events"))?;
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    pub fn restore(&self, fd: &VcpuFd) -> Result<(), Error> {
        let id = self.id;
        let kvm = |op| move |source| Error::Kvm { id, op, source };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| Error::Cpuid { id, entries: self.cpuid.len() })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        fd.set_mp_state(self.mp_state).map_err(kvm("set mp_state"))?;
        fd.set_regs(&self.regs).map_err(kvm("set registers"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("set special registers"))?;
        // SAFETY: Ferry never enables dynamic XSTATE features
        // (ARCH_REQ_XCOMP_GUEST_PERM), so KVM copies no more than the 4096
        // bytes of `kvm_xsave`.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set xsave"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set xcrs"))?;
        fd.set_debug_regs(&self.debugregs).map_err(kvm("set debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("set the local APIC"))?;
        // The TSC deadline is relative to the TSC: restore the TSC first.
        let mut msrs = self.msrs.clone();
        msrs.sort_by_key(|m| match m.index {
            MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        let mut pending: &[kvm_msr_entry] = &msrs;
        while !pending.is_empty() {
            let chunk = &pending[..pending.len().min(MSR_CHUNK)];
            let n = fd.set_msrs(&Msrs::from_entries(chunk).expect("chunk fits")).map_err(kvm("set MSRs"))?;
            if n < chunk.len() {
                tracing::warn!(vcpu = id, "KVM refused MSR {:#x} on restore; skipped", chunk[n].index);
                pending = &pending[n + 1..];
            } else {
                pending = &pending[n..];
            }
        }
        fd.set_vcpu_events(&self.vcpu_events).map_err(kvm("set vcpu events"))?;
        // Tells a kvmclock guest it was stopped, so its watchdogs do not fire;
        // a guest without kvmclock makes this fail, which is fine.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }
}
