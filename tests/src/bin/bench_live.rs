//! `make bench`: live migration figures for the test guest between the lab's
//! hosts a and b, written as JSON.
//!
//! One lab (`bl`), a tap vm0 on each host. For each guest memory size
//! (256 MiB, 1 GiB, 4 GiB) the test guest boots once on host a with a
//! working set of half its memory and is then moved a -> b -> a -> ...
//! (`ferry receive` on the other host, `ferry migrate --mode live`), three
//! times at each dirty rate (0, 50, 200 MiB/s, set with the console command
//! `dirty N`), so the boot and first fill happen once per size. Per
//! migration:
//! - the source's figures (`ferry migrate --json`): total_ms, downtime_ms,
//!   rounds, bytes_sent, round0_mib_s, throttle_pct;
//! - `ferry ping` from the client namespace every 10 ms, from ~300 ms
//!   before the migration to ~500 ms after it: pings_sent, pings_lost,
//!   max_gap_ms;
//! - guest_stall_ms: the guest's own `max_stall_us` from the first
//!   heartbeat line on the destination's console (and, to explain reply
//!   gaps, guest_stall_source_ms: the largest it reported on the source
//!   during the migration).
//!
//! A run whose pinger stopped before the migration ended is kept in the raw
//! runs but repeated (`counted: false`), up to two extra attempts a cell.
//! All processes use one copy of the ferry binary taken at the start.
//!
//! Each cell moves the guest until both directions have RUNS counted runs
//! (so 6 moves a cell), and reports one row per direction (`direction`:
//! "a->b" or "b->a"): the hosts differ (round 0 has run 2-3x faster b->a
//! than a->b here), and a median across both hides that.
//!
//! Same-host rows (`same_host`): idle 1 GiB and 4 GiB guests moved between
//! two VMM processes on host a over `unix:` (taps vm0 and vm1 on its
//! bridge, in turn), by passing the memory's memfd (`shared-fd`) and by
//! copying it (`--no-memfd`), the two alternating; pinged and measured as
//! the cells are.
//!
//! Medians per row, the raw runs, the single-stream TCP throughput from
//! host a to host b (the ceiling round 0 is compared with), QEMU 7.2's
//! published figures and the targets.
//!
//! The stream sweep (`streams`): after the idle 1 GiB cell, that guest
//! moved over 1, 2 and 4 memory streams (`--streams`), encrypted and plain.
//!
//! Environment, to run a part while developing: BENCH_LIVE_PARTS (a comma
//! list of `cells`, `encryption`, `streams`, `same-host`; all by default;
//! encryption and streams run after the 1 GiB idle cell, so need it), BENCH_LIVE_CELLS (e.g.
//! "1024:0,4096:0"; all nine by default), BENCH_LIVE_RUNS (counted runs per
//! direction, or per memory mode for same-host; 3), BENCH_LIVE_SAME_HOST_MEM
//! (e.g. "4096"; "1024,4096" by default).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::stats::{median, ms3, round3};
use ferry_e2e::{
    cluster_key, ferry_bin, field, guest_elf, heartbeat_number, kvm_available, process_running, root_available,
    run_bounded, Lab, Vm,
};
use serde_json::{json, Value};

#[path = "../live_cell.rs"]
#[allow(dead_code)] // bench-qemu uses the rest
mod live_cell;
use live_cell::{
    expected_ms, guest_cmdline, measure, start_ping, Console, MoveOutcome, GUEST_IP, GUEST_MAC, HEARTBEAT_MS,
    MIN_PING_TAIL_MS, PING_FIGURES, PING_LEAD_MS, PING_TAIL_MS, TAP,
};

const LAB: &str = "bl";
const MEM_MIB: [u64; 3] = [256, 1024, 4096];
const DIRTY_MIB_S: [u64; 3] = [0, 50, 200];
/// Counted runs per direction of a cell (per memory mode for same-host).
const RUNS: usize = 3;
/// Extra attempts per direction at most: a run whose pinger stopped before
/// the migration ended is repeated (kept in the raw runs, not counted).
const EXTRA_ATTEMPTS: usize = 2;
const DIRECTIONS: [&str; 2] = ["a->b", "b->a"];
/// Same-host moves: these sizes, idle; the second tap on host a's bridge.
const SAME_HOST_MEM_MIB: [u64; 2] = [1024, 4096];
const SAME_HOST_TAP: &str = "vm1";
const SAME_HOST_MODES: [&str; 2] = ["shared-fd", "copy"];
/// `ferry migrate`'s default, stated here for the report.
const DOWNTIME_TARGET_MS: u64 = 20;
/// Receivers listen on PORT_BASE + the migration's sequence number.
const PORT_BASE: u16 = 7800;
const TCP_PORT: u16 = 7790;
const TCP_BYTES: u64 = 1 << 30;
const TCP_CHUNK: usize = 1 << 20;
const TCP_RUNS: usize = 3;
/// Each dirty rate runs this long before its first migration.
const SETTLE: Duration = Duration::from_millis(1000);
const T: Duration = Duration::from_secs(30);
/// Boot plus the first fill of the working set (2 GiB for the 4 GiB guest).
const BOOT_T: Duration = Duration::from_secs(180);
const MIGRATE_T: Duration = Duration::from_secs(180);
/// The figures taken per migration (from `ferry migrate` or `ferry ping`)
/// and reported as medians per cell.
const MIGRATE_FIGURES: [&str; 6] = ["total_ms", "downtime_ms", "rounds", "bytes_sent", "round0_mib_s", "throttle_pct"];
/// The guest moved plain and encrypted in turn, this many times each, to
/// price encryption.
const ENCRYPTION_PAIRS: usize = 4;
const ENCRYPTION_MEM_MIB: u64 = 1024;
/// The stream sweep (after the idle 1 GiB cell, like encryption): these
/// stream counts, encrypted and plain, this many moves each (alternating
/// directions).
const SWEEP_STREAMS: [u8; 3] = [1, 2, 4];
const SWEEP_MOVES: usize = 2;

/// How a move is made: records sealed or plain, and memory streams.
#[derive(Clone, Copy)]
struct How {
    plain: bool,
    /// None: `ferry migrate`'s default.
    streams: Option<u8>,
}

impl How {
    const DEFAULT: How = How { plain: false, streams: None };
}

/// A VMM process (`ferry run` or `ferry receive`) on a lab host, whose
/// serial console goes to a file.
struct Guest {
    vm: Vm,
    console: Console,
}

impl Guest {
    fn new(vm: Vm, serial: PathBuf, host: &'static str) -> Guest {
        Guest { vm, console: Console { path: serial, host } }
    }

    fn lines(&self) -> Vec<String> {
        self.console.lines()
    }

    /// Waits for a console line at index >= `from` that satisfies `pred`
    /// (naming the VMM's stderr if it does not come).
    fn wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, String), String> {
        self.console
            .wait_line_from(from, timeout, || Ok(()), pred)
            .map_err(|e| format!("{e}\nstderr:\n{}", self.vm.stderr().trim()))
    }

    /// Types `cmd` on the console and waits for the line starting with `prefix`.
    fn command(&self, cmd: &str, prefix: &str, timeout: Duration) -> Result<String, String> {
        let from = self.lines().len();
        let (ok, _, err) = self.vm.ferry(&["console", cmd]);
        if !ok {
            return Err(format!("ferry console {cmd:?} on host {}: {}", self.console.host, err.trim()));
        }
        self.wait_line_from(from, timeout, |l| l.starts_with(prefix)).map(|(_, l)| l)
    }

    /// The VMM process is up and answers on its API socket.
    fn answers(&self) -> bool {
        process_running(self.vm.pid()) && self.vm.ferry(&["info"]).0
    }

    /// Waits (briefly) for the process to exit by itself, then drops it
    /// (killing it if it is still there); returns whether it had exited.
    fn retire(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while process_running(self.vm.pid()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        !process_running(self.vm.pid())
    }
}

/// Boots the test guest on host a: `mem_mib` of RAM, half of it the
/// working set, dirtied at `dirty_mib_s`.
fn boot(lab: &Lab, dir: &Path, mem_mib: u64, dirty_mib_s: u64) -> Result<(Guest, Value), String> {
    let serial = dir.join(format!("boot-{mem_mib}.log"));
    let args: Vec<String> = vec![
        "--kernel".into(),
        guest_elf().display().to_string(),
        "--mem-mib".into(),
        mem_mib.to_string(),
        "--cmdline".into(),
        guest_cmdline(mem_mib, dirty_mib_s, None),
        "--net".into(),
        format!("tap={TAP},mac={GUEST_MAC}"),
        "--serial".into(),
        format!("file:{}", serial.display()),
    ];
    let started = Instant::now();
    let g = Guest::new(Vm::launch(Some(&lab.netns("a")), "run", &args), serial, "a");
    let (i, ready) = g.wait_line_from(0, BOOT_T, |l| l.starts_with("workload ready"))?;
    let ready_ms = ms3(started.elapsed());
    g.wait_line_from(i + 1, T, |l| heartbeat_number(l).is_some())?;
    let boot = json!({ "workload_ready_ms": ready_ms, "fill_ms": field(&ready, "fill_ms"), "line": ready });
    Ok((g, boot))
}

/// Starts `ferry receive` on `host`, listening on `port`; returns once it listens.
fn receiver(lab: &Lab, dir: &Path, host: &'static str, port: u16, seq: usize, plain: bool) -> Result<Guest, String> {
    let listen = format!("tcp:{}:{port}", Lab::host_ip(host));
    receiver_at(lab, dir, host, &listen, TAP, seq, if plain { &["--no-encryption"] } else { &[] })
}

/// Starts `ferry receive` on `host`, listening on `listen` with tap `tap`;
/// returns once it listens.
fn receiver_at(
    lab: &Lab,
    dir: &Path,
    host: &'static str,
    listen: &str,
    tap: &str,
    seq: usize,
    extra: &[&str],
) -> Result<Guest, String> {
    let serial = dir.join(format!("receive-{seq}.log"));
    let mut args: Vec<String> = vec![
        "--listen".into(),
        listen.into(),
        "--key-file".into(),
        cluster_key().display().to_string(),
        "--net".into(),
        format!("tap={tap}"),
        "--serial".into(),
        format!("file:{}", serial.display()),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    let g = Guest::new(Vm::launch(Some(&lab.netns(host)), "receive", &args), serial, host);
    let deadline = Instant::now() + T;
    while !g.vm.stderr().contains("waiting for a migration") {
        if !process_running(g.vm.pid()) || Instant::now() >= deadline {
            std::thread::sleep(Duration::from_millis(50));
            return Err(format!("ferry receive on host {host} did not start listening: {}", g.vm.stderr().trim()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(g)
}

/// Before a size has moved once: the pinger must outlast the migration.
fn first_guess_ms(mem_mib: u64) -> f64 {
    1000.0 + mem_mib as f64 * 2.0
}

/// What one migration did, and where the VM runs afterwards.
struct Moved {
    record: Value,
    total_ms: Option<f64>,
    guest: Option<Guest>,
}

/// Moves the VM in `src` to the other host, measuring it from the client
/// (`how.plain`: with `--no-encryption` on both ends).
fn migrate_once(lab: &Lab, dir: &Path, src: Guest, seq: usize, expect_ms: u64, how: How) -> Moved {
    let (from, to) = (src.console.host, Lab::other_host(src.console.host));
    let port = PORT_BASE + seq as u16;
    let plain = how.plain;
    let mut record =
        json!({ "seq": seq, "from": from, "to": to, "direction": format!("{from}->{to}"), "encrypted": !plain });
    if let Some(n) = how.streams {
        record["streams_asked"] = json!(n);
    }
    let dst = match receiver(lab, dir, to, port, seq, plain) {
        Ok(g) => g,
        Err(e) => {
            record["ok"] = json!(false);
            record["error"] = json!(e);
            return Moved { record, total_ms: None, guest: Some(src) };
        }
    };
    let ping_ms = PING_LEAD_MS + expect_ms + PING_TAIL_MS;
    let src_from = src.lines().len();
    let src_serial = src.console.path.clone();
    let t_ping = Instant::now();
    let ping = start_ping(lab, ping_ms);
    std::thread::sleep(Duration::from_millis(PING_LEAD_MS));
    let t_start = t_ping.elapsed();
    let key = cluster_key().display().to_string();
    let endpoint = format!("tcp:{}:{port}", Lab::host_ip(to));
    let mut migrate = Command::new(ferry_bin());
    migrate.args(["migrate", "--mode", "live", "--json", "--key-file", &key, "--to", &endpoint, "--api-sock"]);
    migrate.arg(&src.vm.api_sock);
    if plain {
        migrate.arg("--no-encryption");
    }
    if let Some(n) = how.streams {
        migrate.args(["--streams", &n.to_string()]);
    }
    let out = run_bounded(&mut migrate, MIGRATE_T);
    let t_end = t_ping.elapsed();
    let ping = ping.join().unwrap_or_else(|_| Err("the ping thread panicked".into()));
    // The guest's own stalls while it still ran on the source (pre-copy).
    let source_lines = src.lines();
    let source_stall_us = source_lines.iter().skip(src_from).filter_map(|l| field(l, "max_stall_us")).max();
    record["guest_stall_source_ms"] = json!(source_stall_us.map(|us| us as f64 / 1000.0));
    record["migrate_wall_ms"] = json!(ms3(t_end - t_start));
    record["ping_planned_ms"] = json!(ping_ms);
    // How long the pinger ran past the migration's end (negative: it
    // stopped first and missed the switchover).
    let tail = round3(ping_ms as f64 - t_end.as_secs_f64() * 1000.0);
    record["ping_tail_ms"] = json!(tail);
    record["ping_covered"] = json!(tail >= MIN_PING_TAIL_MS && ping.is_ok());
    match &ping {
        Ok(p) => {
            for k in PING_FIGURES {
                record[k] = p[k].clone();
            }
            record["ping"] = p.clone();
        }
        Err(e) => record["ping_error"] = json!(e),
    }

    let figures = out.and_then(|o| {
        if o.status.success() {
            serde_json::from_slice::<Value>(&o.stdout).map_err(|e| format!("ferry migrate printed no JSON: {e}"))
        } else {
            Err(format!("ferry migrate failed: {}", String::from_utf8_lossy(&o.stderr).trim()))
        }
    });
    match figures {
        Ok(f) => {
            for k in MIGRATE_FIGURES.iter().chain(["restore_ms", "final_pages", "streams"].iter()) {
                record[*k] = f[*k].clone();
            }
            record["figures"] = f.clone();
            record["source_exited"] = json!(src.retire(Duration::from_secs(5)));
            // Where the console was cut: a heartbeat line split across the
            // hosts means the stop fell inside it, and the guest does not time
            // its own printing (so it misses that stall).
            let source_tail = std::fs::read(&src_serial).unwrap_or_default();
            let cut_mid_line = source_tail.last().is_some_and(|&b| b != b'\n');
            record["console_cut_mid_line"] = json!(cut_mid_line);
            record["source_last_heartbeat"] = json!(source_lines.iter().rev().find_map(|l| heartbeat_number(l)));
            match dst.wait_line_from(0, Duration::from_secs(10), |l| heartbeat_number(l).is_some()) {
                Ok((_, line)) => {
                    record["guest_stall_ms"] = json!(field(&line, "max_stall_us").map(|us| us as f64 / 1000.0));
                    record["first_heartbeat"] = json!(line);
                }
                Err(e) => record["stall_error"] = json!(e),
            }
            record["ok"] = json!(true);
            Moved { record, total_ms: f["total_ms"].as_f64(), guest: Some(dst) }
        }
        Err(e) => {
            record["ok"] = json!(false);
            record["error"] = json!(e);
            record["receiver_stderr"] = json!(dst.vm.stderr());
            // A failure before the commit leaves the VM running here; one after
            // it may have left it running there.
            let guest = if src.answers() {
                drop(dst);
                Some(src)
            } else if dst.answers() {
                record["vm_moved_anyway"] = json!(true);
                Some(dst)
            } else {
                None
            };
            Moved { record, total_ms: None, guest }
        }
    }
}

/// Moves the guest `ENCRYPTION_PAIRS` times plain and as often encrypted,
/// interleaved so that each mode runs in both directions; returns where it
/// runs and every run's record.
fn encryption_pairs(
    lab: &Lab,
    dir: &Path,
    mut current: Option<Guest>,
    seq: &mut usize,
    history: &[(u64, u64, f64)],
) -> (Option<Guest>, Vec<Value>) {
    let mut runs = Vec::new();
    for i in 0..2 * ENCRYPTION_PAIRS {
        let Some(g) = current.take() else { break };
        // P E E P P E E P: each mode goes both ways (a->b and b->a alike).
        let plain = matches!(i % 4, 0 | 3);
        let expect = expected_ms(history, ENCRYPTION_MEM_MIB, 0, first_guess_ms(ENCRYPTION_MEM_MIB));
        let moved = migrate_once(lab, dir, g, *seq, expect, How { plain, streams: None });
        *seq += 1;
        let r = &moved.record;
        eprintln!(
            "{ENCRYPTION_MEM_MIB} MiB idle, {} ({}->{}): ok={} total={} downtime={} round0={}{}",
            if plain { "plain" } else { "encrypted" },
            r["from"].as_str().unwrap_or("?"),
            r["to"].as_str().unwrap_or("?"),
            r["ok"],
            r["total_ms"],
            r["downtime_ms"],
            r["round0_mib_s"],
            r.get("error").map(|e| format!(" error: {e}")).unwrap_or_default(),
        );
        runs.push(moved.record);
        current = moved.guest;
        std::thread::sleep(Duration::from_millis(300));
    }
    (current, runs)
}

/// Medians of round 0 throughput and total time, plain against encrypted.
fn encryption_report(runs: Vec<Value>) -> Value {
    let med = |encrypted: bool, k: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r["ok"] == true && r["encrypted"] == encrypted)
            .filter_map(|r| r[k].as_f64())
            .collect();
        median(&v)
    };
    let ratio = match (med(true, "round0_mib_s"), med(false, "round0_mib_s")) {
        (Some(e), Some(p)) if p > 0.0 => Some(round3(e / p)),
        _ => None,
    };
    json!({
        "mem_mib": ENCRYPTION_MEM_MIB,
        "dirty_mib_s": 0,
        "pairs": ENCRYPTION_PAIRS,
        "round0_mib_s_plain": med(false, "round0_mib_s"),
        "round0_mib_s_encrypted": med(true, "round0_mib_s"),
        "round0_encrypted_vs_plain": ratio,
        "total_ms_plain": med(false, "total_ms"),
        "total_ms_encrypted": med(true, "total_ms"),
        "downtime_ms_plain": med(false, "downtime_ms"),
        "downtime_ms_encrypted": med(true, "downtime_ms"),
        "runs": runs,
        "notes": "plain = `ferry migrate --no-encryption` to `ferry receive --no-encryption` (the same framing and \
                  authenticated handshake, records not sealed); interleaved with encrypted moves of the same guest (P E E P P E E P, so each mode moves a->b and b->a equally).",
    })
}

/// The stream sweep: the idle 1 GiB guest moved over 1, 2 and 4 streams,
/// encrypted and plain, `SWEEP_MOVES` times each, interleaved so drift on
/// the machine hits every setting alike; returns where the VM runs and
/// every run's record.
fn stream_sweep(
    lab: &Lab,
    dir: &Path,
    mut current: Option<Guest>,
    seq: &mut usize,
    history: &[(u64, u64, f64)],
) -> (Option<Guest>, Vec<Value>) {
    let mut runs = Vec::new();
    for pass in 0..SWEEP_MOVES {
        for streams in SWEEP_STREAMS {
            // Six moves a pass: flipping the order on odd passes sends
            // each setting the other way the next time.
            let order = if pass % 2 == 0 { [false, true] } else { [true, false] };
            for plain in order {
                let Some(g) = current.take() else { return (None, runs) };
                let expect = expected_ms(history, ENCRYPTION_MEM_MIB, 0, first_guess_ms(ENCRYPTION_MEM_MIB));
                let moved = migrate_once(lab, dir, g, *seq, expect, How { plain, streams: Some(streams) });
                *seq += 1;
                let r = &moved.record;
                eprintln!(
                    "{ENCRYPTION_MEM_MIB} MiB idle, {streams} stream(s), {} ({}): ok={} total={} downtime={} round0={}{}",
                    if plain { "plain" } else { "encrypted" },
                    r["direction"].as_str().unwrap_or("?"),
                    r["ok"],
                    r["total_ms"],
                    r["downtime_ms"],
                    r["round0_mib_s"],
                    r.get("error").map(|e| format!(" error: {e}")).unwrap_or_default(),
                );
                runs.push(moved.record);
                current = moved.guest;
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    (current, runs)
}

/// Medians per stream count and encryption, against the TCP ceiling
/// measured with no guest and the one measured beside the spinning guest
/// (`loaded`: what round 0 actually competes with on two cores).
fn stream_report(runs: Vec<Value>, ceiling_mib_s: Option<f64>, loaded: Value) -> Value {
    let loaded_mib_s = loaded["mib_s_median"].as_f64();
    let mut rows = Vec::new();
    for streams in SWEEP_STREAMS {
        for encrypted in [true, false] {
            let these: Vec<&Value> = runs
                .iter()
                .filter(|r| r["ok"] == true && r["encrypted"] == encrypted && r["streams_asked"] == streams)
                .collect();
            let med = |k: &str| median(&these.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>()).map(round3);
            let round0 = med("round0_mib_s");
            rows.push(json!({
                "streams": streams,
                "encrypted": encrypted,
                "moves_ok": these.len(),
                "streams_used": these.iter().filter_map(|r| r["streams"].as_u64()).max(),
                "round0_mib_s": round0,
                "round0_vs_ceiling": match (round0, ceiling_mib_s) {
                    (Some(r), Some(c)) if c > 0.0 => Some(round3(r / c)),
                    _ => None,
                },
                "round0_vs_ceiling_beside_guest": match (round0, loaded_mib_s) {
                    (Some(r), Some(c)) if c > 0.0 => Some(round3(r / c)),
                    _ => None,
                },
                "total_ms": med("total_ms"),
                "downtime_ms": med("downtime_ms"),
                "pings_lost": med("pings_lost"),
            }));
        }
    }
    json!({
        "mem_mib": ENCRYPTION_MEM_MIB,
        "dirty_mib_s": 0,
        "moves_per_setting": SWEEP_MOVES,
        "ceiling_mib_s": ceiling_mib_s,
        "ceiling_beside_guest": loaded,
        "rows": rows,
        "runs": runs,
        "notes": "`ferry migrate --streams N` (and --no-encryption on both ends for plain) of the idle 1 GiB guest, \
                  settings interleaved (1 sealed, 1 plain, 2 sealed, ...; the guest alternates hosts, so each \
                  setting's two moves usually go different ways); round0_vs_ceiling divides the median round-0 \
                  MiB/s by the single-stream TCP ceiling from this run.",
    })
}

/// Enters network namespace `name` (this thread only).
fn enter_netns(name: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(name);
    let ns = std::fs::File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: setns on a valid namespace fd; it moves only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns into {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// One TCP stream of TCP_BYTES from host `from` to a listener on host `to`;
/// returns the receiver's seconds from accept to end of stream.
fn tcp_once(lab: &Lab, from: &str, to: &'static str, port: u16) -> Result<f64, String> {
    let (ns_from, ns_to) = (lab.netns(from), lab.netns(to));
    let to_ip: Ipv4Addr = Lab::host_ip(to).parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || -> Result<(u64, f64), String> {
        enter_netns(&ns_to)?;
        let addr = SocketAddrV4::new(to_ip, port);
        let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        let _ = tx.send(());
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let mut buf = vec![0u8; TCP_CHUNK];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok((got, t.elapsed().as_secs_f64()))
    });
    if rx.recv_timeout(Duration::from_secs(5)).is_err() {
        return receiver.join().unwrap_or_else(|_| Err("receiver panicked".into())).map(|_| 0.0);
    }
    let sender = std::thread::spawn(move || -> Result<(), String> {
        enter_netns(&ns_from)?;
        let addr = SocketAddrV4::new(to_ip, port);
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_write_timeout(Some(T)).map_err(|e| e.to_string())?;
        let buf = vec![0x5au8; TCP_CHUNK];
        let mut left = TCP_BYTES;
        while left > 0 {
            let n = left.min(TCP_CHUNK as u64) as usize;
            s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
            left -= n as u64;
        }
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())
    });
    let sent = sender.join().unwrap_or_else(|_| Err("sender panicked".into()));
    let got = receiver.join().unwrap_or_else(|_| Err("receiver panicked".into()));
    sent?;
    let (bytes, secs) = got?;
    if bytes != TCP_BYTES {
        return Err(format!("received {bytes} of {TCP_BYTES} bytes"));
    }
    Ok(secs)
}

/// Single-stream TCP throughput from host `from` to host `to`, MB/s per run.
fn tcp_direction(lab: &Lab, from: &str, to: &'static str, port: u16, errors: &mut Vec<String>) -> Vec<f64> {
    let mut mb_s = Vec::new();
    for run in 0..TCP_RUNS {
        match tcp_once(lab, from, to, port + run as u16) {
            Ok(secs) => {
                let r = TCP_BYTES as f64 / 1e6 / secs;
                eprintln!("tcp {from}->{to} run {run}: {r:.0} MB/s");
                mb_s.push(round3(r));
            }
            Err(e) => {
                eprintln!("tcp {from}->{to} run {run}: {e}");
                errors.push(format!("{from}->{to}: {e}"));
            }
        }
    }
    mb_s
}

/// The ceiling for round 0: single-stream TCP from host a to host b (and,
/// for reference, back).
fn tcp_ceiling(lab: &Lab) -> Value {
    let mut errors = Vec::new();
    let a_b = tcp_direction(lab, "a", "b", TCP_PORT, &mut errors);
    let b_a = tcp_direction(lab, "b", "a", TCP_PORT + TCP_RUNS as u16, &mut errors);
    let med = median(&a_b);
    json!({
        "bytes": TCP_BYTES,
        "runs": TCP_RUNS,
        "mb_s_median": med,
        "mib_s_median": med.map(|m| round3(m * 1e6 / 1048576.0)),
        "mb_s_runs": a_b,
        "b_to_a_mb_s_median": median(&b_a),
        "b_to_a_mb_s_runs": b_a,
        "errors": errors,
        "how": "std::net TCP, one stream, a sender thread in bl-a (setns) writing 1 GiB in 1 MiB buffers to a \
                listener on 10.200.77.2 in bl-b; receiver-side time from accept to end of stream; the ceiling is \
                the a->b median (b->a for reference)",
    })
}

/// Single-stream TCP a -> b while the idle 1 GiB test guest spins its
/// vCPU on one of the two cores (as it does during every move).
fn loaded_tcp_ceiling(lab: &Lab) -> Value {
    let mut errors = Vec::new();
    let runs = tcp_direction(lab, "a", "b", TCP_PORT + 2 * TCP_RUNS as u16, &mut errors);
    let med = median(&runs);
    json!({
        "mb_s_median": med,
        "mib_s_median": med.map(|m| round3(m * 1e6 / 1048576.0)),
        "mb_s_runs": runs,
        "errors": errors,
        "how": "as tcp_ceiling, a -> b, with the idle 1 GiB guest running (its vCPU polls: one core busy)",
    })
}

/// Medians of the successful runs of one cell in one direction.
fn cell_row(mem_mib: u64, dirty_mib_s: u64, direction: &str, runs: Vec<Value>, ceiling_mib_s: Option<f64>) -> Value {
    let ok: Vec<&Value> = runs.iter().filter(|r| r["ok"] == true && r["counted"] == true).collect();
    let med = |k: &str| {
        let v: Vec<f64> = ok.iter().filter_map(|r| r[k].as_f64()).collect();
        median(&v).map(round3)
    };
    let mut row = json!({
        "mem_mib": mem_mib,
        "dirty_mib_s": dirty_mib_s,
        "direction": direction,
        "migrations": runs.len(),
        "migrations_counted": runs.iter().filter(|r| r["counted"] == true).count(),
        "migrations_ok": ok.len(),
    });
    let extra = ["guest_stall_ms", "guest_stall_source_ms", "restore_ms"];
    for k in MIGRATE_FIGURES.iter().chain(PING_FIGURES.iter()).chain(extra.iter()) {
        row[*k] = json!(med(k));
    }
    row["console_cut_mid_line"] = json!(ok.iter().filter(|r| r["console_cut_mid_line"] == true).count());
    row["round0_vs_ceiling"] = json!(match (med("round0_mib_s"), ceiling_mib_s) {
        (Some(r), Some(c)) if c > 0.0 => Some(round3(r / c)),
        _ => None,
    });
    let errors: Vec<&Value> = runs.iter().filter_map(|r| r.get("error")).collect();
    row["errors"] = json!(errors);
    row["runs"] = json!(runs);
    row
}

/// One target: `figure` of the cell (mem_mib, dirty_mib_s) against
/// `limit`, in both directions (`value` is the worse of the two); `None`
/// if the cell did not run.
fn target(
    rows: &[Value],
    name: &str,
    mem_mib: u64,
    dirty_mib_s: u64,
    figure: &str,
    op: &str,
    limit: f64,
) -> Option<Value> {
    let cell: Vec<&Value> =
        rows.iter().filter(|r| r["mem_mib"] == mem_mib && r["dirty_mib_s"] == dirty_mib_s).collect();
    if cell.is_empty() {
        return None;
    }
    let values: Vec<Option<f64>> = DIRECTIONS
        .iter()
        .map(|d| cell.iter().find(|r| r["direction"] == *d).and_then(|r| r[figure].as_f64()))
        .collect();
    let meets = |v: f64| if op == "<=" { v <= limit } else { v >= limit };
    let worst = values.iter().flatten().copied().reduce(|a, b| if op == "<=" { a.max(b) } else { a.min(b) });
    let met = values.iter().all(|v| v.is_some_and(meets));
    let by_direction: serde_json::Map<String, Value> =
        DIRECTIONS.iter().zip(&values).map(|(d, v)| (d.to_string(), json!(v))).collect();
    Some(json!({
        "name": name,
        "mem_mib": mem_mib,
        "dirty_mib_s": dirty_mib_s,
        "figure": figure,
        "op": op,
        "limit": limit,
        "value": worst,
        "by_direction": by_direction,
        "met": met,
    }))
}

/// What this run measures (see the module notes for the environment).
struct Plan {
    /// (mem_mib, dirty_mib_s), in the order they run.
    cells: Vec<(u64, u64)>,
    runs: usize,
    encryption: bool,
    /// The stream sweep (after the idle 1 GiB cell).
    streams: bool,
    same_host_mem: Vec<u64>,
}

impl Plan {
    fn from_env() -> Plan {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let parts = var("BENCH_LIVE_PARTS").unwrap_or_else(|| "cells,encryption,streams,same-host".into());
        let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
        for p in &parts {
            assert!(["cells", "encryption", "streams", "same-host"].contains(p), "BENCH_LIVE_PARTS: unknown part {p}");
        }
        let number =
            |v: &str, what: &str| v.trim().parse::<u64>().unwrap_or_else(|_| panic!("{what}: not a number: {v}"));
        let cells = match (parts.contains(&"cells"), var("BENCH_LIVE_CELLS")) {
            (false, _) => Vec::new(),
            (true, Some(spec)) => spec
                .split(',')
                .map(|c| {
                    let (m, r) = c.split_once(':').unwrap_or_else(|| panic!("BENCH_LIVE_CELLS: {c} is not MEM:RATE"));
                    (number(m, "BENCH_LIVE_CELLS"), number(r, "BENCH_LIVE_CELLS"))
                })
                .collect(),
            (true, None) => MEM_MIB.iter().flat_map(|&m| DIRTY_MIB_S.iter().map(move |&r| (m, r))).collect(),
        };
        let same_host_mem = match (parts.contains(&"same-host"), var("BENCH_LIVE_SAME_HOST_MEM")) {
            (false, _) => Vec::new(),
            (true, Some(spec)) => spec.split(',').map(|m| number(m, "BENCH_LIVE_SAME_HOST_MEM")).collect(),
            (true, None) => SAME_HOST_MEM_MIB.to_vec(),
        };
        Plan {
            encryption: parts.contains(&"encryption") && cells.contains(&(ENCRYPTION_MEM_MIB, 0)),
            streams: parts.contains(&"streams") && cells.contains(&(ENCRYPTION_MEM_MIB, 0)),
            cells,
            runs: var("BENCH_LIVE_RUNS").map_or(RUNS, |v| number(&v, "BENCH_LIVE_RUNS") as usize).max(1),
            same_host_mem,
        }
    }

    /// The memory sizes of the cells, in order, each once.
    fn cell_sizes(&self) -> Vec<u64> {
        let mut sizes: Vec<u64> = Vec::new();
        for &(m, _) in &self.cells {
            if !sizes.contains(&m) {
                sizes.push(m);
            }
        }
        sizes
    }
}

/// The guest's own check of its working set after its moves.
fn verify(guest: Option<Guest>, mem_mib: u64, lost: Option<String>) -> Value {
    let Some(g) = guest else {
        return json!({ "mem_mib": mem_mib, "ok": false, "error": lost });
    };
    let v = g.command("verify", "verify", Duration::from_secs(120));
    eprintln!("{mem_mib} MiB: {v:?}");
    match v {
        Ok(line) => {
            json!({ "mem_mib": mem_mib, "host": g.console.host, "ok": line.starts_with("verify ok"), "line": line })
        }
        Err(e) => json!({ "mem_mib": mem_mib, "host": g.console.host, "ok": false, "error": e }),
    }
}

/// /proc/loadavg's 1, 5 and 15 minute figures: how busy the shared
/// machine was.
fn load_average() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!(text.split_whitespace().take(3).filter_map(|v| v.parse::<f64>().ok()).collect::<Vec<_>>())
}

/// Figures of a same-host row, medians of its counted successful runs.
const SAME_HOST_FIGURES: [&str; 12] = [
    "total_ms",
    "downtime_ms",
    "restore_ms",
    "bytes_sent",
    "pages_sent",
    "pings_sent",
    "pings_lost",
    "max_gap_ms",
    "guest_stall_ms",
    "guest_stall_baseline_ms",
    "migrate_wall_ms",
    "handoff_ms",
];

/// One same-host move of `src` (on tap `from_tap`) to a new VMM process on
/// host a with tap `to_tap`, over `unix:`, memory passed (`shared-fd`) or
/// copied (`copy`: `--no-memfd`); pinged and measured as the cells are.
/// Returns the record and where the VM runs afterwards (and on which tap).
#[allow(clippy::too_many_arguments)]
fn same_host_once(
    lab: &Lab,
    dir: &Path,
    src: Guest,
    from_tap: &'static str,
    to_tap: &'static str,
    seq: usize,
    mode: &'static str,
    expect_ms: u64,
) -> (Value, Option<(Guest, &'static str)>) {
    let listen = format!("unix:{}", dir.join(format!("same-host-{seq}.sock")).display());
    let dst = match receiver_at(lab, dir, "a", &listen, to_tap, seq, &[]) {
        Ok(g) => g,
        Err(e) => {
            let record = json!({ "seq": seq, "memory_asked": mode, "ok": false, "counted": true, "error": e });
            return (record, Some((src, from_tap)));
        }
    };
    let (dst_console, dst_pid, api) = (dst.console.clone(), dst.vm.pid(), src.vm.api_sock.clone());
    let mut record = measure(lab, &src.console, expect_ms, || {
        let key = cluster_key().display().to_string();
        let mut migrate = Command::new(ferry_bin());
        migrate.args(["migrate", "--mode", "live", "--json", "--key-file", &key, "--to", &listen, "--api-sock"]);
        migrate.arg(&api);
        if mode == "copy" {
            migrate.arg("--no-memfd");
        }
        let figures = run_bounded(&mut migrate, MIGRATE_T).and_then(|o| {
            if o.status.success() {
                serde_json::from_slice::<Value>(&o.stdout).map_err(|e| format!("ferry migrate printed no JSON: {e}"))
            } else {
                Err(format!("ferry migrate failed: {}", String::from_utf8_lossy(&o.stderr).trim()))
            }
        });
        let dst_alive: Box<dyn Fn() -> Result<(), String>> =
            Box::new(move || if process_running(dst_pid) { Ok(()) } else { Err("the destination VMM exited".into()) });
        MoveOutcome { figures, dst_console: Some(dst_console), dst_alive }
    });
    record["seq"] = json!(seq);
    record["memory_asked"] = json!(mode);
    record["taps"] = json!(format!("{from_tap}->{to_tap}"));
    if record["ok"] == true {
        record["source_exited"] = json!(src.retire(Duration::from_secs(5)));
        return (record, Some((dst, to_tap)));
    }
    record["receiver_stderr"] = json!(dst.vm.stderr());
    if src.answers() {
        drop(dst);
        (record, Some((src, from_tap)))
    } else if dst.answers() {
        record["vm_moved_anyway"] = json!(true);
        (record, Some((dst, to_tap)))
    } else {
        (record, None)
    }
}

/// The same-host rows: per size, the idle guest moved on host a between
/// taps vm0 and vm1 until each memory mode has `plan.runs` counted moves,
/// the modes alternating; its memory verified after.
fn same_host(lab: &Lab, dir: &Path, plan: &Plan, seq: &mut usize, verifies: &mut Vec<Value>) -> Value {
    if plan.same_host_mem.is_empty() {
        return json!(null);
    }
    let mut rows = Vec::new();
    // (mem_mib, memory mode index, total_ms) of earlier moves: the pinger
    // must outlast the next one.
    let mut history: Vec<(u64, u64, f64)> = Vec::new();
    for &mem_mib in &plan.same_host_mem {
        let mut current = match boot(lab, dir, mem_mib, 0) {
            Ok((g, _)) => Some((g, TAP)),
            Err(e) => {
                for mode in SAME_HOST_MODES {
                    rows.push(json!({ "mem_mib": mem_mib, "memory": mode, "errors": [format!("boot failed: {e}")] }));
                }
                continue;
            }
        };
        std::thread::sleep(SETTLE);
        let mut runs: Vec<Value> = Vec::new();
        let mut counted = [0usize; 2];
        let mut attempts = 0;
        let mut lost = None;
        while counted.iter().any(|&c| c < plan.runs) && attempts < 2 * (plan.runs + EXTRA_ATTEMPTS) {
            let Some((g, tap)) = current.take() else { break };
            let mode = attempts % 2;
            let to_tap = if tap == TAP { SAME_HOST_TAP } else { TAP };
            // Only this mode's history: a copy takes 100x a shared move.
            let this_mode: Vec<_> = history.iter().filter(|h| h.1 == mode as u64).copied().collect();
            let expect = expected_ms(&this_mode, mem_mib, mode as u64, first_guess_ms(mem_mib));
            let (mut record, next) = same_host_once(lab, dir, g, tap, to_tap, *seq, SAME_HOST_MODES[mode], expect);
            *seq += 1;
            attempts += 1;
            let counts = record["ok"] != true || record["ping_covered"] == true;
            record["counted"] = json!(counts);
            counted[mode] += usize::from(counts);
            let r = &record;
            eprintln!(
                "same host {mem_mib} MiB idle, {} ({}): ok={} memory={} total={} downtime={} bytes={} lost={}/{} \
                 gap={} stall={}{}",
                SAME_HOST_MODES[mode],
                r["taps"].as_str().unwrap_or("?"),
                r["ok"],
                r["memory"],
                r["total_ms"],
                r["downtime_ms"],
                r["bytes_sent"],
                r["pings_lost"],
                r["pings_sent"],
                r["max_gap_ms"],
                r["guest_stall_ms"],
                r.get("error").map(|e| format!(" error: {e}")).unwrap_or_default()
            );
            if let Some(t) = r["total_ms"].as_f64() {
                history.push((mem_mib, mode as u64, t));
            }
            if next.is_none() {
                lost = Some(r["error"].as_str().unwrap_or("the VM runs nowhere").to_owned());
            }
            runs.push(record);
            current = next;
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut v = verify(current.map(|(g, _)| g), mem_mib, lost);
        v["same_host"] = json!(true);
        verifies.push(v);
        for mode in SAME_HOST_MODES {
            let these: Vec<&Value> = runs.iter().filter(|r| r["memory_asked"] == mode).collect();
            let ok: Vec<&&Value> = these.iter().filter(|r| r["ok"] == true && r["counted"] == true).collect();
            let mut row = json!({
                "mem_mib": mem_mib,
                "dirty_mib_s": 0,
                "memory": mode,
                "migrations": these.len(),
                "migrations_counted": these.iter().filter(|r| r["counted"] == true).count(),
                "migrations_ok": ok.len(),
                // A shared-fd move that copied after all is a failure of
                // the feature, though the VM moved.
                "memory_as_asked": ok.iter().all(|r| r["memory"] == mode),
            });
            for k in SAME_HOST_FIGURES {
                let v: Vec<f64> = ok.iter().filter_map(|r| r[k].as_f64()).collect();
                row[k] = json!(median(&v).map(round3));
            }
            row["errors"] = json!(these.iter().filter_map(|r| r.get("error")).collect::<Vec<_>>());
            row["runs"] = json!(these);
            rows.push(row);
        }
    }
    let cell = |mem: u64, k: &str| {
        rows.iter().find(|r| r["mem_mib"] == mem && r["memory"] == "shared-fd").and_then(|r| r[k].as_f64())
    };
    let mut targets = Vec::new();
    if plan.same_host_mem.contains(&4096) {
        for (figure, limit) in [("downtime_ms", 10.0), ("total_ms", 100.0)] {
            let value = cell(4096, figure);
            targets.push(json!({
                "name": format!("same host, 4 GiB idle, shared-fd: {figure}"),
                "mem_mib": 4096,
                "figure": figure,
                "op": "<=",
                "limit": limit,
                "value": value,
                "met": value.is_some_and(|v| v <= limit),
            }));
        }
    }
    json!({
        "cells": rows,
        "targets": targets,
        "notes": "Two VMM processes on lab host a: `ferry migrate --mode live` over unix: to `ferry receive` with \
                  the other tap (vm0 and vm1 on host a's bridge, in turn); shared-fd passes the guest memory's \
                  memfd (SCM_RIGHTS) and the destination maps it (no pre-copy; bytes_sent is the state), copy is \
                  `--no-memfd` (pre-copy over the Unix socket, encrypted). The modes alternate on one idle guest \
                  per size (working set half its memory), pinged from bl-client every 10 ms as the cells are. \
                  Medians of the counted successful runs per mode.",
    })
}

fn main() {
    ferry_e2e::clean_up_on_panic();
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/live.json".into());
    if !kvm_available("bench-live") || !root_available("bench-live") {
        return;
    }
    let plan = Plan::from_env();
    let started = Instant::now();
    let load_at_start = load_average();
    // Every process of the run uses one copy of the ferry binary, so a
    // rebuild while the bench runs cannot pair a source and a destination
    // that disagree on the wire format. (Declared before the lab, so the
    // copy outlives `ferry lab down`.)
    let dir = ferry_e2e::TempDir::new("bench-live");
    let ferry = dir.path().join("ferry");
    std::fs::copy(ferry_bin(), &ferry).expect("copy the ferry binary");
    std::env::set_var("FERRY_BIN", &ferry);
    let lab = Lab::up(LAB);
    lab.ok(&["tap", "add", "a", TAP]);
    lab.ok(&["tap", "add", "b", TAP]);
    lab.ok(&["tap", "add", "a", SAME_HOST_TAP]);

    // The ceiling first, with no guest running.
    let ceiling = if plan.cells.is_empty() { json!(null) } else { tcp_ceiling(&lab) };
    let ceiling_mib_s = ceiling["mib_s_median"].as_f64();

    let mut rows = Vec::new();
    let mut boots = Vec::new();
    let mut verifies = Vec::new();
    let mut history: Vec<(u64, u64, f64)> = Vec::new();
    let mut seq = 0;
    let mut encryption = Vec::new();
    let mut sweep = Vec::new();
    let mut loaded_ceiling = json!(null);
    for mem_mib in plan.cell_sizes() {
        let rates: Vec<u64> = plan.cells.iter().filter(|c| c.0 == mem_mib).map(|c| c.1).collect();
        let (mut guest, boot_figures) = match boot(&lab, dir.path(), mem_mib, rates[0]) {
            Ok((g, b)) => (Some(g), b),
            Err(e) => {
                eprintln!("{mem_mib} MiB: boot failed: {e}");
                boots.push(json!({ "mem_mib": mem_mib, "error": e }));
                for &rate in &rates {
                    for d in DIRECTIONS {
                        let mut row = cell_row(mem_mib, rate, d, Vec::new(), ceiling_mib_s);
                        row["errors"] = json!([format!("boot failed: {e}")]);
                        rows.push(row);
                    }
                }
                continue;
            }
        };
        eprintln!("{mem_mib} MiB: workload ready: {boot_figures}");
        boots.push(json!({ "mem_mib": mem_mib, "boot": boot_figures }));
        let mut lost_vm = None;
        for (i, &rate) in rates.iter().enumerate() {
            let Some(g) = guest.take() else {
                let e = lost_vm.clone().unwrap_or_else(|| "no VM".to_string());
                for d in DIRECTIONS {
                    let mut row = cell_row(mem_mib, rate, d, Vec::new(), ceiling_mib_s);
                    row["errors"] = json!([format!("skipped: the VM was lost earlier: {e}")]);
                    rows.push(row);
                }
                continue;
            };
            if i > 0 {
                if let Err(e) = g.command(&format!("dirty {rate}"), "dirty rate set", T) {
                    eprintln!("{mem_mib} MiB: dirty {rate}: {e}");
                }
            }
            std::thread::sleep(SETTLE);
            let mut current = Some(g);
            let mut runs = Vec::new();
            // Counted runs per direction (a->b, b->a); moves alternate, so
            // a direction that has enough still moves the VM back.
            let mut counted = [0usize; 2];
            let mut attempts = 0;
            while counted.iter().any(|&c| c < plan.runs) && attempts < 2 * (plan.runs + EXTRA_ATTEMPTS) {
                let Some(g) = current.take() else { break };
                let direction = usize::from(g.console.host != "a");
                let expect = expected_ms(&history, mem_mib, rate, first_guess_ms(mem_mib));
                let mut moved = migrate_once(&lab, dir.path(), g, seq, expect, How::DEFAULT);
                seq += 1;
                attempts += 1;
                // A failure counts (with its error); a success counts if the
                // pinger saw the switchover.
                let counts = moved.record["ok"] != true || moved.record["ping_covered"] == true;
                moved.record["counted"] = json!(counts);
                counted[direction] += usize::from(counts);
                let r = &moved.record;
                eprintln!(
                    "{mem_mib} MiB, {rate} MiB/s, run {attempts} ({}): ok={} total={} downtime={} rounds={} \
                     round0={} throttle={} lost={}/{} gap={} stall={} (source {}) tail={}{}",
                    r["direction"].as_str().unwrap_or("?"),
                    r["ok"],
                    r["total_ms"],
                    r["downtime_ms"],
                    r["rounds"],
                    r["round0_mib_s"],
                    r["throttle_pct"],
                    r["pings_lost"],
                    r["pings_sent"],
                    r["max_gap_ms"],
                    r["guest_stall_ms"],
                    r["guest_stall_source_ms"],
                    r["ping_tail_ms"],
                    r.get("error").map(|e| format!(" error: {e}")).unwrap_or_default(),
                );
                if let Some(t) = moved.total_ms {
                    history.push((mem_mib, rate, t));
                }
                if moved.guest.is_none() {
                    lost_vm = Some(r["error"].as_str().unwrap_or("the VM runs nowhere").to_owned());
                }
                runs.push(moved.record);
                current = moved.guest;
                // Let the moved guest run a little before moving it back.
                std::thread::sleep(Duration::from_millis(300));
            }
            // What encryption costs: idle 1 GiB moved plain and encrypted
            // in turn (alternated, so drift on the machine hits both alike).
            if plan.encryption && mem_mib == ENCRYPTION_MEM_MIB && rate == 0 {
                let (g, pairs) = encryption_pairs(&lab, dir.path(), current.take(), &mut seq, &history);
                current = g;
                encryption = pairs;
            }
            if plan.streams && mem_mib == ENCRYPTION_MEM_MIB && rate == 0 {
                loaded_ceiling = loaded_tcp_ceiling(&lab);
                let (g, runs) = stream_sweep(&lab, dir.path(), current.take(), &mut seq, &history);
                current = g;
                sweep = runs;
            }
            guest = current;
            for d in DIRECTIONS {
                let these = runs.iter().filter(|r| r["direction"] == d).cloned().collect();
                rows.push(cell_row(mem_mib, rate, d, these, ceiling_mib_s));
            }
        }
        // The working set survived all the moves.
        verifies.push(verify(guest.take(), mem_mib, lost_vm));
    }
    let same_host = same_host(&lab, dir.path(), &plan, &mut seq, &mut verifies);
    drop(lab);

    let round0_ratio_min = rows.iter().filter_map(|r| r["round0_vs_ceiling"].as_f64()).reduce(f64::min);
    let mut targets: Vec<Value> = [
        target(&rows, "idle 1 GiB: downtime", 1024, 0, "downtime_ms", "<=", 2.0),
        target(&rows, "idle 1 GiB: total", 1024, 0, "total_ms", "<=", 600.0),
        target(&rows, "idle 1 GiB: pings lost", 1024, 0, "pings_lost", "<=", 0.0),
        target(&rows, "idle 1 GiB: largest reply gap", 1024, 0, "max_gap_ms", "<=", 25.0),
        target(&rows, "50 MiB/s on 1 GiB: downtime", 1024, 50, "downtime_ms", "<=", 10.0),
        target(&rows, "50 MiB/s on 1 GiB: pings lost", 1024, 50, "pings_lost", "<=", 0.0),
        target(&rows, "200 MiB/s on 1 GiB: downtime", 1024, 200, "downtime_ms", "<=", 50.0),
        target(&rows, "idle 1 GiB: round 0 vs TCP ceiling", 1024, 0, "round0_vs_ceiling", ">=", 0.8),
    ]
    .into_iter()
    .flatten()
    .collect();
    let encryption = if plan.encryption { encryption_report(encryption) } else { json!(null) };
    if plan.encryption {
        targets.push(json!({
            "name": "idle 1 GiB: round 0 encrypted vs plain",
            "figure": "round0_encrypted_vs_plain",
            "limit": ">= 0.85",
            "value": encryption["round0_encrypted_vs_plain"],
            "met": encryption["round0_encrypted_vs_plain"].as_f64().is_some_and(|r| r >= 0.85),
        }));
    }
    let streams = if plan.streams { stream_report(sweep, ceiling_mib_s, loaded_ceiling) } else { json!(null) };
    targets.extend(same_host["targets"].as_array().into_iter().flatten().cloned());
    let targets_met = targets.iter().filter(|t| t["met"] == true).count();
    let report = json!({
        "bench": "live",
        "guest": format!(
            "ferry-guest (PVH), 1 vCPU, heartbeat_ms={HEARTBEAT_MS}, wss_mib = half of memory, ip={GUEST_IP}, \
             tap {TAP} on lab hosts a and b (and {SAME_HOST_TAP} on a for same-host moves)"
        ),
        "pvm_host": ferry_e2e::is_pvm_host(),
        "runs_per_direction": plan.runs,
        "downtime_target_ms": DOWNTIME_TARGET_MS,
        "load_average_at_start_and_end": [load_at_start, load_average()],
        "tcp_ceiling": ceiling,
        "cells": rows,
        "round0_vs_ceiling_min": round0_ratio_min,
        "encryption": encryption,
        "streams": streams,
        "same_host": same_host,
        "boots": boots,
        "verify": verifies,
        "qemu_7_2": {
            "source": "published QEMU 7.2 figures, 1 GiB guest",
            "idle_1g": { "total_ms": 2400, "downtime_ms": 4, "pings_lost": 0, "max_gap_ms": 44 },
            "dirty_50_1g": { "total_ms": 3100, "downtime_ms": 48, "pings_lost": 5 },
            "dirty_200_1g": { "total_ms": 3200, "downtime_ms": 110, "pings_lost": 11 },
        },
        "targets": targets,
        "targets_met": format!("{targets_met} of {}", targets.len()),
        "bench_s": round3(started.elapsed().as_secs_f64()),
        "notes": "Per memory size the guest boots once on host a and is moved a->b->a->... with `ferry migrate \
                  --mode live` (downtime target 20 ms, auto-converge on) to `ferry receive` on the other host; \
                  per dirty rate until each direction has three counted migrations, the rate changed between \
                  cells with the console command `dirty N`; one row per cell and direction. total_ms, downtime_ms (source pause to the destination's resumed), rounds, \
                  bytes_sent, round0_mib_s (data pages of round 0 over its time, MiB/s) and throttle_pct come from \
                  `ferry migrate --json`; pings_* and max_gap_ms from `ferry ping` (ICMP every 10 ms, 200 ms \
                  reply timeout) from bl-client, started 300 ms before the migration and planned to run ~500 ms \
                  past it (ping_tail_ms per run: how long it actually did; negative means it missed the end); \
                  guest_stall_ms is the max_stall_us of the first heartbeat on the destination's console (the \
                  guest's own longest stop since its previous heartbeat, by its TSC), guest_stall_source_ms the \
                  largest max_stall_us the guest printed on the source while the migration ran; restore_ms (from \
                  the figures) is the part of the downtime from sending the state to the destination's Ready. A \
                  run whose pinger stopped less than 200 ms after the migration (ping_covered false) is repeated \
                  and not counted, at most 10 attempts a cell. Row figures are medians of the counted successful \
                  runs of that direction; failed runs count and keep their error. The machine is shared (2 cores, \
                  other builds and tests running: see load_average_at_start_and_end), so figures are indicative. round0_vs_ceiling divides the median \
                  round0_mib_s by the median single-stream TCP MiB/s from host a to host b.",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    if let Some(dir) = Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &text).unwrap();
    println!("{text}");
}
