//! A running VMM's threads are confined by kind (seccomp mode 2, one
//! filter each), and `--seccomp off` leaves them unconfined.

use std::time::{Duration, Instant};

use ferry_e2e::{heartbeat_number, kvm_available, Vm};

const T: Duration = Duration::from_secs(20);

/// (thread name, seccomp mode, filters) for every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let field = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(99),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    out
}

fn wait_threads(vm: &Vm, names: &[&str]) -> Vec<(String, u32, u32)> {
    let deadline = Instant::now() + T;
    loop {
        let t = threads(vm.pid());
        if names.iter().all(|n| t.iter().any(|(name, _, _)| name == n)) {
            return t;
        }
        assert!(Instant::now() < deadline, "threads {names:?} never all ran: {t:?}\n{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_vmm_thread_kind_runs_under_its_own_filter() {
    if !kvm_available("every_vmm_thread_kind_runs_under_its_own_filter") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=100", &["--vcpus", "2"]);
    vm.wait_api(T);
    let t = wait_threads(&vm, &["vcpu0", "vcpu1", "devices", "api"]);
    for (name, mode, filters) in &t {
        if name.starts_with("vcpu") || name == "devices" || name == "api" {
            assert_eq!((*mode, *filters), (2, 1), "thread {name}: {t:?}");
        }
    }
    // The guest runs under it: heartbeats keep coming, the API answers.
    let (i, _) = vm.wait_line_from(0, T, |l| heartbeat_number(l).is_some());
    vm.wait_line_from(i + 3, T, |l| heartbeat_number(l).is_some());
    assert_eq!(vm.info()["state"], "Running");
}

#[test]
fn seccomp_off_leaves_the_threads_unconfined() {
    if !kvm_available("seccomp_off_leaves_the_threads_unconfined") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=100", &["--seccomp", "off"]);
    vm.wait_api(T);
    let t = wait_threads(&vm, &["vcpu0", "devices", "api"]);
    assert!(t.iter().all(|(_, mode, _)| *mode == 0), "{t:?}");
    assert!(vm.stderr().contains("seccomp is off"), "{}", vm.stderr());
}
