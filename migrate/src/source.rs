//! Migration from this host: quick (pause, copy, resume there) or live
//! (pre-copy with dirty logging, then a short switchover).
//!
//! Until `Commit` is sent, any failure resumes the VM here and the
//! destination discards what it built (it never ran). After `Commit` the VM
//! never runs here again.

use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::memory::{self, Extent, GuestRam, PAGE_SIZE};
use vmm::vstate::dirty::DirtyBitmap;
use vmm::Vmm;

use crate::auth::{self, Key};
use crate::figures::Figures;
use crate::progress::{self, Shared};
use crate::transport::{connect, Endpoint, Stream};
use crate::wire::{self, Hello, Kind, Mode, Reason, ZeroRange, PROTOCOL_VERSION};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Any single read or write that takes longer means the peer is gone.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory travels in frames of at most this much data.
const CHUNK: usize = 1 << 20;
const MIB: f64 = (1 << 20) as f64;

/// What to do when pre-copy does not converge in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Give up; the VM keeps running here.
    Cancel,
    /// Switch over anyway, with a longer downtime.
    Force,
}

#[derive(Clone)]
pub struct Options {
    pub mode: Mode,
    pub key: Key,
    /// Switch over once the remaining dirty memory fits this at the
    /// measured bandwidth.
    pub downtime_ms: f64,
    pub timeout: Duration,
    pub max_rounds: u32,
    pub policy: Policy,
    /// Slow the vCPUs down when they dirty memory faster than it drains.
    pub auto_converge: bool,
    /// Only run the destination's preflight.
    pub check_only: bool,
    /// Cap on migration bandwidth, MiB/s (None: as fast as the link goes).
    pub max_bandwidth_mib_s: Option<f64>,
}

impl Options {
    pub fn new(mode: Mode, key: Key) -> Options {
        Options {
            mode,
            key,
            downtime_ms: 20.0,
            timeout: Duration::from_secs(60),
            max_rounds: 30,
            policy: Policy::Cancel,
            auto_converge: true,
            check_only: false,
            max_bandwidth_mib_s: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: Endpoint, source: std::io::Error },
    #[error(transparent)]
    Auth(#[from] auth::Error),
    #[error("destination refused the migration: {0}")]
    Refused(String),
    #[error("destination failed: {0}")]
    DestinationFailed(String),
    #[error(transparent)]
    Wire(#[from] wire::Error),
    #[error(transparent)]
    Vmm(#[from] vmm::vmm::Error),
    #[error("{0}")]
    State(#[from] vmm::state::Error),
    #[error("pre-copy did not converge ({0}); cancelled by policy, the VM keeps running here")]
    Cancelled(String),
    #[error("the destination did not confirm it runs the VM after commit ({0}); the VM is stopped on the source so it never runs twice")]
    Uncertain(String),
}

/// Counts what goes on the wire, and holds it to a bandwidth cap.
struct Counting<W> {
    inner: W,
    bytes: u64,
    /// Bytes per second allowed, and when counting started.
    cap: Option<(f64, Instant)>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        if let Some((rate, since)) = self.cap {
            // Sleep until the bytes so far fit the cap.
            let due = Duration::from_secs_f64(self.bytes as f64 / rate);
            if let Some(ahead) = due.checked_sub(since.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type Writer = Counting<BufWriter<Stream>>;

fn send_extent(w: &mut impl Write, extent: Extent<'_>) -> Result<(), wire::Error> {
    match extent {
        Extent::Zero { offset, len } => wire::send(w, Kind::MemZero, &ZeroRange { offset, len }),
        Extent::Data { offset, bytes } => bytes.chunks(CHUNK).enumerate().try_for_each(|(i, chunk)| {
            wire::write_frame(w, Kind::MemData, &wire::mem_data_payload(offset + (i * CHUNK) as u64, chunk))
        }),
    }
}

/// Sends all of guest memory: untouched and zero pages as markers.
fn send_all_memory(ram: &GuestRam, w: &mut impl Write) -> Result<memory::ScanStats, wire::Error> {
    let mut failure = None;
    let stats = memory::scan(&ram.memfd, ram.size, |extent| {
        send_extent(w, extent).map_err(|e| {
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

/// Sends the pages in `dirty`, reading runs of consecutive pages at once.
fn send_dirty(ram: &GuestRam, dirty: &DirtyBitmap, w: &mut impl Write) -> Result<memory::ScanStats, wire::Error> {
    let mut stats = memory::ScanStats::default();
    let mut buf = vec![0u8; CHUNK];
    let mut flush_run = |start: u64, len: u64, stats: &mut memory::ScanStats| -> Result<(), wire::Error> {
        let bytes = &mut buf[..len as usize];
        ram.memfd.read_exact_at(bytes, start)?;
        let mut run: Option<(bool, usize)> = None;
        for (i, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            let zero = page.iter().all(|b| *b == 0);
            if zero {
                stats.pages_zero += 1
            } else {
                stats.pages_data += 1
            }
            if let Some((z, from)) = run {
                if z != zero {
                    emit(w, z, start, bytes, from, i)?;
                    run = Some((zero, i));
                }
            } else {
                run = Some((zero, i));
            }
        }
        if let Some((z, from)) = run {
            emit(w, z, start, bytes, from, bytes.len() / PAGE_SIZE as usize)?;
        }
        Ok(())
    };
    let mut run: Option<(u64, u64)> = None;
    for off in dirty.offsets().filter(|o| *o < ram.size) {
        match run {
            Some((start, len)) if start + len == off && len < CHUNK as u64 => run = Some((start, len + PAGE_SIZE)),
            Some((start, len)) => {
                flush_run(start, len, &mut stats)?;
                run = Some((off, PAGE_SIZE));
            }
            None => run = Some((off, PAGE_SIZE)),
        }
    }
    if let Some((start, len)) = run {
        flush_run(start, len, &mut stats)?;
    }
    Ok(stats)
}

fn emit(w: &mut impl Write, zero: bool, start: u64, bytes: &[u8], from: usize, to: usize) -> Result<(), wire::Error> {
    let (a, b) = (from * PAGE_SIZE as usize, to * PAGE_SIZE as usize);
    let offset = start + a as u64;
    if zero {
        send_extent(w, Extent::Zero { offset, len: (b - a) as u64 })
    } else {
        send_extent(w, Extent::Data { offset, bytes: &bytes[a..b] })
    }
}

/// Auto-converge: holds the vCPUs for `pct`% of every 20 ms slice, as
/// QEMU's throttle and VMware's stun do, while devices keep running.
struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(vmm: Arc<Vmm>) -> Throttle {
        let pct = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pct.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            const SLICE_US: u64 = 20_000;
            while !s.load(Ordering::Relaxed) {
                let held = SLICE_US * u64::from(p.load(Ordering::Relaxed)) / 100;
                if held > 0 && vmm.hold_vcpus().is_ok() {
                    std::thread::sleep(Duration::from_micros(held));
                    let _ = vmm.release_vcpus();
                }
                std::thread::sleep(Duration::from_micros(SLICE_US - held));
            }
        });
        Throttle { pct, stop, thread: Some(thread) }
    }

    fn set(&self, pct: u32) {
        self.pct.store(pct.min(95), Ordering::Relaxed);
    }

    fn get(&self) -> u32 {
        self.pct.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Moves the VM to `to`. On success the VM no longer runs here and the
/// caller should let this VMM exit.
pub fn migrate(vmm: &Arc<Vmm>, to: &Endpoint, opts: &Options, progress: &Shared) -> Result<Figures, Error> {
    vmm.begin_migration()?;
    let result = migrate_claimed(vmm, to, opts, progress);
    vmm.end_migration();
    result
}

fn migrate_claimed(vmm: &Arc<Vmm>, to: &Endpoint, opts: &Options, progress: &Shared) -> Result<Figures, Error> {
    let t0 = Instant::now();
    progress::update(progress, |p| p.phase = "connecting".into());
    let mut stream = connect(to, CONNECT_TIMEOUT).map_err(|source| Error::Connect { endpoint: to.clone(), source })?;
    stream.set_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
    auth::connect(&mut stream, &opts.key)?;
    let mut reader = stream.try_clone().map_err(wire::Error::Io)?;
    let cap = opts.max_bandwidth_mib_s.filter(|r| *r > 0.0).map(|r| (r * MIB, Instant::now()));
    let mut w = Counting { inner: BufWriter::with_capacity(CHUNK + 64, stream), bytes: 0, cap };

    progress::update(progress, |p| p.phase = "preflight".into());
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        mode: opts.mode,
        mem_bytes: vmm.ram().size,
        config_json: serde_json::to_string(vmm.config()).expect("config serialises"),
        guest_cpuid: vmm.guest_cpuid().iter().map(crate::preflight::entry).collect(),
        tsc_khz: vmm.tsc_khz(),
        check_only: opts.check_only,
    };
    wire::send(&mut w, Kind::Hello, &hello)?;
    w.flush().map_err(wire::Error::Io)?;
    let reply = wire::read_frame(&mut reader)?;
    let destination_host = match reply.kind {
        Kind::HelloAck => reply.decode::<wire::Ack>()?.host_id,
        Kind::Refuse => return Err(Error::Refused(reply.decode::<Reason>()?.reason)),
        other => return Err(wire::Error::Unexpected { expected: "HelloAck", got: other }.into()),
    };
    let mut figures = Figures {
        mode: match opts.mode {
            Mode::Quick => "quick",
            Mode::Live => "live",
        },
        mem_mib: vmm.ram().size >> 20,
        destination: to.to_string(),
        ..Default::default()
    };
    if opts.check_only {
        figures.mode = "check-only";
        figures.total_ms = ms(t0.elapsed());
        return Ok(figures);
    }

    let was_running = vmm.state() == vmm::RunState::Running;
    let logging = opts.mode == Mode::Live && was_running;
    let mut throttle = None;
    let precopy = if logging {
        let t = Throttle::start(vmm.clone());
        let r = precopy(vmm, &mut w, opts, progress, &t, &mut figures, t0);
        throttle = Some(t);
        r
    } else {
        Ok(DirtyBitmap::default())
    };
    if let Some(t) = &mut throttle {
        t.stop();
    }
    let pending = match precopy {
        Ok(p) => p,
        Err(e) => {
            let _ = vmm.stop_dirty_log();
            abort(&mut w, &e);
            return Err(e);
        }
    };

    progress::update(progress, |p| p.phase = "switchover".into());
    // Most of the disks' flush happens here, with the guest still running.
    if let Err(e) = vmm.flush_backends() {
        tracing::warn!("pre-switchover flush: {e}");
    }
    let t_pause = Instant::now();
    if was_running {
        if let Err(e) = vmm.pause() {
            let e = Error::from(e);
            if logging {
                let _ = vmm.stop_dirty_log();
            }
            abort(&mut w, &e);
            return Err(e);
        }
    }
    match switchover(vmm, &mut w, &mut reader, logging, pending, &destination_host, &mut figures) {
        Ok(()) => {}
        Err(Failure::BeforeCommit(e)) => {
            abort(&mut w, &e);
            if logging {
                let _ = vmm.stop_dirty_log();
            }
            if was_running {
                vmm.resume()?;
            }
            return Err(e);
        }
        Err(Failure::AfterCommit(e)) => {
            // Never resumable here (retired at commit); stop this VMM.
            let _ = vmm.events().send(vmm::VmEvent::Exit(vmm::ExitReason::Error(format!(
                "migration outcome unknown after commit: {e}; the VM is stopped here"
            ))));
            return Err(Error::Uncertain(e.to_string()));
        }
    }
    figures.downtime_ms = ms(t_pause.elapsed());
    figures.total_ms = ms(t0.elapsed());
    figures.bytes_sent = w.bytes;
    progress::update(progress, |p| p.phase = "done".into());
    Ok(figures)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Tells the destination (best effort) that we give up.
fn abort(w: &mut Writer, e: &Error) {
    let _ = wire::send(w, Kind::Abort, &Reason { reason: e.to_string() });
    let _ = w.flush();
}

/// Round 0 and the iterative rounds; returns the dirty set not yet sent.
fn precopy(
    vmm: &Arc<Vmm>,
    w: &mut Writer,
    opts: &Options,
    progress: &Shared,
    throttle: &Throttle,
    figures: &mut Figures,
    t0: Instant,
) -> Result<DirtyBitmap, Error> {
    let ram = vmm.ram();
    figures.dirty_log = Some(format!("{:?}", vmm.start_dirty_log()?));
    // Consume what logging starts with (everything, with INITIALLY_SET):
    // round 0 sends all of it, and this re-protects every page.
    vmm.take_dirty()?;
    progress::update(progress, |p| {
        p.phase = "round".into();
        p.round = 0;
        p.remaining_mib = ram.size as f64 / MIB;
    });
    let t = Instant::now();
    let stats = send_all_memory(ram, w)?;
    w.flush().map_err(wire::Error::Io)?;
    let mut bandwidth = (stats.pages_data * PAGE_SIZE) as f64 / t.elapsed().as_secs_f64().max(1e-6);
    figures.round0_mib_s = bandwidth / MIB;
    figures.pages_sent += stats.pages_data;
    figures.pages_zero += stats.pages_zero;
    figures.rounds = 1;
    let mut previous_dirty = u64::MAX;
    loop {
        let dirty = vmm.take_dirty()?;
        let pages = dirty.pages();
        let remaining = (pages * PAGE_SIZE) as f64;
        let estimate_ms = remaining / bandwidth * 1000.0;
        progress::update(progress, |p| {
            p.round = figures.rounds;
            p.remaining_mib = remaining / MIB;
            p.sent_mib = w.bytes as f64 / MIB;
            p.rate_mib_s = bandwidth / MIB;
            p.estimated_downtime_ms = estimate_ms;
            p.throttle_pct = throttle.get();
            p.elapsed_ms = ms(t0.elapsed());
        });
        if estimate_ms <= opts.downtime_ms {
            return Ok(dirty);
        }
        if t0.elapsed() >= opts.timeout || figures.rounds >= opts.max_rounds {
            let why = format!(
                "{} rounds in {:.1} s, {pages} pages still dirty, estimated downtime {estimate_ms:.0} ms > {} ms",
                figures.rounds,
                t0.elapsed().as_secs_f64(),
                opts.downtime_ms
            );
            match opts.policy {
                Policy::Cancel => return Err(Error::Cancelled(why)),
                Policy::Force => {
                    tracing::warn!("forcing switchover: {why}");
                    figures.forced = true;
                    return Ok(dirty);
                }
            }
        }
        // Not shrinking: the guest dirties as fast as we send.
        if opts.auto_converge && figures.rounds >= 2 && pages * 10 >= previous_dirty * 9 {
            throttle.set(throttle.get() + 20);
            figures.throttle_pct = figures.throttle_pct.max(throttle.get());
        }
        previous_dirty = pages;
        let t = Instant::now();
        let stats = send_dirty(ram, &dirty, w)?;
        w.flush().map_err(wire::Error::Io)?;
        let secs = t.elapsed().as_secs_f64();
        if secs > 0.0005 {
            bandwidth = ((stats.pages_data * PAGE_SIZE) as f64 / secs).max(bandwidth * 0.5);
        }
        figures.pages_sent += stats.pages_data;
        figures.pages_zero += stats.pages_zero;
        figures.rounds += 1;
    }
}

enum Failure {
    BeforeCommit(Error),
    AfterCommit(Error),
}

/// With the VM paused: the last memory, the state, and the commit.
fn switchover(
    vmm: &Vmm,
    w: &mut Writer,
    reader: &mut Stream,
    logging: bool,
    mut pending: DirtyBitmap,
    destination_host: &str,
    figures: &mut Figures,
) -> Result<(), Failure> {
    let before = |e: Error| Failure::BeforeCommit(e);
    let stats = if logging {
        pending.merge(&vmm.take_dirty().map_err(|e| before(e.into()))?);
        figures.rounds += 1;
        send_dirty(vmm.ram(), &pending, w).map_err(|e| before(e.into()))?
    } else {
        figures.rounds = 1;
        send_all_memory(vmm.ram(), w).map_err(|e| before(e.into()))?
    };
    figures.pages_sent += stats.pages_data;
    figures.pages_zero += stats.pages_zero;
    figures.final_pages = stats.pages_data + stats.pages_zero;
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
    figures.restore_ms = ms(t_restore.elapsed());
    // Disks are durable and handed over (shared-volume leases to the
    // destination, epoch + 1; local locks released) before it may write.
    let t_handoff = Instant::now();
    vmm.release_backends(destination_host).map_err(|e| before(e.into()))?;
    figures.handoff_ms = ms(t_handoff.elapsed());
    // The point of no return: from here the VM never runs on this host.
    vmm.retire();
    wire::write_frame(w, Kind::Commit, &[]).map_err(|e| Failure::AfterCommit(e.into()))?;
    w.flush().map_err(|e| Failure::AfterCommit(wire::Error::Io(e).into()))?;
    let resumed = wire::read_frame(reader).map_err(|e| Failure::AfterCommit(e.into()))?;
    if resumed.kind != Kind::Resumed {
        return Err(Failure::AfterCommit(wire::Error::Unexpected { expected: "Resumed", got: resumed.kind }.into()));
    }
    Ok(())
}
