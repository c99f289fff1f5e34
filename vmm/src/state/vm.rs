//! VM-wide KVM state: the in-kernel PIC pair, IOAPIC, PIT and KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("KVM cannot {op}: {source}")]
pub struct Error {
    op: &'static str,
    source: kvm_ioctls::Error,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmArchState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32, op: &'static str) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    fd.get_irqchip(&mut chip).map_err(|source| Error { op, source })?;
    Ok(chip)
}

impl VmArchState {
    pub fn save(fd: &VmFd) -> Result<VmArchState, Error> {
        let mut clock = fd.get_clock().map_err(|source| Error { op: "read the KVM clock", source })?;
        // Only the time travels; flags describe this host's clock.
        clock.flags = 0;
        Ok(VmArchState {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER, "read the master PIC")?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE, "read the slave PIC")?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC, "read the IOAPIC")?,
            pit: fd.get_pit2().map_err(|source| Error { op: "read the PIT", source })?,
            clock,
        })
    }

    pub fn restore(&self, fd: &VmFd) -> Result<(), Error> {
        let set = |chip: &kvm_irqchip, op| fd.set_irqchip(chip).map_err(|source| Error { op, source });
        set(&self.pic_master, "set the master PIC")?;
        set(&self.pic_slave, "set the slave PIC")?;
        set(&self.ioapic, "set the IOAPIC")?;
        fd.set_pit2(&self.pit).map_err(|source| Error { op: "set the PIT", source })?;
        fd.set_clock(&self.clock).map_err(|source| Error { op: "set the KVM clock", source })?;
        Ok(())
    }
}
