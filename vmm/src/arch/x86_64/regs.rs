//! The registers a vCPU starts with, per boot protocol.
//!
//! PVH: 32-bit protected mode, paging off, `%ebx` = hvm_start_info.
//! Linux 64-bit protocol: long mode with the first 1 GiB identity-mapped,
//! `%rsi` = boot_params.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{boot_gdt, segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::*;
use crate::memory::GuestMemory;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const BOOT_IDT_START: u64 = 0x520;

/// Where and how the first vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    Pvh { entry: u64, start_info: u64 },
    Linux64 { entry: u64, boot_params: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write boot tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the vCPU's initial {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

pub fn setup_regs(vcpu: &VcpuFd, boot: BootEntry) -> Result<(), Error> {
    let regs = match boot {
        BootEntry::Pvh { entry, start_info } => {
            kvm_regs { rflags: 0x2, rip: entry, rbx: start_info, ..Default::default() }
        }
        BootEntry::Linux64 { entry, boot_params } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot_params,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(kvm("general registers"))
}

/// Writes the boot GDT (and for long mode, an empty IDT and identity page
/// tables) into guest memory and points the segment registers at them.
pub fn setup_sregs(mem: &GuestMemory, vcpu: &VcpuFd, boot: BootEntry) -> Result<(), Error> {
    let long_mode = matches!(boot, BootEntry::Linux64 { .. });
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;

    let gdt = boot_gdt(long_mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    let code = segment_from_gdt(gdt[CODE_INDEX as usize], CODE_INDEX);
    let data = segment_from_gdt(gdt[DATA_INDEX as usize], DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[TSS_INDEX as usize], TSS_INDEX);

    if long_mode {
        mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
        sregs.idt.base = BOOT_IDT_START;
        sregs.idt.limit = 7;
        write_identity_page_tables(mem)?;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PE | CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

/// Identity-maps the first 1 GiB with 2 MiB pages, as Linux's 64-bit entry
/// expects of its loader.
fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), Error> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

/// LINT0 as ExtINT and LINT1 as NMI, as the MP table says they are wired.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    let set_mode = |regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    };
    set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}
