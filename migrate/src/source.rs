//! Migration from this host: quick (pause, copy, resume there) or live
//! (pre-copy with dirty logging, then a short switchover). It drives the VM
//! only through [`MigratableVm`].
//!
//! Until `Commit` is sent, any failure gives the VM back here in the run
//! state it had, and the destination discards what it built (it never
//! ran). After `Commit` the VM never runs here again.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm::migration::{DirtyBitmap, Extent, MemorySource, MigratableVm, RunState, ScanStats, PAGE_SIZE};

use crate::auth::Key;
use crate::figures::Figures;
use crate::progress::{self, Shared};
use crate::secure::{self, SecureReader, SecureWriter};
use crate::transport::{connect, Endpoint};
use crate::wire::{self, Hello, Kind, Mode, Reason, ZeroRange, MEM_CHUNK, PROTOCOL_VERSION};

/// How guest memory reaches the destination (the figures' `memory`).
pub const MEMORY_COPY: &str = "copy";
pub const MEMORY_SHARED_FD: &str = "shared-fd";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The encrypted handshake must be done this quickly, in total.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Any single read or write that takes longer means the peer is gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: f64 = (1 << 20) as f64;
pub const DEFAULT_SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// After the commit, how long the destination has to say it runs the VM.
const RESUMED_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do when pre-copy does not converge in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Cap on pre-copy bandwidth, MiB/s (None: as fast as the link goes).
    /// Never applied inside the downtime window.
    pub max_bandwidth_mib_s: Option<f64>,
    /// Set from outside (`vm.migration-cancel`) to give up before the commit.
    pub cancel: Arc<AtomicBool>,
    /// Any single read or write that takes longer means the peer is gone
    /// (a silent network cut shows as this).
    pub io_timeout: Duration,
    /// The whole switchover (pause to commit) must fit this, or the VM
    /// resumes here; the destination waits for the commit a little longer.
    pub switchover_timeout: Duration,
    /// Who decides the commit, if not this VMM alone: a Unix socket (the
    /// cluster agent's) asked right before `Commit` is sent. See [`gate`].
    pub commit_gate: Option<std::path::PathBuf>,
    /// Encrypted records (the default) or plain ones after an authenticated
    /// handshake; the destination must say the same (see `secure::Records`).
    pub records: secure::Records,
    /// To a destination on this host (`unix:`), pass the guest memory's
    /// file instead of copying pages, if the destination agrees.
    pub share_memory: bool,
    /// Connections to carry memory on, each with its own thread (the
    /// destination may agree to fewer; see `wire::STRIPE`).
    pub streams: u8,
}

/// The default of `--streams` (see the README's Figures for the sweep
/// that chose it).
pub const DEFAULT_STREAMS: u8 = 1;

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
            cancel: Arc::new(AtomicBool::new(false)),
            io_timeout: IO_TIMEOUT,
            switchover_timeout: DEFAULT_SWITCHOVER_TIMEOUT,
            commit_gate: None,
            records: secure::Records::Sealed,
            share_memory: true,
            streams: DEFAULT_STREAMS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: Endpoint, source: std::io::Error },
    #[error(transparent)]
    Secure(#[from] secure::Error),
    #[error("destination refused the migration: {0}")]
    Refused(String),
    #[error("destination failed: {0}")]
    DestinationFailed(String),
    #[error(transparent)]
    Wire(#[from] wire::Error),
    #[error(transparent)]
    Vm(#[from] vmm::migration::Error),
    #[error("pre-copy did not converge ({0}); cancelled by policy, the VM keeps running here")]
    Cancelled(String),
    #[error("cancelled on request before the commit; the VM keeps running here")]
    CancelledByRequest,
    #[error("the commit gate {gate} refused the commit: {reason}")]
    GateRefused { gate: String, reason: String },
    #[error("the commit gate {gate} cannot tell whether the cluster committed the move ({reason}); the VM is stopped here so it never runs twice")]
    GateUncertain { gate: String, reason: String },
    #[error("memory stream {index} of {streams}: {source}")]
    Stream { index: usize, streams: usize, source: wire::Error },
    #[error("the destination did not confirm it runs the VM after commit ({0}); the VM is stopped on the source so it never runs twice")]
    Uncertain(String),
}

/// Counts what goes on the wire, holds it to a bandwidth cap, and stops it
/// when the migration is cancelled.
struct Counting<W> {
    inner: W,
    bytes: u64,
    /// Bytes per second allowed, and the byte count and time it started at.
    cap: Option<(f64, u64, Instant)>,
    /// Checked on every write until the commit is near.
    cancel: Option<Arc<AtomicBool>>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(std::io::Error::other("migration cancelled"));
        }
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        if let Some((rate, from, since)) = self.cap {
            // Sleep until the bytes so far fit the cap.
            let due = Duration::from_secs_f64((self.bytes - from) as f64 / rate);
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

type Writer = Counting<SecureWriter>;

fn send_extent(w: &mut impl Write, extent: Extent<'_>) -> Result<(), wire::Error> {
    match extent {
        Extent::Zero { offset, len } => wire::send(w, Kind::MemZero, &ZeroRange { offset, len }),
        Extent::Data { offset, bytes } => bytes
            .chunks(MEM_CHUNK)
            .enumerate()
            .try_for_each(|(i, chunk)| wire::write_mem_data(w, offset + (i * MEM_CHUNK) as u64, chunk)),
    }
}

/// An extra memory stream (the control stream is stream 0).
struct Extra {
    w: Writer,
    r: SecureReader,
    /// To cut it from another thread.
    socket: crate::transport::Stream,
}

/// Which pages a round sends.
#[derive(Clone, Copy)]
enum Pages<'a> {
    All,
    Dirty(&'a DirtyBitmap),
}

/// Sends `pages` over the control stream and the extra ones, each stream
/// its own stripes from its own thread, and flushes them all. A stream that
/// fails cuts the other extra ones, so none waits out its timeout; the
/// error names the stream that failed first.
fn send_memory(
    mem: &dyn MemorySource,
    pages: Pages<'_>,
    control: &mut Writer,
    extra: &mut [Extra],
) -> Result<ScanStats, Error> {
    if extra.is_empty() {
        let stats = match pages {
            Pages::All => send_all_memory(mem, control)?,
            Pages::Dirty(d) => send_dirty(mem, d, control, |_| true)?,
        };
        control.flush().map_err(wire::Error::Io)?;
        return Ok(stats);
    }
    let n = extra.len() + 1;
    let (extra_writers, sockets): (Vec<&mut Writer>, Vec<&crate::transport::Stream>) =
        extra.iter_mut().map(|e| (&mut e.w, &e.socket)).unzip();
    let writers: Vec<&mut Writer> = std::iter::once(control).chain(extra_writers).collect();
    let round = Round {
        first_failure: Mutex::new(None),
        failed: AtomicBool::new(false),
        left: Mutex::new(n),
        done: Condvar::new(),
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = writers
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let (sockets, round) = (&sockets, &round);
                s.spawn(move || {
                    let mut stopping = Stopping { inner: &mut *w, failed: &round.failed };
                    let r = match pages {
                        Pages::All => send_stripes(mem, i, n, &mut stopping),
                        Pages::Dirty(d) => send_dirty(mem, d, &mut stopping, |offset| wire::stream_of(offset, n) == i),
                    }
                    .and_then(|stats| stopping.flush().map(|()| stats).map_err(wire::Error::Io))
                    .and_then(|stats| round.finished(w).map(|()| stats));
                    r.map_err(|source| round.fail(Error::Stream { index: i, streams: n, source }, sockets)).ok()
                })
            })
            .collect();
        let mut total = ScanStats::default();
        let mut panicked = false;
        for t in threads {
            match t.join() {
                Ok(Some(stats)) => {
                    total.pages_data += stats.pages_data;
                    total.pages_zero += stats.pages_zero;
                }
                Ok(None) => {}
                Err(_) => panicked = true,
            }
        }
        let first = round.first_failure.lock().unwrap_or_else(|e| e.into_inner()).take();
        match first {
            Some(e) => Err(e),
            None if panicked => Err(wire::Error::Payload("a memory stream's thread panicked".into()).into()),
            None => Ok(total),
        }
    })
}

/// How often a memory stream whose share of a round is sent says it is
/// alive while others still send (the receiver times a silent stream out).
const KEEPALIVE: Duration = Duration::from_secs(5);

/// One round over several streams.
struct Round {
    /// The cause: the first stream to fail.
    first_failure: Mutex<Option<Error>>,
    /// Set at the first failure: every other stream stops writing.
    failed: AtomicBool,
    /// Streams still sending their share.
    left: Mutex<usize>,
    done: Condvar,
}

impl Round {
    /// Records the first failure and cuts the extra streams (the control
    /// stream stays, for the `Abort`).
    fn fail(&self, e: Error, sockets: &[&crate::transport::Stream]) {
        let mut first = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(e);
            self.failed.store(true, Ordering::SeqCst);
            sockets.iter().for_each(|s| s.shutdown());
        }
        drop(first);
        self.finish_one();
    }

    fn finish_one(&self) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        *left = left.saturating_sub(1);
        self.done.notify_all();
    }

    /// This stream's share is sent: keep it alive until every stream's is.
    fn finished(&self, w: &mut Writer) -> Result<(), wire::Error> {
        self.finish_one();
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left > 0 && !self.failed.load(Ordering::SeqCst) {
            let (guard, wait) = self.done.wait_timeout(left, KEEPALIVE).unwrap_or_else(|e| e.into_inner());
            left = guard;
            if wait.timed_out() && *left > 0 && !self.failed.load(Ordering::SeqCst) {
                drop(left);
                wire::write_frame(w, Kind::KeepAlive, &[])?;
                w.flush()?;
                left = self.left.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
        Ok(())
    }
}

/// A stream's writer for one round: refuses to write once another stream
/// of the round has failed, so none sends on for nothing.
struct Stopping<'a> {
    inner: &'a mut Writer,
    failed: &'a AtomicBool,
}

impl Write for Stopping<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("another memory stream of this round failed"));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Stream `index` of `n`'s share of all memory: stripes `index`, `index + n`, ...
fn send_stripes(mem: &dyn MemorySource, index: usize, n: usize, w: &mut impl Write) -> Result<ScanStats, wire::Error> {
    let mut total = ScanStats::default();
    let mut start = index as u64 * wire::STRIPE;
    while start < mem.size() {
        let range = start..(start + wire::STRIPE).min(mem.size());
        let stats = scan_sending(w, |f| mem.scan_range(range.clone(), f))?;
        total.pages_data += stats.pages_data;
        total.pages_zero += stats.pages_zero;
        start += n as u64 * wire::STRIPE;
    }
    Ok(total)
}

/// Sends all of guest memory: untouched and zero pages as markers.
fn send_all_memory(mem: &dyn MemorySource, w: &mut impl Write) -> Result<ScanStats, wire::Error> {
    scan_sending(w, |f| mem.scan(f))
}

/// Runs a scan that sends every extent it finds on `w`.
fn scan_sending(
    w: &mut impl Write,
    scan: impl FnOnce(&mut dyn FnMut(Extent<'_>) -> std::io::Result<()>) -> std::io::Result<ScanStats>,
) -> Result<ScanStats, wire::Error> {
    let mut failure = None;
    let stats = scan(&mut |extent| {
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

/// Sends the pages in `dirty` that are `mine`, reading runs of consecutive
/// pages at once (a run never crosses a stripe: see `wire::STRIPE`).
fn send_dirty(
    mem: &dyn MemorySource,
    dirty: &DirtyBitmap,
    w: &mut impl Write,
    mine: impl Fn(u64) -> bool,
) -> Result<ScanStats, wire::Error> {
    let mut stats = ScanStats::default();
    let mut buf = vec![0u8; MEM_CHUNK];
    let mut flush_run = |start: u64, len: u64, stats: &mut ScanStats| -> Result<(), wire::Error> {
        let bytes = &mut buf[..len as usize];
        mem.read_at(start, bytes)?;
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
    let size = mem.size();
    let mut run: Option<(u64, u64)> = None;
    for off in dirty.offsets().filter(|o| *o < size && mine(*o)) {
        match run {
            Some((start, len))
                if start + len == off && len < MEM_CHUNK as u64 && start / wire::STRIPE == off / wire::STRIPE =>
            {
                run = Some((start, len + PAGE_SIZE))
            }
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
    fn start(vm: Arc<dyn MigratableVm>) -> Throttle {
        let pct = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pct.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            const SLICE_US: u64 = 20_000;
            while !s.load(Ordering::Relaxed) {
                let held = SLICE_US * u64::from(p.load(Ordering::Relaxed)) / 100;
                if held > 0 && vm.throttle(true).is_ok() {
                    std::thread::sleep(Duration::from_micros(held));
                    let _ = vm.throttle(false);
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

    /// Stops the throttle with the vCPUs released.
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

/// Moves the VM to `to`. On success the VM is retired here (it runs on the
/// destination) and the caller should let this VMM exit. On any error but
/// [`Error::Uncertain`] the VM is this host's again, as it was.
pub fn migrate(vm: &Arc<dyn MigratableVm>, to: &Endpoint, opts: &Options, progress: &Shared) -> Result<Figures, Error> {
    let before = vm.begin_migration()?;
    let result = migrate_claimed(vm, before, to, opts, progress);
    match &result {
        Ok(f) if f.mode == "check-only" => vm.end_migration()?,
        Ok(_) | Err(Error::Uncertain(_)) => {}
        Err(_) => {
            if let Err(e) = vm.end_migration() {
                tracing::error!("after a failed migration the VM could not be given back: {e}");
            }
        }
    }
    result
}

fn migrate_claimed(
    vm: &Arc<dyn MigratableVm>,
    before: RunState,
    to: &Endpoint,
    opts: &Options,
    progress: &Shared,
) -> Result<Figures, Error> {
    let t0 = Instant::now();
    progress::update(progress, |p| p.phase = "connecting".into());
    let stream = connect(to, CONNECT_TIMEOUT).map_err(|source| Error::Connect { endpoint: to.clone(), source })?;
    // Every byte from here on is encrypted and authenticated, bound to this
    // session (see `secure`), unless both ends asked for plain records.
    let suite = secure::Suite { records: opts.records, ..secure::Suite::default() };
    let (mut reader, mut writer) = secure::connect_with(stream, &opts.key, Instant::now() + HANDSHAKE_TIMEOUT, suite)?;
    // Both halves keep it: clearing a deadline on either puts it back.
    writer.set_timeout(Some(opts.io_timeout)).map_err(wire::Error::Io)?;
    reader.set_timeout(Some(opts.io_timeout)).map_err(wire::Error::Io)?;
    let cap = opts.max_bandwidth_mib_s.filter(|r| *r > 0.0).map(|r| (r * MIB, 0, Instant::now()));
    let mut w = Counting { inner: writer, bytes: 0, cap, cancel: Some(opts.cancel.clone()) };

    progress::update(progress, |p| p.phase = "preflight".into());
    let requirements = vm.requirements();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        mode: opts.mode,
        requirements,
        check_only: opts.check_only,
        switchover_timeout_ms: opts.switchover_timeout.as_millis() as u64,
    };
    let mem = vm.memory();
    // Only a peer on this host can map our memory, and only a Unix socket
    // can carry the descriptor.
    let shareable = match (opts.share_memory && !opts.check_only, to, mem.shareable_file()) {
        (true, Endpoint::Unix(_), Some(file)) => Some((file, wire::MemFdId::of(file).map_err(wire::Error::Io)?)),
        _ => None,
    };
    let streams = if shareable.is_some() { 1 } else { opts.streams.max(1) };
    let ext = wire::HelloExt { shared_memory: shareable.map(|(_, id)| id), streams };
    wire::send_with_ext(&mut w, Kind::Hello, &hello, &ext)?;
    w.flush().map_err(wire::Error::Io)?;
    let reply = wire::read_frame(&mut reader)?;
    let (destination_host, ack_ext) = match reply.kind {
        Kind::HelloAck => {
            let (ack, ext): (wire::Ack, wire::AckExt) = wire::decode_with_ext(reply.kind, &reply.payload)?;
            (ack.host_id, ext)
        }
        Kind::Refuse => return Err(Error::Refused(reply.decode::<Reason>()?.reason)),
        other => return Err(wire::Error::Unexpected { expected: "HelloAck", got: other }.into()),
    };
    let mut figures = Figures {
        mode: match opts.mode {
            Mode::Quick => "quick",
            Mode::Live => "live",
        },
        memory: MEMORY_COPY,
        streams: 1,
        mem_mib: mem.size() >> 20,
        destination: to.to_string(),
        ..Default::default()
    };
    if opts.check_only {
        figures.mode = "check-only";
        figures.total_ms = ms(t0.elapsed());
        return Ok(figures);
    }
    let shared = match shareable {
        Some((file, _)) if ack_ext.shared_memory => pass_memory(file, &mut w, &mut reader)?,
        _ => false,
    };
    if shared {
        figures.memory = MEMORY_SHARED_FD;
    }
    let mut extra = match ack_ext.streams.min(streams) {
        n if n > 1 && !shared => match join_streams(to, opts, &ack_ext.session, n, cap) {
            Ok(extra) => {
                // The bandwidth cap is shared out, this stream's part too.
                w.cap = cap.map(|(rate, from, since)| (rate / f64::from(n), from, since));
                extra
            }
            Err(e) => {
                abort(&mut w, &e);
                return Err(e);
            }
        },
        _ => Vec::new(),
    };
    figures.streams = 1 + extra.len() as u8;

    let was_running = before == RunState::Running;
    // Shared memory needs no pre-copy and no dirty log: the destination
    // maps these very pages. This side's last write to them is done when
    // `vm.pause()` below returns (vCPUs out of KVM_RUN, in-flight MMIO
    // completed; the device loop parked: no tap input, no disk request, no
    // used ring). After it nothing here writes them, whether the move
    // commits (the VM is retired) or fails (the destination wrote nothing
    // either, so the VM resumes on its memory as it left it).
    let logging = opts.mode == Mode::Live && was_running && !shared;
    let precopy = if logging {
        let mut throttle = Throttle::start(vm.clone());
        let peer = Peer { reader: &mut reader, catch_up: ack_ext.catch_up };
        let r = precopy(vm.as_ref(), &mut w, &mut extra, peer, opts, progress, &throttle, &mut figures, t0);
        throttle.stop();
        r
    } else {
        Ok(DirtyBitmap::default())
    };
    let pending = match precopy {
        Ok(p) => p,
        Err(e) => {
            let e = cancelled_by_request(opts, e);
            if logging {
                let _ = vm.stop_dirty_log();
            }
            abort(&mut w, &e);
            return Err(e);
        }
    };

    progress::update(progress, |p| p.phase = "switchover".into());
    // Most of the disks' flush happens here, with the guest still running.
    if let Err(e) = vm.flush_backends() {
        tracing::warn!("pre-switchover flush: {e}");
    }
    // The downtime window: as fast as the link goes, and bounded in total.
    w.cap = None;
    let t_pause = Instant::now();
    let deadline = Some(t_pause + opts.switchover_timeout);
    reader.set_deadline(deadline);
    w.inner.set_deadline(deadline);
    for e in &mut extra {
        e.w.cap = None;
        e.w.inner.set_deadline(deadline);
    }
    if was_running {
        if let Err(e) = vm.pause() {
            let e = Error::from(e);
            if logging {
                let _ = vm.stop_dirty_log();
            }
            abort(&mut w, &e);
            return Err(e);
        }
    }
    let memory = if shared {
        Memory::Shared
    } else if logging {
        Memory::Dirty(pending)
    } else {
        Memory::All
    };
    match switchover(
        vm.as_ref(),
        &mut w,
        &mut extra,
        &mut reader,
        memory,
        &destination_host,
        opts,
        &mut figures,
        t_pause,
    ) {
        Ok(()) => {}
        Err(Failure::BeforeCommit(e)) => {
            let e = cancelled_by_request(opts, e);
            abort(&mut w, &e);
            if logging {
                let _ = vm.stop_dirty_log();
            }
            if was_running {
                vm.resume()?;
            }
            return Err(e);
        }
        Err(Failure::AfterCommit(e)) => return Err(Error::Uncertain(e.to_string())),
    }
    figures.downtime_ms = ms(t_pause.elapsed());
    figures.total_ms = ms(t0.elapsed());
    figures.bytes_sent = w.bytes + extra.iter().map(|e| e.w.bytes).sum::<u64>();
    progress::update(progress, |p| p.phase = "done".into());
    Ok(figures)
}

/// Opens the `n - 1` extra memory streams the destination agreed to, each
/// authenticated on its own and naming the session it joins.
fn join_streams(
    to: &Endpoint,
    opts: &Options,
    session: &[u8; 16],
    n: u8,
    cap: Option<(f64, u64, Instant)>,
) -> Result<Vec<Extra>, Error> {
    let suite = secure::Suite { records: opts.records, ..secure::Suite::default() };
    // The bandwidth cap is shared out.
    let cap = cap.map(|(rate, from, since)| (rate / f64::from(n), from, since));
    (1..n)
        .map(|index| {
            let stream =
                connect(to, CONNECT_TIMEOUT).map_err(|source| Error::Connect { endpoint: to.clone(), source })?;
            let socket = stream.try_clone().map_err(wire::Error::Io)?;
            let (mut r, mut inner) =
                secure::connect_with(stream, &opts.key, Instant::now() + HANDSHAKE_TIMEOUT, suite)?;
            inner.set_timeout(Some(opts.io_timeout)).map_err(wire::Error::Io)?;
            r.set_timeout(Some(opts.io_timeout)).map_err(wire::Error::Io)?;
            let mut w = Counting { inner, bytes: 0, cap, cancel: Some(opts.cancel.clone()) };
            wire::send(&mut w, Kind::Join, &wire::Join { session: *session, index })?;
            w.flush().map_err(wire::Error::Io)?;
            Ok(Extra { w, r, socket })
        })
        .collect()
}

/// Passes the guest memory's file to the destination, which agreed to map
/// it; true once it says it has (false: it could not, and memory is copied).
fn pass_memory(file: &std::fs::File, w: &mut Writer, reader: &mut SecureReader) -> Result<bool, Error> {
    use std::os::fd::AsFd;
    w.inner.send_fd(file.as_fd()).map_err(wire::Error::Io)?;
    let reply = wire::read_frame(reader)?;
    match reply.kind {
        Kind::MemFd => {
            let verdict: wire::MemFdVerdict = reply.decode()?;
            if !verdict.mapped {
                tracing::warn!("the destination could not map the passed memory ({}); copying it", verdict.reason);
            }
            Ok(verdict.mapped)
        }
        Kind::Abort => Err(Error::DestinationFailed(reply.decode::<Reason>()?.reason)),
        other => Err(wire::Error::Unexpected { expected: "MemFd", got: other }.into()),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A write that failed because of a cancel request reads as one.
fn cancelled_by_request(opts: &Options, e: Error) -> Error {
    if opts.cancel.load(Ordering::Relaxed) {
        Error::CancelledByRequest
    } else {
        e
    }
}

/// Tells the destination (best effort) that we give up.
fn abort(w: &mut Writer, e: &Error) {
    w.cancel = None;
    let _ = wire::send(w, Kind::Abort, &Reason { reason: e.to_string() });
    let _ = w.inner.finish();
}

/// The destination as pre-copy sees it: what it says, and whether it
/// answers `CatchUp`.
struct Peer<'a> {
    reader: &'a mut SecureReader,
    catch_up: bool,
}

impl Peer<'_> {
    /// Waits until the destination has applied everything sent so far, on
    /// every stream.
    fn wait_caught_up(&mut self, w: &mut Writer, extra: &mut [Extra]) -> Result<(), Error> {
        for w in std::iter::once(&mut *w).chain(extra.iter_mut().map(|e| &mut e.w)) {
            wire::write_frame(w, Kind::CatchUp, &[])?;
            w.flush().map_err(wire::Error::Io)?;
        }
        let readers = std::iter::once(&mut *self.reader).chain(extra.iter_mut().map(|e| &mut e.r));
        for reader in readers {
            let reply = wire::read_frame(reader)?;
            match reply.kind {
                Kind::CatchUp => {}
                Kind::Abort => return Err(Error::DestinationFailed(reply.decode::<Reason>()?.reason)),
                other => return Err(wire::Error::Unexpected { expected: "CatchUp", got: other }.into()),
            }
        }
        Ok(())
    }
}

/// Round 0 and the iterative rounds; returns the dirty set not yet sent.
#[allow(clippy::too_many_arguments)]
fn precopy(
    vm: &dyn MigratableVm,
    w: &mut Writer,
    extra: &mut [Extra],
    mut peer: Peer<'_>,
    opts: &Options,
    progress: &Shared,
    throttle: &Throttle,
    figures: &mut Figures,
    t0: Instant,
) -> Result<DirtyBitmap, Error> {
    let mem = vm.memory();
    figures.dirty_log = Some(vm.start_dirty_log()?.to_owned());
    // Consume what logging starts with (everything, with INITIALLY_SET):
    // round 0 sends all of it, and this re-protects every page.
    vm.take_dirty()?;
    progress::update(progress, |p| {
        p.phase = "round".into();
        p.round = 0;
        p.remaining_mib = mem.size() as f64 / MIB;
    });
    let t = Instant::now();
    let stats = send_memory(mem, Pages::All, w, extra)?;
    let mut bandwidth = (stats.pages_data * PAGE_SIZE) as f64 / t.elapsed().as_secs_f64().max(1e-6);
    figures.round0_mib_s = bandwidth / MIB;
    figures.pages_sent += stats.pages_data;
    figures.pages_zero += stats.pages_zero;
    figures.rounds = 1;
    let mut previous_dirty = u64::MAX;
    let estimate = |pages: u64, bandwidth: f64| (pages * PAGE_SIZE) as f64 / bandwidth * 1000.0;
    loop {
        let mut dirty = vm.take_dirty()?;
        let mut pages = dirty.pages();
        if peer.catch_up && estimate(pages, bandwidth) <= opts.downtime_ms {
            // About to pause: first let the destination drain the socket
            // buffers, or the downtime would include that. The guest runs
            // meanwhile, so look at the log again after.
            let t = Instant::now();
            peer.wait_caught_up(w, extra)?;
            figures.catch_up_ms += ms(t.elapsed());
            dirty.merge(&vm.take_dirty()?);
            pages = dirty.pages();
        }
        let remaining = (pages * PAGE_SIZE) as f64;
        let estimate_ms = estimate(pages, bandwidth);
        progress::update(progress, |p| {
            p.round = figures.rounds;
            p.remaining_mib = remaining / MIB;
            p.sent_mib = (w.bytes + extra.iter().map(|e| e.w.bytes).sum::<u64>()) as f64 / MIB;
            p.rate_mib_s = bandwidth / MIB;
            p.estimated_downtime_ms = estimate_ms;
            p.throttle_pct = throttle.get();
            p.elapsed_ms = ms(t0.elapsed());
        });
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::CancelledByRequest);
        }
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
        let stats = send_memory(mem, Pages::Dirty(&dirty), w, extra)?;
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

/// What memory the switchover still sends.
enum Memory {
    /// The pages dirtied since the last pre-copy round.
    Dirty(DirtyBitmap),
    /// All of it (quick migration, or a paused VM).
    All,
    /// None: the destination maps the same memory file.
    Shared,
}

/// With the VM paused: the last memory, the state, and the commit.
#[allow(clippy::too_many_arguments)]
fn switchover(
    vm: &dyn MigratableVm,
    w: &mut Writer,
    extra: &mut [Extra],
    reader: &mut SecureReader,
    memory: Memory,
    destination_host: &str,
    opts: &Options,
    figures: &mut Figures,
    t_pause: Instant,
) -> Result<(), Failure> {
    let before = |e: Error| Failure::BeforeCommit(e);
    let stats = match memory {
        Memory::Dirty(mut pending) => {
            pending.merge(&vm.take_dirty().map_err(|e| before(e.into()))?);
            figures.rounds += 1;
            send_memory(vm.memory(), Pages::Dirty(&pending), w, extra).map_err(before)?
        }
        Memory::All => {
            figures.rounds = 1;
            send_memory(vm.memory(), Pages::All, w, extra).map_err(before)?
        }
        Memory::Shared => ScanStats::default(),
    };
    // The extra streams are done: the destination applies what they carry
    // before it reads on past the state (their `End`s).
    for e in extra.iter_mut() {
        wire::write_frame(&mut e.w, Kind::End, &[]).map_err(|e| before(e.into()))?;
        e.w.flush().map_err(|e| before(wire::Error::Io(e).into()))?;
        let _ = e.w.inner.finish();
    }
    figures.pages_sent += stats.pages_data;
    figures.pages_zero += stats.pages_zero;
    figures.final_pages = stats.pages_data + stats.pages_zero;
    let state = vm.save_state().map_err(|e| before(e.into()))?;
    wire::write_frame(w, Kind::State, &state).map_err(|e| before(e.into()))?;
    w.flush().map_err(|e| before(wire::Error::Io(e).into()))?;
    figures.pause_to_state_ms = ms(t_pause.elapsed());
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
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(before(Error::CancelledByRequest));
    }
    // Past here nothing cancels: the commit is near.
    w.cancel = None;
    // Disks are durable and handed over (shared-volume leases to the
    // destination, epoch + 1; local locks released) before it may write.
    let t_handoff = Instant::now();
    vm.release_backends(destination_host).map_err(|e| before(e.into()))?;
    figures.handoff_ms = ms(t_handoff.elapsed());
    // From here a failure before the commit is sent must also take the
    // disks back.
    let undo = |vm: &dyn MigratableVm, e: Error| {
        if let Err(r) = vm.reclaim_backends() {
            tracing::error!("the migration failed before its commit and a disk could not be taken back: {r}");
        }
        Failure::BeforeCommit(e)
    };
    if let Some(path) = &opts.commit_gate {
        let t_gate = Instant::now();
        let answer = gate::ask(path, destination_host);
        figures.commit_ms = ms(t_gate.elapsed());
        match answer {
            Ok(()) => {}
            // The cluster may yet record the destination as the owner: the
            // VM must not run here again, and no Commit goes out (the
            // destination asks the cluster itself).
            Err(e @ Error::GateUncertain { .. }) => {
                vm.retire().map_err(|r| Failure::AfterCommit(r.into()))?;
                return Err(Failure::AfterCommit(e));
            }
            Err(e) => return Err(undo(vm, e)),
        }
    }
    // Send the commit, then retire. The VM is paused meanwhile, so nothing
    // runs in between; and a commit that could not be sent (the destination
    // already gone: the write fails) never reached it, so the VM is still
    // this host's. Only a commit that left is a point of no return.
    if reader.peer_gone() {
        // It sends nothing between Ready and Commit: a close now means the
        // destination died after Ready and can never run the VM.
        return Err(undo(
            vm,
            Error::DestinationFailed("the destination closed the connection before the commit".into()),
        ));
    }
    let after = Some(Instant::now() + RESUMED_TIMEOUT);
    reader.set_deadline(after);
    w.inner.set_deadline(after);
    let sent = wire::write_frame(w, Kind::Commit, &[]).and_then(|()| w.flush().map_err(wire::Error::Io));
    if let Err(e) = sent {
        return Err(undo(vm, e.into()));
    }
    let t_commit = Instant::now();
    vm.retire().map_err(|e| Failure::AfterCommit(e.into()))?;
    let resumed = wire::read_frame(reader).map_err(|e| Failure::AfterCommit(e.into()))?;
    if resumed.kind != Kind::Resumed {
        return Err(Failure::AfterCommit(wire::Error::Unexpected { expected: "Resumed", got: resumed.kind }.into()));
    }
    figures.commit_to_resumed_ms = ms(t_commit.elapsed());
    let _ = w.inner.finish();
    Ok(())
}

/// The commit gate: before a migration commits, the source VMM asks a Unix
/// socket (the cluster agent's) whether it may. One JSON line each way:
///
/// ```text
/// -> {"to_host": "b"}
/// <- {"commit": true}  |  {"commit": false, "reason": "..."}
///    |  {"commit": false, "uncertain": true, "reason": "..."}
/// ```
///
/// The agent answers `true` only once the cluster's own record says the
/// VM belongs to `to_host` (an etcd transaction on its owner key). Anything
/// else (a refusal, no answer within [`gate::TIMEOUT`], a broken reply) is a
/// failure before the commit: the VM stays here. `uncertain` means the
/// cluster could not say whether the owner changed (etcd unreachable after
/// an attempt whose outcome is unknown): then the VM may not run here
/// again, and it is stopped without sending Commit.
pub mod gate {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::Error;

    pub const TIMEOUT: Duration = Duration::from_secs(10);

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Ask {
        pub to_host: String,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Answer {
        pub commit: bool,
        #[serde(default)]
        pub uncertain: bool,
        #[serde(default)]
        pub reason: String,
    }

    pub fn ask(path: &Path, to_host: &str) -> Result<(), Error> {
        let refused = |reason: String| Error::GateRefused { gate: path.display().to_string(), reason };
        let mut s = UnixStream::connect(path).map_err(|e| refused(format!("cannot reach it: {e}")))?;
        s.set_read_timeout(Some(TIMEOUT))
            .and_then(|_| s.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| refused(e.to_string()))?;
        let mut line = serde_json::to_string(&Ask { to_host: to_host.to_owned() }).expect("serialises");
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(|e| refused(format!("cannot ask: {e}")))?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).map_err(|e| refused(format!("no answer: {e}")))?;
        let answer: Answer = serde_json::from_str(reply.trim()).map_err(|e| refused(format!("bad answer: {e}")))?;
        if answer.commit {
            Ok(())
        } else if answer.uncertain {
            Err(Error::GateUncertain { gate: path.display().to_string(), reason: answer.reason })
        } else {
            Err(refused(answer.reason))
        }
    }
}
