//! Building a VM (the shape of Firecracker's builder.rs): one shared core
//! that makes the KVM VM's devices, buses and vCPU threads, and two ways in.
//!
//! - [`build_for_boot`]: fresh memory, the kernel loaded, boot registers.
//! - [`build_from_state`]: memory already filled (a snapshot or a
//!   migration), device and vCPU state restored. A restored VM always comes
//!   up paused; the caller resumes it when the saved run state (or the
//!   migration's commit) says so.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{self, ports};
use crate::arch::x86_64::regs::BootEntry;
use crate::arch::x86_64::{acpi, mptable};
use crate::boot::{self, BootSpec};
use crate::config::{HostConfig, MachineConfig, VirtioNotify, VmConfig, MAX_VCPUS};
use crate::devices::bus::Buses;
use crate::devices::debug_exit::DebugExit;
use crate::devices::disk::{Disk, HostSide};
use crate::devices::event_loop::EventLoop;
use crate::devices::i8042::I8042;
use crate::devices::serial::{IrqLine, SerialDevice};
use crate::devices::tap::Tap;
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::{MmioTransport, QueueEvents, MMIO_WINDOW};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::lifecycle::{Lifecycle, RunState};
use crate::memory::{self, GuestRam};
use crate::state::devices::{BackendSnapshot, DevicesState};
use crate::state::VmState;
use crate::vmm::{Error, Vmm};
use crate::vstate::vcpu::{Vcpu, VcpuControl, Vcpus};
use crate::vstate::vm::Vm;
use crate::vstate::VmEvent;

/// Makes the KVM VM and registers guest RAM with it. A migration
/// destination does this while memory is still arriving, outside the
/// downtime window (memory slots cost milliseconds per GiB).
pub fn prepare(host: &HostConfig, ram: &GuestRam) -> Result<Vm, Error> {
    let vm = Vm::new(&host.kvm_device, host.dirty_tracking)?;
    vm.register_memory(&ram.memory)?;
    Ok(vm)
}

/// Builds the VM and boots its kernel.
pub fn build_for_boot(config: VmConfig) -> Result<Vmm, Error> {
    check_shape(&config)?;
    // Backends first: a missing tap or disk is reported before any boot work.
    let devices = open_backends(&config, false)?;
    memory::check_size(config.machine.mem_mib)?;
    let ram = memory::create(config.machine.mem_mib)?;
    let vm = prepare(&config.host, &ram)?;
    let core = Core::new(&config, &vm, &ram, devices, None)?;

    let m = &config.machine;
    let cmdline = format!("{}{}", m.cmdline, core.mmio_cmdline);
    // ACPI before the boot structures, which carry the RSDP's address.
    let rsdp = acpi::write(&ram.memory, &acpi::AcpiSpec { vcpus: m.vcpus, virtio: &core.mmio_windows })?;
    let booted = boot::load(
        &ram.memory,
        &BootSpec {
            kernel: &m.kernel,
            initrd: m.initrd.as_deref(),
            cmdline: cmdline.trim_start(),
            protocol: m.boot,
            mem_bytes: ram.size,
            acpi_rsdp: Some(rsdp.0),
        },
    )?;
    mptable::write(&ram.memory, m.vcpus)?;
    let boot_protocol = match booted.entry {
        BootEntry::Pvh { .. } => "pvh",
        BootEntry::Linux64 { .. } => "linux64",
    };

    let mut vcpus = Vec::new();
    let mut guest_cpuid = Vec::new();
    for id in 0..m.vcpus {
        let vcpu = core.vcpu(&vm, id)?;
        let set = vcpu.configure_boot(
            m.vcpus,
            &vm.supported_cpuid,
            m.cpu_profile.as_ref(),
            &ram.memory,
            Some(booted.entry).filter(|_| id == 0),
        )?;
        if id == 0 {
            // What the guest really sees can differ from what we set (PVM
            // adds host bits): read it back, then keep a profile's limits
            // on what we report.
            guest_cpuid = vcpu
                .fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map(|c| c.as_slice().to_vec())
                .unwrap_or_else(|_| set.as_slice().to_vec());
            if let Some(p) = &m.cpu_profile {
                p.apply(&mut guest_cpuid);
            }
        }
        vcpus.push(vcpu);
    }
    core.start(
        config,
        vm,
        ram,
        vcpus,
        guest_cpuid,
        Started {
            run_state: RunState::Running,
            boot_protocol,
            kernel_load: booted.kernel_load,
            lifecycle: Lifecycle::Running,
            threads: None,
        },
    )
}

/// How a saved VM is taken on.
pub struct FromState {
    /// Open disks without their locks or leases (a migration destination,
    /// until `acquire_backends` after the source's commit).
    pub standby: bool,
    /// A KVM VM already made for this RAM ([`prepare`]).
    pub vm: Option<Vm>,
    /// The VM's threads, started ahead ([`Threads::start`]).
    pub threads: Option<Threads>,
}

/// A VM's device-loop and vCPU threads, started and confined before the
/// VM exists, each waiting for its work.
pub struct Threads {
    devices: crate::seccomp::Waiting,
    vcpus: Vec<crate::seccomp::Waiting>,
}

impl Threads {
    pub fn start(vcpus: u8) -> Result<Threads, Error> {
        use crate::seccomp::{ThreadKind, Waiting};
        let devices = Waiting::spawn("devices".into(), ThreadKind::Devices).map_err(Error::Threads)?;
        let vcpus = (0..vcpus)
            .map(|id| Waiting::spawn(format!("vcpu{id}"), ThreadKind::Vcpu))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::Threads)?;
        Ok(Threads { devices, vcpus })
    }
}

/// Rebuilds a saved VM on this host from its state, its memory (already
/// filled) and this host's config. The VM comes up paused.
pub fn build_from_state(host: HostConfig, state: VmState, ram: GuestRam, how: FromState) -> Result<Vmm, Error> {
    // A restore sits inside a migration's downtime: each step's time is
    // logged (FERRY_LOG=vmm=debug) so a slow one can be named.
    let mut steps = Steps::new();
    let config = VmConfig { machine: state.machine.clone(), host };
    check_shape(&config)?;
    let devices = open_backends(&config, how.standby)?;
    steps.done("open_backends");
    let here: Vec<BackendSnapshot> = devices.iter().map(|d| d.identity()).collect();
    check_restorable(&config.machine, &state, ram.size, &here)?;
    let vm = match how.vm {
        Some(vm) => vm,
        None => prepare(&config.host, &ram)?,
    };
    steps.done("check_and_vm");
    let core = Core::new(&config, &vm, &ram, devices, Some(&state.devices))?;
    steps.done("devices");
    state.vm.restore(&vm.fd).map_err(|e| Error::BadState(e.to_string()))?;
    steps.done("vm_state");
    let mut vcpus = Vec::new();
    for (id, saved) in (0..config.machine.vcpus).zip(&state.vcpus) {
        let vcpu = core.vcpu(&vm, id)?;
        steps.done("vcpu_create");
        vcpu.restore(saved)?;
        steps.done("vcpu_state");
        vcpus.push(vcpu);
    }
    // After the LAPICs: an edge delivered before would be overwritten.
    raise_pending(&vm, &state.devices.pending_irqs)?;
    let guest_cpuid = state.vcpus[0].cpuid.clone();
    let run_state = state.run_state;
    let vmm = core.start(
        config,
        vm,
        ram,
        vcpus,
        guest_cpuid,
        Started {
            run_state,
            boot_protocol: "restored",
            kernel_load: 0,
            lifecycle: Lifecycle::Paused,
            threads: how.threads,
        },
    );
    steps.done("threads");
    tracing::debug!("restore steps (ms): {}", steps.report());
    vmm
}

/// Named steps and the time each took, for the restore's debug log.
struct Steps {
    last: std::time::Instant,
    taken: Vec<(&'static str, f64)>,
}

impl Steps {
    fn new() -> Steps {
        Steps { last: std::time::Instant::now(), taken: Vec::new() }
    }
    fn done(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.taken.push((step, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }
    fn report(&self) -> String {
        self.taken.iter().map(|(s, ms)| format!("{s} {ms:.2}")).collect::<Vec<_>>().join(", ")
    }
}

/// Raises (an edge: up, then down) each interrupt line that was pending at
/// the save, over the restored irqchip and LAPICs, before any vCPU runs.
/// The lines were checked by [`check_restorable`].
fn raise_pending(vm: &Vm, lines: &[u32]) -> Result<(), Error> {
    for &gsi in lines {
        for level in [true, false] {
            vm.fd.set_irq_line(gsi, level).map_err(|e| Error::Irq(e.into()))?;
        }
    }
    if !lines.is_empty() {
        tracing::debug!("raised the interrupt lines pending at the save: {lines:?}");
    }
    Ok(())
}

fn check_shape(config: &VmConfig) -> Result<(), Error> {
    let m = &config.machine;
    if m.vcpus == 0 || m.vcpus > MAX_VCPUS {
        return Err(Error::VcpuCount(m.vcpus));
    }
    if config.host.taps.len() != m.nics.len() {
        return Err(Error::Taps { nics: m.nics.len(), taps: config.host.taps.len() });
    }
    Ok(())
}

/// Opens every tap and disk image the config names, in device order (NICs
/// first, then disks).
fn open_backends(config: &VmConfig, standby: bool) -> Result<Vec<Box<dyn VirtioDevice>>, Error> {
    let (m, h) = (&config.machine, &config.host);
    let asked = m.nics.len() + m.disks.len();
    if asked > layout::VIRTIO_MAX_DEVICES {
        return Err(Error::TooManyDevices { max: layout::VIRTIO_MAX_DEVICES, asked });
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (nic, tap) in m.nics.iter().zip(&h.taps) {
        devices.push(Box::new(Net::new(Tap::open(tap)?, nic.mac)));
    }
    let side = HostSide {
        host_id: h.host_id.clone(),
        lease_ttl: std::time::Duration::from_millis(h.lease_ttl_ms.max(crate::config::MIN_LEASE_TTL_MS)),
        takeover: h.takeover,
        shared_cache: h.shared_disk_cache,
    };
    for d in &m.disks {
        devices.push(Box::new(Block::new(Disk::from_config(d, &side, standby)?)));
    }
    Ok(devices)
}

/// Checks, before anything is built, that saved state fits this machine,
/// `ram_size` bytes of memory and the backends this host opened (`here`,
/// in device order): what a tampered or foreign state must not get past.
pub fn check_restorable(
    machine: &MachineConfig,
    state: &VmState,
    ram_size: u64,
    here: &[BackendSnapshot],
) -> Result<(), Error> {
    let bad = |m: String| Err(Error::BadState(m));
    if state.mem_bytes != ram_size || machine.mem_bytes() != ram_size {
        return bad(format!("saved memory is {} bytes, this VM has {ram_size}", state.mem_bytes));
    }
    if state.vcpus.len() != usize::from(machine.vcpus) || state.vcpus.is_empty() {
        return bad(format!("state has {} vCPUs, the machine {}", state.vcpus.len(), machine.vcpus));
    }
    if state.devices.virtio.len() != here.len() {
        return bad(format!(
            "state has {} virtio devices, this host opened {}",
            state.devices.virtio.len(),
            here.len()
        ));
    }
    for (saved, here) in state.devices.virtio.iter().zip(here) {
        let offered = crate::devices::virtio::QUEUE_SIZE;
        if let Some(q) = saved.queues.iter().find(|q| q.max_size != offered) {
            return bad(format!(
                "saved virtio queue of {} entries at most; this host's devices offer {offered}",
                q.max_size
            ));
        }
        match (&saved.backend, here) {
            (BackendSnapshot::Net { mac, .. }, BackendSnapshot::Net { mac: m, .. }) if mac == m => {}
            (BackendSnapshot::Block { sectors, .. }, BackendSnapshot::Block { sectors: s, path, .. })
                if sectors == s =>
            {
                tracing::debug!("disk {} matches the saved size", path.display());
            }
            (a, b) => return bad(format!("saved device {a:?} does not match {b:?} on this host")),
        }
    }
    if let Some(gsi) = state.devices.pending_irqs.iter().find(|&&g| g >= layout::IOAPIC_PINS) {
        return bad(format!("saved pending interrupt line {gsi} does not exist"));
    }
    Ok(())
}

/// What either way in leaves for `Vmm` to hold.
struct Started {
    run_state: RunState,
    boot_protocol: &'static str,
    kernel_load: u64,
    lifecycle: Lifecycle,
    /// Threads started ahead (a migration destination); None: new ones.
    threads: Option<Threads>,
}

/// The parts every VM has, whichever way it was built.
struct Core {
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
    bus: Arc<Buses>,
    control: Arc<VcpuControl>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    /// `virtio_mmio.device=` for each transport, for the kernel command line.
    mmio_cmdline: String,
    /// Each transport's MMIO base and IRQ, for the ACPI tables.
    mmio_windows: Vec<(u64, u32)>,
}

impl Core {
    /// Transports (restored from `saved` if given), serial console and buses.
    fn new(
        config: &VmConfig,
        vm: &Vm,
        ram: &GuestRam,
        devices: Vec<Box<dyn VirtioDevice>>,
        saved: Option<&DevicesState>,
    ) -> Result<Core, Error> {
        let mut virtio = Vec::new();
        let mut bus = Buses::default();
        let mut mmio_cmdline = String::new();
        let mut mmio_windows = Vec::new();
        for (i, device) in devices.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_START + i as u64 * MMIO_WINDOW;
            let irq = layout::VIRTIO_FIRST_IRQ + i as u32;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Irq)?;
            vm.fd.register_irqfd(&irqfd, irq).map_err(|e| Error::Irq(e.into()))?;
            let queues = device.queue_count();
            let mut transport = MmioTransport::new(device, ram.memory.clone(), Arc::new(Interrupt::new(irqfd)));
            if config.host.virtio_notify == VirtioNotify::Ioeventfd {
                let events = QueueEvents::new(Arc::downgrade(&vm.fd), base, queues).map_err(Error::EventLoop)?;
                transport = transport.with_queue_events(events);
            }
            // A restore registers the ioeventfds of the queues that were ready.
            if let Some(saved) = saved {
                transport.restore(&saved.virtio[i]).map_err(Error::BadState)?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio_cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
            mmio_windows.push((base, irq));
            bus.mmio.insert(base, MMIO_WINDOW, transport.clone())?;
            virtio.push(transport);
        }

        let (events_tx, events_rx) = channel();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Irq)?;
        vm.fd.register_irqfd(&serial_irq, layout::COM1_IRQ).map_err(|e| Error::Irq(e.into()))?;
        let serial_out = config.host.serial.open().map_err(Error::SerialOutput)?;
        let serial = match saved {
            None => SerialDevice::new(IrqLine(serial_irq), serial_out),
            Some(s) => SerialDevice::from_state(&s.serial, IrqLine(serial_irq), serial_out).map_err(Error::BadState)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        bus.pio.insert(ports::COM1, ports::COM1_LEN, serial.clone())?;
        bus.pio.insert(ports::I8042, ports::I8042_LEN, Arc::new(Mutex::new(I8042::new(events_tx.clone()))))?;
        bus.pio.insert(ports::DEBUG_EXIT, 1, Arc::new(Mutex::new(DebugExit(events_tx.clone()))))?;
        Ok(Core {
            virtio,
            serial,
            bus: Arc::new(bus),
            control: Vcpus::new_control(),
            events_tx,
            events_rx,
            mmio_cmdline,
            mmio_windows,
        })
    }

    fn vcpu(&self, vm: &Vm, id: u8) -> Result<Vcpu, Error> {
        Ok(Vcpu::new(
            &vm.fd,
            id,
            self.bus.clone(),
            self.control.clone(),
            self.events_tx.clone(),
            vm.dirty_rings.clone(),
        )?)
    }

    /// Starts the device loop and the vCPU threads (parked unless the VM
    /// starts running) and hands everything to a `Vmm`.
    fn start(
        self,
        config: VmConfig,
        vm: Vm,
        ram: GuestRam,
        vcpus: Vec<Vcpu>,
        guest_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
        mut started: Started,
    ) -> Result<Vmm, Error> {
        let tsc_khz = vcpus.first().and_then(|v| v.fd.get_tsc_khz().ok()).unwrap_or(0);
        let paused = started.lifecycle.vcpus_parked();
        // Started paused, a restored VM's devices touch nothing (no queue,
        // no disk it may not own yet) until its first resume; wait for the
        // loop to say it parked, so its first pass is done before anything
        // else happens to the VM (one make test run lost a disk write's
        // completion after a move while this wait was gone; cheap now that
        // the thread is started ahead).
        let (devices_thread, vcpu_threads) = match started.threads.take() {
            // Started ahead for this many vCPUs; otherwise start new ones.
            Some(t) if t.vcpus.len() == vcpus.len() => (Some(t.devices), t.vcpus),
            _ => (None, Vec::new()),
        };
        let event_loop = EventLoop::start_on(devices_thread, self.virtio.clone(), paused).map_err(Error::EventLoop)?;
        if paused {
            event_loop.pause();
        }
        let vcpus = Vcpus::start_on(vcpu_threads, self.control, vcpus, paused)?;
        tracing::info!(
            boot_protocol = started.boot_protocol,
            "VM started with {} vCPU(s), {} MiB",
            config.machine.vcpus,
            config.machine.mem_mib
        );
        Ok(Vmm {
            config,
            lifecycle: Mutex::new(started.lifecycle),
            vcpus: Mutex::new(vcpus),
            vm,
            ram,
            serial: self.serial,
            virtio: self.virtio,
            event_loop,
            boot_protocol: started.boot_protocol,
            kernel_load: started.kernel_load,
            guest_cpuid,
            tsc_khz,
            events_tx: self.events_tx,
            events_rx: Mutex::new(self.events_rx),
            started: Instant::now(),
            restored_run_state: started.run_state,
            held: Mutex::new(None),
        })
    }
}
