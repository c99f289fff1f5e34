//! One live-migration cell measured the same way whichever VMM moves the
//! guest: the pinger around the move, the guest's own stall from its serial
//! console, medians per cell. Used by bench-qemu for Ferry and QEMU alike.
//!
//! bench-live uses the same constants, console reader, pinger and
//! expectation, so the figures compare with live.json.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::stats::{median, round3};
use ferry_e2e::{ferry_bin, field, heartbeat_number, run_bounded, Lab};
use serde_json::{json, Value};

pub const GUEST_IP: &str = "10.200.77.10";
pub const GUEST_MAC: &str = "52:54:00:c0:ff:ee";
pub const TAP: &str = "vm0";
pub const HEARTBEAT_MS: u64 = 200;
pub const PING_INTERVAL_MS: u64 = 10;
/// The pinger starts this long before the migration ...
pub const PING_LEAD_MS: u64 = 300;
/// ... and is meant to run this long past it.
pub const PING_TAIL_MS: u64 = 500;
/// A run counts when the pinger ran at least this long past the migration.
pub const MIN_PING_TAIL_MS: f64 = 200.0;
pub const PING_FIGURES: [&str; 3] = ["pings_sent", "pings_lost", "max_gap_ms"];

/// The test guest's command line (both VMMs append their own device words).
/// `idle_us`: the guest's idle request is a Ferry port (0x510, fw_cfg's on
/// QEMU, where it does nothing): 0 makes the guest spin on both VMMs alike.
pub fn guest_cmdline(mem_mib: u64, dirty_mib_s: u64, idle_us: Option<u64>) -> String {
    let idle = idle_us.map(|us| format!(" idle_us={us}")).unwrap_or_default();
    format!("heartbeat_ms={HEARTBEAT_MS} wss_mib={} dirty_mib_s={dirty_mib_s} ip={GUEST_IP}{idle}", mem_mib / 2)
}

/// A serial console written to a file by the VMM.
#[derive(Clone)]
pub struct Console {
    pub path: PathBuf,
    pub host: &'static str,
}

impl Console {
    /// Complete lines so far (a line still being written is left out).
    pub fn lines(&self) -> Vec<String> {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<String> = text.split('\n').map(|l| l.trim_end_matches('\r').to_owned()).collect();
        lines.pop();
        lines
    }

    /// True if the console ends inside a line (the stop fell in the middle
    /// of a heartbeat, which the guest does not time).
    pub fn cut_mid_line(&self) -> bool {
        std::fs::read(&self.path).unwrap_or_default().last().is_some_and(|&b| b != b'\n')
    }

    /// Waits for a line at index >= `from` that satisfies `pred`; `alive`
    /// says whether waiting still makes sense (the VMM still runs).
    pub fn wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        alive: impl Fn() -> Result<(), String>,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, String), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some((i, l)) = lines.iter().enumerate().skip(from).find(|(_, l)| pred(l)) {
                return Ok((i, l.clone()));
            }
            let dead = alive().err();
            if Instant::now() >= deadline || dead.is_some() {
                let tail: Vec<_> = lines.iter().rev().take(10).rev().cloned().collect();
                return Err(format!(
                    "{} on host {}'s console; tail:\n{}{}",
                    if dead.is_some() {
                        "the VMM exited while waiting".to_string()
                    } else {
                        format!("timed out after {timeout:?}")
                    },
                    self.host,
                    tail.join("\n"),
                    dead.map(|d| format!("\n{d}")).unwrap_or_default(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `ferry ping` from the lab client to the guest for `duration_ms`, on a thread.
pub fn start_ping(lab: &Lab, duration_ms: u64) -> std::thread::JoinHandle<Result<Value, String>> {
    let ns = lab.netns("client");
    std::thread::spawn(move || {
        let interval = PING_INTERVAL_MS.to_string();
        let duration = duration_ms.to_string();
        let args =
            ["ping", "--netns", &ns, "--target", GUEST_IP, "--interval-ms", &interval, "--duration-ms", &duration];
        let out = run_bounded(Command::new(ferry_bin()).args(args), Duration::from_millis(duration_ms + 30_000))?;
        if !out.status.success() {
            return Err(format!("ferry ping failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ferry ping printed no JSON: {e}"))
    })
}

/// How long the next migration of this size and rate is expected to take,
/// from earlier ones of the same VMM (generous when there is little to go
/// on: the pinger must outlast the migration); `first_guess_ms` for a size
/// never moved before.
pub fn expected_ms(history: &[(u64, u64, f64)], mem_mib: u64, dirty_mib_s: u64, first_guess_ms: f64) -> u64 {
    let max = |f: &dyn Fn(&(u64, u64, f64)) -> bool| history.iter().filter(|h| f(h)).map(|h| h.2).reduce(f64::max);
    let ms = if let Some(m) = max(&|h| h.0 == mem_mib && h.1 == dirty_mib_s) {
        m * 1.5 + 500.0
    } else if let Some(m) = max(&|h| h.0 == mem_mib) {
        m * 2.0 + 1000.0
    } else {
        first_guess_ms
    };
    (ms as u64).min(120_000)
}

/// What a VMM-specific move hands back: the VMM's own figures (normalised
/// to `total_ms`, `downtime_ms`, ... by the caller) or an error, and the
/// destination's console when the VM runs there.
pub struct MoveOutcome {
    pub figures: Result<Value, String>,
    pub dst_console: Option<Console>,
    /// Checks that the destination VMM still runs (for console waits).
    pub dst_alive: Box<dyn Fn() -> Result<(), String>>,
}

/// Runs `do_move` with the pinger around it and reads the guest's stall
/// from both consoles; returns the run's record.
pub fn measure(lab: &Lab, src_console: &Console, expect_ms: u64, do_move: impl FnOnce() -> MoveOutcome) -> Value {
    let mut record = json!({});
    let ping_ms = PING_LEAD_MS + expect_ms + PING_TAIL_MS;
    let t_ping = Instant::now();
    let ping = start_ping(lab, ping_ms);
    std::thread::sleep(Duration::from_millis(PING_LEAD_MS));
    let t_start = t_ping.elapsed();
    let src_at_start = src_console.lines().len();
    let outcome = do_move();
    let t_end = t_ping.elapsed();
    let ping = ping.join().unwrap_or_else(|_| Err("the ping thread panicked".into()));
    record["migrate_wall_ms"] = json!(round3((t_end - t_start).as_secs_f64() * 1000.0));
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
        }
        Err(e) => record["ping_error"] = json!(e),
    }
    // The guest's own stalls while it still ran on the source (pre-copy),
    // and before the move began: the noise floor of this machine.
    let source_lines = src_console.lines();
    // (the last 5 heartbeats, 1 s, before it).
    let baseline_us =
        source_lines.iter().take(src_at_start).rev().filter_map(|l| field(l, "max_stall_us")).take(5).max();
    record["guest_stall_baseline_ms"] = json!(baseline_us.map(|us| us as f64 / 1000.0));
    let source_stall_us = source_lines.iter().skip(src_at_start).filter_map(|l| field(l, "max_stall_us")).max();
    record["guest_stall_source_ms"] = json!(source_stall_us.map(|us| us as f64 / 1000.0));
    record["source_last_heartbeat"] = json!(source_lines.iter().rev().find_map(|l| heartbeat_number(l)));
    record["console_cut_mid_line"] = json!(src_console.cut_mid_line());
    match outcome.figures {
        Ok(f) => {
            for (k, v) in f.as_object().into_iter().flatten() {
                record[k] = v.clone();
            }
            record["ok"] = json!(true);
        }
        Err(e) => {
            record["ok"] = json!(false);
            record["error"] = json!(e);
        }
    }
    if let (true, Some(dst)) = (record["ok"] == true, &outcome.dst_console) {
        // The stall the guest reports in its first heartbeat after resuming.
        match dst.wait_line_from(0, Duration::from_secs(10), &outcome.dst_alive, |l| heartbeat_number(l).is_some()) {
            Ok((_, line)) => {
                record["guest_stall_ms"] = json!(field(&line, "max_stall_us").map(|us| us as f64 / 1000.0));
                record["first_heartbeat"] = json!(line);
            }
            Err(e) => record["stall_error"] = json!(e),
        }
    }
    record
}

/// The figures every cell reports as medians, for both VMMs.
pub const CELL_FIGURES: [&str; 13] = [
    "total_ms",
    "downtime_ms",
    "setup_ms",
    "rounds",
    "bytes_sent",
    "pings_sent",
    "pings_lost",
    "max_gap_ms",
    "guest_stall_ms",
    "guest_stall_source_ms",
    "guest_stall_baseline_ms",
    "migrate_wall_ms",
    "mib_s",
];

/// Medians of the counted successful runs of one cell.
pub fn cell_row(vmm: &str, mem_mib: u64, dirty_mib_s: u64, runs: Vec<Value>) -> Value {
    let ok: Vec<&Value> = runs.iter().filter(|r| r["ok"] == true && r["counted"] == true).collect();
    let med = |k: &str| {
        let v: Vec<f64> = ok.iter().filter_map(|r| r[k].as_f64()).collect();
        median(&v).map(round3)
    };
    let mut row = json!({
        "vmm": vmm,
        "mem_mib": mem_mib,
        "dirty_mib_s": dirty_mib_s,
        "migrations": runs.len(),
        "migrations_counted": runs.iter().filter(|r| r["counted"] == true).count(),
        "migrations_ok": ok.len(),
    });
    for k in CELL_FIGURES {
        row[k] = json!(med(k));
    }
    row["console_cut_mid_line"] = json!(ok.iter().filter(|r| r["console_cut_mid_line"] == true).count());
    let errors: Vec<&Value> = runs.iter().filter_map(|r| r.get("error")).collect();
    row["errors"] = json!(errors);
    row["runs"] = json!(runs);
    row
}
