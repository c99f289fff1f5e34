//! The i8042 controller, for one thing: a guest writing 0xfe to port 0x64
//! (the CPU reset line) ends the VM, as a reboot would.

use std::sync::mpsc::Sender;

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::vstate::{ExitReason, VmEvent};

pub struct ResetLine(pub Sender<VmEvent>);

impl Trigger for ResetLine {
    type E = std::sync::mpsc::SendError<VmEvent>;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(VmEvent::Exit(ExitReason::GuestReset))
    }
}

pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042(I8042Device::new(ResetLine(events)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            // The receiver is gone only while the VMM is already exiting.
            let _ = self.0.write(offset as u8, *b);
        }
    }
}
