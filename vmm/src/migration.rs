//! The seam between a VM and whatever moves it, in the manner of Cloud
//! Hypervisor's vm-migration traits (Pausable, Snapshottable, Migratable):
//!
//! - [`MigratableVm`]: what a migration source needs from a running VM
//!   (its memory, the dirty log, pause/resume/throttle, state, backend
//!   handoff, retirement), each step checked by the VM's lifecycle;
//! - [`Destination`], [`IncomingVm`], [`ReceivedVm`]: what a receiving host
//!   offers (what it can run, memory to fill, a VM built from state);
//! - [`Requirements`] and [`HostOffer`]: the preflight's two sides, as data.
//!
//! The `migrate` crate uses only these; [`KvmDestination`] and the impls
//! for [`Vmm`] are the real ones, and migrate's tests supply in-memory
//! fakes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpu_features::CpuidLeaf;
use crate::builder::{self, FromState};
use crate::config::{DiskConfig, HostConfig};
use crate::devices::bus::lock;
pub use crate::lifecycle::RunState;
use crate::lifecycle::{Action, Lifecycle, VcpuActivity};
use crate::mac::MacAddr;
use crate::memory::{self, GuestRam};
pub use crate::memory::{Extent, ScanStats, PAGE_SIZE};
use crate::state::VmState;
pub use crate::vmm::Error;
use crate::vmm::Vmm;
pub use crate::vstate::dirty::DirtyBitmap;
use crate::vstate::vm::Vm;

/// Guest memory as a migration source reads it: offsets in the memory file
/// (RAM below the MMIO hole first, then the rest).
pub trait MemorySource: Send + Sync {
    fn size(&self) -> u64;
    /// Walks all of memory in order: runs of zero (or never touched) pages
    /// and runs of data pages.
    fn scan(&self, f: &mut dyn FnMut(Extent<'_>) -> std::io::Result<()>) -> std::io::Result<ScanStats>;
    /// [`scan`](MemorySource::scan) over `range` only (page-aligned ends):
    /// each of several senders walks its own stripes. The default clips a
    /// full scan (fine for small fakes; real memory walks only the range).
    fn scan_range(
        &self,
        range: std::ops::Range<u64>,
        f: &mut dyn FnMut(Extent<'_>) -> std::io::Result<()>,
    ) -> std::io::Result<ScanStats> {
        let mut stats = ScanStats::default();
        self.scan(&mut |extent| {
            let (offset, len) = match extent {
                Extent::Zero { offset, len } => (offset, len),
                Extent::Data { offset, bytes } => (offset, bytes.len() as u64),
            };
            let (from, to) = (offset.max(range.start), (offset + len).min(range.end));
            if from >= to {
                return Ok(());
            }
            let pages = (to - from).div_ceil(PAGE_SIZE);
            match extent {
                Extent::Zero { .. } => {
                    stats.pages_zero += pages;
                    f(Extent::Zero { offset: from, len: to - from })
                }
                Extent::Data { bytes, .. } => {
                    stats.pages_data += pages;
                    f(Extent::Data { offset: from, bytes: &bytes[(from - offset) as usize..(to - offset) as usize] })
                }
            }
        })?;
        Ok(stats)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// The file behind guest memory, if another process on this host may
    /// map it (a same-host move passes it instead of copying pages).
    fn shareable_file(&self) -> Option<&std::fs::File> {
        None
    }
}

/// Guest memory as a destination fills it. Every range is checked: a peer
/// can name any offset.
pub trait MemorySink: Send + Sync {
    fn size(&self) -> u64;
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()>;
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// What a destination must offer to run the VM: the preflight's input,
/// sent before any memory. (The machine config itself travels once, in the
/// state.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    pub mem_bytes: u64,
    pub vcpus: u8,
    /// NICs in device order, by MAC: the destination supplies a tap for each.
    pub nics: Vec<MacAddr>,
    /// Disks in device order.
    pub disks: Vec<DiskRequirement>,
    /// vCPU 0's CPUID as the guest sees it.
    pub guest_cpuid: Vec<CpuidLeaf>,
    /// The guest's TSC frequency (0 if unknown).
    pub tsc_khz: u32,
}

/// One disk as the destination must find it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRequirement {
    pub disk: DiskConfig,
    /// The size the guest knows, in bytes.
    pub size_bytes: u64,
    /// Which image it is (see `devices::disk::identity_of`): a different
    /// file at the same path is refused.
    pub identity: String,
}

/// What this host's KVM offers a guest, for the preflight.
#[derive(Clone, Debug)]
pub struct HostOffer {
    pub cpuid: Vec<CpuidLeaf>,
    pub tsc_khz: u32,
    /// KVM here can give a guest another TSC frequency.
    pub tsc_scaling: bool,
}

/// A running VM a migration can move. Each call is a lifecycle action:
/// refused unless the migration holds the VM and is at the right step.
pub trait MigratableVm: Send + Sync {
    fn memory(&self) -> &dyn MemorySource;
    fn requirements(&self) -> Requirements;
    /// Claims the VM for a migration (refused if one runs, or the VM
    /// stopped or was retired); returns its run state, which travels.
    fn begin_migration(&self) -> Result<RunState, Error>;
    /// The migration failed before its commit: the VM is this host's again,
    /// in the run state it had.
    fn end_migration(&self) -> Result<(), Error>;
    /// Auto-converge: park (true) or release (false) the vCPUs.
    fn throttle(&self, hold: bool) -> Result<(), Error>;
    /// The switchover pause.
    fn pause(&self) -> Result<(), Error>;
    /// A failed switchover gives a VM that was running its vCPUs back.
    fn resume(&self) -> Result<(), Error>;
    /// Starts dirty logging; returns how the log works here, for the figures.
    fn start_dirty_log(&self) -> Result<&'static str, Error>;
    /// Pages dirtied since the last call (re-protected).
    fn take_dirty(&self) -> Result<DirtyBitmap, Error>;
    fn stop_dirty_log(&self) -> Result<(), Error>;
    /// Makes disk writes durable while the guest still runs.
    fn flush_backends(&self) -> Result<(), Error>;
    /// At the commit: every disk flushed, then handed to `to_host`. All or
    /// nothing: if one handoff fails, the ones done are taken back.
    fn release_backends(&self, to_host: &str) -> Result<(), Error>;
    /// Takes back what `release_backends` handed over, when the commit did
    /// not happen after all.
    fn reclaim_backends(&self) -> Result<(), Error>;
    /// The encoded state (vCPUs, irqchip, devices, machine config, run state).
    fn save_state(&self) -> Result<Vec<u8>, Error>;
    /// The commit: this VM never runs here again.
    fn retire(&self) -> Result<(), Error>;
}

/// A host that can take a VM in.
pub trait Destination: Send + Sync {
    type Incoming: IncomingVm<Vm = Self::Vm>;
    type Vm: ReceivedVm + 'static;
    /// This host's name in disk leases: the source hands disks to it.
    fn host_id(&self) -> &str;
    /// What KVM here offers (CPUID, TSC).
    fn offer(&self) -> Result<HostOffer, Error>;
    /// Every reason this host cannot supply the VM's memory and backends
    /// (taps, disks), in words an operator can act on.
    /// `shared_memory`: the source's memory will be mapped, not copied,
    /// so none is needed here.
    fn check_backends(&self, req: &Requirements, shared_memory: bool) -> Vec<String>;
    /// Memory to fill (and, for KVM, the VM made ahead of the state).
    fn prepare(&self, req: &Requirements) -> Result<Self::Incoming, Error>;
    /// Whether this destination can map a source's memory file passed to
    /// it (a same-host move) instead of receiving its pages.
    fn shares_memory(&self) -> bool {
        false
    }
    /// Like `prepare`, with the source's own memory file as guest RAM:
    /// nothing is filled, and nothing here may write to it before the
    /// commit (the source still runs on it until then).
    fn prepare_shared(&self, req: &Requirements, memfd: std::fs::File) -> Result<Self::Incoming, Error> {
        let _ = (req, memfd);
        Err(Error::BadState("this destination cannot map a passed memory file".into()))
    }
}

/// A VM being received: memory filling, not built yet.
pub trait IncomingVm: Send {
    type Vm: ReceivedVm;
    fn memory(&self) -> &dyn MemorySink;
    /// Builds the VM from its encoded state: paused, disks in standby.
    fn restore(self, state: &[u8]) -> Result<Arc<Self::Vm>, Error>;
}

/// A received VM waiting for (or past) the source's commit.
pub trait ReceivedVm: Send + Sync {
    /// The run state the source had: a paused VM stays paused here.
    fn saved_run_state(&self) -> RunState;
    /// Takes the disks the source handed over.
    fn acquire_backends(&self) -> Result<(), Error>;
    /// Keeps the VM paused for an operator, saying why (API and log): a
    /// committed VM whose disks could not be taken. Its resume takes them.
    fn hold(&self, why: String);
    fn resume(&self) -> Result<(), Error>;
    /// RARP on every tap; how many NICs announced.
    fn announce(&self) -> Result<usize, Error>;
}

impl MemorySource for GuestRam {
    fn size(&self) -> u64 {
        self.size
    }
    fn scan(&self, f: &mut dyn FnMut(Extent<'_>) -> std::io::Result<()>) -> std::io::Result<ScanStats> {
        self.scan_range(0..self.size, f)
    }
    fn scan_range(
        &self,
        range: std::ops::Range<u64>,
        f: &mut dyn FnMut(Extent<'_>) -> std::io::Result<()>,
    ) -> std::io::Result<ScanStats> {
        memory::scan_range(&self.memfd, range.start, range.end.min(self.size), |at, buf| self.read_at(at, buf), f)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        GuestRam::read_at(self, offset, buf)
    }
    fn shareable_file(&self) -> Option<&std::fs::File> {
        Some(&self.memfd)
    }
}

impl MemorySink for GuestRam {
    fn size(&self) -> u64 {
        self.size
    }
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        GuestRam::write_at(self, offset, bytes)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        GuestRam::zero_range(self, offset, len)
    }
}

impl MigratableVm for Vmm {
    fn memory(&self) -> &dyn MemorySource {
        &self.ram
    }

    fn requirements(&self) -> Requirements {
        let m = &self.config.machine;
        Requirements {
            mem_bytes: self.ram.size,
            vcpus: m.vcpus,
            nics: m.nics.iter().map(|n| n.mac).collect(),
            disks: self.disk_requirements(),
            guest_cpuid: self.guest_cpuid.iter().map(CpuidLeaf::from).collect(),
            tsc_khz: self.tsc_khz,
        }
    }

    fn begin_migration(&self) -> Result<RunState, Error> {
        self.act(Action::BeginMigration, |_, _| Ok(()))?;
        Ok(self.lifecycle().run_state())
    }

    fn end_migration(&self) -> Result<(), Error> {
        self.act(Action::EndMigration, |_, _| Ok(()))
    }

    fn throttle(&self, hold: bool) -> Result<(), Error> {
        if hold {
            self.act(Action::Throttle, |v, _| {
                lock(&v.vcpus).pause();
                Ok(())
            })
        } else {
            self.act(Action::Unthrottle, |v, _| {
                lock(&v.vcpus).resume();
                Ok(())
            })
        }
    }

    fn pause(&self) -> Result<(), Error> {
        self.act(Action::MigrationPause, |v, _| {
            v.park();
            Ok(())
        })
    }

    fn resume(&self) -> Result<(), Error> {
        self.act(Action::MigrationResume, |v, _| {
            v.unpark();
            Ok(())
        })
    }

    fn start_dirty_log(&self) -> Result<&'static str, Error> {
        Ok(match Vmm::start_dirty_log(self)? {
            crate::vstate::dirty::DirtyLogMode::ManualProtect => "ManualProtect",
            crate::vstate::dirty::DirtyLogMode::GetDirtyLog => "GetDirtyLog",
            crate::vstate::dirty::DirtyLogMode::Ring => "Ring",
        })
    }

    fn take_dirty(&self) -> Result<DirtyBitmap, Error> {
        Vmm::take_dirty(self)
    }

    fn stop_dirty_log(&self) -> Result<(), Error> {
        Vmm::stop_dirty_log(self)
    }

    fn flush_backends(&self) -> Result<(), Error> {
        Vmm::flush_backends(self)
    }

    fn release_backends(&self, to_host: &str) -> Result<(), Error> {
        if !self.lifecycle().vcpus_parked() {
            return Err(Error::BadState("disks are handed over only with the VM paused".into()));
        }
        // Everything durable first: a failing flush hands nothing over.
        Vmm::flush_backends(self)?;
        for (i, t) in self.virtio.iter().enumerate() {
            let released = match lock(t).device_mut().backend_mut() {
                Some(b) => b.release(to_host),
                None => Ok(()),
            };
            if let Err(e) = released {
                // All or nothing: the disks already handed over come back.
                for done in &self.virtio[..i] {
                    if let Some(b) = lock(done).device_mut().backend_mut() {
                        if let Err(r) = b.reclaim() {
                            tracing::error!("after a failed handoff a disk could not be taken back: {r}");
                        }
                    }
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn reclaim_backends(&self) -> Result<(), Error> {
        let mut first = None;
        for t in &self.virtio {
            if let Some(b) = lock(t).device_mut().backend_mut() {
                if let Err(e) = b.reclaim() {
                    tracing::error!("a disk could not be taken back: {e}");
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    fn save_state(&self) -> Result<Vec<u8>, Error> {
        let lifecycle = self.lifecycle();
        if !matches!(lifecycle, Lifecycle::Migrating { vcpus: VcpuActivity::Paused, .. }) {
            return Err(Error::BadState(format!(
                "the state is saved only at the switchover, with the vCPUs paused (the VM is {})",
                lifecycle.name()
            )));
        }
        Vmm::save_state(self, lifecycle.run_state())?.encode().map_err(|e| Error::BadState(e.to_string()))
    }

    fn retire(&self) -> Result<(), Error> {
        self.act(Action::Retire, |_, _| Ok(()))
    }
}

impl Vmm {
    fn disk_requirements(&self) -> Vec<DiskRequirement> {
        let mut out = Vec::new();
        let mut configs = self.config.machine.disks.iter();
        for t in &self.virtio {
            let t = lock(t);
            if let crate::state::devices::BackendSnapshot::Block { sectors, .. } = t.device().identity() {
                let Some(disk) = configs.next() else { break };
                let identity = t.device().disk_identity().unwrap_or_default();
                out.push(DiskRequirement {
                    disk: disk.clone(),
                    size_bytes: sectors * crate::devices::disk::SECTOR,
                    identity,
                });
            }
        }
        out
    }
}

impl ReceivedVm for Vmm {
    fn saved_run_state(&self) -> RunState {
        self.restored_run_state
    }

    fn acquire_backends(&self) -> Result<(), Error> {
        Vmm::acquire_backends(self)
    }

    fn hold(&self, why: String) {
        Vmm::hold(self, why)
    }

    fn resume(&self) -> Result<(), Error> {
        Vmm::resume(self)
    }

    fn announce(&self) -> Result<usize, Error> {
        Vmm::announce(self)
    }
}

/// What this host's KVM offers a guest: a scratch vCPU's CPUID and TSC.
pub fn probe_host(kvm_device: &std::path::Path) -> Result<HostOffer, Error> {
    let kvm = crate::vstate::vm::open_kvm(kvm_device)?;
    let (cpuid, tsc_khz) = crate::arch::x86_64::cpu_profile::probe_vcpu(&kvm).map_err(|source| {
        Error::Kvm(crate::vstate::vm::Error::Kvm { what: "create a vCPU to check CPU features", source })
    })?;
    Ok(HostOffer { cpuid, tsc_khz, tsc_scaling: kvm.check_extension(kvm_ioctls::Cap::TscControl) })
}

/// This host, receiving into real KVM VMs under its own host config.
pub struct KvmDestination {
    pub host: HostConfig,
}

/// Memory being filled for a VM on its way here, with its KVM VM made.
pub struct KvmIncoming {
    host: HostConfig,
    ram: GuestRam,
    vm: Vm,
    /// The RAM is the source's own memory file (a same-host move): the
    /// source still runs on it until the commit, so nothing here writes it.
    shared: bool,
    /// The VM's threads, started while memory arrives (parked, touching
    /// nothing): starting them at the restore was ~0.5 ms of downtime.
    threads: Option<builder::Threads>,
}

impl Destination for KvmDestination {
    type Incoming = KvmIncoming;
    type Vm = Vmm;

    fn host_id(&self) -> &str {
        &self.host.host_id
    }

    fn offer(&self) -> Result<HostOffer, Error> {
        probe_host(&self.host.kvm_device)
    }

    fn check_backends(&self, req: &Requirements, shared_memory: bool) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = csv_fs::fsutil::check_name("host", &self.host.host_id) {
            problems.push(format!("this host's id cannot name a lease holder: {e}"));
        }
        // Shared memory is already there: only its shape is checked (on mapping).
        if !shared_memory {
            if let Err(e) = memory::check_size(req.mem_bytes >> 20) {
                problems.push(e.to_string());
            }
        }
        if req.nics.len() != self.host.taps.len() {
            problems.push(format!(
                "the VM has {} NIC(s) and this host was given {} tap(s) for them (--net tap=NAME, one per NIC)",
                req.nics.len(),
                self.host.taps.len()
            ));
        }
        for tap in &self.host.taps {
            let exists = std::ffi::CString::new(tap.as_str())
                // SAFETY: if_nametoindex reads a NUL-terminated string.
                .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
                .unwrap_or(false);
            if !exists {
                problems.push(format!("tap {tap} does not exist on this host"));
            }
        }
        for d in &req.disks {
            if let Err(why) = check_disk(d, &self.host.disk_roots) {
                problems.push(why);
            }
        }
        problems
    }

    fn prepare(&self, req: &Requirements) -> Result<KvmIncoming, Error> {
        let ram = memory::create(req.mem_bytes >> 20)?;
        // The KVM VM and its memory slots now, while round 0 is in flight.
        let vm = builder::prepare(&self.host, &ram)?;
        let threads = builder::Threads::start(req.vcpus)?;
        Ok(KvmIncoming { host: self.host.clone(), ram, vm, shared: false, threads: Some(threads) })
    }

    fn shares_memory(&self) -> bool {
        true
    }

    /// Maps the source's memory file and makes the KVM VM on it. Until the
    /// commit the pages are the source's live memory (and, if the move
    /// fails, stay its memory), so nothing on this side may write them:
    /// - memory frames: refused here ([`KvmIncoming`]'s sink) and by the
    ///   protocol (`migrate::destination`);
    /// - KVM: registering the slots (no dirty logging) writes nothing, and
    ///   KVM's own guest-memory writes (kvmclock, steal time, PV EOI, all
    ///   set up by the restored MSRs) happen only on guest entry. The vCPU
    ///   threads of a restored VM start parked, and a parked vCPU enters
    ///   KVM_RUN only with `immediate_exit` set, which returns before entry;
    /// - devices: the event loop starts paused (`builder`), so tap input is
    ///   read and dropped, never put in the guest's RX ring, and queue
    ///   notify eventfds (`--virtio-notify ioeventfd`) stay disarmed; the
    ///   catch-up look at every queue comes with the first resume, after
    ///   the commit. Disks open in standby (no I/O) until the commit;
    /// - announce and the API socket come after the commit.
    ///
    /// If the move fails, dropping the VM stops parked vCPUs without a
    /// KVM_RUN and the event loop without a look at the queues.
    fn prepare_shared(&self, req: &Requirements, memfd: std::fs::File) -> Result<KvmIncoming, Error> {
        let ram = memory::from_memfd(memfd, req.mem_bytes)?;
        let vm = builder::prepare(&self.host, &ram)?;
        let threads = builder::Threads::start(req.vcpus)?;
        Ok(KvmIncoming { host: self.host.clone(), ram, vm, shared: true, threads: Some(threads) })
    }
}

/// Incoming memory frames land in the RAM, unless it is shared with the
/// source (see [`KvmDestination::prepare_shared`]).
impl MemorySink for KvmIncoming {
    fn size(&self) -> u64 {
        self.ram.size
    }
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.writable()?;
        self.ram.write_at(offset, bytes)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.writable()?;
        self.ram.zero_range(offset, len)
    }
}

impl KvmIncoming {
    fn writable(&self) -> std::io::Result<()> {
        if self.shared {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "guest memory is the source's own (shared): nothing is written to it before the commit",
            ));
        }
        Ok(())
    }
}

impl IncomingVm for KvmIncoming {
    type Vm = Vmm;

    fn memory(&self) -> &dyn MemorySink {
        self
    }

    fn restore(self, state: &[u8]) -> Result<Arc<Vmm>, Error> {
        let state = VmState::decode(state).map_err(|e| Error::BadState(e.to_string()))?;
        let vmm = builder::build_from_state(
            self.host,
            state,
            self.ram,
            FromState { standby: true, vm: Some(self.vm), threads: self.threads },
        )?;
        Ok(Arc::new(vmm))
    }
}

/// Whether this host will open `req`'s disk: inside a root it allows, the
/// same image (identity) and the same size the guest knows.
fn check_disk(req: &DiskRequirement, roots: &[std::path::PathBuf]) -> Result<(), String> {
    let shown = req.disk.path.display();
    let path = req.disk.image_path().map_err(|e| format!("disk {shown} is not reachable here: {e}"))?;
    let real = std::fs::canonicalize(&path)
        .map_err(|e| format!("disk image {} is not reachable here: {e}", path.display()))?;
    let allowed = roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).any(|r| real.starts_with(&r));
    if !allowed {
        let listed: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(format!(
            "disk {} is outside the places this host allows disks from ({}): add --allow-disks DIR on the destination",
            real.display(),
            if listed.is_empty() { "none given".to_owned() } else { listed.join(", ") }
        ));
    }
    let volume = match &req.disk.volume {
        Some(vd) => {
            Some((csv_fs::Volume::open(&vd.volume).map_err(|e| format!("disk {shown}: {e}"))?, vd.name.clone()))
        }
        None => None,
    };
    let identity = crate::devices::disk::identity_of(&path, volume.as_ref().map(|(v, n)| (v, n.as_str())))
        .map_err(|e| format!("disk {shown}: {e}"))?;
    if identity != req.identity {
        return Err(format!(
            "disk {} here is a different image ({identity}) from the guest's ({})",
            path.display(),
            req.identity
        ));
    }
    let size = csv_fs::Image::open(&path, csv_fs::OpenMode::ReadOnly)
        .map(|i| csv_fs::BlockBackend::len(&i))
        .map_err(|e| format!("disk {shown}: {e}"))?;
    if size != req.size_bytes {
        return Err(format!("disk {} is {size} bytes here, the guest's is {} bytes", path.display(), req.size_bytes));
    }
    Ok(())
}
