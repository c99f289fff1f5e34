//! Quick migration: pause, send memory and state, restore on the
//! destination, commit, resume there.
//!
//! Until the source has sent `Commit`, any failure resumes the VM on the
//! source and the destination discards what it built (it never ran). After
//! `Commit` the source never runs the VM again: if the destination does not
//! confirm, the source stops it rather than risk two copies.

use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::memory::{self, Extent, GuestRam};
use vmm::state::VmState;
use vmm::{VmConfig, Vmm};

use crate::figures::Figures;
use crate::transport::{connect, Endpoint, Listener, Stream};
use crate::wire::{self, Hello, Kind, Mode, Reason, ZeroRange, PROTOCOL_VERSION};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Any single read or write that takes longer means the peer is gone.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory travels in frames of at most this much data.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: Endpoint, source: std::io::Error },
    #[error("destination refused the migration: {0}")]
    Refused(String),
    #[error("destination failed: {0}")]
    DestinationFailed(String),
    #[error("source aborted: {0}")]
    SourceAborted(String),
    #[error(transparent)]
    Wire(#[from] wire::Error),
    #[error(transparent)]
    Vmm(#[from] vmm::vmm::Error),
    #[error("{0}")]
    State(#[from] vmm::state::Error),
    #[error("{0}")]
    Memory(#[from] vmm::memory::Error),
    #[error("the destination did not confirm it runs the VM after commit ({0}); the VM is stopped on the source so it never runs twice")]
    Uncertain(String),
    #[error("{0}")]
    Refuse(String),
}

/// Counts what goes on the wire.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Sends guest memory as zero markers and data frames.
pub fn send_memory(ram: &GuestRam, w: &mut impl Write) -> Result<memory::ScanStats, wire::Error> {
    let mut failure = None;
    let stats = memory::scan(&ram.memfd, ram.size, |extent| {
        let r = match extent {
            Extent::Zero { offset, len } => wire::send(w, Kind::MemZero, &ZeroRange { offset, len }),
            Extent::Data { offset, bytes } => bytes.chunks(CHUNK).enumerate().try_for_each(|(i, chunk)| {
                let at = offset + (i * CHUNK) as u64;
                wire::write_frame(w, Kind::MemData, &wire::mem_data_payload(at, chunk))
            }),
        };
        r.map_err(|e| {
            let msg = e.to_string();
            failure = Some(e);
            std::io::Error::other(msg)
        })
    });
    match (stats, failure) {
        (_, Some(e)) => Err(e),
        (Ok(s), None) => Ok(s),
        (Err(e), None) => Err(wire::Error::Io(e)),
    }
}

/// Moves the VM to `to`. On success the VM no longer runs here and the
/// caller should let this VMM exit.
pub fn send(vmm: &Vmm, to: &Endpoint) -> Result<Figures, Error> {
    let t0 = Instant::now();
    let stream = connect(to, CONNECT_TIMEOUT).map_err(|source| Error::Connect { endpoint: to.clone(), source })?;
    stream.set_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
    let mut reader = match &stream {
        Stream::Tcp(s) => Stream::Tcp(s.try_clone().map_err(wire::Error::Io)?),
        Stream::Unix(s) => Stream::Unix(s.try_clone().map_err(wire::Error::Io)?),
    };
    let mut w = Counting { inner: BufWriter::with_capacity(CHUNK + 64, stream), bytes: 0 };

    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        mode: Mode::Quick,
        mem_bytes: vmm.ram().size,
        config_json: serde_json::to_string(vmm.config()).expect("config serialises"),
    };
    wire::send(&mut w, Kind::Hello, &hello)?;
    w.flush().map_err(wire::Error::Io)?;
    let reply = wire::read_frame(&mut reader)?;
    match reply.kind {
        Kind::HelloAck => {}
        Kind::Refuse => return Err(Error::Refused(reply.decode::<Reason>()?.reason)),
        other => return Err(wire::Error::Unexpected { expected: "HelloAck", got: other }.into()),
    }

    let was_running = vmm.state() == vmm::RunState::Running;
    let t_pause = Instant::now();
    if was_running {
        vmm.pause()?;
    }
    let outcome = transfer_and_commit(vmm, &mut w, &mut reader);
    let (stats, restore_ms) = match outcome {
        Ok(v) => v,
        Err(Failure::BeforeCommit(e)) => {
            // Tell the destination (best effort) and keep the VM here.
            let _ = wire::send(&mut w, Kind::Abort, &Reason { reason: e.to_string() });
            let _ = w.flush();
            if was_running {
                vmm.resume()?;
            }
            return Err(e);
        }
        Err(Failure::AfterCommit(e)) => return Err(Error::Uncertain(e.to_string())),
    };
    let downtime = t_pause.elapsed();
    Ok(Figures {
        mode: "quick",
        mem_mib: vmm.ram().size >> 20,
        total_ms: t0.elapsed().as_secs_f64() * 1000.0,
        downtime_ms: downtime.as_secs_f64() * 1000.0,
        rounds: 1,
        bytes_sent: w.bytes,
        pages_zero: stats.pages_zero,
        pages_sent: stats.pages_data,
        restore_ms,
        destination: to.to_string(),
        ..Default::default()
    })
}

enum Failure {
    BeforeCommit(Error),
    AfterCommit(Error),
}

fn transfer_and_commit(
    vmm: &Vmm,
    w: &mut Counting<BufWriter<Stream>>,
    reader: &mut Stream,
) -> Result<(memory::ScanStats, f64), Failure> {
    let before = |e: Error| Failure::BeforeCommit(e);
    let stats = send_memory(vmm.ram(), w).map_err(|e| before(e.into()))?;
    let state = vmm.save_state().map_err(|e| before(e.into()))?;
    let bytes = state.encode().map_err(|e| before(e.into()))?;
    wire::write_frame(w, Kind::State, &bytes).map_err(|e| before(e.into()))?;
    w.flush().map_err(|e| before(wire::Error::Io(e).into()))?;
    let t_restore = Instant::now();
    let ready = wire::read_frame(reader).map_err(|e| before(e.into()))?;
    match ready.kind {
        Kind::Ready => {}
        Kind::Abort => {
            let reason = ready.decode::<Reason>().map(|r| r.reason).unwrap_or_default();
            return Err(before(Error::DestinationFailed(reason)));
        }
        other => return Err(before(wire::Error::Unexpected { expected: "Ready", got: other }.into())),
    }
    let restore_ms = t_restore.elapsed().as_secs_f64() * 1000.0;
    // Disks are durable and unlocked before the destination may write them.
    vmm.release_backends().map_err(|e| before(e.into()))?;
    // The point of no return: from here the VM never runs on this host.
    wire::write_frame(w, Kind::Commit, &[]).map_err(|e| Failure::AfterCommit(e.into()))?;
    w.flush().map_err(|e| Failure::AfterCommit(wire::Error::Io(e).into()))?;
    let resumed = wire::read_frame(reader).map_err(|e| Failure::AfterCommit(e.into()))?;
    if resumed.kind != Kind::Resumed {
        return Err(Failure::AfterCommit(wire::Error::Unexpected { expected: "Resumed", got: resumed.kind }.into()));
    }
    Ok((stats, restore_ms))
}

/// Receives one migration on `listener`, restores the VM, waits for the
/// source's commit, resumes and announces it. `host` turns the source's
/// config into this host's (taps, console, KVM device) and may refuse.
pub fn receive(listener: &Listener, host: impl Fn(VmConfig) -> Result<VmConfig, String>) -> Result<Arc<Vmm>, Error> {
    let mut stream = listener.accept().map_err(wire::Error::Io)?;
    stream.set_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
    let hello: Hello = wire::read_frame(&mut stream)?.expect(Kind::Hello, "Hello")?.decode()?;
    let refuse = |stream: &mut Stream, reason: String| {
        let _ = wire::send(stream, Kind::Refuse, &Reason { reason: reason.clone() });
        Error::Refuse(format!("refused the migration: {reason}"))
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let reason = format!("protocol version {} (this host speaks {PROTOCOL_VERSION})", hello.protocol_version);
        return Err(refuse(&mut stream, reason));
    }
    let config: VmConfig = match serde_json::from_str(&hello.config_json) {
        Ok(c) => c,
        Err(e) => return Err(refuse(&mut stream, format!("unreadable VM config: {e}"))),
    };
    if config.mem_mib << 20 != hello.mem_bytes {
        return Err(refuse(&mut stream, "memory size and config disagree".into()));
    }
    let config = match host(config) {
        Ok(c) => c,
        Err(reason) => return Err(refuse(&mut stream, reason)),
    };
    if let Err(e) = memory::check_size(config.mem_mib) {
        return Err(refuse(&mut stream, e.to_string()));
    }
    let ram = memory::create(config.mem_mib)?;
    wire::write_frame(&mut stream, Kind::HelloAck, &[])?;

    match receive_vm(&mut stream, config, ram) {
        Ok(vmm) => Ok(vmm),
        Err(e) => {
            let _ = wire::send(&mut stream, Kind::Abort, &Reason { reason: e.to_string() });
            Err(e)
        }
    }
}

fn receive_vm(stream: &mut Stream, config: VmConfig, ram: GuestRam) -> Result<Arc<Vmm>, Error> {
    let state = loop {
        let frame = wire::read_frame(stream)?;
        match frame.kind {
            Kind::MemZero => {
                let z: ZeroRange = frame.decode()?;
                // Fresh guest RAM is zero; only check the range is ours.
                if z.offset.checked_add(z.len).is_none_or(|end| end > ram.size) {
                    return Err(wire::Error::Payload(format!(
                        "zero range {:#x}+{:#x} outside guest memory",
                        z.offset, z.len
                    ))
                    .into());
                }
            }
            Kind::MemData => {
                let (offset, bytes) = wire::parse_mem_data(&frame.payload)?;
                ram.write_at(offset, bytes).map_err(|e| wire::Error::Payload(e.to_string()))?;
            }
            Kind::State => break VmState::decode(&frame.payload)?,
            Kind::Abort => return Err(Error::SourceAborted(frame.decode::<Reason>()?.reason)),
            other => return Err(wire::Error::Unexpected { expected: "memory or State", got: other }.into()),
        }
    };
    let vmm = Arc::new(Vmm::restore_standby(config, state, ram)?);
    wire::write_frame(stream, Kind::Ready, &[])?;
    let commit = wire::read_frame(stream)?;
    match commit.kind {
        Kind::Commit => {}
        Kind::Abort => return Err(Error::SourceAborted(commit.decode::<Reason>()?.reason)),
        other => return Err(wire::Error::Unexpected { expected: "Commit", got: other }.into()),
    }
    acquire_with_retry(&vmm)?;
    vmm.resume()?;
    if let Err(e) = vmm.announce() {
        tracing::warn!("announce after migration: {e}");
    }
    wire::write_frame(stream, Kind::Resumed, &[])?;
    announce_again(vmm.clone());
    Ok(vmm)
}

/// Takes the disks the source just released. The source unlocks before it
/// sends Commit, so this rarely waits.
fn acquire_with_retry(vmm: &Vmm) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match vmm.acquire_backends() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Repeats the announcement as QEMU does (50 ms, then 100 ms steps), for
/// switches that missed the first.
pub fn announce_again(vmm: Arc<Vmm>) {
    std::thread::spawn(move || {
        for delay_ms in [50, 100, 100, 100] {
            std::thread::sleep(Duration::from_millis(delay_ms));
            if vmm.announce().is_err() {
                return;
            }
        }
    });
}
