//! A running VM: builds KVM state, memory, devices and vCPUs from a
//! `VmConfig`, and offers the controls the API and CLI need.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{self, ports};
use crate::arch::x86_64::mptable;
use crate::boot::{self, BootSpec, Booted};
use crate::config::{VmConfig, MAX_VCPUS};
use crate::devices::bus::{lock, PioBus};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::serial::{IrqLine, SerialDevice};
use crate::memory::{self, GuestRam};
use crate::vstate::vcpu::{self, Vcpu, Vcpus};
use crate::vstate::vm::{self, Vm};
use crate::vstate::{ExitReason, VmEvent};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    VcpuCount(u8),
    #[error(transparent)]
    Kvm(#[from] vm::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("cannot open serial output: {0}")]
    SerialOutput(std::io::Error),
    #[error("cannot set up the device interrupt line: {0}")]
    Irq(std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::Overlap),
    #[error("the VM is already {0}")]
    State(VmState),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    Running,
    Paused,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
        })
    }
}

/// What `GET vm.info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfig,
    pub boot_protocol: &'static str,
    pub kernel_load: u64,
    pub uptime_ms: u64,
    pub pid: u32,
    pub pvm_host: bool,
}

pub struct Vmm {
    config: VmConfig,
    vcpus: Mutex<Vcpus>,
    // Field order is drop order: vCPUs, then the VM fd, then its memory.
    _vm: Vm,
    _ram: GuestRam,
    serial: Arc<Mutex<SerialDevice>>,
    booted: Booted,
    events_tx: Sender<VmEvent>,
    events_rx: Mutex<Receiver<VmEvent>>,
    started: Instant,
}

impl Vmm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<Vmm, Error> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(Error::VcpuCount(config.vcpus));
        }
        memory::check_size(config.mem_mib)?;
        let vm = Vm::new(&config.kvm_device)?;
        let ram = memory::create(config.mem_mib)?;
        vm.register_memory(&ram.memory)?;

        let booted = boot::load(
            &ram.memory,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                protocol: config.boot,
                mem_bytes: ram.size,
            },
        )?;
        mptable::write(&ram.memory, config.vcpus)?;

        let (events_tx, events_rx) = channel();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Irq)?;
        vm.fd.register_irqfd(&serial_irq, layout::COM1_IRQ).map_err(|e| Error::Irq(e.into()))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqLine(serial_irq),
            config.serial.open().map_err(Error::SerialOutput)?,
        )));
        let mut bus = PioBus::default();
        bus.insert(ports::COM1, ports::COM1_LEN, serial.clone())?;
        bus.insert(ports::I8042, ports::I8042_LEN, Arc::new(Mutex::new(I8042::new(events_tx.clone()))))?;
        bus.insert(ports::DEBUG_EXIT, 1, Arc::new(Mutex::new(DebugExit(events_tx.clone()))))?;
        let bus = Arc::new(bus);

        let control = Vcpus::new_control();
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            vcpus.push(Vcpu::configure(
                &vm.fd,
                id,
                config.vcpus,
                &vm.supported_cpuid,
                &ram.memory,
                (id == 0).then_some(booted.entry),
                bus.clone(),
                control.clone(),
                events_tx.clone(),
            )?);
        }
        let vcpus = Vcpus::start(control, vcpus, false)?;
        tracing::info!(entry = ?booted.entry, "VM started with {} vCPU(s), {} MiB", config.vcpus, config.mem_mib);
        Ok(Vmm {
            config,
            vcpus: Mutex::new(vcpus),
            _vm: vm,
            _ram: ram,
            serial,
            booted,
            events_tx,
            events_rx: Mutex::new(events_rx),
            started: Instant::now(),
        })
    }

    pub fn state(&self) -> VmState {
        if lock(&self.vcpus).is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Returns once no vCPU is in the guest.
    pub fn pause(&self) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        if vcpus.is_paused() {
            return Err(Error::State(VmState::Paused));
        }
        vcpus.pause();
        Ok(())
    }

    pub fn resume(&self) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        if !vcpus.is_paused() {
            return Err(Error::State(VmState::Running));
        }
        vcpus.resume();
        Ok(())
    }

    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: self.state(),
            config: self.config.clone(),
            boot_protocol: match self.booted.entry {
                crate::arch::x86_64::regs::BootEntry::Pvh { .. } => "pvh",
                crate::arch::x86_64::regs::BootEntry::Linux64 { .. } => "linux64",
            },
            kernel_load: self.booted.kernel_load,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pid: std::process::id(),
            pvm_host: vm::is_pvm_host(),
        }
    }

    /// Types `bytes` on the guest's serial console.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        lock(&self.serial).push_input(bytes)
    }

    /// A handle for anything that needs to end the VM.
    pub fn events(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// Blocks until something ends the VM.
    pub fn wait_for_exit(&self) -> ExitReason {
        match lock(&self.events_rx).recv() {
            Ok(VmEvent::Exit(reason)) => reason,
            Err(_) => ExitReason::Error("event channel closed".into()),
        }
    }

    /// Stops every vCPU and flushes the console.
    pub fn stop(&self) {
        lock(&self.vcpus).stop();
        lock(&self.serial).flush();
    }
}
