//! `make bench`: the migration soak of issue 11 — 50 consecutive live
//! migrations a -> b -> a ... of the test guest with a disk on a shared
//! volume, pinged every 10 ms, written as JSON.
//!
//! After every move: the source VMM has exited (else it is a double run),
//! the destination's guest verifies its memory (`verify`), the disk still
//! holds the pattern written before the move and takes the next one
//! (`disk-verify`, `disk-write`, a new seed per move), and the disk's lease
//! names the destination. Counted: lost VMs, double runs, verify errors,
//! disk-pattern errors, lease errors, pings lost, and the figures of each
//! move (downtime, total, rounds). A move that fails leaves the VM where it
//! was (checked) and the soak goes on; a VM that runs nowhere ends it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::stats::{median, round3};
use ferry_e2e::{
    boot_in_lab_with, ferry_bin, kvm_available, pin_ferry_binary, process_running, receiver_in_lab, root_available,
    run_bounded, run_ferry, try_command, Lab, TempDir, Vm,
};
use serde_json::{json, Value};

const LAB: &str = "sk";
const MOVES: usize = 50;
const MEM_MIB: u32 = 256;
/// After `boot_in_lab`'s `heartbeat_ms=200 ip=...`.
const CMDLINE: &str = "wss_mib=128 dirty_mib_s=20";
const GUEST_IP: &str = ferry_e2e::LAB_GUEST_IP;
const PORT_BASE: u16 = 7600;
/// The pinger runs this long per move; the migration starts after the lead.
const PING_MS: u64 = 2500;
const PING_LEAD_MS: u64 = 300;
const T: Duration = Duration::from_secs(60);

/// The sectors each move's pattern covers.
const PATTERN: &str = "0 512";

fn ask(vm: &Vm, cmd: &str, prefix: &str) -> Result<String, String> {
    try_command(vm, cmd, prefix, T)
}

fn wait_gone(vm: &Vm, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while process_running(vm.pid()) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn lease_owner(vol: &str) -> String {
    ferry_e2e::cluster::disk_lease(vol, "d0")["owner"].as_str().unwrap_or("").to_owned()
}

fn start_ping(lab: &Lab) -> std::thread::JoinHandle<Result<Value, String>> {
    let ns = lab.netns("client");
    std::thread::spawn(move || {
        let duration = PING_MS.to_string();
        let args = ["ping", "--netns", &ns, "--target", GUEST_IP, "--interval-ms", "10", "--duration-ms", &duration];
        let out = run_bounded(Command::new(ferry_bin()).args(args), Duration::from_millis(PING_MS + 30_000))?;
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ferry ping printed no JSON: {e}"))
    })
}

#[derive(Default)]
struct Counts {
    ok: usize,
    failed: usize,
    lost_vms: usize,
    double_runs: usize,
    verify_errors: usize,
    disk_errors: usize,
    lease_errors: usize,
    pings_lost: u64,
    pings_sent: u64,
}

fn main() {
    ferry_e2e::clean_up_on_panic();
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/soak.json".into());
    if !kvm_available("bench-soak") || !root_available("bench-soak") {
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new("bench-soak");
    pin_ferry_binary(dir.path());
    let vol = dir.path().join("vol").display().to_string();
    for args in [
        vec!["volume", "create", &vol],
        vec!["disk", "create", "--volume", &vol, "--format", "qcow2", "--size", "64M", "d0"],
    ] {
        let o = run_ferry(&args);
        assert!(o.status.success(), "ferry {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let lab = Lab::up_with_taps(LAB);
    let disk = format!("csv:{vol}/disks/d0");
    let mut vm = boot_in_lab_with(&lab, "a", MEM_MIB, CMDLINE, &["--disk", &disk, "--host-id", "a"]);
    let mut seed = 1u32;
    ask(&vm, &format!("disk-write {PATTERN} {seed}"), "disk-write").expect("the first pattern");

    let mut host = "a";
    let mut counts = Counts::default();
    let mut moves = Vec::new();
    let allow = dir.path().display().to_string();
    for i in 0..MOVES {
        let to = Lab::other_host(host);
        let port = PORT_BASE + i as u16;
        let mut record = json!({ "move": i + 1, "from": host, "to": to });
        let dest = receiver_in_lab(&lab, to, port, &["--net", "tap=vm0", "--allow-disks", &allow]);
        let ping = start_ping(&lab);
        std::thread::sleep(Duration::from_millis(PING_LEAD_MS));
        let (ok, figures, err) =
            ferry_e2e::migrate_in_lab(&lab, host, &vm, &format!("tcp:{}:{port}", Lab::host_ip(to)), &[]);
        let ping = ping.join().unwrap_or_else(|_| Err("ping thread panicked".into()));
        if let Ok(p) = &ping {
            counts.pings_lost += p["pings_lost"].as_u64().unwrap_or(0);
            counts.pings_sent += p["pings_sent"].as_u64().unwrap_or(0);
            record["pings_lost"] = p["pings_lost"].clone();
            record["max_gap_ms"] = p["max_gap_ms"].clone();
        } else {
            record["ping_error"] = json!(ping.as_ref().err());
        }
        for k in [
            "total_ms",
            "downtime_ms",
            "rounds",
            "bytes_sent",
            "pause_to_state_ms",
            "restore_ms",
            "handoff_ms",
            "commit_to_resumed_ms",
        ] {
            record[k] = figures[k].clone();
        }
        record["ok"] = json!(ok);
        if !ok {
            record["error"] = json!(err.trim());
        }
        // Where does the VM run now? On exactly one of the two hosts.
        let source_gone = wait_gone(&vm, if ok { Duration::from_secs(10) } else { Duration::from_millis(500) });
        let dest_runs = dest.api_sock.exists() && process_running(dest.pid());
        let mut errors: Vec<String> = Vec::new();
        match (source_gone, dest_runs) {
            (true, true) => {
                counts.ok += usize::from(ok);
                counts.failed += usize::from(!ok);
                vm = dest;
                host = to;
            }
            (false, false) => {
                counts.failed += 1;
                errors.push(format!("the move failed and the VM stays on {host}"));
                drop(dest);
            }
            (false, true) => {
                counts.double_runs += 1;
                errors.push("double run: both VMMs run the VM".into());
            }
            (true, false) => {
                counts.lost_vms += 1;
                errors.push("VM lost: neither host runs it".into());
            }
        }
        let fatal = source_gone ^ dest_runs;
        if !fatal {
            // The guest where it runs: memory, the last pattern, a new one,
            // and the lease names this host.
            match ask(&vm, "verify", "verify") {
                Ok(l) if l.starts_with("verify ok") => {}
                other => {
                    counts.verify_errors += 1;
                    errors.push(format!("verify: {other:?}"));
                }
            }
            match ask(&vm, &format!("disk-verify {PATTERN} {seed}"), "disk-verify") {
                Ok(l) if l.starts_with("disk-verify ok") => {}
                other => {
                    counts.disk_errors += 1;
                    errors.push(format!("disk-verify: {other:?}"));
                }
            }
            seed += 1;
            match ask(&vm, &format!("disk-write {PATTERN} {seed}"), "disk-write") {
                Ok(l) if l.starts_with("disk-write ok") => {}
                other => {
                    counts.disk_errors += 1;
                    errors.push(format!("disk-write: {other:?}"));
                }
            }
            let owner = lease_owner(&vol);
            if owner != host {
                counts.lease_errors += 1;
                errors.push(format!("the disk's lease names {owner:?}, the VM runs on {host}"));
            }
        }
        record["errors"] = json!(errors);
        eprintln!(
            "move {:>2} {}->{}: ok={} downtime={} total={} rounds={} lost={} gap={}{}",
            i + 1,
            record["from"].as_str().unwrap_or("?"),
            record["to"].as_str().unwrap_or("?"),
            ok,
            record["downtime_ms"],
            record["total_ms"],
            record["rounds"],
            record["pings_lost"],
            record["max_gap_ms"],
            if errors.is_empty() { String::new() } else { format!(" errors: {errors:?}") },
        );
        moves.push(record);
        if fatal {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(vm);
    drop(lab);

    let figure =
        |k: &str| -> Vec<f64> { moves.iter().filter(|m| m["ok"] == true).filter_map(|m| m[k].as_f64()).collect() };
    let max = |v: &[f64]| v.iter().copied().reduce(f64::max);
    let downtime = figure("downtime_ms");
    let total = figure("total_ms");
    let lost_per_move = figure("pings_lost");
    let clean = counts.lost_vms + counts.double_runs + counts.verify_errors + counts.disk_errors + counts.lease_errors;
    let report = json!({
        "bench": "soak",
        "guest": format!("ferry-guest, {MEM_MIB} MiB, {CMDLINE}, disk d0 (qcow2, 64 MiB) on a csv-fs volume"),
        "moves_planned": MOVES,
        "moves_run": moves.len(),
        "moves_ok": counts.ok,
        "moves_failed": counts.failed,
        "lost_vms": counts.lost_vms,
        "double_runs": counts.double_runs,
        "verify_errors": counts.verify_errors,
        "disk_pattern_errors": counts.disk_errors,
        "lease_errors": counts.lease_errors,
        "pings_sent": counts.pings_sent,
        "pings_lost": counts.pings_lost,
        "pings_lost_per_move_median": median(&lost_per_move),
        "pings_lost_per_move_max": max(&lost_per_move),
        "downtime_ms_median": median(&downtime).map(round3),
        "downtime_ms_max": max(&downtime).map(round3),
        "total_ms_median": median(&total).map(round3),
        "targets": {
            "0 lost VMs, 0 double runs, 0 verify errors, 0 disk-pattern errors over 50 moves":
                clean == 0 && moves.len() == MOVES,
        },
        "moves": moves,
        "bench_s": round3(started.elapsed().as_secs_f64()),
        "notes": "Each move: `ferry receive` on the other host (--allow-disks, its own host id), `ferry ping` from \
                  the lab client every 10 ms for 2.5 s starting 300 ms before `ferry migrate --mode live` (encrypted, \
                  defaults). Afterwards the source VMM must have exited and the destination run the VM; the guest \
                  verifies its working set, the disk pattern written before the move (a new seed each move) and \
                  writes the next; the disk lease must name the new host.",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    if let Some(dir) = Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &text).unwrap();
    println!("{text}");
    if clean > 0 {
        eprintln!("bench-soak: {clean} errors (lost VMs, double runs, verify, disk, lease): see {out}");
    }
}
