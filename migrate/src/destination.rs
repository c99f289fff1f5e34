//! Receiving a VM: authenticate the source, run the preflight, take memory
//! and state, restore paused with disks in standby, and run the VM only
//! after the source's commit (and only if it was running there). It builds
//! the VM only through a [`Destination`].
//!
//! After `Commit` the VM is this host's whatever happens to the
//! connection: a lost `Resumed` or a vanished source is logged, never a
//! reason to stop the guest. If the disks cannot be taken after the
//! commit, the VM stays paused here, holding what it could, and says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::migration::{Destination, IncomingVm, ReceivedVm, Requirements, RunState};

use crate::auth::Key;
use crate::preflight::{self, CpuPolicy};
use crate::secure::{self, Duplex};
use crate::transport::{Listener, Stream};
use crate::wire::{self, Hello, Kind, Reason, ZeroRange, PROTOCOL_VERSION};
use std::io::Write;

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Authentication and the hello must come this quickly.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Secure(#[from] secure::Error),
    #[error("refused the migration: {0}")]
    Refused(String),
    #[error("source aborted: {0}")]
    SourceAborted(String),
    #[error(transparent)]
    Wire(#[from] wire::Error),
    #[error(transparent)]
    Vm(#[from] vmm::migration::Error),
}

/// How this host judges incoming migrations.
pub struct Policy {
    pub key: Key,
    pub cpu: CpuPolicy,
    /// Asked when the commit does not arrive after `Ready` (see [`oracle`]):
    /// the cluster, not this connection, knows whether the move committed.
    pub commit_oracle: Option<std::path::PathBuf>,
    /// Encrypted records (the default), or plain ones if this host was told
    /// to accept only those (see `secure::Records`).
    pub records: secure::Records,
    /// Take a same-host source's memory file when it offers it, instead of
    /// its pages (false: always copy).
    pub share_memory: bool,
}

/// Serves migrations on `listener` until one brings a VM; returns it
/// running (or paused, if it was paused on the source). Each connection
/// has its own thread, so a slow or hostile peer never holds up another,
/// and the first attempt to restore a VM takes this receiver (later ones
/// are refused). A check-only preflight is answered and the wait goes on,
/// and so does a failed attempt (a peer without the key, garbage, a refused
/// preflight, a source that aborts or vanishes): nothing of it ever ran,
/// and one bad connection must not end the wait for the real one. Neither
/// does an `accept` error.
///
/// Once `stop` is raised the wait ends with `None`, unless an attempt has
/// already restored a VM and may be about to get its commit: that attempt
/// is let finish (a VM committed here must not be dropped), and a VM it
/// brings is returned all the same. Stopping claims the receiver, so no
/// attempt can start restoring (and send `Ready`) after the decision.
pub fn receive<D: Destination + 'static>(
    listener: &Listener,
    dest: Arc<D>,
    policy: Arc<Policy>,
    stop: &AtomicBool,
) -> Option<Arc<D::Vm>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let taken = Arc::new(AtomicBool::new(false));
    let mut stopping = false;
    loop {
        if let Ok(vm) = rx.try_recv() {
            return Some(vm);
        }
        if stop.load(Ordering::SeqCst) {
            if taken.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return None;
            }
            if !stopping {
                stopping = true;
                eprintln!("ferry: asked to stop while a VM is being received; finishing that first");
            }
            std::thread::sleep(ACCEPT_POLL);
            continue;
        }
        let stream = match listener.accept_timeout(ACCEPT_POLL) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("ferry: accepting a migration connection failed: {e}; still waiting");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let (dest, policy, taken, tx) = (dest.clone(), policy.clone(), taken.clone(), tx.clone());
        let spawned = std::thread::Builder::new().name("migration-in".into()).spawn(move || {
            if let Err(e) = vmm::seccomp::apply(vmm::seccomp::ThreadKind::Migration) {
                return eprintln!("ferry: migration connection not served: {e}; still waiting");
            }
            match attempt(stream, dest.as_ref(), &policy, &taken) {
                Ok(Some(vm)) => {
                    let _ = tx.send(vm);
                }
                Ok(None) => {}
                Err(e) => eprintln!("ferry: migration attempt failed, nothing kept: {e}; still waiting"),
            }
        });
        if let Err(e) = spawned {
            eprintln!("ferry: cannot serve a migration connection: {e}; still waiting");
        }
    }
}

const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// One connection: `Some` VM once it is this host's, `None` after a
/// check-only. `taken` is claimed by the first attempt that restores a VM.
pub fn attempt<D: Destination>(
    stream: Stream,
    dest: &D,
    policy: &Policy,
    taken: &AtomicBool,
) -> Result<Option<Arc<D::Vm>>, Error> {
    // The encrypted handshake and the hello, within one total deadline.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let is_unix = stream.is_unix();
    let suite = secure::Suite { records: policy.records, ..secure::Suite::default() };
    let mut io = Duplex::new(secure::accept_with(stream, &policy.key, deadline, suite)?);
    let stream = &mut io;
    stream.set_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(wire::Error::Io)?;
    stream.set_deadline(Some(deadline));
    let frame = wire::read_frame(stream)?.expect(Kind::Hello, "Hello")?;
    let (hello, ext): (Hello, wire::HelloExt) = wire::decode_with_ext(frame.kind, &frame.payload)?;
    stream.set_deadline(None);
    // The offer is taken only where a descriptor can come (a Unix socket).
    let offered = ext.shared_memory.filter(|_| policy.share_memory && dest.shares_memory() && is_unix);
    let mut problems = check(&hello, dest, policy, offered.is_some()).err().unwrap_or_default();
    if !hello.check_only && taken.load(Ordering::SeqCst) {
        problems.push("this destination is already taking another VM".into());
    }
    if !problems.is_empty() {
        let reason = problems.join("; ");
        let _ = wire::send(stream, Kind::Refuse, &Reason { reason: reason.clone() });
        let _ = stream.writer.finish();
        return Err(Error::Refused(reason));
    }
    let ack = wire::Ack { host_id: dest.host_id().to_owned() };
    let ext = wire::AckExt { shared_memory: offered.is_some(), catch_up: true };
    wire::send_with_ext(stream, Kind::HelloAck, &ack, &ext)?;
    stream.flush().map_err(wire::Error::Io)?;
    if hello.check_only {
        eprintln!("ferry: preflight passed for a {} MiB guest; still waiting", hello.requirements.mem_bytes >> 20);
        return Ok(None);
    }
    stream.set_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
    let shared = match offered {
        Some(id) => take_shared_memory(stream, dest, &hello.requirements, id)?,
        None => None,
    };
    let shared_memory = shared.is_some();
    let incoming = match shared {
        Some(incoming) => incoming,
        None => dest.prepare(&hello.requirements)?,
    };
    // The source gives up (and resumes) past its switchover deadline; wait
    // for its commit longer than that, so it never commits to nobody.
    // The peer names it: bounded like the source's own option (600 s).
    let asked = Duration::from_millis(hello.switchover_timeout_ms).min(MAX_SWITCHOVER_WAIT);
    let commit_wait = asked + COMMIT_MARGIN;
    match receive_vm(stream, incoming, shared_memory, taken, commit_wait, policy.commit_oracle.as_deref()) {
        Ok(vm) => Ok(Some(vm)),
        Err(e) => {
            let _ = wire::send(stream, Kind::Abort, &Reason { reason: e.to_string() });
            let _ = stream.writer.finish();
            Err(e)
        }
    }
}

/// Takes the memory file the source passes (it was offered as `id`) and
/// builds the incoming VM on it. `None` (after telling the source, which
/// then copies) if it did not arrive, is not that file, or cannot be mapped.
fn take_shared_memory<D: Destination>(
    stream: &mut Duplex,
    dest: &D,
    req: &Requirements,
    id: wire::MemFdId,
) -> Result<Option<D::Incoming>, Error> {
    let taken = stream.reader.recv_fd().map_err(|e| format!("the memory file did not arrive: {e}")).and_then(|fd| {
        let file = std::fs::File::from(fd);
        match wire::MemFdId::of(&file) {
            Ok(got) if got == id => {}
            Ok(got) => return Err(format!("the passed file is not the one the source named ({got:?}, not {id:?})")),
            Err(e) => return Err(format!("cannot inspect the passed memory file: {e}")),
        }
        dest.prepare_shared(req, file).map_err(|e| format!("cannot map the passed memory: {e}"))
    });
    let verdict = match &taken {
        Ok(_) => wire::MemFdVerdict { mapped: true, reason: String::new() },
        Err(reason) => {
            eprintln!("ferry: {reason}; the source copies memory instead");
            wire::MemFdVerdict { mapped: false, reason: reason.clone() }
        }
    };
    wire::send(stream, Kind::MemFd, &verdict)?;
    stream.flush().map_err(wire::Error::Io)?;
    Ok(taken.ok())
}

/// The longest switchover a source may ask the destination to wait for
/// (the API refuses more than this on the source side too).
const MAX_SWITCHOVER_WAIT: Duration = Duration::from_secs(600);

/// How much longer than the source's switchover deadline the destination
/// waits for the commit.
const COMMIT_MARGIN: Duration = Duration::from_secs(5);

/// The preflight: every reason this host cannot run the guest.
fn check<D: Destination>(hello: &Hello, dest: &D, policy: &Policy, shared_memory: bool) -> Result<(), Vec<String>> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(vec![format!("protocol version {} (this host speaks {PROTOCOL_VERSION})", hello.protocol_version)]);
    }
    let req: &Requirements = &hello.requirements;
    let mut problems = dest.check_backends(req, shared_memory);
    match dest.offer() {
        Ok(offer) => problems.extend(preflight::check_cpu(req, &offer, &policy.cpu)),
        Err(e) => problems.push(e.to_string()),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn receive_vm<I: IncomingVm>(
    stream: &mut Duplex,
    incoming: I,
    shared_memory: bool,
    taken: &AtomicBool,
    commit_wait: Duration,
    commit_oracle: Option<&std::path::Path>,
) -> Result<Arc<I::Vm>, Error>
where
    I::Vm: 'static,
{
    let mut payload = Vec::with_capacity(wire::MAX_PAYLOAD as usize);
    let state = loop {
        let kind = wire::read_frame_into(stream, &mut payload)?;
        let frame = wire::FrameRef { kind, payload: &payload };
        match frame.kind {
            // Shared memory is the source's live memory until the commit
            // (and its memory again if the move fails): no frame may write
            // it. The VM built on it stays paused until then too (see
            // `KvmDestination::prepare_shared` for what else never writes).
            Kind::MemZero | Kind::MemData if shared_memory => {
                return Err(wire::Error::Unexpected { expected: "State (memory is shared)", got: frame.kind }.into())
            }
            Kind::MemZero => {
                let z: ZeroRange = frame.decode()?;
                // A page may have become zero since an earlier round.
                incoming.memory().zero_range(z.offset, z.len).map_err(|e| wire::Error::Payload(e.to_string()))?;
            }
            Kind::MemData => {
                let (offset, bytes) = wire::parse_mem_data(frame.payload)?;
                incoming.memory().write_at(offset, bytes).map_err(|e| wire::Error::Payload(e.to_string()))?;
            }
            // Every frame before it is applied: say so (the source pauses
            // the guest only then).
            Kind::CatchUp if !shared_memory => {
                wire::write_frame(stream, Kind::CatchUp, &[])?;
                stream.flush().map_err(wire::Error::Io)?;
            }
            Kind::State => break payload.clone(),
            Kind::Abort => return Err(Error::SourceAborted(frame.decode::<Reason>()?.reason)),
            other => return Err(wire::Error::Unexpected { expected: "memory or State", got: other }.into()),
        }
    };
    if taken.swap(true, Ordering::SeqCst) {
        return Err(Error::Refused("this destination is already taking another VM".into()));
    }
    let restored = incoming.restore(&state);
    let vm = match restored {
        Ok(vm) => vm,
        Err(e) => {
            taken.store(false, Ordering::SeqCst);
            return Err(e.into());
        }
    };
    let committed = match (wait_for_commit(stream, commit_wait), commit_oracle) {
        // No verdict on the wire (a cut, a source gone after Ready): the
        // cluster decides. An explicit Abort needs no asking.
        (Err(e), Some(path)) if !matches!(e, Error::SourceAborted(_)) => match oracle::ask(path) {
            Ok(true) => {
                eprintln!("ferry: the commit did not arrive ({e}) but the cluster says the VM is this host's now");
                Ok(())
            }
            Ok(false) => Err(e),
            Err(o) => {
                eprintln!("ferry: the commit did not arrive ({e}) and the cluster could not be asked ({o})");
                Err(e)
            }
        },
        (r, _) => r,
    };
    if committed.is_err() {
        // Nothing ran: the receiver is free for the next attempt.
        taken.store(false, Ordering::SeqCst);
    }
    committed?;
    // The VM is ours now: nothing below may drop it.
    run_after_commit(vm.as_ref());
    if let Err(e) =
        wire::write_frame(stream, Kind::Resumed, &[]).and_then(|()| stream.writer.finish().map_err(wire::Error::Io))
    {
        tracing::warn!("the source did not hear that the VM runs here ({e}); it runs here all the same");
    }
    if vm.saved_run_state() == RunState::Running {
        announce_again(Arc::downgrade(&vm));
    }
    Ok(vm)
}

/// The commit oracle: when `Ready` got no verdict, the destination VMM
/// asks a Unix socket (the cluster agent's) whether the move committed.
/// One JSON line each way:
///
/// ```text
/// -> {"committed?": true}
/// <- {"committed": true} | {"committed": false, "reason": "..."}
/// ```
///
/// The agent answers from etcd only after making the answer final: it
/// aborts the move record if it is still there (so the source's gate can
/// no longer commit it), else reads the owner key.
pub mod oracle {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    /// The agent retries etcd within this.
    pub const TIMEOUT: Duration = Duration::from_secs(15);

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub struct Ask {
        #[serde(rename = "committed?")]
        pub committed: bool,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Answer {
        pub committed: bool,
        #[serde(default)]
        pub reason: String,
    }

    pub fn ask(path: &Path) -> std::io::Result<bool> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let mut line = serde_json::to_string(&Ask { committed: true }).expect("serialises");
        line.push('\n');
        s.write_all(line.as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        let a: Answer = serde_json::from_str(reply.trim())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        if !a.committed {
            eprintln!("ferry: the cluster says the move did not commit: {}", a.reason);
        }
        Ok(a.committed)
    }
}

/// Sends `Ready` and waits (within `wait` in total) for the source's verdict.
fn wait_for_commit(stream: &mut Duplex, wait: Duration) -> Result<(), Error> {
    wire::write_frame(stream, Kind::Ready, &[])?;
    stream.flush().map_err(wire::Error::Io)?;
    stream.set_deadline(Some(Instant::now() + wait));
    let commit = wire::read_frame(stream);
    stream.set_deadline(None);
    let commit = commit?;
    match commit.kind {
        Kind::Commit => Ok(()),
        Kind::Abort => Err(Error::SourceAborted(commit.decode::<Reason>()?.reason)),
        other => Err(wire::Error::Unexpected { expected: "Commit", got: other }.into()),
    }
}

/// After the commit: take the disks, then resume if the VM ran on the
/// source. A failure leaves the VM paused here, never dropped.
fn run_after_commit(vm: &dyn ReceivedVm) {
    if let Err(e) = acquire_with_retry(vm) {
        eprintln!(
            "ferry: MIGRATION NEEDS ATTENTION: the VM is committed to this host but its disks could not be taken \
             ({e}); it stays paused here (`ferry resume` takes them once they are free, then runs it)"
        );
        vm.hold(format!("committed here by a migration, but its disks could not be taken: {e}"));
        return;
    }
    if vm.saved_run_state() == RunState::Paused {
        eprintln!("ferry: the VM was paused on the source; it stays paused here");
        return;
    }
    if let Err(e) = vm.resume() {
        tracing::error!("after the commit the VM could not be resumed: {e}");
        return;
    }
    // Announce at once: the reply gap a client sees ends here.
    if let Err(e) = vm.announce() {
        tracing::warn!("announce after migration: {e}");
    }
}

/// Takes the disks the source just released. The source unlocks before it
/// sends Commit, so this rarely waits.
fn acquire_with_retry(vm: &dyn ReceivedVm) -> Result<(), vmm::migration::Error> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match vm.acquire_backends() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Repeats the announcement as QEMU does (50 ms, then 100 ms steps), for
/// switches that missed the first. A weak handle: announcing must not keep
/// a stopped VM alive.
fn announce_again<V: ReceivedVm + 'static>(vm: std::sync::Weak<V>) {
    std::thread::spawn(move || {
        for delay_ms in [50, 100, 100, 100] {
            std::thread::sleep(Duration::from_millis(delay_ms));
            match vm.upgrade() {
                Some(vm) if vm.announce().is_ok() => {}
                _ => return,
            }
        }
    });
}
