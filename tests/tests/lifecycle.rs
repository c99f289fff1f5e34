//! The VM's lifecycle seen from outside: what the API refuses while a
//! migration owns the VM, what a cancel leaves behind, what a retired
//! source can no longer do, and a paused VM arriving paused.

use std::time::Duration;

use ferry_e2e::{command, heartbeat_number, kvm_available, last_heartbeat, Lab, Vm};

const T: Duration = Duration::from_secs(60);
use ferry_e2e::LAB_GUEST_IP as GUEST_IP;

/// Runs `ferry ARGS --api-sock SOCK` inside host a; (success, stderr).
fn ferry_on_a(lab: &Lab, vm: &Vm, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.netns("a")])
        .arg(ferry_e2e::ferry_bin())
        .args(args)
        .arg("--api-sock")
        .arg(&vm.api_sock)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn during_a_migration_the_api_is_refused_and_a_cancel_leaves_the_vm_running() {
    if !kvm_available("during_a_migration_the_api_is_refused_and_a_cancel_leaves_the_vm_running") {
        return;
    }
    let lab = Lab::up("lc1");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    let vm = ferry_e2e::boot_in_lab(&lab, "a", 512, "wss_mib=256 dirty_mib_s=0");
    let dest = ferry_e2e::receiver_in_lab(&lab, "b", 7860, &["--net", "tap=vm0"]);
    // 256 MiB of data at 16 MiB/s: the migration runs for many seconds.
    let migration =
        ferry_e2e::migrate_in_lab_background(&lab, "a", &vm, "tcp:10.200.77.2:7860", &["--max-bandwidth", "16"]);
    vm.wait_state(T, "Migrating");
    for (args, what) in [
        (&["announce"][..], "announce"),
        (&["shutdown"][..], "shut down"),
        (&["pause"][..], "pause"),
        (&["snapshot", "--to", "/tmp/ferry-lc1-snap"][..], "snapshot"),
    ] {
        let (ok, err) = ferry_on_a(&lab, &vm, args);
        assert!(!ok, "{what} must be refused during a migration");
        assert!(err.contains("migration"), "{what}: the refusal names the migration: {err}");
    }
    assert_eq!(vm.info()["state"], "Migrating", "the refusals changed nothing");
    let (ok, err) = ferry_on_a(&lab, &vm, &["migrate-cancel"]);
    assert!(ok, "cancel: {err}");
    let (ok, _, err) = migration.join().unwrap();
    assert!(!ok, "the cancelled migration fails");
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(vm.info()["state"], "Running", "the VM runs on the source again");
    let before = last_heartbeat(&vm).unwrap();
    vm.wait_line(T, |l| heartbeat_number(l).is_some_and(|n| n > before + 2));
    let v = command(&vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
    dest.wait_stderr(T, "nothing kept");
    // Now a shutdown is allowed, and stops the VMM cleanly.
    let (ok, err) = ferry_on_a(&lab, &vm, &["shutdown"]);
    assert!(ok, "{err}");
    let mut vm = vm;
    assert_eq!(vm.wait_exit(T).code(), Some(0));
}

#[test]
fn a_paused_vm_arrives_paused_and_the_retired_source_is_gone() {
    if !kvm_available("a_paused_vm_arrives_paused_and_the_retired_source_is_gone") {
        return;
    }
    let lab = Lab::up("lc2");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    let mut vm = ferry_e2e::boot_in_lab(&lab, "a", 128, "wss_mib=32 dirty_mib_s=8");
    let (ok, err) = ferry_on_a(&lab, &vm, &["pause"]);
    assert!(ok, "{err}");
    let paused_at = last_heartbeat(&vm).unwrap();
    let dest = ferry_e2e::receiver_in_lab(&lab, "b", 7861, &["--net", "tap=vm0"]);
    let (ok, f, err) = ferry_e2e::migrate_in_lab(&lab, "a", &vm, "tcp:10.200.77.2:7861", &[]);
    assert!(ok, "{err}");
    assert_eq!(f["mode"], "live");
    // The source retired and exited: nothing there can announce any more.
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    assert!(vm.stderr().contains("migrated to"), "{}", vm.stderr());
    let (ok, _) = ferry_on_a(&lab, &vm, &["announce"]);
    assert!(!ok, "a retired source never announces");
    dest.wait_api(T);
    let info = dest.info();
    assert_eq!(info["state"], "Paused", "paused on the source, paused here: {info}");
    assert!(dest.stderr().contains("stays paused"), "{}", dest.stderr());
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !dest.lines().iter().any(|l| heartbeat_number(l).is_some_and(|n| n > paused_at + 1)),
        "no heartbeat while paused"
    );
    dest.control(&["resume"]);
    dest.wait_line(T, |l| heartbeat_number(l).is_some_and(|n| n > paused_at + 1));
    let v = command(&dest, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
    let announced: serde_json::Value = serde_json::from_str(&dest.control(&["announce"])).unwrap_or_default();
    assert_eq!(announced["announced_on"], 1, "the new owner announces: {announced}");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10"]);
    assert_eq!(ping["pings_lost"], 0, "{ping}");
}
