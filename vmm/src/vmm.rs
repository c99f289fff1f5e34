//! A running VM: builds KVM state, memory, devices and vCPUs from a
//! `VmConfig`, and offers the controls the API and CLI need.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi;
use crate::arch::x86_64::layout::{self, ports};
use crate::arch::x86_64::mptable;
use crate::arch::x86_64::regs::BootEntry;
use crate::boot::{self, BootSpec};
use crate::config::{VmConfig, MAX_VCPUS};
use crate::devices::bus::{lock, Buses};
use crate::devices::debug_exit::DebugExit;
use crate::devices::event_loop::EventLoop;
use crate::devices::i8042::I8042;
use crate::devices::serial::{IrqLine, SerialDevice};
use crate::devices::tap::{self, Tap};
use crate::devices::virtio::blk::{self, Block};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::memory::{self, GuestRam};
use crate::snapshot;
use crate::state::devices::{BackendSnapshot, DevicesState};
use crate::state::vcpu::VcpuState;
use crate::state::vm::VmArchState;
use crate::state::VmState as SavedState;
use crate::vstate::dirty::{self, DirtyBitmap, DirtyLogMode};
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
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("cannot open serial output: {0}")]
    SerialOutput(std::io::Error),
    #[error("cannot set up the device interrupt line: {0}")]
    Irq(std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::Overlap),
    #[error("the VM is already {0}")]
    State(RunState),
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
    #[error("the VM must be paused for this")]
    NotPaused,
    #[error("backend handoff: {0}")]
    Handoff(String),
    #[error("a migration is running: the VM's run state belongs to it until it ends")]
    Migrating,
    #[error("the VM was handed to another host and never runs here again")]
    Retired,
    #[error("dirty tracking: {0}")]
    Dirty(dirty::Error),
    #[error("cannot restore: {0}")]
    BadState(String),
    #[error("cannot write snapshot into {dir}: {source}")]
    Snapshot { dir: PathBuf, source: std::io::Error },
}

/// Whether the vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RunState {
    Running,
    Paused,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        })
    }
}

/// What `vm.snapshot` reports.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    pub state_bytes: u64,
    pub mem_mib: u64,
    pub pages_data: u64,
    pub pages_zero: u64,
    pub pause_ms: f64,
    pub total_ms: f64,
}

/// What `GET vm.info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    pub state: RunState,
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
    vm: Vm,
    ram: GuestRam,
    serial: Arc<Mutex<SerialDevice>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    event_loop: EventLoop,
    boot_protocol: &'static str,
    kernel_load: u64,
    guest_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    tsc_khz: u32,
    events_tx: Sender<VmEvent>,
    events_rx: Mutex<Receiver<VmEvent>>,
    started: Instant,
    /// A migration owns the VM's run state: the API may not pause, resume
    /// or snapshot it meanwhile.
    migrating: std::sync::atomic::AtomicBool,
    /// The VM was committed to another host: it never runs here again.
    retired: std::sync::atomic::AtomicBool,
}

/// How a VM comes to life.
pub enum Launch {
    /// Load the config's kernel and boot it.
    Boot,
    /// Take on saved state; guest RAM already holds the saved memory.
    /// `standby`: open disks without their locks (a migration destination,
    /// until `acquire_backends`). `vm`: a KVM VM already made for this RAM
    /// (see [`Vmm::prepare`]), so restoring costs less downtime.
    Restore { state: Box<SavedState>, ram: GuestRam, paused: bool, standby: bool, vm: Option<Vm> },
}

impl Vmm {
    /// Builds the VM and boots it.
    pub fn start(config: VmConfig) -> Result<Vmm, Error> {
        Vmm::build(config, Launch::Boot)
    }

    /// Rebuilds a saved VM on this host: `state.config` with `config`'s
    /// host-side choices (taps, serial, KVM device) applied by the caller.
    pub fn restore(config: VmConfig, state: SavedState, ram: GuestRam, paused: bool) -> Result<Vmm, Error> {
        Vmm::build(config, Launch::Restore { state: Box::new(state), ram, paused, standby: false, vm: None })
    }

    /// Makes the KVM VM and registers guest RAM with it ahead of a restore:
    /// a migration destination does this while memory is still arriving,
    /// outside the downtime window (memory slots cost milliseconds per GiB).
    pub fn prepare(config: &VmConfig, ram: &GuestRam) -> Result<Vm, Error> {
        let vm = Vm::new(&config.kvm_device)?;
        vm.register_memory(&ram.memory)?;
        Ok(vm)
    }

    /// Restores paused with disks in standby: a migration destination.
    pub fn restore_standby(config: VmConfig, state: SavedState, ram: GuestRam, vm: Option<Vm>) -> Result<Vmm, Error> {
        Vmm::build(config, Launch::Restore { state: Box::new(state), ram, paused: true, standby: true, vm })
    }

    fn build(config: VmConfig, launch: Launch) -> Result<Vmm, Error> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(Error::VcpuCount(config.vcpus));
        }
        // Backends first: a missing tap or disk is reported before any boot work.
        let standby = matches!(launch, Launch::Restore { standby: true, .. });
        let devices = open_virtio_backends(&config, standby)?;
        let (ram, restore, prepared) = match launch {
            Launch::Boot => {
                memory::check_size(config.mem_mib)?;
                (memory::create(config.mem_mib)?, None, None)
            }
            Launch::Restore { state, ram, paused, vm, .. } => {
                check_restorable(&config, &state, &ram, &devices)?;
                (ram, Some((state, paused)), vm)
            }
        };
        let vm = match prepared {
            Some(vm) => vm,
            None => Vmm::prepare(&config, &ram)?,
        };

        let mut cmdline = config.cmdline.clone();
        let mut virtio = Vec::new();
        let mut mmio_devices = Vec::new();
        for (i, device) in devices.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_START + i as u64 * MMIO_WINDOW;
            let irq = layout::VIRTIO_FIRST_IRQ + i as u32;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Irq)?;
            vm.fd.register_irqfd(&irqfd, irq).map_err(|e| Error::Irq(e.into()))?;
            let mut transport = MmioTransport::new(device, ram.memory.clone(), Arc::new(Interrupt::new(irqfd)));
            if let Some((state, _)) = &restore {
                transport.restore(&state.devices.virtio[i]).map_err(Error::BadState)?;
            }
            let transport = Arc::new(Mutex::new(transport));
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
            mmio_devices.push((base, transport.clone()));
            virtio.push(transport);
        }

        let (boot_protocol, kernel_load, boot_entry) = match &restore {
            None => {
                let acpi_virtio: Vec<(u64, u32)> =
                    mmio_devices.iter().zip(layout::VIRTIO_FIRST_IRQ..).map(|((base, _), irq)| (*base, irq)).collect();
                let rsdp = acpi::write(&ram.memory, &acpi::AcpiSpec { vcpus: config.vcpus, virtio: &acpi_virtio })?;
                let booted = boot::load(
                    &ram.memory,
                    &BootSpec {
                        kernel: &config.kernel,
                        initrd: config.initrd.as_deref(),
                        cmdline: cmdline.trim_start(),
                        protocol: config.boot,
                        mem_bytes: ram.size,
                        acpi_rsdp: Some(rsdp.0),
                    },
                )?;
                mptable::write(&ram.memory, config.vcpus)?;
                let name = match booted.entry {
                    BootEntry::Pvh { .. } => "pvh",
                    BootEntry::Linux64 { .. } => "linux64",
                };
                (name, booted.kernel_load, Some(booted.entry))
            }
            Some(_) => ("restored", 0, None),
        };

        let (events_tx, events_rx) = channel();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Irq)?;
        vm.fd.register_irqfd(&serial_irq, layout::COM1_IRQ).map_err(|e| Error::Irq(e.into()))?;
        let serial_out = config.serial.open().map_err(Error::SerialOutput)?;
        let serial = match &restore {
            None => SerialDevice::new(IrqLine(serial_irq), serial_out),
            Some((state, _)) => SerialDevice::from_state(&state.devices.serial, IrqLine(serial_irq), serial_out)
                .map_err(Error::BadState)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let mut bus = Buses::default();
        bus.pio.insert(ports::COM1, ports::COM1_LEN, serial.clone())?;
        bus.pio.insert(ports::I8042, ports::I8042_LEN, Arc::new(Mutex::new(I8042::new(events_tx.clone()))))?;
        bus.pio.insert(ports::DEBUG_EXIT, 1, Arc::new(Mutex::new(DebugExit(events_tx.clone()))))?;
        for (base, transport) in mmio_devices {
            bus.mmio.insert(base, MMIO_WINDOW, transport)?;
        }
        let bus = Arc::new(bus);

        if let Some((state, _)) = &restore {
            state.vm.restore(&vm.fd).map_err(|e| Error::BadState(e.to_string()))?;
        }
        let control = Vcpus::new_control();
        let mut vcpus = Vec::new();
        let mut guest_cpuid = Vec::new();
        let mut tsc_khz = 0;
        for id in 0..config.vcpus {
            let vcpu = Vcpu::new(&vm.fd, id, bus.clone(), control.clone(), events_tx.clone())?;
            let cpuid = match &restore {
                None => {
                    let set = vcpu.configure_boot(
                        config.vcpus,
                        &vm.supported_cpuid,
                        config.cpu_profile.as_ref(),
                        &ram.memory,
                        boot_entry.filter(|_| id == 0),
                    )?;
                    // What the guest really sees can differ from what we set
                    // (PVM adds host bits): read it back, then keep a
                    // profile's limits on what we report.
                    let mut seen = vcpu
                        .fd
                        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                        .map(|c| c.as_slice().to_vec())
                        .unwrap_or_else(|_| set.as_slice().to_vec());
                    if let Some(p) = &config.cpu_profile {
                        p.apply(&mut seen);
                    }
                    seen
                }
                Some((state, _)) => {
                    vcpu.restore(&state.vcpus[usize::from(id)])?;
                    state.vcpus[usize::from(id)].cpuid.clone()
                }
            };
            if id == 0 {
                guest_cpuid = cpuid;
                tsc_khz = vcpu.fd.get_tsc_khz().unwrap_or(0);
            }
            vcpus.push(vcpu);
        }
        let start_paused = restore.as_ref().is_some_and(|(_, paused)| *paused);
        let event_loop = EventLoop::start(virtio.clone()).map_err(Error::EventLoop)?;
        if start_paused {
            event_loop.pause();
        }
        let vcpus = Vcpus::start(control, vcpus, start_paused)?;
        tracing::info!(boot_protocol, "VM started with {} vCPU(s), {} MiB", config.vcpus, config.mem_mib);
        Ok(Vmm {
            config,
            vcpus: Mutex::new(vcpus),
            vm,
            ram,
            serial,
            virtio,
            event_loop,
            boot_protocol,
            kernel_load,
            guest_cpuid,
            tsc_khz,
            events_tx,
            events_rx: Mutex::new(events_rx),
            started: Instant::now(),
            migrating: std::sync::atomic::AtomicBool::new(false),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The VM's state, vCPUs to devices (not memory). The VM must be paused.
    pub fn save_state(&self) -> Result<SavedState, Error> {
        let vcpus = lock(&self.vcpus);
        if !vcpus.is_paused() {
            return Err(Error::NotPaused);
        }
        let msr_list = self
            .vm
            .kvm
            .get_msr_index_list()
            .map_err(|e| Error::BadState(format!("KVM cannot list MSRs: {e}")))?
            .as_slice()
            .to_vec();
        let saved = vcpus.on_each_parked(move |fd, id| VcpuState::save(fd, id, &msr_list))?;
        let vcpu_states = saved.into_iter().collect::<Result<Vec<_>, _>>().map_err(vcpu::Error::from)?;
        Ok(SavedState {
            config: self.config.clone(),
            mem_bytes: self.ram.size,
            vcpus: vcpu_states,
            vm: VmArchState::save(&self.vm.fd).map_err(|e| Error::BadState(e.to_string()))?,
            devices: DevicesState {
                serial: lock(&self.serial).save(),
                virtio: self.virtio.iter().map(|t| lock(t).save()).collect(),
            },
        })
    }

    /// Turns on dirty tracking (KVM log + VMM bitmap) for a live migration.
    pub fn start_dirty_log(&self) -> Result<DirtyLogMode, Error> {
        dirty::reset_vmm_bitmap(&self.ram.memory);
        dirty::set_logging(&self.vm.fd, &self.ram.memory, true).map_err(Error::Dirty)?;
        Ok(self.vm.dirty_log_mode)
    }

    /// Pages dirtied since the last call (or since logging started).
    pub fn take_dirty(&self) -> Result<DirtyBitmap, Error> {
        dirty::take_dirty(&self.vm.fd, &self.ram.memory, self.vm.dirty_log_mode).map_err(Error::Dirty)
    }

    pub fn stop_dirty_log(&self) -> Result<(), Error> {
        dirty::set_logging(&self.vm.fd, &self.ram.memory, false).map_err(Error::Dirty)
    }

    /// vCPU 0's CPUID as the guest sees it (for migration preflight).
    pub fn guest_cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        &self.guest_cpuid
    }

    /// The guest's TSC frequency in kHz (0 if KVM could not say).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Auto-converge: parks the vCPUs while devices keep running. Refused
    /// if the VM is paused (a pause wins over a throttle).
    pub fn hold_vcpus(&self) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        if vcpus.is_paused() {
            return Err(Error::State(RunState::Paused));
        }
        vcpus.hold();
        Ok(())
    }

    pub fn release_vcpus(&self) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        if !vcpus.is_paused() {
            return Err(Error::State(RunState::Running));
        }
        vcpus.resume();
        Ok(())
    }

    /// Guest RAM, for saving and sending memory.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Writes a snapshot (state + sparse memory image) into `dir`. Pauses
    /// the VM if it runs, and leaves it paused.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotReport, Error> {
        let t = Instant::now();
        if self.state() == RunState::Running {
            self.pause()?;
        }
        let paused_ms = t.elapsed().as_secs_f64() * 1000.0;
        let state = self.save_state()?;
        let bytes = state.encode().map_err(|e| Error::BadState(e.to_string()))?;
        let io = |e: std::io::Error| Error::Snapshot { dir: dir.to_owned(), source: e };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mem_tmp = dir.join(".memory.bin.tmp");
        let state_tmp = dir.join(".state.bin.tmp");
        let mem_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&mem_tmp)
            .map_err(io)?;
        let stats = self.ram.save_to(&mem_file).map_err(io)?;
        mem_file.sync_all().map_err(io)?;
        std::fs::write(&state_tmp, &bytes).map_err(io)?;
        std::fs::File::open(&state_tmp).and_then(|f| f.sync_all()).map_err(io)?;
        // Memory first, state last: a state file always has its memory.
        std::fs::rename(&mem_tmp, dir.join(snapshot::MEMORY_FILE)).map_err(io)?;
        std::fs::rename(&state_tmp, dir.join(snapshot::STATE_FILE)).map_err(io)?;
        Ok(SnapshotReport {
            dir: dir.to_owned(),
            state_bytes: bytes.len() as u64,
            mem_mib: self.ram.size >> 20,
            pages_data: stats.pages_data,
            pages_zero: stats.pages_zero,
            pause_ms: paused_ms,
            total_ms: t.elapsed().as_secs_f64() * 1000.0,
        })
    }

    pub fn state(&self) -> RunState {
        if lock(&self.vcpus).is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Claims the VM for a migration; refused if one already runs or the
    /// VM was committed elsewhere.
    pub fn begin_migration(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        if self.retired.load(Ordering::SeqCst) {
            return Err(Error::Retired);
        }
        if self.migrating.swap(true, Ordering::SeqCst) {
            return Err(Error::Migrating);
        }
        Ok(())
    }

    pub fn end_migration(&self) {
        self.migrating.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The VM now belongs to another host (commit sent): it must never run
    /// here again, whatever the API asks.
    pub fn retire(&self) {
        self.retired.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// What the API may do now, or why not.
    pub fn check_api_control(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        if self.retired.load(Ordering::SeqCst) {
            return Err(Error::Retired);
        }
        if self.migrating.load(Ordering::SeqCst) {
            return Err(Error::Migrating);
        }
        Ok(())
    }

    /// Returns once no vCPU is in the guest and no device touches guest
    /// memory.
    pub fn pause(&self) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        if vcpus.is_paused() {
            return Err(Error::State(RunState::Paused));
        }
        vcpus.pause();
        self.event_loop.pause();
        Ok(())
    }

    pub fn resume(&self) -> Result<(), Error> {
        if self.retired.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Retired);
        }
        let vcpus = lock(&self.vcpus);
        if !vcpus.is_paused() {
            return Err(Error::State(RunState::Running));
        }
        self.event_loop.resume();
        vcpus.resume();
        Ok(())
    }

    /// Hands every backend over at a migration's commit: disks flushed and
    /// unlocked. The VM must be paused and never run here again.
    pub fn release_backends(&self, to_host: &str) -> Result<(), Error> {
        if !lock(&self.vcpus).is_paused() {
            return Err(Error::NotPaused);
        }
        // Everything durable first: a failing flush hands nothing over.
        self.flush_backends()?;
        for t in &self.virtio {
            lock(t).device_mut().release_backend(to_host).map_err(Error::Handoff)?;
        }
        Ok(())
    }

    /// Flushes every disk while the VM runs, so the flush inside a
    /// switchover only covers the last moments.
    pub fn flush_backends(&self) -> Result<(), Error> {
        for t in &self.virtio {
            lock(t).device_mut().flush_backend().map_err(Error::Handoff)?;
        }
        Ok(())
    }

    /// Takes backends opened in standby (a migration destination, after
    /// the source's commit).
    pub fn acquire_backends(&self) -> Result<(), Error> {
        for t in &self.virtio {
            lock(t).device_mut().acquire_backend().map_err(Error::Handoff)?;
        }
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
            boot_protocol: self.boot_protocol,
            kernel_load: self.kernel_load,
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

    /// Stops every vCPU, flushes the console, and gives backends up (shared
    /// disks' leases released, so another host can start the VM at once).
    pub fn stop(&self) {
        lock(&self.vcpus).stop();
        self.event_loop.pause();
        for t in &self.virtio {
            lock(t).device_mut().close_backend();
        }
        lock(&self.serial).flush();
    }
}

/// Opens every tap and disk image the config names, in device order.
fn open_virtio_backends(config: &VmConfig, standby: bool) -> Result<Vec<Box<dyn VirtioDevice>>, Error> {
    let asked = config.net.len() + config.disks.len();
    if asked > layout::VIRTIO_MAX_DEVICES {
        return Err(Error::TooManyDevices { max: layout::VIRTIO_MAX_DEVICES, asked });
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for n in &config.net {
        devices.push(Box::new(Net::new(Tap::open(&n.tap)?, n.mac)));
    }
    for d in &config.disks {
        let host = crate::devices::virtio::blk::HostSide {
            host_id: config.host_id.clone(),
            lease_ttl: std::time::Duration::from_millis(config.lease_ttl_ms.max(100)),
            takeover: config.takeover,
        };
        devices.push(Box::new(Block::from_config(d, &host, standby)?));
    }
    Ok(devices)
}

/// Checks that saved state fits this config, its memory and its backends.
fn check_restorable(
    config: &VmConfig,
    state: &SavedState,
    ram: &GuestRam,
    devices: &[Box<dyn VirtioDevice>],
) -> Result<(), Error> {
    let bad = |m: String| Err(Error::BadState(m));
    if state.mem_bytes != ram.size || config.mem_mib << 20 != ram.size {
        return bad(format!("saved memory is {} bytes, this VM has {}", state.mem_bytes, ram.size));
    }
    if state.vcpus.len() != usize::from(config.vcpus) {
        return bad(format!("state has {} vCPUs, the config {}", state.vcpus.len(), config.vcpus));
    }
    if state.devices.virtio.len() != devices.len() {
        return bad(format!(
            "state has {} virtio devices, this host opened {}",
            state.devices.virtio.len(),
            devices.len()
        ));
    }
    for (saved, here) in state.devices.virtio.iter().zip(devices) {
        match (&saved.backend, here.backend()) {
            (BackendSnapshot::Net { mac, .. }, BackendSnapshot::Net { mac: m, .. }) if *mac == m => {}
            (BackendSnapshot::Block { sectors, .. }, BackendSnapshot::Block { sectors: s, path, .. })
                if *sectors == s =>
            {
                tracing::debug!("disk {} matches the saved size", path.display());
            }
            (a, b) => return bad(format!("saved device {a:?} does not match {b:?} on this host")),
        }
    }
    Ok(())
}
