//! PVH boot: `hvm_start_info` with the command line and memory map.

use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

use super::Error;
use crate::arch::x86_64::layout::{
    memory_map, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START,
};
use crate::memory::GuestMemory;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Module descriptors go after the memory map slots.
const PVH_MODLIST_START: u64 = PVH_MEMMAP_START + (PVH_MEMMAP_MAX_ENTRIES * 24) as u64;

/// Writes the start info (and the initrd as module 0, and the ACPI RSDP's
/// address if there is one); returns its address.
pub fn write_start_info(
    mem: &GuestMemory,
    mem_bytes: u64,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<u64, Error> {
    let map = memory_map(mem_bytes);
    for (i, e) in map.iter().enumerate().take(PVH_MEMMAP_MAX_ENTRIES) {
        let entry = hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_START + i as u64 * 24))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len().min(PVH_MEMMAP_MAX_ENTRIES) as u32,
        rsdp_paddr: acpi_rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry { paddr: addr, size, ..Default::default() };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_carries_the_rsdp_address() {
        let ram = crate::memory::create(32).unwrap();
        for rsdp in [Some(0xe0000), None] {
            let at = write_start_info(&ram.memory, ram.size, None, rsdp).unwrap();
            let info: hvm_start_info = ram.memory.read_obj(GuestAddress(at)).unwrap();
            assert_eq!(({ info.magic }, { info.rsdp_paddr }), (XEN_HVM_START_MAGIC, rsdp.unwrap_or(0)));
        }
    }
}
