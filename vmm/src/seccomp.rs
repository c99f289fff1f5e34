//! seccomp-bpf confinement, one filter per thread kind, compiled with
//! rust-vmm's `seccompiler` (Firecracker's approach): each thread installs
//! its kind's filter as its first act, so a vCPU thread is confined before
//! its first KVM_RUN. A syscall outside the filter raises SIGSYS; the
//! handler here writes which thread kind made which syscall (number and
//! name) and ends the process with [`EXIT_BAD_SYSCALL`].
//!
//! The lists allow syscalls by number only (no argument filtering). They
//! were taken from what each thread kind really does (`strace -f` over the
//! whole `make test`; see README, "seccomp"). A filter is inherited by the
//! threads its thread starts, and stacking only narrows, so a list names
//! what its thread's children use too: the migration thread on a
//! destination builds the VM and starts its vCPU, device and lease
//! threads, so its list contains theirs; the API's connection threads run
//! `vm.snapshot` and the source side of `vm.migrate`.
//!
//! Off until [`enable`] is called (the `ferry` binary does, unless
//! `--seccomp off`): a library user or unit test is not confined.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// How the process ends when a thread makes a syscall its filter does not
/// allow: 128 + SIGSYS, as a shell reports a death by SIGSYS.
pub const EXIT_BAD_SYSCALL: i32 = 128 + libc::SIGSYS;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filter for {kind}: unknown syscall {name}")]
    UnknownSyscall { kind: &'static str, name: &'static str },
    #[error("cannot compile the seccomp filter for {kind}: {reason}")]
    Compile { kind: &'static str, reason: String },
    #[error("cannot install the {kind} seccomp filter: {reason}")]
    Install { kind: &'static str, reason: String },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The kinds of thread a VMM runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// `vcpuN`: KVM_RUN and the exits it handles (port I/O, MMIO).
    Vcpu,
    /// `devices`: the virtio event loop (taps, disk images, eventfds).
    Devices,
    /// `api`, `api-conn`: the API socket and the requests it serves.
    Api,
    /// `migration-in`: an incoming migration, which builds the VM.
    Migration,
    /// `lease-keeper`: renews a shared-volume disk's lease.
    LeaseKeeper,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] =
        [ThreadKind::Vcpu, ThreadKind::Devices, ThreadKind::Api, ThreadKind::Migration, ThreadKind::LeaseKeeper];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Api => "api",
            ThreadKind::Migration => "migration",
            ThreadKind::LeaseKeeper => "lease-keeper",
        }
    }

    /// Every syscall the kind's filter allows, by name (sorted, unique).
    pub fn syscalls(self) -> Vec<&'static str> {
        let mut all: Vec<&'static str> = COMMON.to_vec();
        match self {
            ThreadKind::Vcpu => all.extend(VCPU),
            ThreadKind::Devices => all.extend(DEVICES),
            ThreadKind::LeaseKeeper => all.extend(LEASE_KEEPER),
            ThreadKind::Api => {
                all.extend(API);
                all.extend(LEASE_KEEPER);
            }
            ThreadKind::Migration => {
                all.extend(MIGRATION);
                all.extend(VCPU);
                all.extend(DEVICES);
                all.extend(LEASE_KEEPER);
            }
        }
        all.sort_unstable();
        all.dedup();
        all
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// The lists, as `scripts/seccomp-trace.sh` found them over the whole
// end-to-end suite (README, "seccomp"); keep each sorted.

/// Every thread: memory, locks, sleeps and time, signal returns (the
/// vCPU kick), its own end, and what the SIGSYS report needs (write,
/// exit_group). A few here are on rarer paths of std and glibc than the
/// suite took (brk, mremap, nanosleep, restart_syscall, sched_yield,
/// clock_gettime when the vDSO cannot answer).
const COMMON: &[&str] = &[
    "brk",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "exit",
    "exit_group",
    "futex",
    "getpid",
    "gettid",
    "madvise",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "restart_syscall",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "sigaltstack",
    "write",
];

/// KVM_RUN and the exits it serves: the serial console, virtio-blk
/// requests (a queue notify is handled on the vCPU that wrote it).
// fallocate, ftruncate: imago under O_DIRECT zeroes a new qcow2 cluster's
// unwritten part by fallocate (zero range) and grows the file by ftruncate.
const VCPU: &[&str] =
    &["fallocate", "fdatasync", "fsync", "ftruncate", "ioctl", "pread64", "preadv", "pwrite64", "pwritev", "read"];

/// The event loop: epoll, the taps and its wake eventfd, and with
/// `--virtio-notify ioeventfd` the queues' work: virtio-blk requests (the
/// vCPU's disk calls) and the notify eventfds.
// epoll_ctl: a tap whose guest queue is full (or not set up yet, right
// after a boot while traffic arrives) is taken out of epoll and put back;
// no trace had shown it, a failover restart under pings did; and the
// notify eventfds are disarmed while the VM is paused. write: the loop's
// wake eventfd.
const DEVICES: &[&str] = &[
    "epoll_ctl",
    "epoll_wait",
    "fallocate",
    "fdatasync",
    "fsync",
    "ftruncate",
    "pread64",
    "preadv",
    "pwrite64",
    "pwritev",
    "read",
    "write",
];

/// Lease renewals: the lease file rewritten by rename, under a lock
/// (unlink: a failed write's temporary file).
const LEASE_KEEPER: &[&str] = &["fcntl", "fsync", "lseek", "openat", "read", "rename", "statx", "unlink"];

/// The socket and its connection threads (started here: clone3, rseq,
/// set_robust_list and the naming prctl run under this filter, and so
/// does the seccomp call of a lease keeper restarted from here), vm.pause
/// (tgkill kicks the vCPUs), vm.snapshot (files, KVM state ioctls) and
/// the source side of vm.migrate (TCP, getrandom for the handshake, the
/// throttle thread).
const API: &[&str] = &[
    "accept4",
    "clone3",
    "connect",
    "fcntl",
    "fdatasync",
    "flock",
    "fsync",
    "ftruncate",
    "getrandom",
    "getsockopt",
    "ioctl",
    "lseek",
    // A migration sender reads resident guest pages from the mapping.
    "mincore",
    "mkdir",
    "openat",
    "poll",
    "prctl",
    "pread64",
    "pwrite64",
    "read",
    "recvfrom",
    "rename",
    "rseq",
    "seccomp",
    // A same-host move passes the guest memory's memfd (SCM_RIGHTS).
    "sendmsg",
    "sendto",
    "set_robust_list",
    "setsockopt",
    "shutdown",
    "socket",
    "statx",
    "tgkill",
];

/// An incoming migration: the encrypted stream, then building the VM
/// (guest memory in a memfd, zero ranges punched with fallocate, the KVM
/// VM, taps and disks, the device loop's epoll and eventfds, the vCPU
/// kick handler) and starting its threads, which install their own
/// filters (prctl, seccomp) under this one.
const MIGRATION: &[&str] = &[
    "clone3",
    // The commit oracle (a Unix socket to the cluster agent), asked when
    // the Commit frame never came: rare, so no trace shows it.
    "connect",
    "epoll_create1",
    "epoll_ctl",
    "eventfd2",
    "fallocate",
    "fcntl",
    "flock",
    "fstatfs",
    "ftruncate",
    "getpeername",
    "getrandom",
    "getsockopt",
    "ioctl",
    "lseek",
    "memfd_create",
    "openat",
    "prctl",
    "pread64",
    "preadv",
    "pwrite64",
    "read",
    "readlink",
    "recvfrom",
    // A same-host move: the source's memfd arrives in SCM_RIGHTS.
    "recvmsg",
    "rseq",
    "rt_sigaction",
    "seccomp",
    "sendto",
    "set_robust_list",
    "setsockopt",
    "shutdown",
    "socket",
    "statx",
    // A received VM dropped before the commit (refused, aborted) stops
    // its vCPU threads, kicking any still inside KVM_RUN.
    "tgkill",
];

struct Compiled {
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Compiled> = OnceLock::new();

thread_local! {
    /// This thread's kind, once confined: what the SIGSYS report names.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
    /// The kind a thread from [`spawn`] is about to become: until then it
    /// runs under the filter of the thread that started it.
    static STARTING: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

fn number(kind: ThreadKind, name: &'static str) -> Result<i64, Error> {
    name.parse::<syscalls::Sysno>()
        .map(|s| s.id() as i64)
        .map_err(|_| Error::UnknownSyscall { kind: kind.name(), name })
}

/// Compiles `kind`'s filter: its syscalls allowed, anything else trapped.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let mut rules = BTreeMap::new();
    for name in kind.syscalls() {
        rules.insert(number(kind, name)?, Vec::new());
    }
    let compile = |reason: String| Error::Compile { kind: kind.name(), reason };
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| compile(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| compile(e.to_string()))
}

/// Turns confinement on for this process: compiles every filter and
/// installs the SIGSYS handler. Threads started afterwards install their
/// kind's filter in [`apply`]. Call once, before the VM's threads start.
pub fn enable() -> Result<(), Error> {
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        programs.insert(kind, compile(kind)?);
    }
    prime_heap_trim();
    install_sigsys_handler()?;
    let _ = FILTERS.set(Compiled { programs });
    Ok(())
}

/// glibc opens /proc/sys/vm/overcommit_memory the first time any thread's
/// malloc arena is trimmed (once per process, cached), which would kill a
/// confined thread that frees enough at the wrong moment (a vCPU thread
/// after O_DIRECT bounce buffers, at its exit). So that first time happens
/// here, before any filter: a thread of its own fills its arena with blocks
/// under the mmap threshold and frees them, and the arena is trimmed.
fn prime_heap_trim() {
    let primer = std::thread::spawn(|| {
        let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
        std::hint::black_box(&blocks);
        drop(blocks);
    });
    let _ = primer.join();
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Confines the calling thread to `kind`'s filter (nothing if confinement
/// is off). Irrevocable for this thread and the threads it starts.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let Some(compiled) = FILTERS.get() else {
        return Ok(());
    };
    let program = &compiled.programs[&kind];
    seccompiler::apply_filter(program).map_err(|e| Error::Install { kind: kind.name(), reason: e.to_string() })?;
    KIND.with(|k| k.set(Some(kind)));
    Ok(())
}

/// Records that the calling thread runs under `kind`'s filter inherited
/// from the thread that started it (what a SIGSYS report then names).
pub fn inherited(kind: ThreadKind) {
    if enabled() {
        KIND.with(|k| k.set(Some(kind)));
    }
}

/// Each kind's filter size: syscalls allowed and BPF instructions.
pub fn sizes() -> Result<Vec<(ThreadKind, usize, usize)>, Error> {
    ThreadKind::ALL.iter().map(|&k| Ok((k, k.syscalls().len(), compile(k)?.len()))).collect()
}

/// Where the trapped syscall's number sits in a SIGSYS siginfo_t on
/// x86_64: after si_signo, si_errno, si_code, padding and si_call_addr.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler;
    // for SIGSYS its _sigsys member holds the syscall number at this offset.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32) };
    let name = syscalls::Sysno::new(nr as usize).map(|s| s.name()).unwrap_or("unknown");
    let (kind, inherited) = match (KIND.with(|k| k.get()), STARTING.with(|k| k.get())) {
        (Some(k), _) => (k.name(), false),
        (None, Some(k)) => (k.name(), true),
        (None, None) => ("unnamed", true),
    };
    // Formatted into a stack buffer: no allocation in a signal handler.
    let mut buf = [0u8; 320];
    let mut w = Cursor { buf: &mut buf, len: 0 };
    w.put(b"ferry: seccomp: the ");
    w.put(kind.as_bytes());
    let whose: &[u8] = if inherited { b" thread, under the filter of the thread that started it," } else { b" thread" };
    w.put(whose);
    w.put(b" made syscall ");
    w.put(name.as_bytes());
    w.put(b" (");
    w.num(nr);
    w.put(b"), which its filter does not allow; the VMM stops (run with --seccomp off to debug)\n");
    let len = w.len;
    // SAFETY: write(2) and _exit(2) are async-signal-safe; buf outlives the call.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn num(&mut self, n: i32) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.put(b"-");
        }
        self.put(&digits[i..]);
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid; we fill in a handler with the
    // SA_SIGINFO signature and an empty mask before passing it to the kernel.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Starts a thread of `kind` named `name` that installs its filter before
/// it runs `f`; returns once the filter is in place (or with why not, in
/// which case `f` never runs).
pub fn spawn<F>(name: String, kind: ThreadKind, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        STARTING.with(|k| k.set(Some(kind)));
        let confined = apply(kind);
        let ok = confined.is_ok();
        let _ = tx.send(confined);
        if ok {
            f();
        }
    })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(std::io::Error::other(e.to_string()))
        }
        Err(_) => Err(std::io::Error::other(format!("the {kind} thread died before its seccomp filter was in place"))),
    }
}

/// A thread started and confined ahead of the work it will run: a
/// migration destination starts its VM's threads while memory arrives, so
/// that starting them (a cross-CPU round trip each, and the filter's
/// install) is not inside the downtime.
pub struct Waiting {
    work: std::sync::mpsc::SyncSender<Box<dyn FnOnce() + Send>>,
    handle: std::thread::JoinHandle<()>,
}

impl Waiting {
    /// Starts a thread of `kind` named `name` that waits for its work.
    /// Dropped unused, it ends.
    pub fn spawn(name: String, kind: ThreadKind) -> std::io::Result<Waiting> {
        let (work, rx) = std::sync::mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(1);
        let handle = spawn(name, kind, move || {
            if let Ok(f) = rx.recv() {
                f()
            }
        })?;
        Ok(Waiting { work, handle })
    }

    /// Runs `f` on the thread; its handle, as `spawn` would give.
    pub fn run(self, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
        // The thread waits in `recv` until this (or the drop of `work`).
        let _ = self.work.send(Box::new(f));
        self.handle
    }
}

#[cfg(test)]
mod tests;
