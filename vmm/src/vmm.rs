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
use crate::devices::bus::{lock, Buses};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::event_loop::EventLoop;
use crate::devices::serial::{IrqLine, SerialDevice};
use crate::devices::tap::{self, Tap};
use crate::devices::virtio::blk::{self, Block};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{Interrupt, VirtioDevice};
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
    #[error("--net: {0}")]
    Tap(#[from] tap::Error),
    #[error("--disk: {0}")]
    Disk(#[from] blk::Error),
    #[error("at most {max} virtio devices fit this machine model, {asked} asked")]
    TooManyDevices { max: usize, asked: usize },
    #[error("cannot start the device event loop: {0}")]
    EventLoop(std::io::Error),
    #[error("cannot announce the guest on {tap}: {source}")]
    Announce { tap: String, source: std::io::Error },
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
    pub devices: Vec<serde_json::Value>,
}

pub struct Vmm {
    config: VmConfig,
    vcpus: Mutex<Vcpus>,
    // Field order is drop order: vCPUs, then the VM fd, then its memory.
    _vm: Vm,
    _ram: GuestRam,
    serial: Arc<Mutex<SerialDevice>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    event_loop: EventLoop,
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
        // Backends first: a missing tap or disk is reported before any boot work.
        let devices = open_virtio_backends(&config)?;
        let vm = Vm::new(&config.kvm_device)?;
        let ram = memory::create(config.mem_mib)?;
        vm.register_memory(&ram.memory)?;

        let mut cmdline = config.cmdline.clone();
        let mut virtio = Vec::new();
        let mut mmio_devices = Vec::new();
        for (i, device) in devices.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_START + i as u64 * MMIO_WINDOW;
            let irq = layout::VIRTIO_FIRST_IRQ + i as u32;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Irq)?;
            vm.fd.register_irqfd(&irqfd, irq).map_err(|e| Error::Irq(e.into()))?;
            let transport =
                Arc::new(Mutex::new(MmioTransport::new(device, ram.memory.clone(), Arc::new(Interrupt::new(irqfd)))));
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
            mmio_devices.push((base, transport.clone()));
            virtio.push(transport);
        }

        let booted = boot::load(
            &ram.memory,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: cmdline.trim_start(),
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
        let mut bus = Buses::default();
        bus.pio.insert(ports::COM1, ports::COM1_LEN, serial.clone())?;
        bus.pio.insert(ports::I8042, ports::I8042_LEN, Arc::new(Mutex::new(I8042::new(events_tx.clone()))))?;
        bus.pio.insert(ports::DEBUG_EXIT, 1, Arc::new(Mutex::new(DebugExit(events_tx.clone()))))?;
        for (base, transport) in mmio_devices {
            bus.mmio.insert(base, MMIO_WINDOW, transport)?;
        }
        let event_loop = EventLoop::start(virtio.clone()).map_err(Error::EventLoop)?;
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
            virtio,
            event_loop,
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

    /// Returns once no vCPU is in the guest and no device touches guest
    /// memory.
    pub fn pause(&self) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        if vcpus.is_paused() {
            return Err(Error::State(VmState::Paused));
        }
        vcpus.pause();
        self.event_loop.pause();
        Ok(())
    }

    pub fn resume(&self) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        if !vcpus.is_paused() {
            return Err(Error::State(VmState::Running));
        }
        self.event_loop.resume();
        vcpus.resume();
        Ok(())
    }

    /// Announces the guest's MAC on every tap (RARP), so bridges and
    /// switches learn its port: what a migration does right after resume.
    pub fn announce(&self) -> Result<usize, Error> {
        let mut n = 0;
        for t in &self.virtio {
            let mut t = lock(t);
            if t.device().device_type() == crate::devices::virtio::TYPE_NET {
                let tap = t.device().describe()["tap"].as_str().unwrap_or("?").to_owned();
                t.device_mut().announce().map_err(|source| Error::Announce { tap, source })?;
                n += 1;
            }
        }
        Ok(n)
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
            devices: self.virtio.iter().map(|t| lock(t).device().describe()).collect(),
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

/// Opens every tap and disk image the config names, in device order.
fn open_virtio_backends(config: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, Error> {
    let asked = config.net.len() + config.disks.len();
    if asked > layout::VIRTIO_MAX_DEVICES {
        return Err(Error::TooManyDevices { max: layout::VIRTIO_MAX_DEVICES, asked });
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for n in &config.net {
        devices.push(Box::new(Net::new(Tap::open(&n.tap)?, n.mac)));
    }
    for d in &config.disks {
        devices.push(Box::new(Block::open(&d.path, d.readonly)?));
    }
    Ok(devices)
}
