//! `make bench`: what one round's dirty-page sync costs for big guests,
//! with KVM's dirty log (bitmap per memory slot, fetched and re-protected)
//! and with its dirty ring (per-vCPU rings harvested and reset), written as
//! JSON (target/bench/dirty.json).
//!
//! For each memory size, tracking and dirty rate, the test guest boots in
//! this process (working set half its memory), fills it, and a migration's
//! sync (`MigratableVm::take_dirty`) is timed every 200 ms, as a round
//! would call it: the first sync (the whole log, or nothing for the ring)
//! apart, then the median and max of the others with the pages they found.

use std::time::{Duration, Instant};

use ferry_e2e::stats::{median, round3};
use ferry_e2e::{kvm_available, TempDir};
use serde_json::{json, Value};
use vmm::migration::MigratableVm;
use vmm::vstate::dirty::DirtyTracking;
use vmm::{HostConfig, MachineConfig, VmConfig, Vmm};

const MEM_MIB: [u64; 2] = [4096, 8192];
const DIRTY_MIB_S: [u64; 2] = [50, 200];
const ROUNDS: usize = 10;
const ROUND_PERIOD: Duration = Duration::from_millis(200);

fn cell(dir: &std::path::Path, mem_mib: u64, tracking: DirtyTracking, dirty_mib_s: u64) -> Result<Value, String> {
    let serial = dir.join(format!("serial-{mem_mib}-{dirty_mib_s}-{tracking:?}.log"));
    let mut machine = MachineConfig::new(ferry_e2e::guest_elf());
    machine.mem_mib = mem_mib;
    machine.cmdline = format!("wss_mib={} dirty_mib_s={dirty_mib_s} heartbeat_ms=1000", mem_mib / 2);
    let host = HostConfig {
        serial: vmm::devices::serial::SerialOutput::File(serial.clone()),
        dirty_tracking: tracking,
        ..HostConfig::default()
    };
    let vm = Vmm::boot(VmConfig { machine, host }).map_err(|e| e.to_string())?;
    let started = Instant::now();
    while !std::fs::read_to_string(&serial).unwrap_or_default().contains("workload ready") {
        if started.elapsed() > Duration::from_secs(300) {
            vm.stop();
            return Err(format!(
                "the guest never filled its working set: {}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let fill_s = started.elapsed().as_secs_f64();
    let mode = vm.start_dirty_log().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let first = vm.take_dirty().map_err(|e| e.to_string())?;
    let first_ms = t.elapsed().as_secs_f64() * 1000.0;
    let (mut sync_ms, mut pages) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        std::thread::sleep(ROUND_PERIOD);
        let t = Instant::now();
        let d = vm.take_dirty().map_err(|e| e.to_string())?;
        sync_ms.push(round3(t.elapsed().as_secs_f64() * 1000.0));
        pages.push(d.pages() as f64);
    }
    let _ = vm.stop_dirty_log();
    vm.stop();
    let max = sync_ms.iter().copied().fold(0.0, f64::max);
    Ok(json!({
        "mem_mib": mem_mib,
        "tracking": mode,
        "dirty_mib_s": dirty_mib_s,
        "fill_s": round3(fill_s),
        "first_sync_ms": round3(first_ms),
        "first_sync_pages": first.pages(),
        "sync_ms_median": median(&sync_ms),
        "sync_ms_max": max,
        "dirty_pages_median": median(&pages),
        "sync_ms": sync_ms,
    }))
}

fn main() {
    ferry_e2e::clean_up_on_panic();
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/bench/dirty.json".into());
    if !kvm_available("bench-dirty") {
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new("bench-dirty");
    let mut rows = Vec::new();
    for mem in MEM_MIB {
        for dirty in DIRTY_MIB_S {
            for tracking in [DirtyTracking::Log, DirtyTracking::Ring(vmm::vstate::dirty::RING_ENTRIES)] {
                let row = cell(dir.path(), mem, tracking, dirty).unwrap_or_else(|e| {
                    json!({ "mem_mib": mem, "dirty_mib_s": dirty, "tracking": format!("{tracking:?}"), "error": e })
                });
                eprintln!("{row}");
                rows.push(row);
            }
        }
    }
    let report = json!({
        "bench": "dirty",
        "guest": "ferry-guest, 1 vCPU, working set half its memory, dirtied at dirty_mib_s",
        "round_period_ms": ROUND_PERIOD.as_millis() as u64,
        "rounds": ROUNDS,
        "ring_entries_per_vcpu": vmm::vstate::dirty::RING_ENTRIES,
        "rows": rows,
        "bench_s": round3(started.elapsed().as_secs_f64()),
        "notes": "sync = MigratableVm::take_dirty as a migration round calls it: the log fetches every slot's \
                  bitmap, re-protects what it found (KVM_CLEAR_DIRTY_LOG) and ORs in the VMM's own bitmap; \
                  the ring harvests each vCPU's ring and resets it (KVM_RESET_DIRTY_RINGS). first_sync is the \
                  one after logging starts (the log's INITIALLY_SET makes it every page; the ring's is empty).",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    if let Some(parent) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&out, &text).unwrap();
    println!("{text}");
}
