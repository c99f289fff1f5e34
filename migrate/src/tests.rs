//! The migration logic against an in-memory fake guest: no root, no KVM.
//! The fake implements the same traits the real VMM does, keeps its run
//! state with the real lifecycle table, and dirties its memory from a
//! thread while its "vCPUs" run; the two ends talk over a real Unix socket.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::lifecycle::{Action, Lifecycle};
use vmm::migration::{
    Destination, DirtyBitmap, Error as VmError, Extent, HostOffer, IncomingVm, MemorySink, MemorySource, MigratableVm,
    ReceivedVm, Requirements, RunState, ScanStats, PAGE_SIZE,
};

use crate::auth::Key;
use crate::destination::{self, Policy as DestPolicy};
use crate::preflight::CpuPolicy;
use crate::secure::Duplex;
use crate::source::{self, Error, Options, Policy};
use crate::transport::{Endpoint, Listener};
use crate::wire::{self, Kind, Mode};
use std::io::Write;

const PAGES: u64 = 1024; // 4 MiB

fn key() -> Key {
    static KEY: std::sync::OnceLock<Key> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ferry-migrate-test-{}.key", std::process::id()));
        write_key_file(&p, 0o600);
        let key = Key::load(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        key
    })
    .clone()
}

/// Guest memory as a vector of bytes, and a file standing in for the
/// memfd a same-host move passes (its bytes are not the guest's: the fake
/// destination only checks which file it got).
struct FakeMem(Mutex<Vec<u8>>, Option<std::fs::File>);

impl FakeMem {
    fn new(pages: u64) -> FakeMem {
        FakeMem(Mutex::new(vec![0; (pages * PAGE_SIZE) as usize]), None)
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
    fn check(&self, offset: u64, len: u64) -> std::io::Result<std::ops::Range<usize>> {
        let size = MemorySource::size(self);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "outside guest memory")),
        }
    }
}

impl MemorySource for FakeMem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn scan(&self, f: &mut dyn FnMut(Extent<'_>) -> std::io::Result<()>) -> std::io::Result<ScanStats> {
        let mem = self.snapshot();
        let mut stats = ScanStats::default();
        for (i, page) in mem.chunks(PAGE_SIZE as usize).enumerate() {
            let offset = i as u64 * PAGE_SIZE;
            if page.iter().all(|b| *b == 0) {
                stats.pages_zero += 1;
                f(Extent::Zero { offset, len: PAGE_SIZE })?;
            } else {
                stats.pages_data += 1;
                f(Extent::Data { offset, bytes: page })?;
            }
        }
        Ok(stats)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let r = self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn shareable_file(&self) -> Option<&std::fs::File> {
        self.1.as_ref()
    }
}

impl MemorySink for FakeMem {
    fn size(&self) -> u64 {
        MemorySource::size(self)
    }
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let r = self.check(offset, bytes.len() as u64)?;
        self.0.lock().unwrap()[r].copy_from_slice(bytes);
        Ok(())
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let r = self.check(offset, len)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

/// A running guest: memory, the lifecycle, a dirty log, and a log of
/// what the migration did to it.
struct FakeVm {
    mem: FakeMem,
    lifecycle: Mutex<Lifecycle>,
    logging: AtomicBool,
    dirty: Mutex<BTreeSet<u64>>,
    calls: Mutex<Vec<String>>,
    /// Make this step fail.
    fail: Option<&'static str>,
    stop: AtomicBool,
    writes: AtomicU64,
    /// A guest that dirties all of its memory between any two looks at the
    /// log while its vCPUs run (deterministic, unlike a writer thread).
    always_dirty: AtomicBool,
}

impl FakeVm {
    fn new(state: Lifecycle, fail: Option<&'static str>) -> Arc<FakeVm> {
        FakeVm::build(state, fail, FakeMem::new(PAGES))
    }

    /// A guest whose memory has a file a same-host move can pass; returns
    /// the file's identity too.
    fn with_memory_file(state: Lifecycle, fail: Option<&'static str>) -> (Arc<FakeVm>, wire::MemFdId) {
        let file = memory_file();
        let id = wire::MemFdId::of(&file).unwrap();
        let mem = FakeMem(Mutex::new(vec![0; (PAGES * PAGE_SIZE) as usize]), Some(file));
        (FakeVm::build(state, fail, mem), id)
    }

    fn build(state: Lifecycle, fail: Option<&'static str>, mem: FakeMem) -> Arc<FakeVm> {
        let vm = Arc::new(FakeVm {
            mem,
            lifecycle: Mutex::new(state),
            logging: AtomicBool::new(false),
            dirty: Mutex::new(BTreeSet::new()),
            calls: Mutex::new(Vec::new()),
            fail,
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            always_dirty: AtomicBool::new(false),
        });
        for p in 0..PAGES / 2 {
            vm.mem.write_at(p * PAGE_SIZE, &[p as u8 | 1; 64]).unwrap();
        }
        vm
    }

    /// Starts a "vCPU" that writes `pages_per_ms` pages (round robin over
    /// the first `span` pages) while the lifecycle lets it run.
    fn dirty_from_a_thread(self: &Arc<Self>, pages_per_ms: u64, span: u64) -> std::thread::JoinHandle<()> {
        let vm = self.clone();
        std::thread::spawn(move || {
            let mut next = 0u64;
            while !vm.stop.load(Ordering::Relaxed) {
                {
                    // The lock orders writes against pause, as a parked vCPU would.
                    let lc = vm.lifecycle.lock().unwrap();
                    if !lc.vcpus_parked() {
                        for _ in 0..pages_per_ms {
                            let n = vm.writes.fetch_add(1, Ordering::Relaxed);
                            vm.mem.write_at((next % span) * PAGE_SIZE + 8, &n.to_le_bytes()).unwrap();
                            if vm.logging.load(Ordering::Relaxed) {
                                vm.dirty.lock().unwrap().insert(next % span);
                            }
                            next += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }

    fn act(&self, action: Action) -> Result<(), VmError> {
        let mut lc = self.lifecycle.lock().unwrap();
        *lc = lc.next(action)?;
        self.calls.lock().unwrap().push(format!("{action}"));
        Ok(())
    }

    fn failing(&self, step: &str) -> Result<(), VmError> {
        if self.fail == Some(step) {
            return Err(VmError::BadState(format!("injected failure at {step}")));
        }
        Ok(())
    }

    fn state(&self) -> Lifecycle {
        *self.lifecycle.lock().unwrap()
    }

    fn called(&self, what: &str) -> bool {
        self.calls.lock().unwrap().iter().any(|c| c.contains(what))
    }
}

impl MigratableVm for FakeVm {
    fn memory(&self) -> &dyn MemorySource {
        &self.mem
    }
    fn requirements(&self) -> Requirements {
        Requirements {
            mem_bytes: MemorySource::size(&self.mem),
            vcpus: 1,
            nics: Vec::new(),
            disks: Vec::new(),
            guest_cpuid: Vec::new(),
            tsc_khz: 0,
        }
    }
    fn begin_migration(&self) -> Result<RunState, VmError> {
        self.act(Action::BeginMigration)?;
        Ok(self.state().run_state())
    }
    fn end_migration(&self) -> Result<(), VmError> {
        self.act(Action::EndMigration)
    }
    fn throttle(&self, hold: bool) -> Result<(), VmError> {
        self.act(if hold { Action::Throttle } else { Action::Unthrottle })
    }
    fn pause(&self) -> Result<(), VmError> {
        self.failing("pause")?;
        self.act(Action::MigrationPause)
    }
    fn resume(&self) -> Result<(), VmError> {
        self.act(Action::MigrationResume)
    }
    fn start_dirty_log(&self) -> Result<&'static str, VmError> {
        self.logging.store(true, Ordering::SeqCst);
        // As with KVM's INITIALLY_SET: everything starts dirty.
        self.dirty.lock().unwrap().extend(0..PAGES);
        Ok("fake")
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, VmError> {
        let mut pages = std::mem::take(&mut *self.dirty.lock().unwrap());
        if self.always_dirty.load(Ordering::SeqCst) && !self.state().vcpus_parked() {
            pages.extend(0..PAGES);
        }
        let mut words = vec![0u64; PAGES.div_ceil(64) as usize];
        for p in pages {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        let mut bitmap = DirtyBitmap::default();
        bitmap.merge_kvm_log(0, &words);
        Ok(bitmap)
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.logging.store(false, Ordering::SeqCst);
        self.calls.lock().unwrap().push("stop dirty log".into());
        Ok(())
    }
    fn flush_backends(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn release_backends(&self, to_host: &str) -> Result<(), VmError> {
        self.failing("release")?;
        self.calls.lock().unwrap().push(format!("release to {to_host}"));
        Ok(())
    }
    fn reclaim_backends(&self) -> Result<(), VmError> {
        self.calls.lock().unwrap().push("reclaim".into());
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        self.failing("save")?;
        let run_state = self.state().run_state();
        Ok(serde_json::to_vec(&run_state).unwrap())
    }
    fn retire(&self) -> Result<(), VmError> {
        self.act(Action::Retire)
    }
}

/// An unlinked file of the fake guest's memory size.
fn memory_file() -> std::fs::File {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("ferry-mt-ram-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    file.set_len(PAGES * PAGE_SIZE).unwrap();
    file
}

/// A receiving host that builds fake VMs.
#[derive(Default)]
struct FakeDestination {
    refuse: bool,
    fail_restore: bool,
    /// The disks cannot be taken after the commit.
    fail_acquire: bool,
    /// Takes a same-host source's memory file when offered ...
    share: bool,
    /// ... but cannot map it.
    fail_map: bool,
    /// Applies memory slowly, noting each write in this (the source's) log.
    slow_sink: Option<Arc<FakeVm>>,
    /// A write covering this offset fails (the stream carrying it dies).
    fail_write_at: Option<u64>,
}

struct FakeIncoming {
    mem: FakeMem,
    slow_sink: Option<Arc<FakeVm>>,
    fail_write_at: Option<u64>,
    fail_restore: bool,
    fail_acquire: bool,
    /// The memory file the source passed (its identity), if it did.
    shared: Option<wire::MemFdId>,
}

struct FakeReceived {
    mem: FakeMem,
    shared: Option<wire::MemFdId>,
    run_state: RunState,
    acquired: AtomicBool,
    running: AtomicBool,
    fail_acquire: bool,
    held: Mutex<Option<String>>,
}

impl Destination for FakeDestination {
    type Incoming = FakeIncoming;
    type Vm = FakeReceived;
    fn host_id(&self) -> &str {
        "fake-b"
    }
    fn offer(&self) -> Result<HostOffer, VmError> {
        Ok(HostOffer { cpuid: Vec::new(), tsc_khz: 0, tsc_scaling: false })
    }
    fn check_backends(&self, _req: &Requirements, _shared_memory: bool) -> Vec<String> {
        if self.refuse {
            vec!["tap vm0 does not exist on this host".into()]
        } else {
            Vec::new()
        }
    }
    fn prepare(&self, req: &Requirements) -> Result<FakeIncoming, VmError> {
        Ok(FakeIncoming {
            mem: FakeMem::new(req.mem_bytes / PAGE_SIZE),
            fail_restore: self.fail_restore,
            fail_acquire: self.fail_acquire,
            shared: None,
            slow_sink: self.slow_sink.clone(),
            fail_write_at: self.fail_write_at,
        })
    }
    fn shares_memory(&self) -> bool {
        self.share
    }
    fn prepare_shared(&self, req: &Requirements, memfd: std::fs::File) -> Result<FakeIncoming, VmError> {
        if self.fail_map {
            return Err(VmError::BadState("injected mapping failure".into()));
        }
        let mut incoming = self.prepare(req)?;
        incoming.shared = Some(wire::MemFdId::of(&memfd).map_err(|e| VmError::BadState(e.to_string()))?);
        Ok(incoming)
    }
}

impl IncomingVm for FakeIncoming {
    type Vm = FakeReceived;
    fn memory(&self) -> &dyn MemorySink {
        match (&self.slow_sink, self.fail_write_at) {
            (None, None) => &self.mem,
            _ => self,
        }
    }
    fn restore(self, state: &[u8]) -> Result<Arc<FakeReceived>, VmError> {
        if self.fail_restore {
            return Err(VmError::BadState("injected restore failure".into()));
        }
        let run_state = serde_json::from_slice(state).map_err(|e| VmError::BadState(e.to_string()))?;
        Ok(Arc::new(FakeReceived {
            mem: self.mem,
            shared: self.shared,
            run_state,
            acquired: AtomicBool::new(false),
            running: AtomicBool::new(false),
            fail_acquire: self.fail_acquire,
            held: Mutex::new(None),
        }))
    }
}

/// The slow sink (200 us per write, each noted in the source's call log)
/// and the failing one.
impl MemorySink for FakeIncoming {
    fn size(&self) -> u64 {
        MemorySink::size(&self.mem)
    }
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        if self.fail_write_at.is_some_and(|at| (offset..offset + bytes.len() as u64).contains(&at)) {
            return Err(std::io::Error::other("injected write failure"));
        }
        if let Some(source) = &self.slow_sink {
            std::thread::sleep(Duration::from_micros(200));
            source.calls.lock().unwrap().push(format!("applied {offset:#x}"));
        }
        self.mem.write_at(offset, bytes)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.mem.zero_range(offset, len)
    }
}

impl ReceivedVm for FakeReceived {
    fn saved_run_state(&self) -> RunState {
        self.run_state
    }
    fn acquire_backends(&self) -> Result<(), VmError> {
        if self.fail_acquire {
            return Err(VmError::BadState("disk d0: another host holds it".into()));
        }
        self.acquired.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn hold(&self, why: String) {
        *self.held.lock().unwrap() = Some(why);
    }
    fn resume(&self) -> Result<(), VmError> {
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn announce(&self) -> Result<usize, VmError> {
        Ok(0)
    }
}

struct Sock(PathBuf);

impl Sock {
    fn new(tag: &str) -> Sock {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Sock(std::env::temp_dir().join(format!("ferry-mt-{tag}-{}-{n}.sock", std::process::id())))
    }
    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.0.clone())
    }
}

/// A destination serving one connection on its own thread.
fn destination(
    sock: &Sock,
    dest: FakeDestination,
) -> std::thread::JoinHandle<Result<Option<Arc<FakeReceived>>, String>> {
    let listener = Listener::bind(&sock.endpoint()).unwrap();
    std::thread::spawn(move || {
        let stream = listener.accept().map_err(|e| e.to_string())?;
        destination::attempt(stream, &dest, &dest_policy(), &AtomicBool::new(false)).map_err(|e| e.to_string())
    })
}

fn options(mode: Mode) -> Options {
    let mut o = Options::new(mode, key());
    o.timeout = Duration::from_secs(10);
    o
}

fn progress() -> crate::progress::Shared {
    Arc::new(Mutex::new(crate::progress::Progress::default()))
}

fn run(vm: &Arc<FakeVm>, sock: &Sock, opts: &Options) -> Result<crate::Figures, Error> {
    let dyn_vm: Arc<dyn MigratableVm> = vm.clone();
    source::migrate(&dyn_vm, &sock.endpoint(), opts, &progress())
}

#[test]
fn a_live_migration_of_a_dirtying_guest_moves_every_byte_and_retires_the_source() {
    let vm = FakeVm::new(Lifecycle::Running, None);
    let dirtier = vm.dirty_from_a_thread(4, 256);
    let sock = Sock::new("live");
    let dest = destination(&sock, FakeDestination::default());
    let figures = run(&vm, &sock, &options(Mode::Live)).expect("migration succeeds");
    let received = dest.join().unwrap().unwrap().expect("a VM arrived");
    vm.stop.store(true, Ordering::Relaxed);
    dirtier.join().unwrap();
    assert_eq!(vm.state(), Lifecycle::Retired);
    assert!(received.running.load(Ordering::SeqCst) && received.acquired.load(Ordering::SeqCst));
    assert!(received.mem.snapshot() == vm.mem.snapshot(), "destination memory equals the paused source's");
    assert!(figures.rounds >= 2, "round 0 and the final round at least: {figures:?}");
    assert!(vm.called("release to fake-b"), "disks handed to the destination's host id");
    assert!(vm.writes.load(Ordering::Relaxed) > 0);
}

#[test]
fn the_guest_pauses_only_once_the_destination_has_applied_what_was_sent() {
    // A destination slower than the link: without CatchUp, the socket
    // buffers would still hold pre-copy pages at the pause, and draining
    // them would be downtime.
    let vm = FakeVm::new(Lifecycle::Running, None);
    vm.mem.0.lock().unwrap().iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8 | 1);
    let sock = Sock::new("catchup");
    let dest = destination(&sock, FakeDestination { slow_sink: Some(vm.clone()), ..Default::default() });
    let figures = run(&vm, &sock, &options(Mode::Live)).expect("migration succeeds");
    let received = dest.join().unwrap().unwrap().expect("a VM arrived");
    assert!(received.mem.snapshot() == vm.mem.snapshot());
    let calls = vm.calls.lock().unwrap().clone();
    let pause = calls.iter().position(|c| c == "pause for the switchover").expect("paused for the switchover");
    let applied_after = calls[pause..].iter().filter(|c| c.starts_with("applied")).count();
    let applied_before = calls[..pause].iter().filter(|c| c.starts_with("applied")).count();
    assert!(applied_before > 0);
    assert_eq!(applied_after, 0, "an idle guest's pages were all applied before the pause: {figures:?}");
    assert!(figures.catch_up_ms > 0.0, "{figures:?}");
}

#[test]
fn a_paused_vm_arrives_paused() {
    let vm = FakeVm::new(Lifecycle::Paused, None);
    let sock = Sock::new("paused");
    let dest = destination(&sock, FakeDestination::default());
    run(&vm, &sock, &options(Mode::Live)).expect("migration succeeds");
    let received = dest.join().unwrap().unwrap().unwrap();
    assert_eq!(received.saved_run_state(), RunState::Paused);
    assert!(!received.running.load(Ordering::SeqCst), "never resumed on the destination");
    assert!(received.acquired.load(Ordering::SeqCst), "but its disks are taken");
    assert!(!vm.called("pause for the switchover"), "a paused VM needs no switchover pause");
    assert!(received.mem.snapshot() == vm.mem.snapshot());
}

#[test]
fn a_guest_that_never_converges_is_cancelled_by_policy_or_forced() {
    for policy in [Policy::Cancel, Policy::Force] {
        let vm = FakeVm::new(Lifecycle::Running, None);
        vm.always_dirty.store(true, Ordering::SeqCst);
        let sock = Sock::new("converge");
        let dest = destination(&sock, FakeDestination::default());
        let mut opts = options(Mode::Live);
        opts.downtime_ms = 0.001;
        opts.max_rounds = 4;
        opts.auto_converge = false;
        opts.policy = policy;
        let result = run(&vm, &sock, &opts);
        let arrived = dest.join().unwrap();
        match policy {
            Policy::Cancel => {
                assert!(matches!(result, Err(Error::Cancelled(_))), "{result:?}");
                assert_eq!(vm.state(), Lifecycle::Running, "the VM keeps running on the source");
                assert!(vm.called("stop dirty log"));
                assert!(arrived.is_err(), "the destination discarded it");
            }
            Policy::Force => {
                let f = result.expect("forced switchover");
                assert!(f.forced && f.rounds >= 4, "{f:?}");
                assert_eq!(vm.state(), Lifecycle::Retired);
            }
        }
    }
}

#[test]
fn auto_converge_throttles_a_guest_whose_dirty_set_does_not_shrink() {
    let vm = FakeVm::new(Lifecycle::Running, None);
    vm.always_dirty.store(true, Ordering::SeqCst);
    let sock = Sock::new("throttle");
    let dest = destination(&sock, FakeDestination::default());
    let mut opts = options(Mode::Live);
    opts.downtime_ms = 0.001;
    // Enough rounds that the throttle thread (20 ms slices) runs while the
    // throttle is up, however fast the fake rounds are.
    opts.max_rounds = 30;
    opts.policy = Policy::Force;
    let f = run(&vm, &sock, &opts).expect("forced switchover");
    let _ = dest.join();
    assert!(f.throttle_pct >= 20, "throttle stepped up: {f:?}");
    assert!(vm.called("throttle the vCPUs"), "the vCPUs were held through the lifecycle");
}

/// Same host (`unix:`): the source passes its memory file, the destination
/// takes that very file, and no memory frame, pre-copy round or dirty log
/// happens; live and quick alike.
#[test]
fn a_same_host_move_passes_the_memory_file_and_copies_no_page() {
    for mode in [Mode::Live, Mode::Quick] {
        let (vm, id) = FakeVm::with_memory_file(Lifecycle::Running, None);
        let sock = Sock::new("shared");
        let dest = destination(&sock, FakeDestination { share: true, ..Default::default() });
        let figures = run(&vm, &sock, &options(mode)).expect("migration succeeds");
        let received = dest.join().unwrap().unwrap().expect("a VM arrived");
        assert_eq!(figures.memory, "shared-fd", "{mode:?}: {figures:?}");
        assert_eq!(received.shared, Some(id), "{mode:?}: the destination got the source's own file");
        assert_eq!((figures.pages_sent, figures.pages_zero), (0, 0), "{mode:?}: {figures:?}");
        assert!(received.mem.snapshot().iter().all(|b| *b == 0), "{mode:?}: no memory frame was sent");
        assert!(figures.dirty_log.is_none() && !vm.logging.load(Ordering::SeqCst), "{mode:?}: no dirty log");
        assert_eq!(vm.state(), Lifecycle::Retired);
        assert!(received.running.load(Ordering::SeqCst));
    }
}

/// A destination that does not take the offer, or cannot map the file, and
/// a source told not to offer (`--no-memfd`), all end in a copy that moves
/// every byte.
#[test]
fn without_a_shared_memory_file_the_move_copies_every_byte() {
    let cases = [
        ("destination does not share", FakeDestination::default(), true),
        ("destination cannot map", FakeDestination { share: true, fail_map: true, ..Default::default() }, true),
        ("source does not offer", FakeDestination { share: true, ..Default::default() }, false),
    ];
    for (why, dest, offer) in cases {
        let (vm, _) = FakeVm::with_memory_file(Lifecycle::Running, None);
        let sock = Sock::new("copied");
        let dest = destination(&sock, dest);
        let mut opts = options(Mode::Live);
        opts.share_memory = offer;
        let figures = run(&vm, &sock, &opts).expect("migration succeeds");
        let received = dest.join().unwrap().unwrap().expect("a VM arrived");
        assert_eq!(figures.memory, "copy", "{why}: {figures:?}");
        assert!(received.shared.is_none(), "{why}");
        assert!(received.mem.snapshot() == vm.mem.snapshot(), "{why}: every byte copied");
        assert!(figures.pages_sent > 0, "{why}: {figures:?}");
    }
}

#[test]
fn every_failure_before_commit_gives_the_vm_back_as_it_was() {
    // Copied and shared memory alike.
    for share in [false, true] {
        failures_before_commit_give_the_vm_back(share);
    }
}

fn failures_before_commit_give_the_vm_back(share: bool) {
    let guest = |before, fail| if share { FakeVm::with_memory_file(before, fail).0 } else { FakeVm::new(before, fail) };
    // Destination-side failures.
    for (tag, dest, expect) in [
        ("refuse", FakeDestination { refuse: true, share, ..Default::default() }, "tap vm0 does not exist"),
        ("restore", FakeDestination { fail_restore: true, share, ..Default::default() }, "injected restore failure"),
    ] {
        let vm = guest(Lifecycle::Running, None);
        let sock = Sock::new(tag);
        let d = destination(&sock, dest);
        let e = run(&vm, &sock, &options(Mode::Live)).unwrap_err();
        assert!(e.to_string().contains(expect), "{tag}: {e}");
        assert!(d.join().unwrap().is_err(), "{tag}: nothing kept on the destination");
        assert_eq!(vm.state(), Lifecycle::Running, "{tag}: running on the source again");
    }
    // Source-side failures, in order of the switchover.
    for step in ["pause", "save", "release"] {
        for before in [Lifecycle::Running, Lifecycle::Paused] {
            let vm = guest(before, Some(step));
            let sock = Sock::new(step);
            let d = destination(&sock, FakeDestination { share, ..Default::default() });
            let e = run(&vm, &sock, &options(Mode::Quick));
            let paused_skips_pause = step == "pause" && before == Lifecycle::Paused;
            if paused_skips_pause {
                assert!(e.is_ok(), "a paused VM is never paused again");
                continue;
            }
            assert!(e.unwrap_err().to_string().contains(step), "{step}");
            assert!(d.join().unwrap().is_err(), "{step}: the destination discarded the VM");
            assert_eq!(vm.state(), before, "{step}: the source has the VM as it was");
            assert!(!vm.called("retire"), "{step}");
        }
    }
}

/// A destination that speaks the protocol by hand up to `until`, then
/// vanishes (or aborts).
fn rogue_destination(sock: &Sock, until: &'static str) -> std::thread::JoinHandle<()> {
    let listener = Listener::bind(&sock.endpoint()).unwrap();
    std::thread::spawn(move || {
        let stream = listener.accept().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut s = Duplex::new(crate::secure::accept(stream, &key(), deadline).unwrap());
        let _hello = wire::read_frame(&mut s).unwrap();
        wire::send(&mut s, Kind::HelloAck, &wire::Ack { host_id: "rogue".into() }).unwrap();
        s.flush().unwrap();
        loop {
            let f = wire::read_frame(&mut s).unwrap();
            if f.kind == Kind::State {
                break;
            }
        }
        match until {
            "abort-before-ready" => {
                wire::send(&mut s, Kind::Abort, &wire::Reason { reason: "no room".into() }).unwrap();
                s.flush().unwrap();
            }
            "vanish-before-ready" => {}
            "vanish-after-commit" => {
                wire::write_frame(&mut s, Kind::Ready, &[]).unwrap();
                s.flush().unwrap();
                let commit = wire::read_frame(&mut s).unwrap();
                assert_eq!(commit.kind, Kind::Commit);
            }
            other => panic!("unknown step {other}"),
        }
    })
}

#[test]
fn a_destination_that_fails_before_ready_leaves_the_source_running() {
    for until in ["abort-before-ready", "vanish-before-ready"] {
        let vm = FakeVm::new(Lifecycle::Running, None);
        let sock = Sock::new(until);
        let d = rogue_destination(&sock, until);
        let e = run(&vm, &sock, &options(Mode::Live)).unwrap_err();
        d.join().unwrap();
        assert!(!matches!(e, Error::Uncertain(_)), "{until}: {e}");
        assert_eq!(vm.state(), Lifecycle::Running, "{until}");
    }
}

#[test]
fn a_destination_lost_after_commit_leaves_the_source_retired_never_running() {
    let vm = FakeVm::new(Lifecycle::Running, None);
    let sock = Sock::new("after-commit");
    let d = rogue_destination(&sock, "vanish-after-commit");
    let e = run(&vm, &sock, &options(Mode::Live)).unwrap_err();
    d.join().unwrap();
    assert!(matches!(e, Error::Uncertain(_)), "{e}");
    assert_eq!(vm.state(), Lifecycle::Retired, "the source never runs it again");
    assert!(vm.state().next(Action::Resume).is_err());
}

/// A quick migration's `Hello` for a one-vCPU guest of `mem_bytes`.
fn quick_hello(mem_bytes: u64) -> wire::Hello {
    wire::Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        mode: Mode::Quick,
        requirements: Requirements {
            mem_bytes,
            vcpus: 1,
            nics: Vec::new(),
            disks: Vec::new(),
            guest_cpuid: Vec::new(),
            tsc_khz: 0,
        },
        check_only: false,
        switchover_timeout_ms: 1000,
    }
}

/// A source by hand: handshake, one page of 7s and the state, up to the
/// destination's `Ready`.
fn source_until_ready(sock: &Sock) -> Duplex {
    let stream = crate::transport::connect(&sock.endpoint(), Duration::from_secs(5)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut s = Duplex::new(crate::secure::connect(stream, &key(), deadline).unwrap());
    let hello = quick_hello(16 * PAGE_SIZE);
    wire::send(&mut s, Kind::Hello, &hello).unwrap();
    s.flush().unwrap();
    assert_eq!(wire::read_frame(&mut s).unwrap().kind, Kind::HelloAck);
    wire::write_frame(&mut s, Kind::MemData, &wire::mem_data_payload(PAGE_SIZE, &[7; 4096])).unwrap();
    wire::write_frame(&mut s, Kind::State, &serde_json::to_vec(&RunState::Running).unwrap()).unwrap();
    s.flush().unwrap();
    assert_eq!(wire::read_frame(&mut s).unwrap().kind, Kind::Ready);
    s
}

/// A source that passes its memory file and then sends pages anyway: the
/// file is the source's live memory until the commit, so the destination
/// refuses and keeps nothing.
#[test]
fn memory_frames_after_the_memory_file_passed_are_refused() {
    use std::os::fd::AsFd;
    let sock = Sock::new("shared-then-pages");
    let dest = destination(&sock, FakeDestination { share: true, ..Default::default() });
    let stream = crate::transport::connect(&sock.endpoint(), Duration::from_secs(5)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut s = Duplex::new(crate::secure::connect(stream, &key(), deadline).unwrap());
    let file = memory_file();
    let hello = quick_hello(PAGES * PAGE_SIZE);
    let offer = wire::HelloExt { shared_memory: Some(wire::MemFdId::of(&file).unwrap()), streams: 1 };
    wire::send_with_ext(&mut s, Kind::Hello, &hello, &offer).unwrap();
    s.flush().unwrap();
    let ack = wire::read_frame(&mut s).unwrap();
    let (_, ext): (wire::Ack, wire::AckExt) = wire::decode_with_ext(ack.kind, &ack.payload).unwrap();
    assert!(ext.shared_memory, "the destination takes the offer");
    s.writer.send_fd(file.as_fd()).unwrap();
    let verdict: wire::MemFdVerdict = wire::read_frame(&mut s).unwrap().decode().unwrap();
    assert!(verdict.mapped, "{}", verdict.reason);
    wire::write_frame(&mut s, Kind::MemData, &wire::mem_data_payload(PAGE_SIZE, &[7; 4096])).unwrap();
    s.flush().unwrap();
    let Err(e) = dest.join().unwrap() else { panic!("the destination kept a VM") };
    assert!(e.contains("memory is shared"), "{e}");
}

#[test]
fn a_source_lost_after_commit_leaves_the_vm_running_on_the_destination() {
    let sock = Sock::new("source-gone");
    let dest = destination(&sock, FakeDestination::default());
    // A source that commits and vanishes without waiting for Resumed.
    let mut s = source_until_ready(&sock);
    wire::write_frame(&mut s, Kind::Commit, &[]).unwrap();
    s.flush().unwrap();
    drop(s);
    let vm = dest.join().unwrap().unwrap().expect("the committed VM is kept");
    assert!(vm.running.load(Ordering::SeqCst), "and runs, whatever happened to the connection");
    let mut page = [0u8; 4096];
    vm.mem.read_at(PAGE_SIZE, &mut page).unwrap();
    assert_eq!(page, [7; 4096]);
}

#[test]
fn a_cancel_request_stops_the_migration_before_its_commit() {
    let vm = FakeVm::new(Lifecycle::Running, None);
    let dirtier = vm.dirty_from_a_thread(400, PAGES);
    let sock = Sock::new("cancel");
    let dest = destination(&sock, FakeDestination::default());
    let mut opts = options(Mode::Live);
    // 2 MiB of data at 1 MiB/s: the cancel lands in round 0.
    opts.max_bandwidth_mib_s = Some(1.0);
    let cancel = opts.cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        cancel.store(true, Ordering::SeqCst);
    });
    let e = run(&vm, &sock, &opts).unwrap_err();
    canceller.join().unwrap();
    let _ = dest.join();
    vm.stop.store(true, Ordering::Relaxed);
    dirtier.join().unwrap();
    assert!(matches!(e, Error::CancelledByRequest), "{e}");
    assert_eq!(vm.state(), Lifecycle::Running);
}

fn write_key_file(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(p);
    std::fs::write(p, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A key file others can read (or write) is refused, naming the fix; the
/// owner's own (group-readable at most) is accepted.
#[test]
fn an_exposed_key_file_is_refused() {
    let p = std::env::temp_dir().join(format!("ferry-migrate-exposed-{}.key", std::process::id()));
    for mode in [0o644, 0o606, 0o620] {
        write_key_file(&p, mode);
        let e = Key::load(&p).err().expect("refused");
        assert!(e.to_string().contains(&format!("mode {mode:04o}")) && e.to_string().contains("chmod 600"), "{e}");
    }
    for mode in [0o600, 0o640, 0o400] {
        write_key_file(&p, mode);
        assert!(Key::load(&p).is_ok(), "mode {mode:o}");
    }
    let _ = std::fs::remove_file(&p);
}

fn dest_policy() -> DestPolicy {
    DestPolicy {
        key: key(),
        cpu: CpuPolicy::default(),
        commit_oracle: None,
        records: crate::secure::Records::Sealed,
        share_memory: true,
    }
}

/// A receiver serving many connections (as `ferry receive` does) until a VM
/// arrives or `stop` is raised.
fn receiver(
    sock: &Sock,
    dest: FakeDestination,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<Arc<FakeReceived>>> {
    let listener = Listener::bind(&sock.endpoint()).unwrap();
    std::thread::spawn(move || destination::receive(&listener, Arc::new(dest), Arc::new(dest_policy()), &stop))
}

/// Guest memory that is data everywhere, so every stripe carries pages.
fn fill(vm: &FakeVm) {
    vm.mem.0.lock().unwrap().iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8 | 1);
}

#[test]
fn memory_moves_over_several_streams_in_every_round_and_arrives_whole() {
    for mode in [Mode::Live, Mode::Quick] {
        let vm = FakeVm::new(Lifecycle::Running, None);
        fill(&vm);
        let dirtier = vm.dirty_from_a_thread(4, 256);
        let sock = Sock::new("streams");
        let stop = Arc::new(AtomicBool::new(false));
        let dest = receiver(&sock, FakeDestination::default(), stop.clone());
        let mut opts = options(mode);
        opts.streams = 3;
        let figures = run(&vm, &sock, &opts).expect("migration succeeds");
        let received = dest.join().unwrap().expect("a VM arrived");
        vm.stop.store(true, Ordering::Relaxed);
        dirtier.join().unwrap();
        assert_eq!(figures.streams, 3, "{figures:?}");
        assert_eq!(vm.state(), Lifecycle::Retired);
        assert!(received.running.load(Ordering::SeqCst));
        assert!(received.mem.snapshot() == vm.mem.snapshot(), "{mode:?}: destination memory equals the source's");
        if mode == Mode::Live {
            assert!(figures.rounds >= 2, "{figures:?}");
        }
    }
}

#[test]
fn a_bandwidth_cap_holds_for_all_streams_together() {
    // 4 MiB in 1 MiB stripes over 3 streams: the first carries two of
    // them. Each stream gets a third of the cap, the first one included.
    let vm = FakeVm::new(Lifecycle::Running, None);
    fill(&vm);
    let sock = Sock::new("streams-cap");
    let stop = Arc::new(AtomicBool::new(false));
    let dest = receiver(&sock, FakeDestination::default(), stop.clone());
    let mut opts = options(Mode::Live);
    opts.streams = 3;
    opts.max_bandwidth_mib_s = Some(8.0);
    let figures = run(&vm, &sock, &opts).expect("migration succeeds");
    dest.join().unwrap().expect("a VM arrived");
    assert_eq!(figures.streams, 3);
    assert!(figures.round0_mib_s <= 8.0 * 1.05, "the cap holds in round 0: {figures:?}");
}

#[test]
fn a_lone_destination_connection_takes_one_stream() {
    // `attempt` on its own (an older receiver's shape) has nobody to hand
    // extra streams to: it agrees to one, and the move works.
    let vm = FakeVm::new(Lifecycle::Running, None);
    fill(&vm);
    let sock = Sock::new("one-stream");
    let dest = destination(&sock, FakeDestination::default());
    let mut opts = options(Mode::Live);
    opts.streams = 4;
    let figures = run(&vm, &sock, &opts).expect("migration succeeds");
    let received = dest.join().unwrap().unwrap().expect("a VM arrived");
    assert_eq!(figures.streams, 1);
    assert!(received.mem.snapshot() == vm.mem.snapshot());
}

#[test]
fn a_memory_stream_dying_mid_round_leaves_the_vm_running_on_the_source() {
    // Stripe 2 (bytes 2-3 MiB) travels on stream 2 of 3: its receiver
    // fails there, in round 0, and every stream is cut.
    let vm = FakeVm::new(Lifecycle::Running, None);
    fill(&vm);
    let sock = Sock::new("stream-dies");
    let stop = Arc::new(AtomicBool::new(false));
    let dest = receiver(&sock, FakeDestination { fail_write_at: Some(2 << 20), ..Default::default() }, stop.clone());
    let mut opts = options(Mode::Live);
    opts.streams = 3;
    let started = std::time::Instant::now();
    let result = run(&vm, &sock, &opts);
    assert!(result.is_err(), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "no stream waits out its timeout");
    assert_eq!(vm.state(), Lifecycle::Running, "the VM keeps running on the source");
    assert!(vm.called("stop dirty log"));
    assert!(!vm.called("pause for the switchover"), "it never paused");
    stop.store(true, Ordering::SeqCst);
    assert!(dest.join().unwrap().is_none(), "nothing was kept on the destination");
}

/// A receiver asked to stop while it only waits ends at once, with no VM.
#[test]
fn a_waiting_receiver_stops_when_asked() {
    let sock = Sock::new("stop-idle");
    let listener = Listener::bind(&sock.endpoint()).unwrap();
    let stop = AtomicBool::new(true);
    let dest = Arc::new(FakeDestination::default());
    let started = std::time::Instant::now();
    assert!(destination::receive(&listener, dest, Arc::new(dest_policy()), &stop).is_none());
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Asked to stop after it sent `Ready`, a receiver does not walk away from
/// a VM the source may be committing: it waits for the verdict and keeps
/// the committed VM.
#[test]
fn a_stop_after_ready_waits_for_the_commit_and_keeps_the_vm() {
    let sock = Sock::new("stop-ready");
    let listener = Listener::bind(&sock.endpoint()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let dest = Arc::new(FakeDestination::default());
            destination::receive(&listener, dest, Arc::new(dest_policy()), &stop)
        })
    };
    let mut s = source_until_ready(&sock);
    stop.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!receiver.is_finished(), "the receiver waits for the verdict");
    wire::write_frame(&mut s, Kind::Commit, &[]).unwrap();
    s.flush().unwrap();
    let vm = receiver.join().unwrap().expect("the committed VM is returned");
    assert!(vm.running.load(Ordering::SeqCst));
}

/// A VM committed here whose disks cannot be taken is kept, paused and
/// held with the reason (what `vm.info` shows), never dropped or run.
#[test]
fn a_committed_vm_whose_disks_cannot_be_taken_stays_here_paused_and_held() {
    let sock = Sock::new("held");
    let dest = destination(&sock, FakeDestination { fail_acquire: true, ..Default::default() });
    let mut s = source_until_ready(&sock);
    wire::write_frame(&mut s, Kind::Commit, &[]).unwrap();
    s.flush().unwrap();
    let vm = dest.join().unwrap().unwrap().expect("the committed VM is kept");
    assert!(!vm.running.load(Ordering::SeqCst), "it does not run without its disks");
    let held = vm.held.lock().unwrap().clone().expect("held for an operator");
    assert!(held.contains("another host holds it"), "{held}");
}
