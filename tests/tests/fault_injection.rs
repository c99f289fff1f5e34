//! Faults injected into real migrations between lab hosts: a silent
//! network cut (the host's link taken down: no RST), a lost `Resumed`
//! (nftables drops what host b sends to host a right after the commit), and
//! the destination killed after `Ready`. Afterwards the VM runs on exactly
//! one host, with its memory verified. The commit gate (a Unix socket the
//! source asks right before it commits) is how the test strikes at exactly
//! that moment.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_e2e::{command, heartbeat_number, kvm_available, last_heartbeat, Lab, TempDir, Vm};

const T: Duration = Duration::from_secs(60);
use ferry_e2e::LAB_GUEST_IP as GUEST_IP;

fn lab_with_taps(name: &str) -> Lab {
    let lab = Lab::up(name);
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    lab
}

/// `nft ARGS` inside network namespace `netns`.
fn nft(netns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft"])
        .args(args)
        .output()
        .expect("nft (Debian's nftables; make deps installs it)");
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A commit gate that runs `strike` when the source asks, then agrees.
fn gate(dir: &TempDir, strike: impl FnOnce() + Send + 'static) -> (PathBuf, std::thread::JoinHandle<()>) {
    let path = dir.path().join("gate.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("to_host"), "{line}");
        strike();
        s.write_all(b"{\"commit\":true}\n").unwrap();
    });
    (path, t)
}

fn still_runs(vm: &Vm, why: &str) {
    assert_eq!(vm.info()["state"], "Running", "{why}");
    let before = last_heartbeat(vm).unwrap();
    vm.wait_line(T, |l| heartbeat_number(l).is_some_and(|n| n > before + 1));
    let v = command(vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{why}: {v}");
}

#[test]
fn a_silent_cut_during_round_0_leaves_the_vm_on_the_source() {
    if !kvm_available("a_silent_cut_during_round_0_leaves_the_vm_on_the_source") {
        return;
    }
    let lab = lab_with_taps("fi1");
    let vm = ferry_e2e::boot_in_lab(&lab, "a", 512, "wss_mib=256 dirty_mib_s=0");
    let dest = ferry_e2e::receiver_in_lab(&lab, "b", 7870, &["--net", "tap=vm0"]);
    let migration = ferry_e2e::migrate_in_lab_background(
        &lab,
        "a",
        &vm,
        "tcp:10.200.77.2:7870",
        &["--max-bandwidth", "32", "--io-timeout", "3"],
    );
    vm.wait_state(T, "Migrating");
    std::thread::sleep(Duration::from_millis(800));
    lab.ok(&["cut", "b"]);
    let (ok, _, _) = migration.join().unwrap();
    lab.ok(&["heal", "b"]);
    assert!(!ok, "a cut link fails the migration");
    still_runs(&vm, "after a silent cut in round 0");
    assert!(!dest.api_sock.exists(), "the destination never ran the VM");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host a: {ping}");
}

#[test]
fn a_lost_resumed_after_the_commit_leaves_the_vm_running_on_the_destination_only() {
    if !kvm_available("a_lost_resumed_after_the_commit_leaves_the_vm_running_on_the_destination_only") {
        return;
    }
    let lab = lab_with_taps("fi2");
    let mut vm = ferry_e2e::boot_in_lab(&lab, "a", 128, "wss_mib=32 dirty_mib_s=8");
    let dest = ferry_e2e::receiver_in_lab(&lab, "b", 7871, &["--net", "tap=vm0"]);
    let dir = TempDir::new("gate");
    let b = lab.netns("b");
    let (gate_path, gate_thread) = gate(&dir, move || {
        // From now on nothing host b sends reaches host a: the commit gets
        // through, the destination's Resumed does not.
        nft(&b, &["add", "table", "inet", "ferrycut"]);
        nft(&b, &["add", "chain", "inet", "ferrycut", "out", "{ type filter hook output priority 0 ; }"]);
        nft(&b, &["add", "rule", "inet", "ferrycut", "out", "ip", "daddr", "10.200.77.1", "drop"]);
    });
    let gate_arg = gate_path.display().to_string();
    let (ok, _, err) = ferry_e2e::migrate_in_lab(
        &lab,
        "a",
        &vm,
        "tcp:10.200.77.2:7871",
        &["--mode", "quick", "--commit-gate", &gate_arg],
    );
    gate_thread.join().unwrap();
    nft(&lab.netns("b"), &["delete", "table", "inet", "ferrycut"]);
    assert!(!ok, "the source never heard the destination runs it");
    assert!(err.contains("outcome unknown") || err.contains("did not confirm"), "{err}");
    vm.wait_exit(T);
    assert!(vm.stderr().contains("stopped here") || vm.stderr().contains("outcome unknown"), "{}", vm.stderr());
    dest.wait_api(T);
    still_runs(&dest, "the destination took the commit");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host b: {ping}");
}

#[test]
fn the_destination_killed_after_ready_leaves_the_vm_running_on_the_source() {
    if !kvm_available("the_destination_killed_after_ready_leaves_the_vm_running_on_the_source") {
        return;
    }
    let lab = lab_with_taps("fi3");
    let vm = ferry_e2e::boot_in_lab(&lab, "a", 128, "wss_mib=32 dirty_mib_s=8");
    let dest = ferry_e2e::receiver_in_lab(&lab, "b", 7872, &["--net", "tap=vm0"]);
    let dest_pid = dest.pid() as i32;
    let dir = TempDir::new("gate");
    let (gate_path, gate_thread) = gate(&dir, move || {
        // SAFETY: kill(2) on a child process of this test, by pid.
        unsafe { libc::kill(dest_pid, libc::SIGKILL) };
        let deadline = Instant::now() + T;
        // SAFETY: kill(pid, 0) only probes whether the process exists.
        while unsafe { libc::kill(dest_pid, 0) } == 0 && Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: reaps the killed child if it is ours; never blocks.
            unsafe { libc::waitpid(dest_pid, &mut status, libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let gate_arg = gate_path.display().to_string();
    let (ok, _, err) = ferry_e2e::migrate_in_lab(&lab, "a", &vm, "tcp:10.200.77.2:7872", &["--commit-gate", &gate_arg]);
    gate_thread.join().unwrap();
    assert!(!ok, "the destination is gone");
    assert!(!err.contains("outcome unknown"), "a commit that never left is not uncertain: {err}");
    still_runs(&vm, "the destination died after Ready, before the commit");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "{ping}");
    drop(dest);
}

#[test]
fn the_source_killed_right_after_its_commit_leaves_the_vm_running_on_the_destination() {
    if !kvm_available("the_source_killed_right_after_its_commit_leaves_the_vm_running_on_the_destination") {
        return;
    }
    let lab = lab_with_taps("fi4");
    let mut vm = ferry_e2e::boot_in_lab(&lab, "a", 128, "wss_mib=32 dirty_mib_s=8");
    let dest = ferry_e2e::receiver_in_lab(&lab, "b", 7873, &["--net", "tap=vm0"]);
    let source_pid = vm.pid() as i32;
    let dir = TempDir::new("gate");
    let (gate_path, gate_thread) = gate(&dir, move || {
        // Kill the source a moment after the gate lets it commit.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            // SAFETY: kill(2) on a child process of this test, by pid.
            unsafe { libc::kill(source_pid, libc::SIGKILL) };
        });
    });
    let gate_arg = gate_path.display().to_string();
    let _ = ferry_e2e::migrate_in_lab(&lab, "a", &vm, "tcp:10.200.77.2:7873", &["--commit-gate", &gate_arg]);
    gate_thread.join().unwrap();
    vm.wait_exit(T);
    dest.wait_api(T);
    still_runs(&dest, "the destination had the commit when the source died");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host b: {ping}");
}
