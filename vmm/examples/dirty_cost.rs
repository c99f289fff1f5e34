//! What one round's dirty-page sync costs on this host: boots the test
//! guest with MEM MiB, a working set and a dirty rate, turns dirty logging
//! on, and times each `take_dirty` (KVM's log fetched and re-protected,
//! ORed with the VMM's own bitmap) at a fixed period, as a migration's
//! rounds would call it.
//!
//!     cargo run --release -p vmm --example dirty_cost -- GUEST_ELF MEM_MIB WSS_MIB DIRTY_MIB_S [ROUNDS] [log|ring]
//!
//! Prints one JSON object: per-round sync milliseconds and dirty pages.

use std::time::{Duration, Instant};

use vmm::migration::MigratableVm;
use vmm::{HostConfig, MachineConfig, VmConfig, Vmm};

fn arg(n: usize, default: &str) -> String {
    std::env::args().nth(n).unwrap_or_else(|| default.to_owned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = arg(1, "target/guest/ferry-guest.elf");
    let mem_mib: u64 = arg(2, "4096").parse()?;
    let wss_mib: u64 = arg(3, "2048").parse()?;
    let dirty_mib_s: u64 = arg(4, "50").parse()?;
    let rounds: usize = arg(5, "8").parse()?;
    let tracking: vmm::vstate::dirty::DirtyTracking = arg(6, "log").parse()?;
    let serial = std::env::temp_dir().join(format!("ferry-dirty-cost-{}.log", std::process::id()));
    let mut machine = MachineConfig::new(&kernel);
    machine.mem_mib = mem_mib;
    machine.cmdline = format!("wss_mib={wss_mib} dirty_mib_s={dirty_mib_s} heartbeat_ms=1000");
    let host = HostConfig {
        serial: vmm::devices::serial::SerialOutput::File(serial.clone()),
        dirty_tracking: tracking,
        ..HostConfig::default()
    };
    let vm = Vmm::boot(VmConfig { machine, host })?;
    let started = Instant::now();
    while !std::fs::read_to_string(&serial).unwrap_or_default().contains("workload ready") {
        if started.elapsed() > Duration::from_secs(600) {
            return Err("the guest never filled its working set".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let filled_s = started.elapsed().as_secs_f64();
    let mode = vm.start_dirty_log()?;
    // The first sync takes the whole log (every page, with INITIALLY_SET).
    let t = Instant::now();
    let first = vm.take_dirty()?;
    let first_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut sync_ms = Vec::new();
    let mut pages = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let d = vm.take_dirty()?;
        sync_ms.push((t.elapsed().as_secs_f64() * 1e6).round() / 1e3);
        pages.push(d.pages());
    }
    vm.stop_dirty_log()?;
    vm.stop();
    let _ = std::fs::remove_file(&serial);
    println!(
        "{}",
        serde_json::json!({
            "mem_mib": mem_mib, "wss_mib": wss_mib, "dirty_mib_s": dirty_mib_s, "mode": mode,
            "fill_s": (filled_s * 10.0).round() / 10.0,
            "first_sync_ms": (first_ms * 1000.0).round() / 1000.0, "first_sync_pages": first.pages(),
            "round_period_ms": 200, "sync_ms": sync_ms, "dirty_pages": pages,
        })
    );
    Ok(())
}
