//! Faults injected into real migrations between lab hosts: a silent
//! network cut (the host's link taken down: no RST) in round 0, in a dirty
//! round, one of three memory streams reset mid-round and between `Ready` and `Commit` (settled by the commit oracle
//! either way), a lost `Resumed` (nftables drops what host b sends to host
//! a right after the commit), the destination killed after `Ready` and the
//! source killed after its commit. Afterwards the VM runs on exactly one
//! host, with its memory verified (and, where it has one, its shared-volume
//! disk's pattern and lease). The commit gate (a Unix socket the source asks
//! right before it commits) is how the test strikes at exactly that moment.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_e2e::{
    boot_with_disk, command, disk_intact, heartbeat_number, kvm_available, last_heartbeat, lease_owner,
    receiver_with_disks, run_ferry, volume_with_disk, Lab, TempDir, Vm,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
use ferry_e2e::LAB_GUEST_IP as GUEST_IP;

/// `nft ARGS` inside network namespace `netns`.
fn nft(netns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft"])
        .args(args)
        .output()
        .expect("nft (Debian's nftables; make deps installs it)");
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The gate's yes, and a no.
const COMMIT: &str = "{\"commit\":true}\n";
const REFUSE: &str = "{\"commit\":false,\"reason\":\"no\"}\n";

/// A commit gate that runs `strike` when the source asks, then agrees.
fn gate(dir: &TempDir, strike: impl FnOnce() + Send + 'static) -> (PathBuf, std::thread::JoinHandle<()>) {
    gate_answering(dir, COMMIT, strike)
}

/// A commit gate that runs `strike` when the source asks, then answers
/// `answer`.
fn gate_answering(
    dir: &TempDir,
    answer: &'static str,
    strike: impl FnOnce() + Send + 'static,
) -> (PathBuf, std::thread::JoinHandle<()>) {
    let path = dir.path().join("gate.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("to_host"), "{line}");
        strike();
        s.write_all(answer.as_bytes()).unwrap();
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
    let lab = Lab::up_with_taps("fi1");
    let dir = TempDir::new("fi1");
    let vol = volume_with_disk(&dir);
    let vm = boot_with_disk(&lab, &vol, 512, "wss_mib=256 dirty_mib_s=0", 1);
    let dest = receiver_with_disks(&lab, &dir, 7870, &[]);
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
    disk_intact(&vm, 1, "after a silent cut in round 0");
    assert_eq!(lease_owner(&vol), "a", "the disk never left host a");
    assert!(!dest.api_sock.exists(), "the destination never ran the VM");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host a: {ping}");
}

#[test]
fn a_lost_resumed_after_the_commit_leaves_the_vm_running_on_the_destination_only() {
    if !kvm_available("a_lost_resumed_after_the_commit_leaves_the_vm_running_on_the_destination_only") {
        return;
    }
    let lab = Lab::up_with_taps("fi2");
    let dir = TempDir::new("fi2");
    let vol = volume_with_disk(&dir);
    let mut vm = boot_with_disk(&lab, &vol, 128, "wss_mib=32 dirty_mib_s=8", 2);
    let dest = receiver_with_disks(&lab, &dir, 7871, &[]);
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
    disk_intact(&dest, 2, "on the destination after a lost Resumed");
    assert_eq!(lease_owner(&vol), "b", "the disk is host b's");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host b: {ping}");
}

#[test]
fn the_destination_killed_after_ready_leaves_the_vm_running_on_the_source() {
    if !kvm_available("the_destination_killed_after_ready_leaves_the_vm_running_on_the_source") {
        return;
    }
    let lab = Lab::up_with_taps("fi3");
    let dir = TempDir::new("fi3");
    let vol = volume_with_disk(&dir);
    let vm = boot_with_disk(&lab, &vol, 128, "wss_mib=32 dirty_mib_s=8", 3);
    let dest = receiver_with_disks(&lab, &dir, 7872, &[]);
    let dest_pid = dest.pid() as i32;
    let (gate_path, gate_thread) = gate(&dir, move || ferry_e2e::kill_and_reap(dest_pid));
    let gate_arg = gate_path.display().to_string();
    let (ok, _, err) = ferry_e2e::migrate_in_lab(&lab, "a", &vm, "tcp:10.200.77.2:7872", &["--commit-gate", &gate_arg]);
    gate_thread.join().unwrap();
    assert!(!ok, "the destination is gone");
    assert!(!err.contains("outcome unknown"), "a commit that never left is not uncertain: {err}");
    still_runs(&vm, "the destination died after Ready, before the commit");
    disk_intact(&vm, 3, "on the source after the destination died");
    assert_eq!(lease_owner(&vol), "a", "the disk handed over at Ready is host a's again");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "{ping}");
    drop(dest);
}

#[test]
fn the_source_killed_right_after_its_commit_leaves_the_vm_running_on_the_destination() {
    if !kvm_available("the_source_killed_right_after_its_commit_leaves_the_vm_running_on_the_destination") {
        return;
    }
    let lab = Lab::up_with_taps("fi4");
    let dir = TempDir::new("fi4");
    let vol = volume_with_disk(&dir);
    let mut vm = boot_with_disk(&lab, &vol, 128, "wss_mib=32 dirty_mib_s=8", 4);
    let dest = receiver_with_disks(&lab, &dir, 7873, &[]);
    let source_pid = vm.pid() as i32;
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
    disk_intact(&dest, 4, "on the destination after the source died");
    assert_eq!(lease_owner(&vol), "b", "the disk is host b's");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host b: {ping}");
}

/// The migration's progress as the source's API reports it.
fn progress(vm: &Vm) -> Value {
    vmm::api::client::request(&vm.api_sock, "GET", "vm.migration", b"", Duration::from_secs(2))
        .ok()
        .and_then(|r| serde_json::from_str(&r.body).ok())
        .unwrap_or_default()
}

/// A capped live migration dirtied nearly as fast as it drains, with a
/// downtime target it cannot meet: round after round, until the fault.
const NEVER_CONVERGES: [&str; 10] = [
    "--max-bandwidth",
    "48",
    "--downtime-ms",
    "0.01",
    "--no-auto-converge",
    "--max-rounds",
    "10000",
    "--timeout",
    "300",
    "--io-timeout",
];

/// Waits until the migration from `vm` is in pre-copy round `round`.
fn wait_for_round(vm: &Vm, round: u64) {
    let deadline = Instant::now() + T;
    loop {
        let p = progress(vm);
        if p["phase"] == "round" && p["round"].as_u64().is_some_and(|r| r >= round) {
            return;
        }
        assert!(Instant::now() < deadline, "the migration never reached round {round}: {p}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a failed move: the VM runs on host a with its disk (pattern
/// `seed`) and lease, the destination never ran it, the guest answers.
fn left_on_host_a(lab: &Lab, vm: &Vm, vol: &str, dest: &Vm, seed: u32, why: &str) {
    still_runs(vm, why);
    disk_intact(vm, seed, why);
    assert_eq!(lease_owner(vol), "a", "the disk never left host a");
    assert!(!dest.api_sock.exists(), "the destination never ran the VM");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host a: {ping}");
}

#[test]
fn a_silent_cut_during_a_dirty_round_leaves_the_vm_and_its_disk_on_the_source() {
    if !kvm_available("a_silent_cut_during_a_dirty_round_leaves_the_vm_and_its_disk_on_the_source") {
        return;
    }
    let lab = Lab::up_with_taps("fi5");
    let dir = TempDir::new("fi5");
    let vol = volume_with_disk(&dir);
    let vm = boot_with_disk(&lab, &vol, 256, "wss_mib=128 dirty_mib_s=40", 5);
    let dest = receiver_with_disks(&lab, &dir, 7875, &[]);
    let args = [&NEVER_CONVERGES[..], &["3"]].concat();
    let migration = ferry_e2e::migrate_in_lab_background(&lab, "a", &vm, "tcp:10.200.77.2:7875", &args);
    wait_for_round(&vm, 2);
    lab.ok(&["cut", "b"]);
    let (ok, _, err) = migration.join().unwrap();
    lab.ok(&["heal", "b"]);
    assert!(!ok, "a cut link fails the migration");
    assert!(!err.contains("outcome unknown"), "a dirty round is long before any commit: {err}");
    left_on_host_a(&lab, &vm, &vol, &dest, 5, "after a silent cut in a dirty round");
}

#[test]
fn one_memory_stream_reset_mid_round_leaves_the_vm_and_its_disk_on_the_source() {
    if !kvm_available("one_memory_stream_reset_mid_round_leaves_the_vm_and_its_disk_on_the_source") {
        return;
    }
    let lab = Lab::up_with_taps("fi9");
    let dir = TempDir::new("fi9");
    let vol = volume_with_disk(&dir);
    let vm = boot_with_disk(&lab, &vol, 256, "wss_mib=128 dirty_mib_s=40", 9);
    let dest = receiver_with_disks(&lab, &dir, 7879, &[]);
    // Three streams, rounds going on until the reset.
    let args = [&NEVER_CONVERGES[..], &["30", "--streams", "3"]].concat();
    let migration = ferry_e2e::migrate_in_lab_background(&lab, "a", &vm, "tcp:10.200.77.2:7879", &args);
    wait_for_round(&vm, 1);
    // The receiver names where each extra stream came from: reset stream
    // 2 alone (host b answers its next segment with a RST).
    let joined = dest.stderr();
    let port = joined
        .lines()
        .find_map(|l| l.strip_prefix("ferry: memory stream 2 joined from tcp:10.200.77.1:"))
        .unwrap_or_else(|| panic!("stream 2 joined: {joined}"))
        .trim()
        .to_owned();
    let b = lab.netns("b");
    nft(&b, &["add", "table", "inet", "ferrycut"]);
    nft(&b, &["add", "chain", "inet", "ferrycut", "in", "{ type filter hook input priority 0 ; }"]);
    nft(&b, &["add", "rule", "inet", "ferrycut", "in", "tcp", "sport", &port, "reject", "with", "tcp", "reset"]);
    let started = Instant::now();
    let (ok, _, err) = migration.join().unwrap();
    let failed_after = started.elapsed();
    nft(&b, &["delete", "table", "inet", "ferrycut"]);
    eprintln!("one stream reset: failed after {failed_after:?}: {err}");
    assert!(!ok, "a reset stream fails the migration");
    assert!(err.contains("memory stream 2 of 3"), "the error names the stream: {err}");
    assert!(failed_after < Duration::from_secs(10), "noticed at once, not at a timeout: {failed_after:?}: {err}");
    assert!(!err.contains("outcome unknown"), "a round is long before any commit: {err}");
    left_on_host_a(&lab, &vm, &vol, &dest, 9, "after one memory stream was reset");
}

/// A commit oracle on `path` that answers `committed` once asked.
fn oracle(path: PathBuf, committed: bool) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("committed?"), "{line}");
        let answer =
            if committed { "{\"committed\":true}\n" } else { "{\"committed\":false,\"reason\":\"gate said no\"}\n" };
        s.write_all(answer.as_bytes()).unwrap();
    })
}

/// The link of host b is cut right after `Ready` (when the source asks its
/// gate); the gate's answer is what the destination's oracle says later,
/// as the cluster's owner key would. Returns (source VM, destination VM,
/// volume, migrate's stderr) after the migration command ended.
fn cut_between_ready_and_commit(lab: &Lab, dir: &TempDir, port: u16, committed: bool) -> (Vm, Vm, String, String) {
    let vol = volume_with_disk(dir);
    let vm = boot_with_disk(lab, &vol, 128, "wss_mib=32 dirty_mib_s=8", 9);
    let oracle_path = dir.path().join("oracle.sock");
    let oracle_thread = oracle(oracle_path.clone(), committed);
    let oracle_arg = oracle_path.display().to_string();
    let dest = receiver_with_disks(lab, dir, port, &["--commit-oracle", &oracle_arg]);
    // The gate cuts the link before it answers, so whatever the source
    // sends next is lost.
    let lab_name = lab.name.clone();
    let (gate_path, gate_thread) = gate_answering(dir, if committed { COMMIT } else { REFUSE }, move || {
        let out = ferry_e2e::ferry_bounded(&["lab", "cut", "b", "--name", &lab_name], T);
        assert!(out.status.success(), "lab cut b: {}", String::from_utf8_lossy(&out.stderr));
    });
    let gate_arg = gate_path.display().to_string();
    let to = format!("tcp:10.200.77.2:{port}");
    let migration = ferry_e2e::migrate_in_lab_background(
        lab,
        "a",
        &vm,
        &to,
        &["--mode", "quick", "--commit-gate", &gate_arg, "--switchover-timeout", "3"],
    );
    gate_thread.join().unwrap();
    let (ok, _, err) = migration.join().unwrap();
    oracle_thread.join().unwrap();
    lab.ok(&["heal", "b"]);
    assert!(!ok, "the source never heard back: {err}");
    (vm, dest, vol, err)
}

#[test]
fn a_cut_between_ready_and_a_commit_leaves_the_vm_on_the_destination_the_oracle_names() {
    if !kvm_available("a_cut_between_ready_and_a_commit_leaves_the_vm_on_the_destination_the_oracle_names") {
        return;
    }
    let lab = Lab::up_with_taps("fi6");
    let dir = TempDir::new("fi6");
    let (mut vm, dest, vol, err) = cut_between_ready_and_commit(&lab, &dir, 7876, true);
    assert!(err.contains("outcome unknown") || err.contains("did not confirm"), "{err}");
    vm.wait_exit(T);
    dest.wait_api(T);
    assert!(dest.stderr().contains("the cluster says the VM is this host's"), "{}", dest.stderr());
    still_runs(&dest, "the oracle said the move committed");
    disk_intact(&dest, 9, "on the destination after the oracle's yes");
    assert_eq!(lease_owner(&vol), "b", "the disk is host b's");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host b: {ping}");
}

#[test]
fn a_cut_between_ready_and_a_refused_commit_leaves_the_vm_and_its_disk_on_the_source() {
    if !kvm_available("a_cut_between_ready_and_a_refused_commit_leaves_the_vm_and_its_disk_on_the_source") {
        return;
    }
    let lab = Lab::up_with_taps("fi7");
    let dir = TempDir::new("fi7");
    let (vm, mut dest, vol, err) = cut_between_ready_and_commit(&lab, &dir, 7877, false);
    assert!(!err.contains("outcome unknown"), "a refused commit is not uncertain: {err}");
    still_runs(&vm, "the gate refused the commit");
    disk_intact(&vm, 9, "on the source after the refused commit");
    assert_eq!(lease_owner(&vol), "a", "the disk is back under host a's lease");
    // The destination asked its oracle, heard no, and discarded the VM.
    dest.wait_stderr(T, "did not commit");
    assert!(!dest.api_sock.exists(), "the destination never ran the VM");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers from host a: {ping}");
    // A receiver still waiting stops on SIGTERM, as a service should.
    dest.signal(libc::SIGTERM);
    let status = dest.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?} {}", dest.stderr());
    dest.wait_stderr(T, "stopped by a signal; no VM was received");
}

/// Hands disk d0 of `vol` from `from` (at the epoch the record shows) to
/// `to`, by hand and with --force, as an operator or a runaway host could.
fn hand_disk(vol: &str, from: &str, to: &str) {
    let epoch = ferry_e2e::cluster::disk_lease(vol, "d0")["epoch"].as_u64().expect("a lease").to_string();
    let out = run_ferry(&[
        "disk", "lease", "handoff", "--volume", vol, "--host", from, "--epoch", &epoch, "--to", to, "--force", "d0",
    ]);
    assert!(out.status.success(), "handoff {from} -> {to}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The disk is taken from the destination between Ready and Commit (handed
/// to a host c behind its back): the committed VM must not be dropped nor
/// run without its disk. It stays paused on b, `vm.info` says why, a
/// resume is refused while c holds the disk, and once c gives it back a
/// resume takes it and runs the guest with its disk intact.
#[test]
fn a_committed_vm_whose_disk_was_taken_waits_paused_on_the_destination_for_it() {
    if !kvm_available("a_committed_vm_whose_disk_was_taken_waits_paused_on_the_destination_for_it") {
        return;
    }
    let lab = Lab::up_with_taps("fi8");
    let dir = TempDir::new("fi8");
    let vol = volume_with_disk(&dir);
    let mut vm = boot_with_disk(&lab, &vol, 128, "wss_mib=32 dirty_mib_s=8", 8);
    let dest = receiver_with_disks(&lab, &dir, 7878, &[]);
    let vol_for_gate = vol.clone();
    let (gate_path, gate_thread) = gate(&dir, move || hand_disk(&vol_for_gate, "b", "c"));
    let gate_arg = gate_path.display().to_string();
    let (ok, _, err) = ferry_e2e::migrate_in_lab(
        &lab,
        "a",
        &vm,
        "tcp:10.200.77.2:7878",
        &["--mode", "quick", "--commit-gate", &gate_arg],
    );
    gate_thread.join().unwrap();
    assert!(ok, "the move committed: {err}");
    vm.wait_exit(T);
    dest.wait_api(T);
    dest.wait_stderr(T, "MIGRATION NEEDS ATTENTION");
    let info = dest.info();
    assert_eq!(info["state"], "Paused", "no disk, no running: {info}");
    assert!(info["held"].as_str().is_some_and(|h| h.contains("disks could not be taken")), "{info}");
    let out = run_ferry(&["resume", "--api-sock", dest.api_sock.to_str().unwrap()]);
    assert!(!out.status.success(), "a resume while host c holds the disk is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("still cannot be taken"), "{out:?}");
    assert_eq!(dest.info()["state"], "Paused");
    hand_disk(&vol, "c", "b");
    dest.control(&["resume"]);
    let info = dest.info();
    assert_eq!(info["state"], "Running", "{info}");
    assert!(info.get("held").is_none(), "{info}");
    still_runs(&dest, "resumed once its disk was back");
    disk_intact(&dest, 8, "on the destination after its disk came back");
    assert_eq!(lease_owner(&vol), "b");
}
