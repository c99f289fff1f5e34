//! The test guest on real KVM: boot, heartbeat, memory workload, pause and
//! resume, the API, and the ways a VM ends.

use std::time::{Duration, Instant};

use ferry_e2e::{field, heartbeat_number, kvm_available, Vm};

const T: Duration = Duration::from_secs(20);

fn is_heartbeat(l: &str) -> bool {
    heartbeat_number(l).is_some()
}

#[test]
fn guest_boots_prints_banner_and_heartbeats_count_up() {
    if !kvm_available("guest_boots_prints_banner_and_heartbeats_count_up") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=100 wss_mib=8", &["--mem-mib", "64"]);
    let banner = vm.wait_line(T, |l| l.starts_with("ferry-guest ") && l.contains(" booted: "));
    assert!(banner.contains("wss_mib=8"), "banner shows the parsed command line: {banner}");
    assert!(field(&banner, "tsc_khz").unwrap() > 100_000, "TSC frequency found: {banner}");
    assert!(field(&banner, "ram_mib").unwrap() >= 60, "memory map read: {banner}");
    let (i, first) = vm.wait_line_from(0, T, is_heartbeat);
    let (_, later) = vm.wait_line_from(i + 3, T, is_heartbeat);
    assert!(heartbeat_number(&later).unwrap() >= heartbeat_number(&first).unwrap() + 3);
}

#[test]
fn memory_workload_stamps_and_verifies_while_dirtying() {
    if !kvm_available("memory_workload_stamps_and_verifies_while_dirtying") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=200 wss_mib=32 dirty_mib_s=64", &["--mem-mib", "128"]);
    let ready = vm.wait_line(T, |l| l.starts_with("workload ready"));
    assert_eq!(field(&ready, "pages"), Some(32 * 256), "{ready}");
    // Let the workload sweep the set more than once.
    vm.wait_line(T, |l| is_heartbeat(l) && field(l, "generation").unwrap_or(0) >= 3);
    vm.control(&["console", "verify"]);
    let verdict = vm.wait_line(T, |l| l.starts_with("verify "));
    assert!(verdict.starts_with("verify ok"), "every page stamp intact: {verdict}");
    assert_eq!(field(&verdict, "pages"), Some(32 * 256));
}

#[test]
fn pause_stops_the_guest_and_resume_continues_where_it_was() {
    if !kvm_available("pause_stops_the_guest_and_resume_continues_where_it_was") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=100 wss_mib=8", &["--mem-mib", "64"]);
    vm.wait_line(T, is_heartbeat);
    assert_eq!(vm.info()["state"], "Running");

    let t = Instant::now();
    vm.control(&["pause"]);
    let pause_took = t.elapsed();
    assert_eq!(vm.info()["state"], "Paused");
    let last = vm.lines().iter().rev().find_map(|l| heartbeat_number(l)).unwrap();
    let count_at_pause = vm.lines().len();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(vm.lines().len(), count_at_pause, "no console output while paused");
    let (ok, _, err) = vm.ferry(&["pause"]);
    assert!(!ok && err.contains("already paused"), "double pause is refused clearly: {err}");

    vm.control(&["resume"]);
    assert_eq!(vm.info()["state"], "Running");
    let (_, next) = vm.wait_line_from(count_at_pause, T, is_heartbeat);
    assert_eq!(heartbeat_number(&next), Some(last + 1), "the counter continues from where it was");
    // The guest saw the stop itself: its stall measure covers the pause.
    let stall = field(&next, "max_stall_us").unwrap();
    assert!(stall >= 1_100_000, "guest measured the 1.2 s pause as a stall, got {stall} us");
    assert!(pause_took < Duration::from_secs(1), "pause returned in {pause_took:?}");
    let (ok, _, err) = vm.ferry(&["resume"]);
    assert!(!ok && err.contains("already running"), "{err}");
}

#[test]
fn two_vcpu_vm_boots_and_pauses_with_a_parked_ap() {
    if !kvm_available("two_vcpu_vm_boots_and_pauses_with_a_parked_ap") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=100 wss_mib=8", &["--mem-mib", "64", "--vcpus", "2"]);
    let banner = vm.wait_line(T, |l| l.contains(" booted: "));
    assert_eq!(field(&banner, "cpus"), Some(2), "CPUID reports both vCPUs: {banner}");
    vm.wait_line(T, is_heartbeat);
    // vCPU 1 never gets a SIPI and blocks inside KVM_RUN: pause must still
    // get it out.
    vm.control(&["pause"]);
    assert_eq!(vm.info()["state"], "Paused");
    vm.control(&["resume"]);
    let n = vm.lines().len();
    vm.wait_line_from(n, T, is_heartbeat);
}

#[test]
fn api_reports_info_and_rejects_unknown_requests() {
    if !kvm_available("api_reports_info_and_rejects_unknown_requests") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=100", &["--mem-mib", "48", "--vcpus", "1"]);
    vm.wait_line(T, is_heartbeat);
    let info = vm.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["machine"]["mem_mib"], 48);
    assert_eq!(info["boot_protocol"], "pvh");
    assert_eq!(info["pid"], vm.pid());

    let raw = |req: &str| {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&vm.api_sock).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let ping = raw("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(ping.starts_with("HTTP/1.1 200") && ping.contains("\"version\""), "{ping}");
    let missing = raw("GET /api/v1/vm.nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404") && missing.contains("\"error\""), "{missing}");
    let wrong = raw("GET /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(wrong.starts_with("HTTP/1.1 405"), "{wrong}");
    // Every route is in the table, vm.migration included (it answered 404).
    let put_progress =
        raw("PUT /api/v1/vm.migration HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert!(put_progress.starts_with("HTTP/1.1 405"), "{put_progress}");
    assert!(put_progress.to_lowercase().contains("allow: get"), "405 names the allowed method: {put_progress}");
}

#[test]
fn guest_exit_status_and_reset_end_the_vmm_cleanly() {
    if !kvm_available("guest_exit_status_and_reset_end_the_vmm_cleanly") {
        return;
    }
    let mut vm = Vm::guest("heartbeat_ms=100", &["--mem-mib", "32"]);
    vm.wait_line(T, is_heartbeat);
    vm.control(&["console", "exit 7"]);
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(7), "debug-exit status becomes the exit code");
    assert!(!vm.api_sock.exists(), "API socket removed on exit");

    let mut vm = Vm::guest("heartbeat_ms=100", &["--mem-mib", "32"]);
    vm.wait_line(T, is_heartbeat);
    vm.control(&["console", "reset"]);
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    assert!(vm.stderr().contains("guest reset"), "{}", vm.stderr());
}

#[test]
fn api_shutdown_and_sigterm_stop_the_vm() {
    if !kvm_available("api_shutdown_and_sigterm_stop_the_vm") {
        return;
    }
    let mut vm = Vm::guest("heartbeat_ms=100", &["--mem-mib", "32"]);
    vm.wait_line(T, is_heartbeat);
    vm.control(&["shutdown"]);
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    assert!(vm.stderr().contains("shutdown requested through the API"), "{}", vm.stderr());

    let mut vm = Vm::guest("heartbeat_ms=100", &["--mem-mib", "32"]);
    vm.wait_line(T, is_heartbeat);
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    assert!(vm.stderr().contains("signal 15"), "{}", vm.stderr());
    assert!(!vm.api_sock.exists());
}
