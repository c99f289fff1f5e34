//! The VM state model: plain serde structs, one module per state kind, that
//! serve snapshots, quick migration and live migration alike.
//!
//! Encoded as: magic `FERRYVM\0`, format version (u32 LE), payload length
//! (u64 LE), CRC-32 of the payload (u32 LE), then the payload (postcard).
//! A reader refuses any other version by name: formats change by bumping
//! `FORMAT_VERSION`, never silently.

pub mod devices;
pub mod vcpu;
pub mod vm;

use serde::{Deserialize, Serialize};

use crate::config::MachineConfig;
use crate::lifecycle::RunState;

pub const MAGIC: &[u8; 8] = b"FERRYVM\0";
/// 2: the machine config alone (no host choices) and the run state.
/// 3: the interrupt lines pending at the save (`DevicesState::pending_irqs`).
pub const FORMAT_VERSION: u32 = 3;
pub const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// No VM state comes near this; a larger length is corruption.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a Ferry VM state (bad magic)")]
    BadMagic,
    #[error("VM state format version {found} is not supported: this ferry reads version {FORMAT_VERSION}")]
    UnsupportedVersion { found: u32 },
    #[error("VM state is truncated: {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    #[error("VM state is corrupted (checksum mismatch)")]
    Checksum,
    #[error("VM state claims {0} bytes, more than any VM state ({MAX_STATE_BYTES} bytes)")]
    TooLarge(u64),
    #[error("VM state does not decode: {0}")]
    Decode(postcard::Error),
    #[error("cannot encode VM state: {0}")]
    Encode(postcard::Error),
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The guest-visible machine; each host supplies its own host config.
    pub machine: MachineConfig,
    /// What the VM was doing when it was saved: a paused VM comes back paused.
    pub run_state: RunState,
    pub mem_bytes: u64,
    pub vcpus: Vec<vcpu::VcpuState>,
    pub vm: vm::VmArchState,
    pub devices: devices::DevicesState,
}

impl VmState {
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let payload = postcard::to_stdvec(self).map_err(Error::Encode)?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<VmState, Error> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(if bytes.len() < 8 && MAGIC.starts_with(bytes) {
                Error::Truncated { expected: HEADER_LEN as u64, got: bytes.len() as u64 }
            } else {
                Error::BadMagic
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated { expected: HEADER_LEN as u64, got: bytes.len() as u64 });
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { found: version });
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
        if len > MAX_STATE_BYTES {
            return Err(Error::TooLarge(len));
        }
        let crc = u32::from_le_bytes(bytes[20..24].try_into().unwrap());
        let payload = &bytes[HEADER_LEN..];
        if (payload.len() as u64) < len {
            return Err(Error::Truncated { expected: HEADER_LEN as u64 + len, got: bytes.len() as u64 });
        }
        let payload = &payload[..len as usize];
        if crc32fast::hash(payload) != crc {
            return Err(Error::Checksum);
        }
        postcard::from_bytes(payload).map_err(Error::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            machine: MachineConfig::new("/k"),
            run_state: RunState::Paused,
            mem_bytes: 64 << 20,
            vcpus: Vec::new(),
            vm: vm::VmArchState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: devices::DevicesState { serial: Default::default(), virtio: Vec::new(), pending_irqs: Vec::new() },
        }
    }

    #[test]
    fn round_trips_and_names_every_kind_of_damage() {
        let bytes = sample().encode().unwrap();
        let back = VmState::decode(&bytes).unwrap();
        assert_eq!(back.mem_bytes, 64 << 20);

        assert!(matches!(VmState::decode(b"garbage!garbage!garbage!"), Err(Error::BadMagic)));
        assert!(matches!(VmState::decode(&bytes[..bytes.len() - 3]), Err(Error::Truncated { .. })));
        assert!(matches!(VmState::decode(&bytes[..10]), Err(Error::Truncated { .. })));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert!(matches!(VmState::decode(&flipped), Err(Error::Checksum)));
        let mut future = bytes.clone();
        future[8..12].copy_from_slice(&4u32.to_le_bytes());
        let e = VmState::decode(&future).unwrap_err();
        assert!(e.to_string().contains("version 4 is not supported: this ferry reads version 3"), "{e}");
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(VmState::decode(&huge), Err(Error::TooLarge(_))));
    }

    /// Everything that says which interrupt is where travels: each virtio
    /// device's InterruptStatus, the lines pending at the save, the PICs'
    /// and IOAPIC's registers (redirection entries, IRR) and each vCPU's
    /// LAPIC page and pending events.
    #[test]
    fn interrupt_state_round_trips() {
        use kvm_bindings::{kvm_ioapic_state, kvm_irqchip, kvm_pic_state, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};

        let mut s = sample();
        let mut ioapic_regs = kvm_ioapic_state { base_address: 0xfec0_0000, id: 3, irr: 1 << 5, ..Default::default() };
        // Pin 5: vector 0x25, level-triggered, unmasked; pin 6 masked.
        ioapic_regs.redirtbl[5].bits = 0x25 | 1 << 15;
        ioapic_regs.redirtbl[6].bits = 0x26 | 1 << 16;
        let mut ioapic = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
        ioapic.chip.ioapic = ioapic_regs;
        s.vm.ioapic = ioapic;
        let mut pic = kvm_irqchip { chip_id: KVM_IRQCHIP_PIC_MASTER, ..Default::default() };
        pic.chip.pic = kvm_pic_state { irr: 0x10, imr: 0xef, isr: 0x01, irq_base: 0x20, ..Default::default() };
        s.vm.pic_master = pic;
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x200] = 0x20; // IRR bit for vector 0x25
        lapic.regs[0x100] = 0x01; // ISR
        let mut events = kvm_bindings::kvm_vcpu_events::default();
        events.nmi.pending = 1;
        s.vcpus.push(vcpu::VcpuState {
            id: 0,
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic,
            msrs: Vec::new(),
            vcpu_events: events,
            tsc_khz: 2_600_000,
        });
        let transport = devices::TransportSnapshot {
            device_type: 2,
            status: 0xf,
            acked_features: 1 << 32,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: crate::devices::virtio::INTERRUPT_USED_RING,
            queues: vec![devices::QueueSnapshot { max_size: 256, size: 256, ready: true, ..Default::default() }],
            backend: devices::BackendSnapshot::Block { path: "/d".into(), sectors: 8, readonly: false },
        };
        let serial = devices::SerialSnapshot { interrupt_identification: 0x02, ..Default::default() };
        s.devices.virtio = vec![transport];
        s.devices.pending_irqs = devices::DevicesState::unacknowledged_irqs(&serial, &s.devices.virtio);
        assert_eq!(s.devices.pending_irqs, [4, 5], "COM1 (THR empty) and the disk's line");
        s.devices.serial = serial;

        let back = VmState::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back.devices, s.devices);
        let bytes = |v: &kvm_irqchip| postcard::to_stdvec(v).unwrap();
        assert_eq!(bytes(&back.vm.ioapic), bytes(&s.vm.ioapic));
        assert_eq!(bytes(&back.vm.pic_master), bytes(&s.vm.pic_master));
        assert_eq!(back.vcpus[0].lapic.regs[..], s.vcpus[0].lapic.regs[..]);
        assert_eq!(back.vcpus[0].vcpu_events.nmi.pending, 1);
        // The redirection entries themselves, not only equal encodings.
        let mut want = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
        want.chip.ioapic = ioapic_regs;
        assert_eq!(bytes(&back.vm.ioapic), bytes(&want));
        assert_ne!(bytes(&back.vm.ioapic), bytes(&kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() }));
    }
}
