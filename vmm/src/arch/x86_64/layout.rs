//! Where things live in guest-physical memory and port space.
//!
//! ```text
//! 0x0000_0500  boot GDT               (both boot protocols)
//! 0x0000_6000  PVH hvm_start_info, then its memory map at 0x6100
//! 0x0000_7000  Linux boot_params (the "zero page")
//! 0x0000_8ff0  Linux boot stack top
//! 0x0000_9000  Linux boot page tables (PML4, PDPT, PD: first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA); reserved up to 1 MiB
//! 0x000e_0000  ACPI tables, the RSDP first (BIOS area, still reserved)
//! 0x0010_0000  kernel / test guest image (high memory)
//! 0xc000_0000  MMIO hole up to 4 GiB: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM beyond 3 GiB continues here
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// hvm_memmap_table_entry slots that fit between the memmap and the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area; the MP table goes here.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables, RSDP first: Linux scans 0xE0000-0xFFFFF for it.
pub const ACPI_START: u64 = 0xe0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, out of
/// the guest's way in the MMIO hole.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// virtio-mmio windows, one 4 KiB page per device from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IRQ of the first virtio device; the next ones follow.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Devices that fit IRQs 5..=23 of the IOAPIC.
pub const VIRTIO_MAX_DEVICES: usize = (IOAPIC_PINS - VIRTIO_FIRST_IRQ) as usize;

/// IRQ lines of the in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
pub const COM1_IRQ: u32 = 4;

/// Port I/O map. The guest side of the Ferry ports is `guest/src/ports.rs`.
pub mod ports {
    pub const COM1: u64 = 0x3f8;
    pub const COM1_LEN: u64 = 8;
    pub const I8042: u64 = 0x60;
    pub const I8042_LEN: u64 = 5;
    /// A byte written here ends the VM with that exit status (QEMU's
    /// isa-debug-exit address).
    pub const DEBUG_EXIT: u64 = 0x501;
    /// A 32-bit write holds the vCPU for that many microseconds: the
    /// polling guest's `hlt`.
    pub const IDLE: u16 = 0x510;
    pub const IDLE_MAX_US: u32 = 10_000;
}

/// The guest-physical RAM ranges for `mem_bytes` of memory: below the MMIO
/// hole first, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((MMIO_HOLE_END, mem_bytes - low));
    }
    ranges
}

/// One entry of the memory map handed to the guest (e820 / PVH memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// The guest's memory map: RAM with the legacy BIOS area carved out.
pub fn memory_map(mem_bytes: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry { addr: 0, size: EBDA_START, kind: MemoryKind::Ram },
        MemoryMapEntry { addr: EBDA_START, size: HIMEM_START - EBDA_START, kind: MemoryKind::Reserved },
    ];
    for (start, size) in ram_ranges(mem_bytes) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START { size } else { start + size };
        if end > start {
            map.push(MemoryMapEntry { addr: start, size: end - start, kind: MemoryKind::Ram });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_ram_range_and_a_hole_for_the_bios() {
        let map = memory_map(256 << 20);
        assert_eq!(map[0], MemoryMapEntry { addr: 0, size: EBDA_START, kind: MemoryKind::Ram });
        assert_eq!(map[1].kind, MemoryKind::Reserved);
        assert_eq!(
            map[2],
            MemoryMapEntry { addr: HIMEM_START, size: (256 << 20) - HIMEM_START, kind: MemoryKind::Ram }
        );
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let mem = 5u64 << 30;
        assert_eq!(ram_ranges(mem), vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 2 << 30)]);
        let map = memory_map(mem);
        let ram: u64 = map.iter().filter(|e| e.kind == MemoryKind::Ram).map(|e| e.size).sum();
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        assert_eq!(map.last().unwrap().addr, MMIO_HOLE_END);
    }
}
