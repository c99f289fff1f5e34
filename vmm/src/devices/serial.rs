//! COM1: vm-superio's 8250 UART, output to stdout or a file, input pushed
//! by the API, interrupts through an irqfd on IRQ 4 for guests that use them.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::state::devices::SerialSnapshot;

/// Where the guest's console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    #[default]
    Stdout,
    File(PathBuf),
    Null,
}

impl std::str::FromStr for SerialOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "null" | "none" => Ok(Self::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(format!("bad serial output '{s}' (expected stdout, file:PATH or null)")),
            },
        }
    }
}

impl SerialOutput {
    pub fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::File(p) => Box::new(File::create(p)?),
            SerialOutput::Null => Box::new(std::io::sink()),
        })
    }
}

/// An interrupt line backed by an eventfd (registered with KVM as an irqfd).
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialDevice {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        SerialDevice { uart: Serial::new(irq, out) }
    }

    /// A UART in a saved state (registers and unread input).
    pub fn from_state(state: &SerialSnapshot, irq: IrqLine, out: Box<dyn Write + Send>) -> Result<Self, String> {
        Serial::from_state(&state.into(), irq, vm_superio::serial::NoEvents, out)
            .map(|uart| SerialDevice { uart })
            .map_err(|e| format!("saved serial state is invalid: {e:?}"))
    }

    pub fn save(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Queues console input for the guest; returns how many bytes fit in the
    /// UART's FIFO (the rest is dropped, as on real hardware).
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                tracing::warn!("serial: {e}");
            }
        }
    }
}
