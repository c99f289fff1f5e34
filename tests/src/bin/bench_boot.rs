//! `make bench`: boot figures for the test guest, written as JSON.
//!
//! - banner_ms: process start (spawn of `ferry run`) to the guest's banner
//!   line on serial, median over 20 runs;
//! - rss_overhead_mib: the VMM's resident memory beyond guest RAM
//!   (RssAnon + RssFile; guest RAM is the memfd, counted as RssShmem).

use std::time::Duration;

use ferry_e2e::stats::median;
use ferry_e2e::{kvm_available, Vm};

const RUNS: usize = 20;

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing from /proc/{pid}/status"))
}

fn main() {
    ferry_e2e::clean_up_on_panic();
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/boot.json".into());
    if !kvm_available("bench-boot") {
        return;
    }
    let mut banner_ms = Vec::new();
    let mut overhead_mib = Vec::new();
    let mut anon_mib = Vec::new();
    for run in 0..RUNS {
        let vm = Vm::guest("heartbeat_ms=100 wss_mib=16", &["--mem-mib", "128"]);
        vm.wait_line(Duration::from_secs(10), |l| l.contains(" booted: "));
        banner_ms.push(vm.started.elapsed().as_secs_f64() * 1000.0);
        vm.wait_line(Duration::from_secs(10), |l| l.starts_with("heartbeat "));
        let (anon, file) = (status_kib(vm.pid(), "RssAnon:"), status_kib(vm.pid(), "RssFile:"));
        overhead_mib.push((anon + file) as f64 / 1024.0);
        anon_mib.push(anon as f64 / 1024.0);
        eprintln!("run {run}: banner {:.1} ms, overhead {:.2} MiB", banner_ms[run], overhead_mib[run]);
    }
    let mut sorted = banner_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "bench": "boot",
        "runs": RUNS,
        "guest": "ferry-guest (PVH), 128 MiB, 1 vCPU",
        "pvm_host": ferry_e2e::is_pvm_host(),
        "banner_ms_median": median(&sorted).unwrap_or(0.0),
        "banner_ms_min": sorted[0],
        "banner_ms_max": sorted[RUNS - 1],
        "rss_overhead_mib": median(&overhead_mib).unwrap_or(0.0),
        "rss_anon_mib": median(&anon_mib).unwrap_or(0.0),
        "targets": { "banner_ms_median": 50, "rss_overhead_mib": 8 },
        "banner_ms_runs": banner_ms,
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, &text).unwrap();
    println!("{text}");
}
