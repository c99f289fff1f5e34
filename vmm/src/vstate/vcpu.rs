//! vCPU threads and the pause / resume / stop protocol.
//!
//! Each vCPU runs KVM_RUN on its own thread. To get it out of the guest the
//! controller sets a request and sends the thread a kick signal whose handler
//! sets `kvm_run.immediate_exit`: if the signal lands just before the thread
//! enters KVM_RUN, KVM returns at once instead of running the guest. A vCPU
//! that parks first re-enters KVM_RUN once with immediate_exit set, so KVM
//! completes any port or MMIO access in flight and the saved state is
//! consistent. `pause()` returns only once every vCPU has parked.

use std::cell::Cell;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::{ExitReason, VmEvent};
use crate::arch::x86_64::layout::ports;
use crate::arch::x86_64::regs::{self, BootEntry};
use crate::arch::x86_64::{cpuid, msr};
use crate::devices::bus::Buses;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM cannot {what} for vCPU {id}: {source}")]
    Kvm { id: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {id}: {source}")]
    Regs { id: u8, source: regs::Error },
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("{0}")]
    State(#[from] crate::state::vcpu::Error),
    #[error("vCPUs must be paused for this")]
    NotPaused,
    #[error("a vCPU thread has exited")]
    Exited,
}

/// Work run on a parked vCPU's own thread, with its fd.
type Job = Box<dyn FnOnce(&VcpuFd) + Send>;

/// What the controller wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    request: Request,
    /// vCPUs out of KVM_RUN and waiting on the condvar.
    parked: usize,
    /// vCPU threads that have left their loop for good.
    exited: usize,
    /// Per vCPU: work to run while parked (state save).
    jobs: Vec<Option<Job>>,
}

/// Shared between the controller and the vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    /// This thread's kvm_run page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while
        // its VcpuFd is alive. It aliases the `&mut kvm_run` kvm-ioctls holds
        // (as in Firecracker): a volatile byte store to a field KVM reads at
        // entry, and the handler runs on the same thread, never concurrently.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
}

/// Installs the kick handler once per process.
pub fn register_kick_handler() -> Result<(), Error> {
    static ONCE: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| register_signal_handler(kick_signal(), handle_kick)).map_err(Error::Signal)
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    bus: Arc<Buses>,
    control: Arc<VcpuControl>,
    events: Sender<VmEvent>,
    /// The VM's dirty rings (this vCPU's is mapped among them) and the VM
    /// fd to reset them on, when the VM tracks dirty pages by ring.
    dirty: Option<(Arc<super::dirty::Rings>, std::os::fd::RawFd)>,
}

impl Vcpu {
    pub fn new(
        vm: &VmFd,
        id: u8,
        bus: Arc<Buses>,
        control: Arc<VcpuControl>,
        events: Sender<VmEvent>,
        rings: Option<Arc<super::dirty::Rings>>,
    ) -> Result<Vcpu, Error> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|source| Error::Kvm { id, what: "create the vCPU", source })?;
        if let Some(r) = &rings {
            r.map(&fd).map_err(|e| Error::Kvm {
                id,
                what: "map the vCPU's dirty ring",
                source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EINVAL)),
            })?;
        }
        let dirty = rings.map(|r| (r, std::os::fd::AsRawFd::as_raw_fd(vm)));
        Ok(Vcpu { id, fd, bus, control, events, dirty })
    }

    /// Restores saved state (snapshot or migration).
    pub fn restore(&self, state: &crate::state::vcpu::VcpuState) -> Result<(), Error> {
        if state.tsc_khz != 0 {
            let here = self.fd.get_tsc_khz().unwrap_or(0);
            if here != state.tsc_khz {
                // Within 250 ppm is the same clock for any guest that cares.
                let tolerance = state.tsc_khz / 4000;
                if here.abs_diff(state.tsc_khz) > tolerance {
                    self.fd.set_tsc_khz(state.tsc_khz).map_err(|source| Error::Kvm {
                        id: self.id,
                        what: "give the guest its saved TSC frequency (this host cannot scale the TSC)",
                        source,
                    })?;
                }
            }
        }
        state.restore(&self.fd)?;
        Ok(())
    }

    /// CPUID, MSRs, FPU and LAPIC wiring for a fresh boot; registers come
    /// from `boot` on vCPU 0.
    pub fn configure_boot(
        &self,
        count: u8,
        supported_cpuid: &CpuId,
        profile: Option<&crate::arch::x86_64::cpu_profile::CpuProfile>,
        mem: &GuestMemory,
        boot: Option<BootEntry>,
    ) -> Result<CpuId, Error> {
        let (id, fd) = (self.id, &self.fd);
        let kvm = |what| move |source| Error::Kvm { id, what, source };
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        let mut cpuid = supported_cpuid.clone();
        if let Some(p) = profile {
            p.apply(cpuid.as_mut_slice());
        }
        cpuid::normalize(&mut cpuid, id, count, tsc_khz);
        fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        let msrs = msr::boot_msrs();
        let written = fd.set_msrs(&msrs).map_err(kvm("set boot MSRs"))?;
        if written != msrs.as_slice().len() {
            tracing::warn!(vcpu = id, "KVM accepted {written} of {} boot MSRs", msrs.as_slice().len());
        }
        regs::setup_lint(fd).map_err(|source| Error::Regs { id, source })?;
        regs::setup_fpu(fd).map_err(|source| Error::Regs { id, source })?;
        if let Some(boot) = boot {
            regs::setup_regs(fd, boot).map_err(|source| Error::Regs { id, source })?;
            regs::setup_sregs(mem, fd, boot).map_err(|source| Error::Regs { id, source })?;
        }
        Ok(cpuid)
    }

    fn run_loop(mut self) {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        let exit = loop {
            let request = self.control.lock().request;
            match request {
                Request::Run => {}
                Request::Pause => {
                    self.park();
                    continue;
                }
                Request::Stop => break None,
            }
            match self.fd.run() {
                Ok(exit) => {
                    if let Some(reason) = handle_exit(self.id, exit, &self.bus, &self.control, self.dirty.as_ref()) {
                        if let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) {
                            tracing::debug!(
                                vcpu = self.id,
                                "{reason}: rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/{}",
                                r.rip,
                                r.rsp,
                                s.cr0,
                                s.cr3,
                                s.cr4,
                                s.efer,
                                s.cs.selector,
                                s.cs.dpl
                            );
                        }
                        break Some(reason);
                    }
                }
                Err(e) if e.errno() == libc::EINTR => self.fd.set_kvm_immediate_exit(0),
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => break Some(ExitReason::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.id))),
            }
        };
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        if let Some(reason) = exit {
            let _ = self.events.send(VmEvent::Exit(reason));
        }
        let mut st = self.control.lock();
        st.exited += 1;
        self.control.changed.notify_all();
    }

    /// Leaves the guest for good (completing any in-flight I/O), then waits
    /// until asked to run or stop.
    fn park(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // Completing an in-flight exit can raise another (more MMIO
        // fragments, string I/O): serve those until KVM says EINTR.
        for _ in 0..1024 {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Ok(exit) => {
                    if let Some(reason) = handle_exit(self.id, exit, &self.bus, &self.control, self.dirty.as_ref()) {
                        let _ = self.events.send(VmEvent::Exit(reason));
                    }
                }
                Err(e) => {
                    tracing::warn!(vcpu = self.id, "KVM_RUN while parking: {e}");
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        let mut st = self.control.lock();
        st.parked += 1;
        self.control.changed.notify_all();
        loop {
            if let Some(job) = st.jobs.get_mut(usize::from(self.id)).and_then(Option::take) {
                drop(st);
                job(&self.fd);
                st = self.control.lock();
                continue;
            }
            if st.request != Request::Pause {
                break;
            }
            st = self.control.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        self.control.changed.notify_all();
    }
}

/// Handles one exit; `Some` ends this vCPU.
fn handle_exit(
    id: u8,
    exit: VcpuExit,
    bus: &Buses,
    control: &VcpuControl,
    dirty: Option<&(Arc<super::dirty::Rings>, std::os::fd::RawFd)>,
) -> Option<ExitReason> {
    match exit {
        // This vCPU's dirty ring is full: make room (what is harvested
        // waits for the migration's next sync) and go on.
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) if dirty.is_some() => {
            let (rings, vm_fd) = dirty?;
            rings.harvest(*vm_fd).err().map(|e| ExitReason::Error(format!("vCPU {id}: {e}")))
        }
        VcpuExit::IoOut(ports::IDLE, data) => {
            let mut us = [0u8; 4];
            let n = data.len().min(4);
            us[..n].copy_from_slice(&data[..n]);
            idle(control, u32::from_le_bytes(us).min(ports::IDLE_MAX_US));
            None
        }
        VcpuExit::IoOut(port, data) => {
            bus.pio.write(u64::from(port), data);
            None
        }
        VcpuExit::IoIn(port, data) => {
            bus.pio.read(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            bus.mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            bus.mmio.write(addr, data);
            None
        }
        VcpuExit::Hlt | VcpuExit::Shutdown => Some(ExitReason::GuestShutdown),
        VcpuExit::SystemEvent(kind, _) => Some(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
            ExitReason::GuestReset
        } else {
            ExitReason::GuestShutdown
        }),
        VcpuExit::InternalError => Some(ExitReason::Error(format!(
            "vCPU {id}: KVM internal error (emulation failure: on a PVM host the guest took an exception or interrupt)"
        ))),
        VcpuExit::FailEntry(reason, cpu) => {
            Some(ExitReason::Error(format!("vCPU {id}: VM entry failed, hardware reason {reason:#x} on CPU {cpu}")))
        }
        other => Some(ExitReason::Error(format!("vCPU {id}: unexpected exit {other:?}"))),
    }
}

/// The guest asked to idle: hold this vCPU for `us` microseconds, or less
/// if the controller wants it to pause or stop.
fn idle(control: &VcpuControl, us: u32) {
    let st = control.lock();
    let _unused =
        control.changed.wait_timeout_while(st, Duration::from_micros(u64::from(us)), |s| s.request == Request::Run);
}

/// The running vCPU threads of one VM.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
}

impl Vcpus {
    pub fn new_control() -> Arc<VcpuControl> {
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState { request: Request::Run, parked: 0, exited: 0, jobs: Vec::new() }),
            changed: Condvar::new(),
        })
    }

    /// Starts one thread per vCPU, running (or paused, if `paused`).
    pub fn start(control: Arc<VcpuControl>, vcpus: Vec<Vcpu>, paused: bool) -> Result<Vcpus, Error> {
        Vcpus::start_on(Vec::new(), control, vcpus, paused)
    }

    /// [`start`](Vcpus::start) on threads already started, one per vCPU in
    /// order (`threads` empty: new ones).
    pub fn start_on(
        threads: Vec<crate::seccomp::Waiting>,
        control: Arc<VcpuControl>,
        vcpus: Vec<Vcpu>,
        paused: bool,
    ) -> Result<Vcpus, Error> {
        register_kick_handler()?;
        {
            let mut st = control.lock();
            st.request = if paused { Request::Pause } else { Request::Run };
            st.jobs = vcpus.iter().map(|_| None).collect();
        }
        let mut waiting = threads.into_iter();
        let mut threads = Vec::new();
        for vcpu in vcpus {
            // Confined before its first KVM_RUN.
            let t = match waiting.next() {
                Some(w) => w.run(move || vcpu.run_loop()),
                None => {
                    crate::seccomp::spawn(format!("vcpu{}", vcpu.id), crate::seccomp::ThreadKind::Vcpu, move || {
                        vcpu.run_loop()
                    })
                    .map_err(Error::Spawn)?
                }
            };
            threads.push(t);
        }
        Ok(Vcpus { control, threads })
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // ESRCH only means the thread already finished.
            let _ = t.kill(kick_signal());
        }
    }

    fn set_request(&self, request: Request) {
        self.control.lock().request = request;
        self.control.changed.notify_all();
    }

    /// Returns once every vCPU is out of KVM_RUN and parked (or exited).
    pub fn pause(&self) {
        self.set_request(Request::Pause);
        let n = self.threads.len();
        let mut st = self.control.lock();
        while st.parked + st.exited < n {
            drop(st);
            // Re-kick until parked: a kick can land while a vCPU is between
            // exits, and a vCPU blocked in-kernel (halted AP) needs one.
            self.kick_all();
            st = self.control.lock();
            if st.parked + st.exited >= n {
                break;
            }
            st = self.control.changed.wait_timeout(st, Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Throttling: parks the vCPUs (devices keep running).
    pub fn hold(&self) {
        self.pause();
    }

    /// Returns once every vCPU has left its parked state.
    pub fn resume(&self) {
        self.set_request(Request::Run);
        let mut st = self.control.lock();
        while st.parked > 0 {
            st = self.control.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops every vCPU and joins its thread.
    pub fn stop(&mut self) {
        self.set_request(Request::Stop);
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Runs `f` on every vCPU's own thread while they are parked, returning
    /// the results in vCPU order.
    pub fn on_each_parked<T: Send + 'static>(
        &self,
        f: impl Fn(&VcpuFd, u8) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, Error> {
        let n = self.threads.len();
        let f = Arc::new(f);
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut st = self.control.lock();
            if st.request != Request::Pause || st.parked < n {
                return Err(if st.exited > 0 { Error::Exited } else { Error::NotPaused });
            }
            for (i, slot) in st.jobs.iter_mut().enumerate() {
                let (f, tx) = (f.clone(), tx.clone());
                *slot = Some(Box::new(move |fd: &VcpuFd| {
                    let _ = tx.send((i, f(fd, i as u8)));
                }));
            }
        }
        self.control.changed.notify_all();
        drop(tx);
        let mut out: Vec<(usize, T)> = rx.iter().take(n).collect();
        if out.len() < n {
            return Err(Error::Exited);
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, t)| t).collect())
    }

    pub fn is_paused(&self) -> bool {
        self.control.lock().request == Request::Pause
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}
