//! The Linux 64-bit boot protocol: the `boot_params` zero page with the
//! setup header, e820 map, command line and initrd.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::Error;
use crate::arch::x86_64::layout::{memory_map, CMDLINE_START, ZERO_PAGE_START};
use crate::memory::GuestMemory;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Builds and writes the zero page (with the ACPI RSDP's address if there
/// is one); returns its address.
pub fn write_boot_params(
    mem: &GuestMemory,
    mem_bytes: u64,
    header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<u64, Error> {
    let mut params = boot_params_for(mem_bytes, header, cmdline_len, initrd);
    params.acpi_rsdp_addr = acpi_rsdp.unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(ZERO_PAGE_START)
}

pub fn boot_params_for(
    mem_bytes: u64,
    header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut params = boot_params::default();
    // A bzImage's own setup header carries its needs (loadflags, alignment).
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(mem_bytes);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}
