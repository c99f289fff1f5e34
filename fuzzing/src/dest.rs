//! The destination's side of a migration fed an arbitrary source: after a
//! real (plain-records) handshake over a socket pair, the input is the
//! byte stream the source sends, and `migrate::destination::attempt` runs
//! its whole state machine on it: hello and preflight (this host's real
//! checks: host id, memory size, taps, disks), memory frames into real
//! guest RAM, the state decoded and checked as a restore would
//! (`vmm::builder::check_restorable`), the commit wait. Only building the
//! KVM VM is left out (a fuzz input per millisecond needs no /dev/kvm).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use migrate::auth::Key;
use migrate::destination::{self, Policy};
use migrate::preflight::CpuPolicy;
use migrate::secure::{self, Records, Suite};
use migrate::transport::Stream;
use vmm::memory::GuestRam;
use vmm::migration::{
    Destination, Error as VmError, HostOffer, IncomingVm, KvmDestination, MemorySink, ReceivedVm, Requirements,
    RunState,
};
use vmm::state::devices::BackendSnapshot;
use vmm::state::VmState;

/// Guest RAM the fuzz destination agrees to hold.
const MAX_MEM_MIB: u64 = 16;
/// Input beyond this is not sent (it would not fit the socket buffers the
/// source side writes into before the destination reads).
const MAX_INPUT: usize = 128 << 10;

/// A host whose preflight is `KvmDestination`'s own, receiving into RAM
/// without a KVM VM.
struct FuzzDestination {
    real: KvmDestination,
}

struct FuzzIncoming {
    req: Requirements,
    ram: GuestRam,
}

/// A received VM that never runs (it reports Paused, so nothing announces).
struct FuzzVm;

impl Destination for FuzzDestination {
    type Incoming = FuzzIncoming;
    type Vm = FuzzVm;
    fn host_id(&self) -> &str {
        self.real.host_id()
    }
    fn offer(&self) -> Result<HostOffer, VmError> {
        Ok(HostOffer { cpuid: Vec::new(), tsc_khz: 0, tsc_scaling: false })
    }
    fn check_backends(&self, req: &Requirements, shared_memory: bool) -> Vec<String> {
        let mut problems = self.real.check_backends(req, shared_memory);
        if req.mem_bytes >> 20 > MAX_MEM_MIB {
            problems.push("more memory than the fuzz destination holds".into());
        }
        problems
    }
    fn prepare(&self, req: &Requirements) -> Result<FuzzIncoming, VmError> {
        Ok(FuzzIncoming { req: req.clone(), ram: vmm::memory::create(req.mem_bytes >> 20)? })
    }
}

impl IncomingVm for FuzzIncoming {
    type Vm = FuzzVm;
    fn memory(&self) -> &dyn MemorySink {
        &self.ram
    }
    fn restore(self, state: &[u8]) -> Result<Arc<FuzzVm>, VmError> {
        let state = VmState::decode(state).map_err(|e| VmError::BadState(e.to_string()))?;
        // What this host would have opened for the requirements it accepted.
        let mut here: Vec<BackendSnapshot> =
            self.req.nics.iter().map(|&mac| BackendSnapshot::Net { tap: "tap0".into(), mac }).collect();
        here.extend(self.req.disks.iter().map(|d| BackendSnapshot::Block {
            path: d.disk.path.clone(),
            sectors: d.size_bytes / 512,
            readonly: false,
        }));
        vmm::builder::check_restorable(&state.machine, &state, self.ram.size, &here)
            .map_err(|e| VmError::BadState(e.to_string()))?;
        Ok(Arc::new(FuzzVm))
    }
}

impl ReceivedVm for FuzzVm {
    fn saved_run_state(&self) -> RunState {
        RunState::Paused
    }
    fn acquire_backends(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn hold(&self, _why: String) {}
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn announce(&self) -> Result<usize, VmError> {
        Ok(0)
    }
}

/// A fixed key, through a 0600 file as `Key::load` wants.
fn key() -> Key {
    static KEY: OnceLock<Key> = OnceLock::new();
    KEY.get_or_init(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let path = super::scratch().join("fuzz.key");
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).expect("key");
        f.write_all(&[0x5a; 32]).expect("key");
        Key::load(&path).expect("fuzz key")
    })
    .clone()
}

/// The source end's work: handshake, send the input, hold the connection
/// open until the destination is done (`done`), then drop it.
struct Job {
    stream: Stream,
    input: Vec<u8>,
    done: Receiver<()>,
}

/// One long-lived thread plays every input's source (a thread per input
/// trips libFuzzer's leak check on thread-local destructors).
fn source_thread() -> &'static Sender<Job> {
    static TX: OnceLock<Sender<Job>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fuzz-source".into())
            .spawn(move || {
                for job in rx {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let suite = Suite { records: Records::Plain, ..Suite::default() };
                    if let Ok((reader, mut writer)) = secure::connect_with(job.stream, &key(), deadline, suite) {
                        // Whatever the destination answers (a CatchUp per
                        // one in the input, say) is read and dropped, so it
                        // never blocks on a full socket.
                        let _ = drain_thread().send(reader);
                        let _ = writer.write_all(&job.input);
                        let _ = writer.finish();
                        let _ = job.done.recv();
                    }
                }
            })
            .expect("fuzz source thread");
        tx
    })
}

/// One long-lived thread reads each input's answers to their end.
fn drain_thread() -> &'static Sender<secure::SecureReader> {
    static TX: OnceLock<Sender<secure::SecureReader>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<secure::SecureReader>();
        std::thread::Builder::new()
            .name("fuzz-drain".into())
            .spawn(move || {
                let mut sink = [0u8; 4096];
                for mut reader in rx {
                    while matches!(std::io::Read::read(&mut reader, &mut sink), Ok(n) if n > 0) {}
                }
            })
            .expect("fuzz drain thread");
        tx
    })
}

/// Input: the plaintext the source sends after the handshake (wire frames:
/// Hello, memory, State, Commit...).
pub fn fuzz_destination_stream(data: &[u8]) {
    let _ = destination_outcome(data);
}

/// What the destination made of `data`: `Ok(true)` a VM committed here,
/// `Ok(false)` a check-only preflight passed, else why the attempt failed.
pub fn destination_outcome(data: &[u8]) -> Result<bool, String> {
    let (source, dest_end) = Stream::pair().map_err(|e| e.to_string())?;
    let (done_tx, done_rx): (SyncSender<()>, Receiver<()>) = mpsc::sync_channel(1);
    let input = data[..data.len().min(MAX_INPUT)].to_vec();
    source_thread().send(Job { stream: source, input, done: done_rx }).map_err(|e| e.to_string())?;
    let host = vmm::HostConfig {
        host_id: "fuzz-b".into(),
        disk_roots: vec![super::scratch().to_path_buf()],
        ..vmm::HostConfig::default()
    };
    let dest = FuzzDestination { real: KvmDestination { host } };
    // Memory always arrives in frames here (this destination maps no
    // passed memory file): those are what the fuzzer feeds.
    let policy = Policy {
        key: key(),
        cpu: CpuPolicy::default(),
        commit_oracle: None,
        records: Records::Plain,
        share_memory: false,
    };
    let outcome = destination::attempt(dest_end, &dest, &policy, &AtomicBool::new(false));
    let _ = done_tx.send(());
    outcome.map(|vm| vm.is_some()).map_err(|e| e.to_string())
}
