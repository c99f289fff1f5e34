//! The ACPI tables Linux reads to find the vCPUs, the interrupt controllers
//! and the devices: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT
//! naming COM1, the i8042 and the virtio-mmio devices.
//!
//! Built with rust-vmm's `acpi_tables`; the two MADT entries it has no type
//! for on x86 (interrupt source override, local APIC NMI) are defined here.
//! Everything lives in the BIOS area from `layout::ACPI_START` (the RSDP
//! first, where Linux's scan of 0xE0000-0xFFFFF finds it) to 1 MiB, which
//! the e820 map marks reserved.
//!
//! Hardware-reduced means no SCI, no PM1 blocks and no FACS: the VMM has
//! none of that hardware. Linux then leaves the 8259 PIC and the PIT alone
//! and routes everything through the IOAPIC. The reset register is the
//! i8042's CPU reset line (0xfe to port 0x64), which the VMM implements.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::layout::{ports, ACPI_START, APIC_START, COM1_IRQ, HIMEM_START, IOAPIC_START};
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_REVISION: u32 = 1;
/// The DSDT's revision: 2 and up means 64-bit AML integers.
const DSDT_REVISION: u8 = 6;
/// Each virtio-mmio device decodes one 4 KiB page (see `layout`).
pub const VIRTIO_MMIO_SIZE: u32 = 0x1000;
const I8042_IRQ: u32 = 1;
/// The i8042 command port: 0xfe written here pulses the CPU reset line.
const I8042_COMMAND: u64 = ports::I8042 + 4;
const I8042_RESET: u8 = 0xfe;

// IA-PC boot architecture flags (FADT IAPC_BOOT_ARCH).
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

// MPS INTI flags: polarity in bits 0-1, trigger mode in bits 2-3.
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_EDGE: u16 = 0b01 << 2;

/// The most vCPUs the MADT can name: xAPIC ids are one byte, 0xff is the
/// broadcast id, and the IOAPIC takes the id after the last vCPU.
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the ACPI tables describe 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    #[error("virtio-mmio device at {0:#x} lies above 4 GiB; the DSDT describes 32-bit windows only")]
    MmioAbove4G(u64),
    #[error("the ACPI tables ({0} bytes) do not fit between {ACPI_START:#x} and 1 MiB")]
    TooLarge(u64),
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiSpec<'a> {
    pub vcpus: u8,
    /// Each virtio-mmio device's window base and IOAPIC pin (GSI).
    pub virtio: &'a [(u64, u32)],
}

/// One table and where it goes.
#[derive(Clone, Debug)]
pub struct Table {
    /// "RSD PTR " is abbreviated to "RSDP".
    pub signature: [u8; 4],
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// MADT type 2: an ISA IRQ's GSI and its polarity and trigger mode.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT type 4: which LINT pin of which processors takes the NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16<LE>,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// The DSDT: `\_SB` with COM1, the i8042 and one LNRO0005 (virtio-mmio)
/// device per window.
fn dsdt(spec: &AcpiSpec) -> Result<Vec<u8>, Error> {
    // Each device is built and serialised in one statement: the AML types
    // borrow their children, which are temporaries.
    let mut children = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(ports::COM1 as u16, ports::COM1 as u16, 1, ports::COM1_LEN as u8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut children);

    aml::Device::new(
        "PS2K".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(ports::I8042 as u16, ports::I8042 as u16, 1, 1),
                    &aml::IO::new(I8042_COMMAND as u16, I8042_COMMAND as u16, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, I8042_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut children);

    for (i, &(base, irq)) in spec.virtio.iter().enumerate() {
        let base32 = u32::try_from(base).map_err(|_| Error::MmioAbove4G(base))?;
        let name = format!("VR{i:02X}");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base32, VIRTIO_MMIO_SIZE),
                        // irqfd-driven lines: edge-triggered, active high, not shared.
                        &aml::Interrupt::new(true, true, false, false, irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut children);
    }

    let mut table = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, *b"FERRYDSD", OEM_REVISION);
    table.append_slice(&aml::Scope::raw("\\_SB_".into(), children));
    Ok(table.as_slice().to_vec())
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"FERRYFAC", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_8042
        | IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, I8042_COMMAND);
    fadt.reset_value = I8042_RESET;
    to_bytes(&fadt.finalize())
}

/// The MADT: a local APIC per vCPU (APIC id = vCPU index, as KVM sets it),
/// the IOAPIC with GSIs 0-23, identity overrides for the ISA IRQs the
/// machine wires (i8042, COM1: edge, active high, as KVM's default routing
/// has them), and NMI on LINT1 of every processor (as the MP table says).
/// None for IRQ 0: a hardware-reduced FADT's SCI_INT is 0, and Linux takes
/// an override of the SCI's IRQ for the SCI, making it level, active low.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(OEM_ID, *b"FERRYAPC", OEM_REVISION, LocalInterruptController::Address(APIC_START as u32));
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The same IOAPIC id as the MP table.
    madt.add_structure(IoApic::new(vcpus + 1, IOAPIC_START as u32, 0));
    for irq in [I8042_IRQ, COM1_IRQ] {
        madt.add_structure(InterruptSourceOverride {
            r#type: 2,
            length: 10,
            bus: 0,
            source: irq as u8,
            gsi: irq.into(),
            flags: (MPS_INTI_ACTIVE_HIGH | MPS_INTI_EDGE).into(),
        });
    }
    madt.add_structure(LocalApicNmi { r#type: 4, length: 6, processor_uid: 0xff, flags: 0.into(), lint: 1 });
    to_bytes(&madt)
}

/// Builds every table laid out from `base`, RSDP first.
pub fn build(spec: &AcpiSpec, base: u64) -> Result<Vec<Table>, Error> {
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(Error::VcpuCount(spec.vcpus));
    }
    let mut at = align16(base + Rsdp::len() as u64);
    let mut tables = Vec::new();
    let mut place = |signature: [u8; 4], bytes: Vec<u8>| {
        let addr = at;
        at = align16(at + bytes.len() as u64);
        tables.push(Table { signature, addr, bytes });
        addr
    };
    let dsdt_addr = place(*b"DSDT", dsdt(spec)?);
    let fadt_addr = place(*b"FACP", fadt(dsdt_addr));
    let madt_addr = place(*b"APIC", madt(spec.vcpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"FERRYXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(*b"XSDT", to_bytes(&xsdt));
    let end = at;
    if end > HIMEM_START {
        return Err(Error::TooLarge(end - base));
    }
    tables.insert(0, Table { signature: *b"RSDP", addr: base, bytes: to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)) });
    Ok(tables)
}

/// Writes the tables to their place in guest memory; returns the RSDP's
/// address for the boot protocol to hand over.
pub fn write(mem: &GuestMemory, spec: &AcpiSpec) -> Result<GuestAddress, Error> {
    let tables = build(spec, ACPI_START)?;
    for t in &tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))?;
    }
    let end = tables.iter().map(|t| t.addr + t.bytes.len() as u64).max().unwrap_or(ACPI_START);
    tracing::debug!(
        vcpus = spec.vcpus,
        virtio = spec.virtio.len(),
        "ACPI tables at {ACPI_START:#x}-{end:#x}, RSDP at {ACPI_START:#x}"
    );
    Ok(GuestAddress(ACPI_START))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::arch::x86_64::layout::{memory_map, MemoryKind, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_START};

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn virtio(n: usize) -> Vec<(u64, u32)> {
        (0..n)
            .map(|i| {
                (VIRTIO_MMIO_START + i as u64 * crate::devices::virtio::mmio::MMIO_WINDOW, VIRTIO_FIRST_IRQ + i as u32)
            })
            .collect()
    }

    fn find<'a>(tables: &'a [Table], sig: &[u8; 4]) -> &'a Table {
        tables.iter().find(|t| &t.signature == sig).unwrap()
    }

    /// Every checksum, length and pointer, checked from the bytes.
    fn check_tables(tables: &[Table], vcpus: u8, devices: usize) {
        let rsdp = &tables[0];
        assert_eq!(&rsdp.bytes[0..8], b"RSD PTR ");
        assert_eq!(rsdp.addr % 16, 0, "the RSDP sits on a 16-byte boundary for the BIOS-area scan");
        assert_eq!(sum(&rsdp.bytes[0..20]), 0, "RSDP checksum (ACPI 1.0 part)");
        assert_eq!(rsdp.bytes[15], 2, "RSDP revision 2: XSDT");
        assert_eq!(u32_at(&rsdp.bytes, 20) as usize, rsdp.bytes.len());
        assert_eq!(sum(&rsdp.bytes), 0, "RSDP extended checksum");
        for t in &tables[1..] {
            assert_eq!(&t.bytes[0..4], &t.signature);
            assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len(), "{} length", String::from_utf8_lossy(&t.signature));
            assert_eq!(sum(&t.bytes), 0, "{} checksum", String::from_utf8_lossy(&t.signature));
            assert_eq!(t.addr % 8, 0);
        }
        let xsdt = find(tables, b"XSDT");
        assert_eq!(u64_at(&rsdp.bytes, 24), xsdt.addr);
        let entries: Vec<u64> = xsdt.bytes[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(entries, vec![find(tables, b"FACP").addr, find(tables, b"APIC").addr]);
        let fadt = find(tables, b"FACP");
        assert_eq!(u64_at(&fadt.bytes, 140), find(tables, b"DSDT").addr, "FADT X_DSDT");
        assert_ne!(u32_at(&fadt.bytes, 112) & (1 << 20), 0, "hardware-reduced");

        let madt = &find(tables, b"APIC").bytes;
        assert_eq!(u32_at(madt, 36), APIC_START as u32);
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            entries.push(&madt[off..off + madt[off + 1] as usize]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(off, madt.len(), "MADT entries fill the table exactly");
        let lapics: Vec<_> = entries.iter().filter(|e| e[0] == 0).collect();
        assert_eq!(lapics.len(), vcpus as usize);
        for (i, e) in lapics.iter().enumerate() {
            assert_eq!((e[2], e[3], u32_at(e, 4)), (i as u8, i as u8, 1), "vCPU {i}: uid, APIC id, enabled");
        }
        let ioapics: Vec<_> = entries.iter().filter(|e| e[0] == 1).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!((u32_at(ioapics[0], 4), u32_at(ioapics[0], 8)), (IOAPIC_START as u32, 0));
        let isos: Vec<(u8, u32)> = entries.iter().filter(|e| e[0] == 2).map(|e| (e[3], u32_at(e, 4))).collect();
        assert_eq!(isos, vec![(1, 1), (4, 4)]);
        assert!(entries.iter().any(|e| e[0] == 4 && e[2] == 0xff && e[5] == 1), "NMI on LINT1");

        // Each virtio window's Memory32Fixed descriptor (0x86, length 9,
        // read-write, base, 4 KiB) and the COM1 I/O range are in the AML.
        let dsdt = &find(tables, b"DSDT").bytes;
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        for (base, _) in virtio(devices) {
            let mut desc = vec![0x86, 9, 0, 1];
            desc.extend_from_slice(&(base as u32).to_le_bytes());
            desc.extend_from_slice(&VIRTIO_MMIO_SIZE.to_le_bytes());
            assert!(contains(&desc), "virtio window {base:#x} in the DSDT");
        }
        assert_eq!(dsdt.windows(8).filter(|w| w == b"LNRO0005").count(), devices);
        assert!(contains(&[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]), "COM1 IO(0x3f8, 8)");
    }

    #[test]
    fn checksums_lengths_and_pointers() {
        for (vcpus, devices) in
            [(1u8, 0usize), (2, 2), (8, 5), (MAX_VCPUS, crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES)]
        {
            let spec = AcpiSpec { vcpus, virtio: &virtio(devices) };
            let tables = build(&spec, ACPI_START).unwrap();
            check_tables(&tables, vcpus, devices);
        }
    }

    #[test]
    fn the_window_size_is_the_transport_s() {
        assert_eq!(u64::from(VIRTIO_MMIO_SIZE), crate::devices::virtio::mmio::MMIO_WINDOW);
    }

    #[test]
    fn refuses_what_it_cannot_describe() {
        assert!(matches!(build(&AcpiSpec { vcpus: 0, virtio: &[] }, ACPI_START), Err(Error::VcpuCount(0))));
        assert!(matches!(build(&AcpiSpec { vcpus: 255, virtio: &[] }, ACPI_START), Err(Error::VcpuCount(255))));
        let high = [(0x1_0000_0000, 5)];
        assert!(matches!(build(&AcpiSpec { vcpus: 1, virtio: &high }, ACPI_START), Err(Error::MmioAbove4G(_))));
        assert!(matches!(build(&AcpiSpec { vcpus: 1, virtio: &[] }, HIMEM_START - 64), Err(Error::TooLarge(_))));
    }

    #[test]
    fn tables_land_in_reserved_memory_with_the_rsdp_in_the_bios_area() {
        let ram = crate::memory::create(64).unwrap();
        let devices = virtio(3);
        let spec = AcpiSpec { vcpus: 4, virtio: &devices };
        let rsdp = write(&ram.memory, &spec).unwrap();
        assert_eq!(rsdp, GuestAddress(ACPI_START));
        assert!((0xe0000..0x10_0000).contains(&rsdp.0), "inside Linux's RSDP scan range");
        let tables = build(&spec, ACPI_START).unwrap();
        let end = tables.iter().map(|t| t.addr + t.bytes.len() as u64).max().unwrap();
        let reserved = memory_map(ram.size)
            .into_iter()
            .any(|e| e.kind == MemoryKind::Reserved && e.addr <= ACPI_START && end <= e.addr + e.size);
        assert!(reserved, "the tables' range {ACPI_START:#x}-{end:#x} is reserved in the e820 map");
        for t in &tables {
            let mut back = vec![0u8; t.bytes.len()];
            ram.memory.read_slice(&mut back, GuestAddress(t.addr)).unwrap();
            assert_eq!(back, t.bytes);
        }
    }

    fn run(dir: &Path, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool).current_dir(dir).args(args).output().unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{tool} {args:?} failed ({}):\n{log}", out.status);
        // Both exit 0 on a bad checksum or a bad AML opcode, with a warning.
        for bad in ["Error", "Warning", "Exception", "Incorrect", "Invalid"] {
            assert!(!log.contains(bad), "{tool} {args:?} says {bad}:\n{log}");
        }
        log
    }

    /// Debian's `iasl -d` disassembles every table without an error or a
    /// warning, and `acpiexec` (ACPICA's core, as in Linux) loads them and
    /// evaluates each device's _CRS. Needs acpica-tools
    /// (scripts/install-deps.sh); fails without it unless FERRY_NO_KVM=1
    /// says this machine runs no system tests.
    #[test]
    fn iasl_disassembles_every_table() {
        if Command::new("iasl").arg("-v").output().is_err() {
            if std::env::var("FERRY_NO_KVM").as_deref() == Ok("1") {
                eprintln!("iasl_disassembles_every_table: not run: no iasl and FERRY_NO_KVM=1");
                return;
            }
            panic!("iasl_disassembles_every_table needs iasl (Debian's acpica-tools; scripts/install-deps.sh)");
        }
        let dir = std::env::temp_dir().join(format!("ferry-acpi-iasl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let devices = virtio(4);
        let tables = build(&AcpiSpec { vcpus: 2, virtio: &devices }, ACPI_START).unwrap();
        check_tables(&tables, 2, 4);
        // The RSDP is no SDT (it has no common header): this iasl (Debian's
        // 20200925) refuses any standalone RSDP, even one it compiled from
        // its own template, so check_tables checks it byte by byte instead.
        for t in tables.iter().filter(|t| &t.signature != b"RSDP") {
            let name = String::from_utf8_lossy(&t.signature).to_lowercase();
            let dat = format!("{name}.dat");
            std::fs::write(dir.join(&dat), &t.bytes).unwrap();
            run(&dir, "iasl", &["-d", &dat]);
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap_or_default();
            check_disassembly(&name, &dsl);
        }
        let log = run(
            &dir,
            "acpiexec",
            &[
                "-b",
                "Evaluate \\_SB.COM1._CRS; Evaluate \\_SB.PS2K._CRS; Evaluate \\_SB.VR03._CRS",
                "dsdt.dat",
                "facp.dat",
                "apic.dat",
            ],
        );
        assert!(log.contains("6 Devices"), "{log}");
        assert_eq!(log.matches("external buffer length").count(), 3, "three _CRS evaluated:\n{log}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What iasl's disassembly must say, table by table.
    fn check_disassembly(name: &str, dsl: &str) {
        let must = |what: &str| assert!(dsl.contains(what), "{name}.dsl lacks {what:?}:\n{dsl}");
        assert!(!dsl.is_empty(), "iasl wrote no disassembly for {name}");
        for bad in ["Invalid", "Incorrect", "****"] {
            assert!(!dsl.contains(bad), "{name}.dsl says {bad}:\n{dsl}");
        }
        match name {
            "xsdt" => must("ACPI Table Address   1 : 00000000000E"),
            "facp" => must("Hardware Reduced (V5) : 1"),
            "apic" => {
                must("Local Apic ID : 01");
                must("[Interrupt Source Override]");
                must("[Local APIC NMI]");
            }
            "dsdt" => {
                must("Device (COM1)");
                must("EisaId (\"PNP0501\")");
                must("EisaId (\"PNP0303\")");
                must("\"LNRO0005\"");
                must("Memory32Fixed (ReadWrite,");
            }
            _ => unreachable!("{name}"),
        }
    }
}
