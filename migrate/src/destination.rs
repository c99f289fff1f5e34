//! Receiving a VM: authenticate the source, run the preflight, take memory
//! and state, restore paused with disks in standby, and run the VM only
//! after the source's commit (and only if it was running there). It builds
//! the VM only through a [`Destination`].
//!
//! After `Commit` the VM is this host's whatever happens to the
//! connection: a lost `Resumed` or a vanished source is logged, never a
//! reason to stop the guest. If the disks cannot be taken after the
//! commit, the VM stays paused here, holding what it could, and says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::migration::{Destination, IncomingVm, MemorySink, ReceivedVm, Requirements, RunState};

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
    #[error("memory stream {index}: {source}")]
    Stream { index: u8, source: Box<Error> },
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
    let sessions = Arc::new(Sessions::default());
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
        let sessions = sessions.clone();
        let spawned = std::thread::Builder::new().name("migration-in".into()).spawn(move || {
            if let Err(e) = vmm::seccomp::apply(vmm::seccomp::ThreadKind::Migration) {
                return eprintln!("ferry: migration connection not served: {e}; still waiting");
            }
            match attempt_in(stream, dest.as_ref(), &policy, &taken, Some(&sessions)) {
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
/// A lone connection: the migration it starts uses one memory stream.
pub fn attempt<D: Destination>(
    stream: Stream,
    dest: &D,
    policy: &Policy,
    taken: &AtomicBool,
) -> Result<Option<Arc<D::Vm>>, Error> {
    attempt_in(stream, dest, policy, taken, None)
}

/// [`attempt`] among other connections of one `receive`: a migration may
/// take extra memory streams, which arrive as connections of their own
/// and find it in `sessions` (`None` after a `Join`: the stream was handed
/// over).
pub fn attempt_in<D: Destination>(
    stream: Stream,
    dest: &D,
    policy: &Policy,
    taken: &AtomicBool,
    sessions: Option<&Sessions>,
) -> Result<Option<Arc<D::Vm>>, Error> {
    // The encrypted handshake and the hello, within one total deadline.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let is_unix = stream.is_unix();
    // Kept to cut the connection from another thread (see `Lanes`).
    let socket = stream.try_clone().map_err(wire::Error::Io)?;
    let suite = secure::Suite { records: policy.records, ..secure::Suite::default() };
    let mut io = Duplex::new(secure::accept_with(stream, &policy.key, deadline, suite)?);
    io.set_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(wire::Error::Io)?;
    io.set_deadline(Some(deadline));
    let frame = wire::read_frame(&mut io)?;
    if frame.kind == Kind::Join {
        let join: wire::Join = frame.decode()?;
        let sessions = sessions.ok_or_else(|| Error::Refused("this receiver takes one stream per migration".into()))?;
        io.set_deadline(None);
        io.set_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
        sessions.hand_over(Joined { index: join.index, io, peer: socket.peer_name(), socket }, &join.session)?;
        return Ok(None);
    }
    let stream = &mut io;
    let frame = frame.expect(Kind::Hello, "Hello")?;
    let (hello, hello_ext): (Hello, wire::HelloExt) = wire::decode_with_ext(frame.kind, &frame.payload)?;
    stream.set_deadline(None);
    // The offer is taken only where a descriptor can come (a Unix socket).
    let offered = hello_ext.shared_memory.filter(|_| policy.share_memory && dest.shares_memory() && is_unix);
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
    // Extra memory streams need a registry to find us, and have nothing
    // to carry when memory is shared.
    let streams = match sessions {
        Some(_) if offered.is_none() && !hello.check_only => hello_ext.streams.clamp(1, MAX_STREAMS),
        _ => 1,
    };
    let mut session = [0u8; 16];
    if streams > 1 {
        getrandom::getrandom(&mut session).map_err(|e| wire::Error::Io(std::io::Error::other(e.to_string())))?;
    }
    let registration = match sessions {
        Some(sessions) if streams > 1 => Some(sessions.register(session)),
        _ => None,
    };
    let ack = wire::Ack { host_id: dest.host_id().to_owned() };
    let ext = wire::AckExt { shared_memory: offered.is_some(), catch_up: true, streams, session };
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
    let lanes = Lanes { joins: registration, wanted: usize::from(streams), control: socket };
    match receive_vm(stream, incoming, shared_memory, lanes, taken, commit_wait, policy.commit_oracle.as_deref()) {
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

#[allow(clippy::too_many_arguments)]
fn receive_vm<I: IncomingVm>(
    stream: &mut Duplex,
    incoming: I,
    shared_memory: bool,
    lanes: Lanes,
    taken: &AtomicBool,
    commit_wait: Duration,
    commit_oracle: Option<&std::path::Path>,
) -> Result<Arc<I::Vm>, Error>
where
    I::Vm: 'static,
{
    let state = lanes.receive(stream, incoming.memory(), shared_memory)?;
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

/// The most memory streams one migration may use.
pub const MAX_STREAMS: u8 = 8;

/// Extra memory streams on their way to the migration they join (see
/// `wire::Join`): one registry per `receive`, shared by its connections.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<[u8; 16], mpsc::Sender<Joined>>>);

/// An extra memory stream, authenticated and named by its `Join`.
pub struct Joined {
    index: u8,
    io: Duplex,
    /// To cut it from another thread.
    socket: Stream,
    peer: String,
}

impl Sessions {
    fn register(&self, session: [u8; 16]) -> Registration<'_> {
        let (tx, rx) = mpsc::channel();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(session, tx);
        Registration { sessions: self, session, rx }
    }

    fn hand_over(&self, joined: Joined, session: &[u8; 16]) -> Result<(), Error> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let tx =
            map.get(session).ok_or_else(|| Error::Refused("a memory stream for no migration in progress".into()))?;
        tx.send(joined).map_err(|_| Error::Refused("a memory stream for a migration that has ended".into()))
    }
}

/// A migration's place in [`Sessions`], given up when it ends.
struct Registration<'a> {
    sessions: &'a Sessions,
    session: [u8; 16],
    rx: mpsc::Receiver<Joined>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.sessions.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.session);
    }
}

/// A migration's memory streams: the control stream and the extra ones
/// that join it, each applied by its own thread.
struct Lanes<'a> {
    joins: Option<Registration<'a>>,
    /// Streams in all, the control one included.
    wanted: usize,
    control: Stream,
}

/// How long extra streams have to join once `HelloAck` is sent.
const JOIN_TIMEOUT: Duration = HANDSHAKE_TIMEOUT;

impl Lanes<'_> {
    /// Applies memory from every stream until the control stream brings
    /// the state (returned), by which time every extra stream has ended
    /// (`End`). A failure on any stream cuts them all, so no thread is left
    /// waiting on a peer that will not send.
    fn receive(self, control: &mut Duplex, memory: &dyn MemorySink, shared: bool) -> Result<Vec<u8>, Error> {
        let extra = self.collect()?;
        if extra.is_empty() {
            return apply_until_state(control, memory, shared);
        }
        let control_socket = self.control;
        let mut sockets = Vec::new();
        for j in &extra {
            eprintln!("ferry: memory stream {} joined from {}", j.index, j.peer);
            sockets.push(j.socket.try_clone().map_err(wire::Error::Io)?);
        }
        // The first failure is the cause (the others are its cuts). The
        // control stream is cut for reading only: its `Abort` can still go.
        let first: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error| {
            let mut first = first.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(e);
                control_socket.shutdown_read();
                sockets.iter().for_each(Stream::shutdown);
            }
        };
        let state = std::thread::scope(|s| {
            let threads: Vec<_> = extra
                .into_iter()
                .map(|mut j| {
                    let fail = &fail;
                    s.spawn(move || {
                        let index = j.index;
                        if let Err(e) = apply_until_end(&mut j.io, memory) {
                            fail(Error::Stream { index, source: Box::new(e) });
                        }
                    })
                })
                .collect();
            let state = apply_until_state(control, memory, shared);
            let state = match state {
                Ok(state) => Some(state),
                Err(e) => {
                    fail(e);
                    None
                }
            };
            for t in threads {
                if t.join().is_err() {
                    fail(Error::Wire(wire::Error::Payload("a memory stream's thread panicked".into())));
                }
            }
            state
        });
        match (first.into_inner().unwrap_or_else(|e| e.into_inner()), state) {
            (Some(e), _) => Err(e),
            (None, Some(state)) => Ok(state),
            (None, None) => Err(wire::Error::Payload("the control stream ended without the state".into()).into()),
        }
    }

    /// Waits for every extra stream (they join right after `HelloAck`).
    fn collect(&self) -> Result<Vec<Joined>, Error> {
        let Some(reg) = &self.joins else { return Ok(Vec::new()) };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut joined: Vec<Joined> = Vec::new();
        while joined.len() + 1 < self.wanted {
            let left = deadline.saturating_duration_since(Instant::now());
            match reg.rx.recv_timeout(left) {
                Ok(j)
                    if (1..self.wanted).contains(&usize::from(j.index))
                        && !joined.iter().any(|o| o.index == j.index) =>
                {
                    joined.push(j)
                }
                Ok(j) => return Err(Error::Refused(format!("memory stream {} joined twice or out of range", j.index))),
                Err(_) => {
                    return Err(Error::Refused(format!(
                        "only {} of {} memory streams joined within {} s",
                        joined.len() + 1,
                        self.wanted,
                        JOIN_TIMEOUT.as_secs()
                    )))
                }
            }
        }
        Ok(joined)
    }
}

/// Applies one memory frame; false if it is not one.
fn apply_memory(frame: &wire::FrameRef<'_>, memory: &dyn MemorySink) -> Result<bool, Error> {
    match frame.kind {
        Kind::MemZero => {
            let z: ZeroRange = frame.decode()?;
            // A page may have become zero since an earlier round.
            memory.zero_range(z.offset, z.len).map_err(|e| wire::Error::Payload(e.to_string()))?;
        }
        Kind::MemData => {
            let (offset, bytes) = wire::parse_mem_data(frame.payload)?;
            memory.write_at(offset, bytes).map_err(|e| wire::Error::Payload(e.to_string()))?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The control stream: memory (its own stripes) until the state.
fn apply_until_state(stream: &mut Duplex, memory: &dyn MemorySink, shared_memory: bool) -> Result<Vec<u8>, Error> {
    let mut payload = Vec::with_capacity(wire::MAX_PAYLOAD as usize);
    loop {
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
            // Every frame before it is applied: say so (the source pauses
            // the guest only then).
            Kind::CatchUp if !shared_memory => {
                wire::write_frame(stream, Kind::CatchUp, &[])?;
                stream.flush().map_err(wire::Error::Io)?;
            }
            Kind::State => return Ok(payload),
            Kind::KeepAlive if !shared_memory => {}
            Kind::Abort => return Err(Error::SourceAborted(frame.decode::<Reason>()?.reason)),
            _ if apply_memory(&frame, memory)? => {}
            other => return Err(wire::Error::Unexpected { expected: "memory or State", got: other }.into()),
        }
    }
}

/// An extra stream: memory (its stripes) until `End`.
fn apply_until_end(stream: &mut Duplex, memory: &dyn MemorySink) -> Result<(), Error> {
    let mut payload = Vec::with_capacity(wire::MAX_PAYLOAD as usize);
    loop {
        let kind = wire::read_frame_into(stream, &mut payload)?;
        let frame = wire::FrameRef { kind, payload: &payload };
        match frame.kind {
            Kind::CatchUp => {
                wire::write_frame(stream, Kind::CatchUp, &[])?;
                stream.flush().map_err(wire::Error::Io)?;
            }
            Kind::End => return Ok(()),
            Kind::KeepAlive => {}
            _ if apply_memory(&frame, memory)? => {}
            other => return Err(wire::Error::Unexpected { expected: "memory or End", got: other }.into()),
        }
    }
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
