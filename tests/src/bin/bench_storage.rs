//! `make bench`: storage figures for the test guest with disks on a shared
//! volume, written as JSON.
//!
//! One lab (`bs`), one volume (`ferry volume create`) in a scratch
//! directory, everything on the filesystem that directory lives on:
//! - formats: per disk format (raw, vhd-fixed, vhd-dynamic, qcow2) a 256 MiB
//!   disk (`ferry disk create`) and the test guest on lab host a with
//!   `--disk csv:VOLUME/disks/NAME --host-id a`; `disk-write` (write, flush,
//!   read back, verify) of fresh 8 MiB regions, `disk-verify` (read,
//!   verify) of the same regions, and `disk-write` over the first region
//!   again, each timed from the host side; medians as MB/s. The reference
//!   is `dd` on a plain file in the same directory, with O_DIRECT (the
//!   ratios) and through the page cache (as the VMM does I/O). A console
//!   command that does no work (`disk-verify` without arguments) gives the
//!   console round trip every guest figure includes;
//! - lease: acquire, renew, handoff and release of a disk's lease, with
//!   `ferry disk lease ...` (process start to exit) and in-process with
//!   the csv_fs API (`Volume::lease_store`), and the fsync-bound record
//!   replacement alone (the floor of every lease change);
//! - migration: a guest with a `csv:` qcow2 disk live-migrated a -> b -> a
//!   ... (`ferry receive --host-id` on the other host, `ferry migrate
//!   --mode live --json` in the source host's namespace), the handoff
//!   (flush, lease to the destination) and the downtime per move from the
//!   source's figures; then the same with a plain raw image file for
//!   comparison. A 1 MiB pattern written before each move is verified
//!   after it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use csv_fs::{LeaseStore, Volume};
use ferry_e2e::stats::{median, ms, percentile, round3};
use ferry_e2e::{
    ferry_bin, guest_elf, heartbeat_number, kvm_available, process_running, root_available, run_bounded, Lab, TempDir,
    Vm,
};
use serde_json::{json, Value};

const LAB: &str = "bs";
const FORMATS: [&str; 4] = ["raw", "vhd-fixed", "vhd-dynamic", "qcow2"];
const DISK_SIZE: &str = "256M";
/// Sectors per guest command: 8 MiB, the guest's maximum.
const SECTORS: u64 = 16384;
/// Fresh 8 MiB regions written (then read) per format: 96 MiB.
const IO_RUNS: usize = 12;
/// Writes over the first region again, per format.
const OVERWRITE_RUNS: usize = 5;
const CONSOLE_RUNS: usize = 7;
const DD_MIB: u64 = 256;
const DD_RUNS: usize = 3;
const LEASE_CLI_CYCLES: usize = 15;
const LEASE_API_CYCLES: usize = 300;
/// In-process cycles with LEASE_GAP between operations (the VMM renews
/// every third of the TTL, not back to back).
const LEASE_SPACED_CYCLES: usize = 50;
const LEASE_GAP: Duration = Duration::from_millis(20);
const FSYNC_PROBES: usize = 100;
const LEASE_TTL_MS: u64 = 10_000;
/// Moves per disk kind (a -> b -> a -> ...).
const MIGRATIONS: usize = 10;
/// Sectors of the pattern written before each move and verified after it.
const MOVE_PATTERN_SECTORS: u64 = 2048;
const HANDOFF_TARGET_MS: f64 = 2.0;
const PORT_BASE: u16 = 7900;
const MEM_MIB: &str = "128";
const T: Duration = Duration::from_secs(30);
const MIGRATE_T: Duration = Duration::from_secs(60);

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| round3(x)).collect()
}

/// MB/s (10^6 bytes) of `bytes` moved in `ms` milliseconds.
fn mb_s(bytes: u64, ms: Option<f64>) -> Option<f64> {
    ms.filter(|&m| m > 0.0).map(|m| round3(bytes as f64 / 1e6 / (m / 1000.0)))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(round3(a / b)),
        _ => None,
    }
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

/// Runs `ferry ARGS` (bounded); its stdout if it succeeded.
fn ferry(args: &[&str]) -> Result<String, String> {
    let out = run_bounded(Command::new(ferry_bin()).args(args), T)?;
    if !out.status.success() {
        return Err(format!("ferry {args:?} failed: {}", stderr_of(&out)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The filesystem holding `path`: type and source from /proc/self/mounts
/// (the longest mount point that contains it).
fn filesystem(path: &Path) -> Value {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0].to_owned(), f[1].replace("\\040", " "), f[2].to_owned()))
        })
        .filter(|(_, mnt, _)| path.starts_with(mnt))
        .max_by_key(|(_, mnt, _)| mnt.len());
    match best {
        Some((source, mount, fstype)) => {
            json!({ "path": path.display().to_string(), "type": fstype, "source": source, "mount": mount })
        }
        None => json!({ "path": path.display().to_string(), "type": "unknown" }),
    }
}

/// /proc/loadavg, to judge how busy the machine was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_owned()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The guest and its console.

fn guest_args(disk: &str, host: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        guest_elf().display().to_string(),
        "--mem-mib".into(),
        MEM_MIB.into(),
        "--cmdline".into(),
        "heartbeat_ms=1000 wss_mib=16 dirty_mib_s=16".into(),
        "--disk".into(),
        disk.into(),
        "--host-id".into(),
        host.into(),
    ]
}

/// Waits for a console line at index >= `from` that satisfies `pred`, with
/// the harness's wait (woken by each new line, so the timing is exact); a
/// timeout is an error.
fn wait_for(vm: &Vm, from: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String, String> {
    vm.try_wait_line_from(from, timeout, pred).map(|(_, l)| l)
}

/// Boots the test guest on lab host `host` with `disk`; returns once it
/// has found the disk and printed a heartbeat.
fn boot(lab: &Lab, disk: &str, host: &str) -> Result<Vm, String> {
    boot_with(lab, disk, host, &[])
}

/// [`boot`] with more `ferry run` arguments.
fn boot_with(lab: &Lab, disk: &str, host: &str, extra: &[&str]) -> Result<Vm, String> {
    let mut args = guest_args(disk, host);
    args.extend(extra.iter().map(|a| a.to_string()));
    let vm = Vm::launch(Some(&lab.netns(host)), "run", &args);
    wait_for(&vm, 0, T, |l| l.starts_with("virtio-blk:"))?;
    wait_for(&vm, 0, T, |l| heartbeat_number(l).is_some())?;
    Ok(vm)
}

/// Types `cmd` on the console and waits for the first line from then on
/// starting with `prefix`; returns it and the host-side milliseconds from
/// starting `ferry console` to the answer line.
fn console(vm: &Vm, cmd: &str, prefix: &str) -> Result<(String, f64), String> {
    let from = vm.lines().len();
    let t = Instant::now();
    let (ok, _, err) = vm.ferry(&["console", cmd]);
    if !ok {
        return Err(format!("ferry console {cmd:?}: {}", err.trim()));
    }
    let line = wait_for(vm, from, T, |l| l.starts_with(prefix))?;
    Ok((line, ms(t.elapsed())))
}

/// A console command that must answer `ok_prefix`; host-side milliseconds.
fn timed(vm: &Vm, cmd: &str, prefix: &str, ok_prefix: &str) -> Result<f64, String> {
    let (line, ms) = console(vm, cmd, prefix)?;
    if !line.starts_with(ok_prefix) {
        return Err(format!("`{cmd}` answered: {line}"));
    }
    Ok(ms)
}

/// Asks the VMM to stop and waits for it to exit (it is killed on drop
/// otherwise); true if it exited by itself.
fn shut_down(vm: Vm) -> bool {
    vm.ferry(&["shutdown"]).0 && wait_gone(&vm, Duration::from_secs(5))
}

// ---------------------------------------------------------------------------
// 1. Guest throughput per format, and dd.

/// Guest figures for one format, the image using the host's page cache as
/// `cache` says (`direct`, the default for shared volumes, or `host`).
fn format_run(lab: &Lab, vol: &Path, format: &str, cache: &str) -> Value {
    let name = format!("bench-{format}-{cache}");
    let mut row = json!({ "format": format, "disk": name, "shared_disk_cache": cache });
    let created =
        ferry(&["disk", "create", "--volume", vol.to_str().unwrap(), "--format", format, "--size", DISK_SIZE, &name]);
    if let Err(e) = created {
        row["error"] = json!(e);
        return row;
    }
    let disk = format!("csv:{}/disks/{name}", vol.display());
    let t_boot = Instant::now();
    let vm = match boot_with(lab, &disk, "a", &["--shared-disk-cache", cache]) {
        Ok(vm) => vm,
        Err(e) => {
            row["error"] = json!(format!("boot: {e}"));
            return row;
        }
    };
    row["boot_ms"] = json!(round3(ms(t_boot.elapsed())));
    let result = (|| -> Result<(), String> {
        let usage = "usage: disk-verify";
        let console_ms =
            (0..CONSOLE_RUNS).map(|_| timed(&vm, "disk-verify", usage, usage)).collect::<Result<Vec<_>, _>>()?;
        row["console_ms_median"] = json!(median(&console_ms).map(round3));
        row["console_ms_runs"] = json!(rounded(&console_ms));
        let (mut write_ms, mut read_ms, mut overwrite_ms) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..IO_RUNS as u64 {
            let cmd = format!("disk-write {} {SECTORS} {}", i * SECTORS, 100 + i);
            write_ms.push(timed(&vm, &cmd, "disk-write", "disk-write ok")?);
        }
        for i in 0..IO_RUNS as u64 {
            let cmd = format!("disk-verify {} {SECTORS} {}", i * SECTORS, 100 + i);
            read_ms.push(timed(&vm, &cmd, "disk-verify", "disk-verify ok")?);
        }
        for i in 0..OVERWRITE_RUNS as u64 {
            let cmd = format!("disk-write 0 {SECTORS} {}", 500 + i);
            overwrite_ms.push(timed(&vm, &cmd, "disk-write", "disk-write ok")?);
        }
        let bytes = SECTORS * 512;
        let (w, r, o) = (median(&write_ms), median(&read_ms), median(&overwrite_ms));
        row["write_mb_s"] = json!(mb_s(bytes, w));
        row["read_mb_s"] = json!(mb_s(bytes, r));
        row["overwrite_mb_s"] = json!(mb_s(bytes, o));
        row["write_ms_median"] = json!(w.map(round3));
        row["read_ms_median"] = json!(r.map(round3));
        row["overwrite_ms_median"] = json!(o.map(round3));
        // The same figures with the median console round trip taken off.
        let c = median(&console_ms).unwrap_or(0.0);
        row["write_mb_s_less_console"] = json!(mb_s(bytes, w.map(|w| w - c)));
        row["read_mb_s_less_console"] = json!(mb_s(bytes, r.map(|r| r - c)));
        row["runs"] = json!({
            "write_ms": rounded(&write_ms),
            "read_ms": rounded(&read_ms),
            "overwrite_ms": rounded(&overwrite_ms),
        });
        Ok(())
    })();
    if let Err(e) = result {
        row["error"] = json!(e);
    }
    row["shutdown_clean"] = json!(shut_down(vm));
    if let Ok(info) = ferry(&["disk", "info", "--json", "--volume", vol.to_str().unwrap(), &name]) {
        if let Ok(v) = serde_json::from_str::<Value>(&info) {
            row["allocated_bytes"] = v["allocated_bytes"].clone();
            row["lease_after_shutdown"] = v["lease"].clone();
        }
    }
    eprintln!(
        "{format} ({cache} cache): write {} MB/s, read {} MB/s, overwrite {} MB/s, console {} ms{}",
        row["write_mb_s"],
        row["read_mb_s"],
        row["overwrite_mb_s"],
        row["console_ms_median"],
        row.get("error").map(|e| format!(" error: {e}")).unwrap_or_default()
    );
    row
}

/// One `dd`: dd's own seconds (from its last stderr line) and the wall time.
fn dd(args: &[String]) -> Result<(f64, f64), String> {
    let t = Instant::now();
    let out = run_bounded(Command::new("dd").args(args), Duration::from_secs(60))?;
    let wall = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("dd {args:?}: {}", err.trim()));
    }
    // "268435456 bytes (268 MB, 256 MiB) copied, 0.35 s, 767 MB/s"
    let secs = err
        .lines()
        .rev()
        .find(|l| l.contains(" copied, "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" s")?.trim().parse::<f64>().ok()))
        .ok_or_else(|| format!("dd {args:?} printed no time: {}", err.trim()))?;
    Ok((secs, wall))
}

/// dd write and read of a DD_MIB file in `dir`, with O_DIRECT (`direct`)
/// or through the page cache (write + fdatasync, read of a cached file).
fn dd_reference(dir: &Path, direct: bool) -> Value {
    let file = dir.join(if direct { "dd-direct.img" } else { "dd-buffered.img" });
    let f = file.display().to_string();
    let count = DD_MIB.to_string();
    let write: Vec<String> = if direct {
        vec![
            "if=/dev/zero".into(),
            format!("of={f}"),
            "bs=1M".into(),
            format!("count={count}"),
            "oflag=direct".into(),
            "conv=fsync".into(),
        ]
    } else {
        vec![
            "if=/dev/zero".into(),
            format!("of={f}"),
            "bs=1M".into(),
            format!("count={count}"),
            "conv=fdatasync".into(),
        ]
    };
    let mut read: Vec<String> = vec![format!("if={f}"), "of=/dev/null".into(), "bs=1M".into()];
    if direct {
        read.push("iflag=direct".into());
    }
    let bytes = DD_MIB << 20;
    let (mut w, mut r, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..DD_RUNS {
        let _ = std::fs::remove_file(&file);
        match dd(&write) {
            Ok((secs, _)) => w.push(secs * 1000.0),
            Err(e) => errors.push(e),
        }
        if !direct {
            // Warm the cache as the guest's reads find it (just written).
            let _ = dd(&read);
        }
        match dd(&read) {
            Ok((secs, _)) => r.push(secs * 1000.0),
            Err(e) => errors.push(e),
        }
    }
    let _ = std::fs::remove_file(&file);
    let (wm, rm) = (median(&w), median(&r));
    let v = json!({
        "write_mb_s": mb_s(bytes, wm),
        "read_mb_s": mb_s(bytes, rm),
        "write_ms_runs": rounded(&w),
        "read_ms_runs": rounded(&r),
        "write": format!("dd {}", write.join(" ")),
        "read": format!("dd {}", read.join(" ")),
        "errors": errors,
    });
    eprintln!("dd {}: {v}", if direct { "direct" } else { "buffered" });
    v
}

// ---------------------------------------------------------------------------
// 2. Lease latency.

fn op_summary(samples: &[f64]) -> Value {
    json!({
        "median_ms": median(samples).map(round3),
        "p99_ms": percentile(samples, 0.99).map(round3),
        "max_ms": samples.iter().copied().reduce(f64::max).map(round3),
        "n": samples.len(),
    })
}

/// `ferry disk lease ...` timed from process start to exit.
fn lease_cli(vol: &Path, disk: &str) -> Value {
    let vol = vol.display().to_string();
    let ttl = LEASE_TTL_MS.to_string();
    let run = |args: &[&str]| -> Result<(String, f64), String> {
        let mut all = vec!["disk", "lease"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--volume", &vol]);
        let t = Instant::now();
        let out = run_bounded(Command::new(ferry_bin()).args(&all), T)?;
        let elapsed = ms(t.elapsed());
        if !out.status.success() {
            return Err(format!("ferry {all:?}: {}", stderr_of(&out)));
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), elapsed))
    };
    let epoch = |out: &str| -> Result<String, String> {
        serde_json::from_str::<Value>(out)
            .ok()
            .and_then(|v| v["epoch"].as_u64())
            .map(|e| e.to_string())
            .ok_or_else(|| format!("no epoch in {out:?}"))
    };
    let (mut acquire, mut renew, mut handoff, mut release, mut show, mut noop) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut errors = Vec::new();
    for _ in 0..LEASE_CLI_CYCLES {
        let cycle = (|| -> Result<(), String> {
            let t = Instant::now();
            let v = run_bounded(Command::new(ferry_bin()).arg("--version"), T)?;
            if v.status.success() {
                noop.push(ms(t.elapsed()));
            }
            let (out, t) = run(&["acquire", "--host", "a", "--ttl-ms", &ttl, disk])?;
            acquire.push(t);
            let e = epoch(&out)?;
            let (_, t) = run(&["renew", "--host", "a", "--ttl-ms", &ttl, "--epoch", &e, disk])?;
            renew.push(t);
            let (out, t) = run(&["handoff", "--host", "a", "--ttl-ms", &ttl, "--epoch", &e, "--to", "b", disk])?;
            handoff.push(t);
            let e = epoch(&out)?;
            let (_, t) = run(&["show", disk])?;
            show.push(t);
            let (_, t) = run(&["release", "--host", "b", "--ttl-ms", &ttl, "--epoch", &e, disk])?;
            release.push(t);
            Ok(())
        })();
        if let Err(e) = cycle {
            errors.push(e);
            break;
        }
    }
    let v = json!({
        "acquire": op_summary(&acquire),
        "renew": op_summary(&renew),
        "handoff": op_summary(&handoff),
        "release": op_summary(&release),
        "show": op_summary(&show),
        "ferry_version_ms": op_summary(&noop),
        "cycles": LEASE_CLI_CYCLES,
        "errors": errors,
        "runs": {
            "acquire_ms": rounded(&acquire),
            "renew_ms": rounded(&renew),
            "handoff_ms": rounded(&handoff),
            "release_ms": rounded(&release),
        },
    });
    eprintln!(
        "lease cli: acquire {} renew {} handoff {} release {} (ferry --version {})",
        v["acquire"]["median_ms"],
        v["renew"]["median_ms"],
        v["handoff"]["median_ms"],
        v["release"]["median_ms"],
        v["ferry_version_ms"]["median_ms"]
    );
    v
}

/// The same operations in-process, on the volume's FileLeaseStore:
/// `cycles` of acquire, renew, handoff, check, release, with `gap` between
/// operations (zero: back to back).
fn lease_api(vol: &Path, disk: &str, cycles: usize, gap: Duration) -> Value {
    let (mut acquire, mut renew, mut handoff, mut release, mut check) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut errors = Vec::new();
    let pause = || {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    };
    let result = (|| -> Result<(), String> {
        let volume = Volume::open(vol).map_err(|e| format!("open the volume: {e}"))?;
        let store = volume.lease_store(Duration::from_millis(LEASE_TTL_MS));
        for _ in 0..cycles {
            let t = Instant::now();
            let lease = store.acquire(disk, "a").map_err(|e| format!("acquire: {e}"))?;
            acquire.push(ms(t.elapsed()));
            pause();
            let t = Instant::now();
            let lease = store.renew(&lease).map_err(|e| format!("renew: {e}"))?;
            renew.push(ms(t.elapsed()));
            pause();
            let t = Instant::now();
            let lease = store.handoff(&lease, "b").map_err(|e| format!("handoff: {e}"))?;
            handoff.push(ms(t.elapsed()));
            pause();
            let t = Instant::now();
            store.check(&lease).map_err(|e| format!("check: {e}"))?;
            check.push(ms(t.elapsed()));
            pause();
            let t = Instant::now();
            store.release(&lease).map_err(|e| format!("release: {e}"))?;
            release.push(ms(t.elapsed()));
            pause();
        }
        Ok(())
    })();
    if let Err(e) = result {
        errors.push(e);
    }
    let v = json!({
        "acquire": op_summary(&acquire),
        "renew": op_summary(&renew),
        "handoff": op_summary(&handoff),
        "release": op_summary(&release),
        "check": op_summary(&check),
        "cycles": cycles,
        "gap_ms": ms(gap),
        "errors": errors,
    });
    eprintln!(
        "lease api (gap {} ms): acquire {} renew {} handoff {} release {} check {}",
        ms(gap),
        v["acquire"]["median_ms"],
        v["renew"]["median_ms"],
        v["handoff"]["median_ms"],
        v["release"]["median_ms"],
        v["check"]["median_ms"]
    );
    v
}

/// What every lease change costs on this filesystem, without the lease
/// code: a small temp file written and fsynced, renamed over a record, the
/// directory fsynced (as the volume replaces a lease record); `count`
/// times, `gap` apart.
fn fsync_probe(dir: &Path, count: usize, gap: Duration) -> Value {
    use std::io::Write;
    let d = dir.join("fsync-probe");
    let (mut file_ms, mut dir_ms, mut total_ms, mut errors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        if i > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        let r = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&d)?;
            let tmp = d.join(format!(".r.{i}.tmp"));
            let t = Instant::now();
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&[b'x'; 200])?;
            let t_sync = Instant::now();
            f.sync_all()?;
            file_ms.push(ms(t_sync.elapsed()));
            std::fs::rename(&tmp, d.join("r.json"))?;
            let t_dir = Instant::now();
            std::fs::File::open(&d)?.sync_all()?;
            dir_ms.push(ms(t_dir.elapsed()));
            total_ms.push(ms(t.elapsed()));
            Ok(())
        })();
        if let Err(e) = r {
            errors.push(e.to_string());
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&d);
    let v = json!({
        "record_replace": op_summary(&total_ms),
        "fsync_file": op_summary(&file_ms),
        "fsync_dir": op_summary(&dir_ms),
        "gap_ms": ms(gap),
        "errors": errors,
    });
    eprintln!(
        "fsync probe (gap {} ms): replace {} ms (file fsync {}, dir fsync {})",
        ms(gap),
        v["record_replace"]["median_ms"],
        v["fsync_file"]["median_ms"],
        v["fsync_dir"]["median_ms"]
    );
    v
}

// ---------------------------------------------------------------------------
// 3. The handoff in live migration.

/// A VMM process and the lab host it runs on.
struct Placed {
    vm: Vm,
    host: &'static str,
}

/// `ferry receive` on `host`; returns once it listens.
fn receiver(lab: &Lab, key: &Path, host: &'static str, port: u16) -> Result<Placed, String> {
    let args: Vec<String> = vec![
        "--listen".into(),
        format!("tcp:{}:{port}", Lab::host_ip(host)),
        "--key-file".into(),
        key.display().to_string(),
        "--host-id".into(),
        host.into(),
        "--allow-disks".into(),
        std::env::temp_dir().display().to_string(),
    ];
    let vm = Vm::launch(Some(&lab.netns(host)), "receive", &args);
    let deadline = Instant::now() + T;
    while !vm.stderr().contains("waiting for a migration") {
        if Instant::now() >= deadline || !process_running(vm.pid()) {
            std::thread::sleep(Duration::from_millis(50));
            return Err(format!("ferry receive on host {host} did not start listening: {}", vm.stderr().trim()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Placed { vm, host })
}

fn wait_gone(vm: &Vm, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_running(vm.pid()) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Moves `src` to the other host once; the record and where the VM runs.
fn migrate_once(lab: &Lab, key: &Path, src: Placed, seq: usize, csv: Option<(&Path, &str)>) -> (Value, Option<Placed>) {
    let (from, to) = (src.host, Lab::other_host(src.host));
    let port = PORT_BASE + seq as u16;
    let mut rec = json!({ "seq": seq, "from": from, "to": to });
    let seed = 9000 + seq as u64;
    let start = (seq as u64 % 8) * MOVE_PATTERN_SECTORS;
    let pattern = format!("{start} {MOVE_PATTERN_SECTORS} {seed}");
    if let Err(e) = timed(&src.vm, &format!("disk-write {pattern}"), "disk-write", "disk-write ok") {
        rec["ok"] = json!(false);
        rec["error"] = json!(format!("before the move: {e}"));
        return (rec, Some(src));
    }
    let dst = match receiver(lab, key, to, port) {
        Ok(d) => d,
        Err(e) => {
            rec["ok"] = json!(false);
            rec["error"] = json!(e);
            return (rec, Some(src));
        }
    };
    let t = Instant::now();
    let out = run_bounded(
        Command::new("ip")
            .args(["netns", "exec", &lab.netns(from)])
            .arg(ferry_bin())
            .args(["migrate", "--mode", "live", "--json", "--key-file"])
            .arg(key)
            .args(["--to", &format!("tcp:{}:{port}", Lab::host_ip(to)), "--api-sock"])
            .arg(&src.vm.api_sock),
        MIGRATE_T,
    );
    rec["migrate_wall_ms"] = json!(round3(ms(t.elapsed())));
    let figures = out.and_then(|o| {
        if o.status.success() {
            serde_json::from_slice::<Value>(&o.stdout).map_err(|e| format!("ferry migrate printed no JSON: {e}"))
        } else {
            Err(format!("ferry migrate failed: {}", stderr_of(&o)))
        }
    });
    let f = match figures {
        Ok(f) => f,
        Err(e) => {
            rec["ok"] = json!(false);
            rec["error"] = json!(e);
            rec["receiver_stderr"] = json!(dst.vm.stderr());
            // Before the commit the VM keeps running on the source.
            if process_running(src.vm.pid()) && src.vm.ferry(&["info"]).0 {
                return (rec, Some(src));
            }
            let moved = process_running(dst.vm.pid()) && dst.vm.ferry(&["info"]).0;
            return (rec, moved.then_some(dst));
        }
    };
    for k in ["handoff_ms", "downtime_ms", "restore_ms", "total_ms", "rounds", "bytes_sent"] {
        rec[k] = f[k].clone();
    }
    rec["figures"] = f;
    rec["source_exited"] = json!(wait_gone(&src.vm, Duration::from_secs(5)));
    drop(src);
    if let Some((vol, disk)) = csv {
        let show = ferry(&["disk", "lease", "show", "--volume", vol.to_str().unwrap(), disk]);
        if let Ok(l) = show.as_deref().map(serde_json::from_str::<Value>) {
            let l = l.unwrap_or_default();
            rec["lease_owner"] = l["owner"].clone();
            rec["lease_epoch"] = l["epoch"].clone();
        }
    }
    // The disk is intact on the destination and takes writes there.
    let deadline = Instant::now() + T;
    while !dst.vm.api_sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    match timed(&dst.vm, &format!("disk-verify {pattern}"), "disk-verify", "disk-verify ok") {
        Ok(_) => {
            rec["pattern_verified"] = json!(true);
            rec["ok"] = json!(true);
        }
        Err(e) => {
            rec["pattern_verified"] = json!(false);
            rec["ok"] = json!(false);
            rec["error"] = json!(format!("after the move: {e}"));
        }
    }
    (rec, Some(dst))
}

/// MIGRATIONS moves of a guest with `disk`, starting on host a.
fn migration_series(
    lab: &Lab,
    key: &Path,
    label: &str,
    disk: &str,
    csv: Option<(&Path, &str)>,
    seq: &mut usize,
) -> Value {
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    match boot(lab, disk, "a") {
        Ok(vm) => {
            let mut current = Some(Placed { vm, host: "a" });
            for _ in 0..MIGRATIONS {
                let Some(src) = current.take() else { break };
                let (rec, next) = migrate_once(lab, key, src, *seq, csv);
                *seq += 1;
                eprintln!(
                    "{label} {}->{}: ok={} handoff {} ms, downtime {} ms, total {} ms, lease {}@{}{}",
                    rec["from"].as_str().unwrap_or("?"),
                    rec["to"].as_str().unwrap_or("?"),
                    rec["ok"],
                    rec["handoff_ms"],
                    rec["downtime_ms"],
                    rec["total_ms"],
                    rec["lease_owner"],
                    rec["lease_epoch"],
                    rec.get("error").map(|e| format!(" error: {e}")).unwrap_or_default()
                );
                if let Some(e) = rec.get("error") {
                    errors.push(e.clone());
                }
                runs.push(rec);
                if next.is_none() {
                    errors.push(json!("the VM was lost"));
                }
                current = next;
                std::thread::sleep(Duration::from_millis(200));
            }
            if let Some(p) = current {
                if !shut_down(p.vm) {
                    errors.push(json!("the VMM did not exit after `ferry shutdown`"));
                }
            }
        }
        Err(e) => errors.push(json!(format!("boot: {e}"))),
    }
    let ok: Vec<&Value> = runs.iter().filter(|r| r["ok"] == true).collect();
    let med = |k: &str| median(&ok.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>()).map(round3);
    let max = |k: &str| ok.iter().filter_map(|r| r[k].as_f64()).reduce(f64::max).map(round3);
    json!({
        "disk": disk,
        "migrations": runs.len(),
        "migrations_ok": ok.len(),
        "handoff_ms_median": med("handoff_ms"),
        "handoff_ms_max": max("handoff_ms"),
        "downtime_ms_median": med("downtime_ms"),
        "downtime_ms_max": max("downtime_ms"),
        "restore_ms_median": med("restore_ms"),
        "total_ms_median": med("total_ms"),
        "errors": errors,
        "runs": runs,
    })
}

fn main() {
    ferry_e2e::clean_up_on_panic();
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/storage.json".into());
    if !kvm_available("bench-storage") || !root_available("bench-storage") {
        return;
    }
    let started = Instant::now();
    let load_start = loadavg();
    // One copy of the ferry binary for the whole run (a rebuild meanwhile
    // cannot pair a source and destination that disagree); declared before
    // the lab so it outlives `ferry lab down`.
    let dir = TempDir::new("bench-storage");
    let ferry_copy = dir.path().join("ferry");
    std::fs::copy(ferry_bin(), &ferry_copy).expect("copy the ferry binary");
    std::env::set_var("FERRY_BIN", &ferry_copy);
    let vol = dir.path().join("vol");
    ferry(&["volume", "create", vol.to_str().unwrap()]).expect("ferry volume create");
    let key = dir.path().join("cluster.key");
    ferry(&["keygen", "--out", key.to_str().unwrap()]).expect("ferry keygen");
    let fs = filesystem(&vol);
    // FERRY_BENCH_LAB: another lab name, so two benches can run at once.
    let lab = Lab::up(&std::env::var("FERRY_BENCH_LAB").unwrap_or_else(|_| LAB.into()));
    eprintln!("lab {} up after {:.1} s; volume {} on {}", lab.name, started.elapsed().as_secs_f64(), vol.display(), fs);

    // 1. Formats, and dd on the same filesystem.
    let dd_direct = dd_reference(dir.path(), true);
    let dd_buffered = dd_reference(dir.path(), false);
    let mut formats: Vec<Value> = FORMATS.iter().map(|f| format_run(&lab, &vol, f, "direct")).collect();
    // The same through the page cache (the write mode before O_DIRECT),
    // to price what the fence's guarantee costs.
    let host_cache: Vec<Value> = FORMATS.iter().map(|f| format_run(&lab, &vol, f, "host")).collect();
    let direct_vs_host: Vec<Value> = formats
        .iter()
        .zip(&host_cache)
        .map(|(d, h)| {
            json!({
                "format": d["format"],
                "write_mb_s_direct": d["write_mb_s"],
                "write_mb_s_host_cache": h["write_mb_s"],
                "write_ratio": ratio(d["write_mb_s"].as_f64(), h["write_mb_s"].as_f64()),
                "read_mb_s_direct": d["read_mb_s"],
                "read_mb_s_host_cache": h["read_mb_s"],
                "read_ratio": ratio(d["read_mb_s"].as_f64(), h["read_mb_s"].as_f64()),
            })
        })
        .collect();
    let (ddw, ddr) = (dd_direct["write_mb_s"].as_f64(), dd_direct["read_mb_s"].as_f64());
    let (dbw, dbr) = (dd_buffered["write_mb_s"].as_f64(), dd_buffered["read_mb_s"].as_f64());
    for row in &mut formats {
        let (w, r) = (row["write_mb_s"].as_f64(), row["read_mb_s"].as_f64());
        row["write_ratio"] = json!(ratio(w, ddw));
        row["read_ratio"] = json!(ratio(r, ddr));
        row["write_ratio_buffered"] = json!(ratio(w, dbw));
        row["read_ratio_buffered"] = json!(ratio(r, dbr));
    }
    let console_all: Vec<f64> =
        formats.iter().filter_map(|r| r["console_ms_runs"].as_array()).flatten().filter_map(Value::as_f64).collect();

    // 2. Leases.
    let lease_disk = "bench-lease";
    let lease = match ferry(&[
        "disk",
        "create",
        "--volume",
        vol.to_str().unwrap(),
        "--format",
        "raw",
        "--size",
        "1M",
        lease_disk,
    ]) {
        Ok(_) => json!({
            "disk": lease_disk,
            "ttl_ms": LEASE_TTL_MS,
            "cli": lease_cli(&vol, lease_disk),
            "api": lease_api(&vol, lease_disk, LEASE_API_CYCLES, Duration::ZERO),
            "api_spaced": lease_api(&vol, lease_disk, LEASE_SPACED_CYCLES, LEASE_GAP),
            "fsync_probe": fsync_probe(&vol, FSYNC_PROBES, Duration::ZERO),
            "fsync_probe_spaced": fsync_probe(&vol, LEASE_SPACED_CYCLES, LEASE_GAP),
        }),
        Err(e) => json!({ "error": e }),
    };

    // 3. Migration: a csv: qcow2 disk, then a plain raw image file.
    let mut seq = 0;
    let mut fsync_at_migration = Value::Null;
    let mig_disk = "bench-mig";
    let csv = match ferry(&[
        "disk",
        "create",
        "--volume",
        vol.to_str().unwrap(),
        "--format",
        "qcow2",
        "--size",
        DISK_SIZE,
        mig_disk,
    ]) {
        Ok(_) => {
            fsync_at_migration = fsync_probe(&vol, LEASE_SPACED_CYCLES, LEASE_GAP);
            let disk = format!("csv:{}/disks/{mig_disk}", vol.display());
            migration_series(&lab, &key, "csv qcow2", &disk, Some((&vol, mig_disk)), &mut seq)
        }
        Err(e) => json!({ "errors": [e] }),
    };
    let plain_img = ferry_e2e::disk_image(dir.path(), "plain.img", 256);
    let plain = migration_series(&lab, &key, "plain raw", &plain_img.display().to_string(), None, &mut seq);
    drop(lab);

    let handoff = csv["handoff_ms_median"].as_f64();
    let met = handoff.is_some_and(|h| h <= HANDOFF_TARGET_MS);
    let adds = match (csv["downtime_ms_median"].as_f64(), plain["downtime_ms_median"].as_f64()) {
        (Some(c), Some(p)) => Some(round3(c - p)),
        _ => None,
    };
    let report = json!({
        "bench": "storage",
        "pvm_host": ferry_e2e::is_pvm_host(),
        "guest": format!(
            "ferry-guest (PVH), {MEM_MIB} MiB, 1 vCPU, heartbeat_ms=1000 wss_mib=16 dirty_mib_s=16, on lab host a \
             (migrations: a <-> b), disk --host-id of its host"
        ),
        "filesystem": fs,
        "disk_size": DISK_SIZE,
        "handoff_ms": handoff,
        "handoff_target_ms": HANDOFF_TARGET_MS,
        "handoff_target_met": met,
        "downtime_ms": csv["downtime_ms_median"],
        "downtime_ms_plain_raw": plain["downtime_ms_median"],
        "handoff_adds_downtime_ms": adds,
        "console_ms": median(&console_all).map(round3),
        "formats": formats,
        "formats_host_cache": host_cache,
        "direct_vs_host_cache": direct_vs_host,
        "dd": {
            "file_mib": DD_MIB,
            "runs": DD_RUNS,
            "direct": dd_direct,
            "buffered": dd_buffered,
        },
        "lease": lease,
        "migration": {
            "mode": "live",
            "moves_per_disk": MIGRATIONS,
            "fsync_probe": fsync_at_migration,
            "csv_qcow2": csv,
            "plain_raw": plain,
        },
        "bench_s": round3(started.elapsed().as_secs_f64()),
        "loadavg": { "start": load_start, "end": loadavg() },
        "notes": "Guest figures are host-side times from starting `ferry console` to the guest's answer line, so \
                  they include the console round trip (console_ms: `disk-verify` with no arguments, which only \
                  prints its usage line; *_less_console subtracts its median); 8 MiB (16384 sectors) per command, \
                  MB/s = 10^6 bytes/s, medians. write = `disk-write` of a fresh 8 MiB region: write + flush \
                  (fdatasync) + read back + verify, i.e. 8 MiB written and 8 MiB read per 8 MiB counted; read = \
                  `disk-verify` of the same regions (read + verify); overwrite = `disk-write` over the first, \
                  already allocated region. The VMM does buffered I/O, so the guest's reads of data it just wrote \
                  come from the host page cache. write_ratio / read_ratio divide by dd with O_DIRECT on a 256 MiB \
                  file in the volume's directory (dd.direct: `oflag=direct conv=fsync` / `iflag=direct`); \
                  *_ratio_buffered divide by dd through the page cache (`conv=fdatasync` / a cached read), the \
                  like-for-like reference. Leases: cli = `ferry disk lease acquire|renew|handoff|release` timed \
                  from process start to exit (ferry_version_ms: a process that does nothing); api = the same \
                  calls in-process on csv_fs::Volume::lease_store (FileLeaseStore: OFD lock, temp file + fsync + \
                  rename + directory fsync), back to back (api) and 20 ms apart (api_spaced); fsync_probe[_spaced] \
                  times that record replacement alone on the same filesystem, back to back and 20 ms apart (the \
                  floor of every lease change; migration.fsync_probe repeats the spaced one just before the \
                  migrations). lease_after_shutdown: the record after `ferry shutdown` of that format's guest. Migration: `ferry migrate --mode live --json` run in the source host's namespace to \
                  `ferry receive --host-id` on the other, a->b->a..., a 1 MiB pattern written before each move \
                  and verified after it on the destination; handoff_ms (flushing the disks and handing the lease \
                  to the destination, inside the downtime) and downtime_ms from the source's figures; \
                  handoff_ms at the top is the median for the csv: qcow2 disk against a 2 ms target; \
                  handoff_adds_downtime_ms = median downtime with the csv: disk minus with a plain raw image.",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    if let Some(parent) = Path::new(&out).parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&out, &text).unwrap();
    println!("{text}");
}
