//! The debug-exit port: a byte written ends the VM with that exit status,
//! so a test guest can report its verdict as a process exit code.

use std::sync::mpsc::Sender;

use super::bus::BusDevice;
use crate::vstate::{ExitReason, VmEvent};

pub struct DebugExit(pub Sender<VmEvent>);

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(code) = data.first() {
            let _ = self.0.send(VmEvent::Exit(ExitReason::DebugExit(*code)));
        }
    }
}
