//! The PVH `hvm_start_info` the VMM hands us: command line and memory map.
//! All of guest-physical memory is identity-mapped, so its addresses are
//! usable as pointers.

const HVM_START_MAGIC: u32 = 0x336e_c578;
pub const E820_RAM: u32 = 1;
const MAX_CMDLINE: usize = 4096;

#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    reserved: u32,
}

pub struct StartInfo {
    pub cmdline: &'static str,
    pub memmap: &'static [MemmapEntry],
}

/// Reads the start info at `paddr`; `None` if the magic is wrong.
pub fn read(paddr: u64) -> Option<StartInfo> {
    // SAFETY: the VMM placed hvm_start_info at this identity-mapped address;
    // the magic check guards against a VMM that did not.
    let si = unsafe { &*(paddr as *const HvmStartInfo) };
    if si.magic != HVM_START_MAGIC {
        return None;
    }
    let cmdline = if si.cmdline_paddr == 0 {
        ""
    } else {
        // SAFETY: the VMM wrote a NUL-terminated string here; the scan is
        // bounded so a missing terminator cannot run off the end of RAM.
        let bytes = unsafe { core::slice::from_raw_parts(si.cmdline_paddr as *const u8, MAX_CMDLINE) };
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(0);
        core::str::from_utf8(&bytes[..len]).unwrap_or("")
    };
    let memmap = if si.memmap_paddr == 0 {
        &[][..]
    } else {
        // SAFETY: the VMM wrote `memmap_entries` entries at `memmap_paddr`.
        unsafe {
            core::slice::from_raw_parts(si.memmap_paddr as *const MemmapEntry, si.memmap_entries.min(128) as usize)
        }
    };
    Some(StartInfo { cmdline, memmap })
}
