//! A running VM and what can be done to it. Every operation goes through
//! the lifecycle table ([`crate::lifecycle`]) under one lock, so the API, a
//! migration, a throttle and a stop can never disagree about whether the
//! VM runs. Built by [`crate::builder`]; moved through the traits in
//! [`crate::migration`].

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::api::VmInfo;
use crate::arch::x86_64::mptable;
use crate::boot;
use crate::config::{VmConfig, MAX_VCPUS};
use crate::devices::bus::lock;
use crate::devices::event_loop::EventLoop;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::{backend, disk, tap};
use crate::lifecycle::{Action, Lifecycle, Refused, RunState};
use crate::memory::{self, GuestRam};
use crate::state::devices::DevicesState;
use crate::state::vcpu::VcpuState;
use crate::state::vm::VmArchState;
use crate::state::VmState;
use crate::vstate::dirty::{self, DirtyBitmap, DirtyLogMode};
use crate::vstate::vcpu::{self, Vcpus};
use crate::vstate::vm::{self, Vm};
use crate::vstate::{ExitReason, VmEvent};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    VcpuCount(u8),
    #[error("the VM has {nics} NIC(s) and this host gave {taps} tap(s) for them (--net tap=NAME, one per NIC)")]
    Taps { nics: usize, taps: usize },
    #[error(transparent)]
    Kvm(#[from] vm::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Acpi(#[from] crate::arch::x86_64::acpi::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("cannot open serial output: {0}")]
    SerialOutput(std::io::Error),
    #[error("cannot set up the device interrupt line: {0}")]
    Irq(std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::Overlap),
    #[error(transparent)]
    Lifecycle(#[from] Refused),
    #[error("--net: {0}")]
    Tap(#[from] tap::Error),
    #[error("--disk: {0}")]
    Disk(#[from] disk::Error),
    #[error("at most {max} virtio devices fit this machine model, {asked} asked")]
    TooManyDevices { max: usize, asked: usize },
    #[error("cannot start the device event loop: {0}")]
    EventLoop(std::io::Error),
    #[error("cannot start the VM's threads: {0}")]
    Threads(std::io::Error),
    #[error("backend: {0}")]
    Backend(#[from] backend::BackendError),
    #[error("dirty tracking: {0}")]
    Dirty(dirty::Error),
    #[error("cannot restore: {0}")]
    BadState(String),
    #[error("the VM is held paused: {0}")]
    Held(String),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
}

pub struct Vmm {
    pub(crate) config: VmConfig,
    /// The one owner of whether the VM may run; held while an action's
    /// effect happens, so actions never interleave.
    pub(crate) lifecycle: Mutex<Lifecycle>,
    // Field order is drop order: vCPUs, then the VM fd, then its memory.
    pub(crate) vcpus: Mutex<Vcpus>,
    pub(crate) vm: Vm,
    pub(crate) ram: GuestRam,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) virtio: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) event_loop: EventLoop,
    pub(crate) boot_protocol: &'static str,
    pub(crate) kernel_load: u64,
    pub(crate) guest_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub(crate) tsc_khz: u32,
    pub(crate) events_tx: Sender<VmEvent>,
    pub(crate) events_rx: Mutex<Receiver<VmEvent>>,
    pub(crate) started: Instant,
    /// The run state the saved image had (a booted VM: running).
    pub(crate) restored_run_state: RunState,
    /// Why the VM is held paused for an operator (a migration committed
    /// here whose disks could not be taken); `resume` takes them first.
    pub(crate) held: Mutex<Option<String>>,
}

impl Vmm {
    /// Builds the VM and boots it.
    pub fn boot(config: VmConfig) -> Result<Vmm, Error> {
        crate::builder::build_for_boot(config)
    }

    /// Performs `action` if the lifecycle allows it: the effect runs under
    /// the lifecycle lock, and the new state is kept only if it succeeds.
    /// The effect gets the state it starts from.
    pub(crate) fn act<T>(
        &self,
        action: Action,
        effect: impl FnOnce(&Vmm, Lifecycle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut lifecycle = lock(&self.lifecycle);
        let next = lifecycle.next(action)?;
        let out = effect(self, *lifecycle)?;
        *lifecycle = next;
        Ok(out)
    }

    pub fn lifecycle(&self) -> Lifecycle {
        *lock(&self.lifecycle)
    }

    /// Parks the vCPUs and stops the devices touching guest memory.
    pub(crate) fn park(&self) {
        lock(&self.vcpus).pause();
        self.event_loop.pause();
    }

    pub(crate) fn unpark(&self) {
        self.event_loop.resume();
        lock(&self.vcpus).resume();
    }

    /// Returns once no vCPU is in the guest and no device touches guest
    /// memory.
    pub fn pause(&self) -> Result<(), Error> {
        self.act(Action::Pause, |v, _| {
            v.park();
            Ok(())
        })
    }

    /// Runs the VM again. A VM held for its disks ([`Vmm::hold`]) takes
    /// them first, and stays paused (with why) if it still cannot.
    pub fn resume(&self) -> Result<(), Error> {
        self.act(Action::Resume, |v, _| {
            let mut held = lock(&v.held);
            if held.is_some() {
                v.acquire_backends().map_err(|e| Error::Held(format!("its disks still cannot be taken: {e}")))?;
                tracing::info!("the disks are taken; the VM held for them may run");
                *held = None;
            }
            v.unpark();
            Ok(())
        })
    }

    /// The VM's state, vCPUs to devices (not memory), carrying `run_state`.
    /// The caller has parked the vCPUs; all must still be there (a
    /// stopping VM has none left to save).
    pub(crate) fn save_state(&self, run_state: RunState) -> Result<VmState, Error> {
        let msr_list = self
            .vm
            .kvm
            .get_msr_index_list()
            .map_err(|e| Error::BadState(format!("KVM cannot list MSRs: {e}")))?
            .as_slice()
            .to_vec();
        let saved = lock(&self.vcpus).on_each_parked(move |fd, id| VcpuState::save(fd, id, &msr_list))?;
        let vcpus = saved.into_iter().collect::<Result<Vec<_>, _>>().map_err(vcpu::Error::from)?;
        if vcpus.len() != usize::from(self.config.machine.vcpus) {
            return Err(Error::BadState(format!(
                "only {} of {} vCPUs could be saved (the VM is stopping)",
                vcpus.len(),
                self.config.machine.vcpus
            )));
        }
        Ok(VmState {
            machine: self.config.machine.clone(),
            run_state,
            mem_bytes: self.ram.size,
            vcpus,
            vm: VmArchState::save(&self.vm.fd).map_err(|e| Error::BadState(e.to_string()))?,
            devices: self.save_devices(),
        })
    }

    fn save_devices(&self) -> DevicesState {
        let serial = lock(&self.serial).save();
        let virtio: Vec<_> = self.virtio.iter().map(|t| lock(t).save()).collect();
        let pending_irqs = DevicesState::unacknowledged_irqs(&serial, &virtio);
        DevicesState { serial, virtio, pending_irqs }
    }

    pub(crate) fn start_dirty_log(&self) -> Result<DirtyLogMode, Error> {
        dirty::reset_vmm_bitmap(&self.ram.memory);
        if let Some(rings) = &self.vm.dirty_rings {
            rings.clear(std::os::fd::AsRawFd::as_raw_fd(&*self.vm.fd)).map_err(Error::Dirty)?;
        }
        dirty::set_logging(&self.vm.fd, &self.ram.memory, true).map_err(Error::Dirty)?;
        Ok(self.vm.dirty_log_mode)
    }

    pub(crate) fn take_dirty(&self) -> Result<DirtyBitmap, Error> {
        dirty::take_dirty(&self.vm.fd, &self.ram.memory, self.vm.dirty_log_mode, self.vm.dirty_rings.as_deref())
            .map_err(Error::Dirty)
    }

    pub(crate) fn stop_dirty_log(&self) -> Result<(), Error> {
        dirty::set_logging(&self.vm.fd, &self.ram.memory, false).map_err(Error::Dirty)
    }

    /// Takes every disk (after a migration's commit, or a hold).
    pub(crate) fn acquire_backends(&self) -> Result<(), Error> {
        for t in &self.virtio {
            if let Some(b) = lock(t).device_mut().backend_mut() {
                b.acquire()?;
            }
        }
        Ok(())
    }

    /// Holds the VM paused for an operator ([`VmInfo::held`]); `resume`
    /// takes the disks first.
    pub fn hold(&self, why: String) {
        tracing::error!("the VM is held paused: {why}");
        *lock(&self.held) = Some(why);
    }

    /// Flushes every disk.
    pub(crate) fn flush_backends(&self) -> Result<(), Error> {
        for t in &self.virtio {
            if let Some(b) = lock(t).device_mut().backend_mut() {
                b.flush()?;
            }
        }
        Ok(())
    }

    /// Announces the guest's MAC on every tap (RARP), so bridges and
    /// switches learn its port; returns how many NICs announced.
    pub(crate) fn announce_backends(&self) -> Result<usize, Error> {
        let mut n = 0;
        for t in &self.virtio {
            if let Some(b) = lock(t).device_mut().backend_mut() {
                n += usize::from(b.announce()?);
            }
        }
        Ok(n)
    }

    /// `vm.announce`: refused during a migration and after it (a retired
    /// source must never pull the guest's traffic back).
    pub fn announce(&self) -> Result<usize, Error> {
        self.act(Action::Announce, |v, _| v.announce_backends())
    }

    /// Writes a snapshot (state + sparse memory image) into `dir`. Pauses
    /// the VM if it runs, and leaves it paused.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<crate::api::SnapshotReport, Error> {
        self.act(Action::Snapshot, |v, before| crate::snapshot::save(v, before, dir))
    }

    pub fn info(&self) -> VmInfo {
        let lifecycle = self.lifecycle();
        VmInfo {
            state: lifecycle.name(),
            lifecycle,
            run_state: lifecycle.run_state(),
            config: self.config.clone(),
            boot_protocol: self.boot_protocol,
            kernel_load: self.kernel_load,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pid: std::process::id(),
            pvm_host: vm::is_pvm_host(),
            tsc_khz: self.tsc_khz,
            devices: self.virtio.iter().map(|t| lock(t).describe()).collect(),
            held: lock(&self.held).clone(),
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
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

    /// `vm.shutdown`: refused while a migration owns the VM; otherwise the
    /// vCPUs stop now. The caller then tells the main loop (an
    /// `ExitReason::Api` event), which finishes the stop.
    pub fn request_shutdown(&self) -> Result<(), Error> {
        self.act(Action::Shutdown, |v, _| {
            lock(&v.vcpus).stop();
            Ok(())
        })
    }

    /// Stops every vCPU, flushes the console, and gives backends up (shared
    /// disks' leases released, so another host can start the VM at once).
    /// Always allowed: the process is going away.
    pub fn stop(&self) {
        let _ = self.act(Action::Stop, |v, _| {
            lock(&v.vcpus).stop();
            v.event_loop.pause();
            for t in &v.virtio {
                if let Some(b) = lock(t).device_mut().backend_mut() {
                    b.close();
                }
            }
            lock(&v.serial).flush();
            Ok(())
        });
    }
}
