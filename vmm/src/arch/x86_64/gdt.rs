//! Boot-time GDT entries and the matching KVM segment registers.
//! Hand-written: no rust-vmm crate encodes descriptors.

use kvm_bindings::kvm_segment;

/// Builds a segment descriptor from its flags (the upper nibble pair of
/// byte 6 and the access byte: e.g. 0xa09b), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM view of descriptor `entry` loaded with selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { ((raw_limit << 12) | 0xfff) as u32 } else { raw_limit as u32 },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Null, code, data, TSS: the table both boot protocols start with.
/// Code is 64-bit for the Linux 64-bit protocol and 32-bit for PVH.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode { 0xa09b } else { 0xc09b };
    [gdt_entry(0, 0, 0), gdt_entry(code, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment_decodes() {
        let seg = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((seg.l, seg.db, seg.present, seg.s, seg.type_, seg.dpl), (1, 0, 1, 1, 0xb, 0));
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 8);
    }

    #[test]
    fn descriptor_fields_round_trip() {
        let e = gdt_entry(0xc093, 0x1234_5678, 0xabcde);
        let seg = segment_from_gdt(e, 2);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcd_efff);
        assert_eq!((seg.db, seg.g, seg.type_), (1, 1, 3));
    }
}
