//! Same-host moves over `unix:`, on lab host a: the source passes its guest
//! memory's memfd (SCM_RIGHTS) and the destination maps the same pages, so
//! nothing is copied. The guest has a tap NIC (vm0, and vm1 on the same
//! bridge for the other process: a tap is held by one process at a time)
//! pinged from the lab client, and a shared-volume disk whose lease the
//! move hands over (host a to host a, one epoch on).
//!
//! Until the commit the shared memory is the source's live memory, so the
//! destination must write none of it: checked by hashing the memory file
//! across a whole failed move of a paused VM while broadcast frames reach
//! the destination's tap. A failure before the commit leaves the VM
//! running on the source, its memory, disk and lease intact.

use std::hash::Hasher;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_e2e::{
    boot_in_lab_with, cluster_key, command, disk_intact, heartbeat_number, in_netns, kvm_available, last_heartbeat,
    migrate_in_lab, s, volume_with_disk, Lab, TempDir, Vm, LAB_GUEST_IP,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// Short, so a lease the new process did not take over would fence within
/// the test (writes stop a third of a TTL after the last renewal).
const LEASE_TTL_MS: &str = "1000";
const COMMIT: &str = "{\"commit\":true}\n";
const REFUSE: &str = "{\"commit\":false,\"reason\":\"no\"}\n";

/// A lab whose host a has two taps on its bridge.
fn lab(tag: &str) -> Lab {
    let lab = Lab::up(tag);
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "a", "vm1"]);
    lab
}

/// The test guest on host a (tap vm0, host id a) with disk d0 of `vol`,
/// pattern `seed` written on its first 512 sectors.
fn boot(lab: &Lab, vol: &str, mem_mib: u32, cmdline: &str, seed: u32, extra: &[&str]) -> Vm {
    let disk = format!("csv:{vol}/disks/d0");
    let mut args = vec!["--disk", &disk, "--host-id", "a", "--lease-ttl-ms", LEASE_TTL_MS];
    args.extend_from_slice(extra);
    let vm = boot_in_lab_with(lab, "a", mem_mib, cmdline, &args);
    let w = command(&vm, &format!("disk-write 0 512 {seed}"), "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{w}");
    vm
}

/// `ferry receive` on host a on a Unix socket in `dir`, with tap `tap`,
/// host id a and the disks under `dir`; returns it listening, and its
/// endpoint.
fn receiver(lab: &Lab, dir: &TempDir, name: &str, tap: &str, extra: &[&str]) -> (Vm, String) {
    let endpoint = format!("unix:{}", dir.path().join(format!("{name}.sock")).display());
    let mut args = vec![
        s("--listen"),
        endpoint.clone(),
        s("--key-file"),
        cluster_key().display().to_string(),
        s("--host-id"),
        s("a"),
        s("--net"),
        format!("tap={tap}"),
        s("--allow-disks"),
        dir.path().display().to_string(),
        s("--lease-ttl-ms"),
        s(LEASE_TTL_MS),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    let vm = Vm::launch(Some(&lab.netns("a")), "receive", &args);
    vm.wait_stderr(T, "waiting for a migration");
    (vm, endpoint)
}

fn lease(vol: &str) -> Value {
    ferry_e2e::cluster::disk_lease(vol, "d0")
}

fn verified(vm: &Vm, why: &str) {
    let v = command(vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{why}: every page stamp intact: {v}");
}

fn heartbeat_goes_on(vm: &Vm, after: u64, why: &str) {
    let (_, hb) = vm.wait_line_from(0, T, |l| heartbeat_number(l).is_some_and(|n| n > after));
    assert!(heartbeat_number(&hb).unwrap() > after, "{why}: heartbeat continues: {hb}");
}

/// Ten pings from the lab client, all answered (after a 3 s warm-up).
fn answers_pings(lab: &Lab, why: &str) {
    let ping = lab.ping_from_client(LAB_GUEST_IP, &["--count", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "{why}: {ping}");
}

fn still_runs(vm: &Vm, why: &str) {
    assert_eq!(vm.info()["state"], "Running", "{why}");
    let before = last_heartbeat(vm).unwrap();
    vm.wait_line(T, |l| heartbeat_number(l).is_some_and(|n| n > before + 1));
    verified(vm, why);
}

/// Every virtio device of `vm` serves its notifies the way `mode` says.
fn notifies(vm: &Vm, mode: &str) {
    let info = vm.info();
    for d in info["devices"].as_array().expect("devices") {
        assert_eq!(d["notify"], mode, "{d}");
    }
}

/// A commit gate that runs `strike` when the source asks, then answers.
fn gate(
    dir: &TempDir,
    answer: &'static str,
    strike: impl FnOnce() + Send + 'static,
) -> (PathBuf, std::thread::JoinHandle<()>) {
    let path = dir.path().join("gate.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("\"to_host\":\"a\""), "{line}");
        strike();
        s.write_all(answer.as_bytes()).unwrap();
    });
    (path, t)
}

/// A hash of the whole guest memory file of VMM process `pid`, read
/// through /proc (the memfd has no other name).
fn memory_hash(pid: u32) -> u64 {
    let fds = Path::new("/proc").join(pid.to_string()).join("fd");
    let fd = std::fs::read_dir(&fds)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:ferry-guest-ram")))
        .expect("the VMM's guest memory file");
    let mut file = std::fs::File::open(fd.path()).unwrap();
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buf[..n]);
    }
}

/// Frames the bridge of a lab host (namespace `netns`) sent out of `tap`
/// so far.
fn tap_tx_packets(netns: &str, tap: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "cat", &format!("/sys/class/net/{tap}/statistics/tx_packets")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("tx_packets of {tap}: {out:?}"))
}

/// `n` UDP broadcasts (to the guest's echo port) from the lab client
/// (namespace `netns`): host a's bridge floods them to every tap, the
/// destination's included.
fn broadcast_from_client(netns: &str, n: usize) {
    in_netns(netns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_broadcast(true).unwrap();
        for i in 0..n {
            sock.send_to(format!("flood {i}").as_bytes(), "10.200.77.255:7").unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_vm_moves_back_and_forth_on_one_host_by_memfd_with_its_nic_and_disk() {
    if !kvm_available("a_vm_moves_back_and_forth_on_one_host_by_memfd_with_its_nic_and_disk") {
        return;
    }
    let lab = lab("sh1");
    let dir = TempDir::new("sh1");
    let vol = volume_with_disk(&dir);
    let mut vm = boot(&lab, &vol, 256, "wss_mib=64 dirty_mib_s=20", 11, &[]);
    answers_pings(&lab, "before the moves");
    let mut epoch = lease(&vol)["epoch"].as_u64().expect("lease epoch");
    // vm0 -> vm1 -> vm0 -> vm1 -> vm0 -> vm1; the third move copies because
    // the source is told not to pass memory, the fourth because the
    // destination is.
    let legs: [(&str, &[&str], &[&str]); 5] = [
        ("vm1", &[], &[]),
        ("vm0", &[], &[]),
        ("vm1", &["--no-memfd"], &[]),
        ("vm0", &[], &["--no-memfd"]),
        ("vm1", &[], &[]),
    ];
    for (leg, (tap, source_flags, dest_flags)) in legs.into_iter().enumerate() {
        let copy = !source_flags.is_empty() || !dest_flags.is_empty();
        let (mut dest, to) = receiver(&lab, &dir, &format!("move{leg}"), tap, dest_flags);
        let before = last_heartbeat(&vm).unwrap();
        let (ok, f, err) = migrate_in_lab(&lab, "a", &vm, &to, source_flags);
        assert!(ok, "leg {leg}: {err}\nreceiver: {}", dest.stderr());
        eprintln!("leg {leg} to {tap}: {f}");
        if copy {
            assert_eq!(f["memory"], "copy", "leg {leg}: {f}");
            assert!(f["pages_sent"].as_u64().unwrap() >= (64 << 20) / 4096, "leg {leg}: the working set was sent: {f}");
        } else {
            assert_eq!(f["memory"], "shared-fd", "leg {leg}: {f}");
            assert_eq!(f["pages_sent"], 0, "leg {leg}: no page copied: {f}");
            assert!(f["bytes_sent"].as_u64().unwrap() < 64 << 10, "leg {leg}: only the state on the wire: {f}");
        }
        assert_eq!(vm.wait_exit(T).code(), Some(0), "leg {leg}: the source stops after the commit");
        std::mem::swap(&mut vm, &mut dest);
        vm.wait_api(T);
        heartbeat_goes_on(&vm, before, &format!("leg {leg}"));
        answers_pings(&lab, &format!("leg {leg}: the guest answers on {tap}"));
        let l = lease(&vol);
        assert_eq!(l["owner"], "a", "leg {leg}: {l}");
        assert_eq!(l["epoch"].as_u64(), Some(epoch + 1), "leg {leg}: handed over once: {l}");
        epoch += 1;
    }
    verified(&vm, "after five moves");
    // Longer than the lease's TTL: the last process renews what it took.
    std::thread::sleep(Duration::from_millis(1500));
    disk_intact(&vm, 11, "after five moves");
    assert_eq!(lease(&vol)["epoch"].as_u64(), Some(epoch), "nobody took the disk meanwhile");
}

/// Nothing of a destination writes the memory it shares before the
/// commit, in ioeventfd mode (the device thread serves the queues): the
/// VM is paused on the source, so its memory file must not change at all
/// across a move that maps it, restores the VM, takes broadcast frames on
/// the destination's tap, gets refused at the gate and is dropped. Then
/// the VM resumes on the source, intact, and the next try moves it with a
/// disk write in flight.
#[test]
fn in_ioeventfd_mode_a_refused_commit_leaves_the_memory_untouched_and_the_vm_on_the_source() {
    if !kvm_available("in_ioeventfd_mode_a_refused_commit_leaves_the_memory_untouched_and_the_vm_on_the_source") {
        return;
    }
    let lab = lab("sh2");
    let dir = TempDir::new("sh2");
    let vol = volume_with_disk(&dir);
    let ioeventfd = ["--virtio-notify", "ioeventfd"];
    let mut vm = boot(&lab, &vol, 256, "wss_mib=64 dirty_mib_s=20", 12, &ioeventfd);
    notifies(&vm, "ioeventfd");
    let (dest, to) = receiver(&lab, &dir, "move", "vm1", &ioeventfd);
    let epoch = lease(&vol)["epoch"].as_u64().expect("lease epoch");

    vm.control(&["pause"]);
    let src_pid = vm.pid();
    let at_pause = memory_hash(src_pid);
    let seen = Arc::new(Mutex::new(None));
    let (gate_path, gate_thread) = gate(&dir, REFUSE, {
        let (seen, host_a, client) = (seen.clone(), lab.netns("a"), lab.netns("client"));
        move || {
            // Ready: the destination has mapped the memory and restored
            // the VM. Its tap gets frames while it waits for the commit.
            let tx = tap_tx_packets(&host_a, "vm1");
            broadcast_from_client(&client, 200);
            std::thread::sleep(Duration::from_millis(200));
            *seen.lock().unwrap() = Some((memory_hash(src_pid), tap_tx_packets(&host_a, "vm1") - tx));
        }
    });
    let gate_arg = gate_path.display().to_string();
    let (ok, _, err) = migrate_in_lab(&lab, "a", &vm, &to, &["--commit-gate", &gate_arg]);
    gate_thread.join().unwrap();
    assert!(!ok, "the gate said no");
    assert!(err.contains("refused the commit"), "{err}\nreceiver: {}", dest.stderr());
    dest.wait_stderr(T, "migration attempt failed");
    let (at_gate, flooded) = seen.lock().unwrap().take().expect("the gate was asked");
    assert!(flooded >= 100, "the broadcasts reached the destination's tap: {flooded}");
    assert_eq!(at_gate, at_pause, "the destination wrote the shared memory before the commit");
    assert_eq!(memory_hash(src_pid), at_pause, "the failed move's teardown wrote the shared memory");
    assert_eq!(vm.info()["state"], "Paused", "the VM paused on the source stays paused there");
    vm.control(&["resume"]);
    still_runs(&vm, "after the refused commit");
    disk_intact(&vm, 12, "after the refused commit");
    let l = lease(&vol);
    assert_eq!((l["owner"].as_str(), l["epoch"].as_u64()), (Some("a"), Some(epoch + 2)), "handed, taken back: {l}");
    answers_pings(&lab, "after the refused commit");

    // The receiver waits on: the next try moves the VM, a disk write in
    // flight across the switchover.
    let before = last_heartbeat(&vm).unwrap();
    let from = vm.lines().len();
    vm.control(&["console", "disk-write 2048 16384 91"]);
    let (ok, f, err) = migrate_in_lab(&lab, "a", &vm, &to, &[]);
    assert!(ok, "{err}\nreceiver: {}", dest.stderr());
    assert_eq!(f["memory"], "shared-fd", "{f}");
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    dest.wait_api(T);
    notifies(&dest, "ioeventfd");
    // The write's answer comes from whichever side finished it.
    let done = |v: &Vm, from: usize| v.lines().into_iter().skip(from).find(|l| l.starts_with("disk-write"));
    let deadline = Instant::now() + T;
    let answer = loop {
        if let Some(l) = done(&vm, from).or_else(|| done(&dest, 0)) {
            break l;
        }
        assert!(Instant::now() < deadline, "the disk write in flight never finished: {:?}", dest.lines());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(answer.starts_with("disk-write ok"), "{answer}");
    let v = command(&dest, "disk-verify 2048 16384 91", "disk-verify", T);
    assert!(v.starts_with("disk-verify ok"), "the write in flight landed: {v}");
    heartbeat_goes_on(&dest, before, "after the move");
    verified(&dest, "after the move");
    disk_intact(&dest, 12, "after the move");
    answers_pings(&lab, "after the move: the guest answers on vm1");
    let lost: Vec<String> = dest.lines().into_iter().filter(|l| l.contains("no completion")).collect();
    assert!(lost.is_empty(), "a request lost its notify: {lost:?}");
}

#[test]
fn the_destination_killed_after_ready_leaves_the_running_vm_on_the_source() {
    if !kvm_available("the_destination_killed_after_ready_leaves_the_running_vm_on_the_source") {
        return;
    }
    let lab = lab("sh3");
    let dir = TempDir::new("sh3");
    let vol = volume_with_disk(&dir);
    let vm = boot(&lab, &vol, 128, "wss_mib=32 dirty_mib_s=8", 13, &[]);
    let (dest, to) = receiver(&lab, &dir, "move", "vm1", &[]);
    let dest_pid = dest.pid() as i32;
    let (gate_path, gate_thread) = gate(&dir, COMMIT, move || ferry_e2e::kill_and_reap(dest_pid));
    let gate_arg = gate_path.display().to_string();
    let (ok, f, err) = migrate_in_lab(&lab, "a", &vm, &to, &["--commit-gate", &gate_arg]);
    gate_thread.join().unwrap();
    assert!(!ok, "the destination is gone: {f}");
    assert!(!err.contains("outcome unknown"), "a commit that never left is not uncertain: {err}");
    still_runs(&vm, "the destination died after Ready, before the commit");
    disk_intact(&vm, 13, "on the source after the destination died");
    assert_eq!(lease(&vol)["owner"], "a");
    answers_pings(&lab, "on the source after the destination died");
    drop(dest);
}
