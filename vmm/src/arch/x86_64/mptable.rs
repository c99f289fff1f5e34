//! The Intel MultiProcessor table (spec 1.4) Linux reads to find the vCPUs,
//! the IOAPIC and the ISA interrupt routing. Hand-written: no rust-vmm crate.
//! Built as bytes rather than packed structs, so there is no unsafe here.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, HIMEM_START, IOAPIC_PINS, IOAPIC_START};
use crate::memory::GuestMemory;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU_APIC: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// The most vCPUs the table can describe (APIC ids are one byte and the
/// IOAPIC takes the id after the last vCPU).
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the MP table describes at most {MAX_VCPUS} vCPUs, {0} asked")]
    TooManyVcpus(u8),
    #[error("the MP table does not fit below 1 MiB")]
    TooLarge,
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// The floating pointer and configuration table for `vcpus` vCPUs, laid out
/// from guest address `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = if cpu == 0 { 0x3 } else { 0x1 }; // enabled, bootstrap
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURE_FPU_APIC.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS as u8 {
        let kind = if pin == 0 { INT_TYPE_EXTINT } else { INT_TYPE_INT };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut table: Vec<u8> = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]); // checksum patched below
    table.extend_from_slice(b"FERRY   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating: Vec<u8> = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    if base + floating.len() as u64 > HIMEM_START {
        return Err(Error::TooLarge);
    }
    Ok(floating)
}

pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), Error> {
    let bytes = build(vcpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_cpu_entries() {
        for vcpus in [1u8, 2, 8, MAX_VCPUS] {
            let b = build(vcpus, EBDA_START).unwrap();
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
            let table_addr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_addr, EBDA_START + 16);
            let table = &b[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let cpus = table[44..].chunks(20).take(vcpus as usize).filter(|e| e[0] == ENTRY_PROCESSOR).count();
            assert_eq!(cpus, vcpus as usize);
            assert_eq!(table[44 + 3], 0x3, "vCPU 0 is the bootstrap processor");
        }
    }

    #[test]
    fn refuses_impossible_vcpu_counts() {
        assert!(matches!(build(0, EBDA_START), Err(Error::TooManyVcpus(0))));
        assert!(matches!(build(255, EBDA_START), Err(Error::TooManyVcpus(255))));
    }
}
