//! `make bench`: snapshot, restore and quick-migration figures, written as
//! JSON (target/bench/quick.json).
//!
//! The test guest boots once per memory size on lab host a (working set
//! half its memory) and, at each dirty rate (0 and 50 MiB/s, set with the
//! console command `dirty N`), RUNS times:
//! - snapshot_ms: `ferry snapshot --to DIR` (pause, save state and memory),
//!   command start to end; the VM is resumed afterwards;
//! - restore_ms: `ferry restore --from DIR` on host b, process start until
//!   the API reports the VM Running (the copy's memory is verified, then it
//!   is shut down: the original keeps running on a);
//! - downtime_ms and total_ms of a quick migration (`ferry migrate --mode
//!   quick`) to the other host, from its figures (the VM then lives there).
//!
//! Same-host rows (`same_host`): per size an idle guest on host a moved
//! RUNS times by quick migration over `unix:` to a new VMM process on the
//! same host (taps vm0 and vm1 in turn), its memory passed by memfd: what a
//! node's Ferry upgrade costs each VM.
//!
//! Environment, to run a part: BENCH_QUICK_PARTS (`cross-host`,
//! `same-host`; both by default), BENCH_QUICK_MEM (e.g. "1024"; "256,1024,
//! 4096" by default).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::stats::{median, ms3, round3};
use ferry_e2e::{cluster_key, command, ferry_bin, kvm_available, root_available, run_bounded, s, Lab, TempDir, Vm};
use serde_json::{json, Value};

const LAB: &str = "bq";
const MEM_MIB: [u32; 3] = [256, 1024, 4096];
const DIRTY_MIB_S: [u32; 2] = [0, 50];
const T: Duration = Duration::from_secs(120);
const SAME_HOST_RUNS: usize = 3;
/// The second tap on host a's bridge, for the process a VM moves to.
const SAME_HOST_TAP: &str = "vm1";

/// Comma-separated values of environment variable `name`, or `default`.
fn list_from_env(name: &str, default: &str) -> Vec<String> {
    let v = std::env::var(name).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.into());
    v.split(',').map(|p| p.trim().to_owned()).collect()
}

/// Runs per cell: medians of three at every size.
const RUNS: usize = 3;

fn boot(lab: &Lab, mem_mib: u32) -> Vm {
    ferry_e2e::boot_in_lab(lab, "a", mem_mib, &format!("wss_mib={} dirty_mib_s=0", mem_mib / 2))
}

/// One snapshot, restore and quick migration; returns the record and
/// where the VM runs afterwards.
fn one_run(lab: &Lab, dir: &Path, vm: Vm, host: &'static str, seq: usize) -> (Value, Vm, &'static str) {
    let mut r = json!({ "seq": seq, "from": host });
    // Snapshot (the VM is left paused; resume it).
    let snap = dir.join(format!("snap-{seq}"));
    let t = Instant::now();
    let (ok, out, err) = vm.ferry(&["snapshot", "--to", snap.to_str().unwrap()]);
    r["snapshot_ms"] = json!(ms3(t.elapsed()));
    r["snapshot_ok"] = json!(ok);
    if !ok {
        r["snapshot_error"] = json!(err.trim());
    }
    r["snapshot_report"] = serde_json::from_str::<Value>(&out).unwrap_or(Value::Null);
    vm.control(&["resume"]);
    // Restore the copy on the other host, verify it, shut it down.
    let other = Lab::other_host(host);
    if ok {
        let t = Instant::now();
        let copy = Vm::launch(
            Some(&lab.netns(other)),
            "restore",
            &[s("--from"), snap.display().to_string(), s("--net"), s("tap=vm0")],
        );
        let deadline = Instant::now() + T;
        let mut running = false;
        while Instant::now() < deadline {
            if copy.api_sock.exists() {
                if let Ok(info) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| copy.info())) {
                    if info["state"] == "Running" {
                        running = true;
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        r["restore_ms"] = json!(running.then(|| ms3(t.elapsed())));
        if running {
            let v = command(&copy, "verify", "verify", T);
            r["restore_verify_ok"] = json!(v.starts_with("verify ok"));
        }
        let _ = copy.ferry(&["shutdown"]);
        drop(copy);
    }
    let _ = std::fs::remove_dir_all(&snap);
    // Quick migration to the other host.
    let port = 7700 + seq as u16;
    let dest = ferry_e2e::receiver_in_lab(lab, other, port, &["--net", "tap=vm0"]);
    let out = run_bounded(
        Command::new("ip")
            .args(["netns", "exec", &lab.netns(host)])
            .arg(ferry_bin())
            .args(["migrate", "--mode", "quick", "--json", "--key-file", cluster_key().to_str().unwrap()])
            .args(["--to", &format!("tcp:{}:{port}", Lab::host_ip(other)), "--api-sock"])
            .arg(&vm.api_sock),
        T,
    );
    match out {
        Ok(o) if o.status.success() => {
            let f: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            r["quick_downtime_ms"] = f["downtime_ms"].clone();
            r["quick_total_ms"] = f["total_ms"].clone();
            r["quick_ok"] = json!(true);
            drop(vm);
            dest.wait_api(T);
            (r, dest, other)
        }
        other_result => {
            r["quick_ok"] = json!(false);
            r["quick_error"] = json!(format!("{other_result:?}"));
            drop(dest);
            (r, vm, host)
        }
    }
}

/// One quick migration over `unix:` to a new VMM process on host a with
/// tap `to_tap`; returns the record and where the VM runs afterwards.
fn same_host_once(lab: &Lab, dir: &Path, vm: Vm, to_tap: &'static str, seq: usize) -> (Value, Vm, bool) {
    let mut r = json!({ "seq": seq, "to_tap": to_tap });
    let to = format!("unix:{}", dir.join(format!("same-host-{seq}.sock")).display());
    let args = [s("--listen"), to.clone(), s("--key-file"), cluster_key().display().to_string()];
    let mut args = args.to_vec();
    args.extend([s("--net"), format!("tap={to_tap}")]);
    let dest = Vm::launch(Some(&lab.netns("a")), "receive", &args);
    dest.wait_stderr(T, "waiting for a migration");
    let out = run_bounded(
        Command::new(ferry_bin())
            .args(["migrate", "--mode", "quick", "--json", "--key-file", cluster_key().to_str().unwrap()])
            .args(["--to", &to, "--api-sock"])
            .arg(&vm.api_sock),
        T,
    );
    match out {
        Ok(o) if o.status.success() => {
            let f: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for k in ["memory", "downtime_ms", "total_ms", "restore_ms", "bytes_sent"] {
                r[k] = f[k].clone();
            }
            r["ok"] = json!(true);
            drop(vm);
            dest.wait_api(T);
            (r, dest, true)
        }
        other => {
            r["ok"] = json!(false);
            r["error"] = json!(format!("{other:?}"));
            drop(dest);
            (r, vm, false)
        }
    }
}

/// The same-host rows: per size, an idle guest moved SAME_HOST_RUNS times
/// on host a by quick migration with its memory passed.
fn same_host(lab: &Lab, dir: &Path, sizes: &[u32], seq: &mut usize) -> Vec<Value> {
    let mut rows = Vec::new();
    for &mem in sizes {
        let mut vm = boot(lab, mem);
        let mut tap = "vm0";
        let mut runs = Vec::new();
        for _ in 0..SAME_HOST_RUNS {
            let to_tap = if tap == "vm0" { SAME_HOST_TAP } else { "vm0" };
            let (r, next, moved) = same_host_once(lab, dir, vm, to_tap, *seq);
            *seq += 1;
            eprintln!(
                "same host {mem} MiB idle, quick: ok={} memory={} downtime {} ms, total {} ms",
                r["ok"], r["memory"], r["downtime_ms"], r["total_ms"]
            );
            runs.push(r);
            vm = next;
            if moved {
                tap = to_tap;
            }
        }
        let v = command(&vm, "verify", "verify", T);
        eprintln!("{mem} MiB after its same-host moves: {v}");
        drop(vm);
        let ok: Vec<&Value> = runs.iter().filter(|r| r["ok"] == true).collect();
        let med = |k: &str| median(&ok.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>()).map(round3);
        rows.push(json!({
            "mem_mib": mem,
            "dirty_mib_s": 0,
            "runs": runs.len(),
            "downtime_ms": med("downtime_ms"),
            "total_ms": med("total_ms"),
            "restore_ms": med("restore_ms"),
            "all_ok": ok.len() == runs.len() && ok.iter().all(|r| r["memory"] == "shared-fd") && v.starts_with("verify ok"),
            "verify": v,
            "raw": runs,
        }));
    }
    rows
}

fn main() {
    ferry_e2e::clean_up_on_panic();
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/quick.json".into());
    if !kvm_available("bench-quick") || !root_available("bench-quick") {
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new("bench-quick");
    ferry_e2e::pin_ferry_binary(dir.path());
    let parts = list_from_env("BENCH_QUICK_PARTS", "cross-host,same-host");
    let sizes: Vec<u32> = list_from_env("BENCH_QUICK_MEM", &MEM_MIB.map(|m| m.to_string()).join(","))
        .iter()
        .map(|m| m.parse().unwrap_or_else(|_| panic!("BENCH_QUICK_MEM: not a number: {m}")))
        .collect();
    let cross_host = parts.iter().any(|p| p == "cross-host");
    let lab = Lab::up_with_taps(LAB);
    lab.ok(&["tap", "add", "a", SAME_HOST_TAP]);
    let mut rows = Vec::new();
    let mut seq = 0;
    for &mem in sizes.iter().filter(|_| cross_host) {
        let mut vm = boot(&lab, mem);
        let mut host = "a";
        for dirty in DIRTY_MIB_S {
            let set = command(&vm, &format!("dirty {dirty}"), "dirty rate set", T);
            assert!(set.starts_with("dirty rate set"), "{set}");
            std::thread::sleep(Duration::from_secs(1));
            let mut runs = Vec::new();
            for _ in 0..RUNS {
                let (r, next, at) = one_run(&lab, dir.path(), vm, host, seq);
                seq += 1;
                eprintln!(
                    "{mem} MiB, {dirty} MiB/s: snapshot {} ms, restore {} ms (verify {}), quick downtime {} ms, total {} ms",
                    r["snapshot_ms"], r["restore_ms"], r["restore_verify_ok"], r["quick_downtime_ms"], r["quick_total_ms"]
                );
                runs.push(r);
                (vm, host) = (next, at);
            }
            let med = |k: &str| median(&runs.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>()).map(round3);
            rows.push(json!({
                "mem_mib": mem,
                "dirty_mib_s": dirty,
                "runs": runs.len(),
                "snapshot_ms": med("snapshot_ms"),
                "restore_ms": med("restore_ms"),
                "downtime_ms": med("quick_downtime_ms"),
                "quick_total_ms": med("quick_total_ms"),
                "all_ok": runs.iter().all(|r| r["snapshot_ok"] == true && r["restore_verify_ok"] == true && r["quick_ok"] == true),
                "raw": runs,
            }));
        }
        let v = command(&vm, "verify", "verify", T);
        eprintln!("{mem} MiB after its moves: {v}");
        drop(vm);
    }
    let same_host =
        if parts.iter().any(|p| p == "same-host") { same_host(&lab, dir.path(), &sizes, &mut seq) } else { Vec::new() };
    drop(lab);
    let same_host_max = same_host.iter().filter_map(|r| r["downtime_ms"].as_f64()).reduce(f64::max);
    let cell = |mem: u32, dirty: u32, k: &str| {
        rows.iter().find(|r| r["mem_mib"] == mem && r["dirty_mib_s"] == dirty).and_then(|r| r[k].as_f64())
    };
    let restore_1g = cell(1024, 0, "restore_ms");
    let quick_max = rows.iter().filter_map(|r| r["downtime_ms"].as_f64()).reduce(f64::max);
    let report = json!({
        "bench": "quick",
        "rows": rows,
        "targets": [
            { "name": "1 GiB idle restore", "limit_ms": 50, "value": restore_1g, "met": restore_1g.is_some_and(|v| v <= 50.0) },
            { "name": "quick-migration downtime (every cell)", "limit_ms": 1000, "value": quick_max, "met": quick_max.is_some_and(|v| v <= 1000.0) },
            { "name": "same-host quick-migration downtime, memory passed (every size)", "limit_ms": 50, "value": same_host_max, "met": same_host_max.is_some_and(|v| v <= 50.0) },
        ],
        "same_host": same_host,
        "bench_s": round3(started.elapsed().as_secs_f64()),
        "notes": "snapshot_ms: `ferry snapshot` command time (pause, state and memory written, fsynced); restore_ms: \
                  `ferry restore` process start to vm.info Running on the other lab host (memory verified after); \
                  downtime_ms/quick_total_ms: `ferry migrate --mode quick --json` between lab hosts a and b \
                  (encrypted). Medians of 3 runs (1 at 4 GiB). same_host: `ferry migrate --mode quick` over unix: \
                  to a new `ferry receive` on host a (taps vm0 and vm1 in turn), the memory's memfd passed, idle \
                  guests, medians of 3. The machine is shared (2 cores, other work running): indicative figures.",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    if let Some(d) = Path::new(&out).parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&out, &text).unwrap();
    println!("{text}");
}
