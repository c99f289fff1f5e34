//! Same-host moves over `unix:`: the source passes its guest memory's memfd
//! and the destination maps the same pages (no copy). The guest keeps
//! dirtying memory up to the pause and checks every page afterwards; a
//! destination that dies before the commit, or a commit refused, leaves it
//! running on the source on memory nobody else wrote; `--no-memfd` (either
//! side) falls back to copying.
//!
//! No lab: both VMMs run on this host without NICs (a tap is held by one
//! process at a time).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_e2e::{cluster_key, command, heartbeat_number, kvm_available, last_heartbeat, run_ferry, s, TempDir, Vm};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn boot(mem_mib: u32, cmdline: &str) -> Vm {
    let vm = Vm::guest(&format!("heartbeat_ms=100 {cmdline}"), &["--mem-mib", &mem_mib.to_string()]);
    vm.wait_line(T, |l| l.starts_with("workload ready"));
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm
}

/// `ferry receive` on a Unix socket in `dir`; returns it listening, and
/// the endpoint.
fn receiver(dir: &TempDir, extra: &[&str]) -> (Vm, String) {
    let sock = dir.path().join("migrate.sock");
    let endpoint = format!("unix:{}", sock.display());
    let mut args = vec![
        s("--listen"),
        endpoint.clone(),
        s("--key-file"),
        cluster_key().display().to_string(),
        s("--host-id"),
        s("memfd-dest"),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    let vm = Vm::launch(None, "receive", &args);
    vm.wait_stderr(T, "waiting for a migration");
    (vm, endpoint)
}

/// `ferry migrate --json --to TO EXTRA` for `vm`: (success, figures, stderr).
fn migrate(vm: &Vm, to: &str, extra: &[&str]) -> (bool, Value, String) {
    let key = cluster_key().display().to_string();
    let api = vm.api_sock.display().to_string();
    let mut args = vec!["migrate", "--json", "--key-file", &key, "--to", to, "--api-sock", &api];
    args.extend_from_slice(extra);
    let out = run_ferry(&args);
    let figures = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.success(), figures, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn verified(vm: &Vm, why: &str) {
    let v = command(vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{why}: every page stamp intact: {v}");
}

fn heartbeat_goes_on(vm: &Vm, after: u64, why: &str) {
    let (_, hb) = vm.wait_line_from(0, T, |l| heartbeat_number(l).is_some_and(|n| n > after));
    assert!(heartbeat_number(&hb).unwrap() > after, "{why}: heartbeat continues: {hb}");
}

#[test]
fn a_dirtying_guest_moves_by_memfd_with_its_memory_intact() {
    if !kvm_available("a_dirtying_guest_moves_by_memfd_with_its_memory_intact") {
        return;
    }
    let mut vm = boot(512, "wss_mib=128 dirty_mib_s=50");
    // Two legs: the second moves a VM whose RAM is itself a received memfd.
    for leg in 1..=2 {
        let dir = TempDir::new("memfd");
        let (mut dest, to) = receiver(&dir, &[]);
        let before = last_heartbeat(&vm).unwrap();
        let (ok, f, err) = migrate(&vm, &to, &[]);
        assert!(ok, "leg {leg}: {err}");
        assert_eq!(f["memory"], "shared-fd", "leg {leg}: {f}");
        assert_eq!(f["pages_sent"], 0, "leg {leg}: no page copied: {f}");
        assert!(f["bytes_sent"].as_u64().unwrap() < 64 << 10, "leg {leg}: only state on the wire: {f}");
        assert_eq!(vm.wait_exit(T).code(), Some(0), "leg {leg}: the source stops after commit");
        std::mem::swap(&mut vm, &mut dest);
        vm.wait_api(T);
        heartbeat_goes_on(&vm, before, &format!("leg {leg}"));
        verified(&vm, &format!("leg {leg}"));
        eprintln!("leg {leg}: {f}");
    }
}

/// A commit gate on `dir` that runs `strike` when the source asks, then
/// answers `answer`.
fn gate(
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
        strike();
        let _ = s.write_all(answer.as_bytes());
    });
    (path, t)
}

fn still_runs(vm: &Vm, why: &str) {
    assert_eq!(vm.info()["state"], "Running", "{why}");
    let before = last_heartbeat(vm).unwrap();
    vm.wait_line(T, |l| heartbeat_number(l).is_some_and(|n| n > before + 1));
    verified(vm, why);
}

#[test]
fn a_destination_killed_after_ready_leaves_the_vm_on_the_source_intact() {
    if !kvm_available("a_destination_killed_after_ready_leaves_the_vm_on_the_source_intact") {
        return;
    }
    let vm = boot(256, "wss_mib=64 dirty_mib_s=20");
    let dir = TempDir::new("memfd");
    let (dest, to) = receiver(&dir, &[]);
    let dest_pid = dest.pid() as i32;
    // The destination has mapped the memory and restored the VM (Ready)
    // when the source asks the gate: kill it there.
    let (gate_path, gate_thread) = gate(&dir, "{\"commit\":true}\n", move || {
        // SAFETY: kill(2) on a child process of this test, by pid.
        unsafe { libc::kill(dest_pid, libc::SIGKILL) };
        // Until it is reaped: a killed process shows as a zombie while its
        // other threads (and its sockets) are still going away.
        let deadline = Instant::now() + T;
        // SAFETY: kill(pid, 0) only probes whether the process exists.
        while unsafe { libc::kill(dest_pid, 0) } == 0 && Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: reaps the killed child if it is ours; never blocks.
            unsafe { libc::waitpid(dest_pid, &mut status, libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let (ok, f, err) = migrate(&vm, &to, &["--commit-gate", gate_path.to_str().unwrap()]);
    gate_thread.join().unwrap();
    assert!(!ok, "the destination is gone: {f}");
    eprintln!("source after the failed move: {err}");
    assert!(!err.contains("outcome unknown"), "a commit that never left is not uncertain: {err}");
    still_runs(&vm, "the destination died after Ready, before the commit");
    drop(dest);
}

#[test]
fn a_refused_commit_gives_the_vm_back_and_a_second_try_succeeds() {
    if !kvm_available("a_refused_commit_gives_the_vm_back_and_a_second_try_succeeds") {
        return;
    }
    let vm = boot(256, "wss_mib=64 dirty_mib_s=20");
    let dir = TempDir::new("memfd");
    let (dest, to) = receiver(&dir, &[]);
    let (gate_path, gate_thread) = gate(&dir, "{\"commit\":false,\"reason\":\"no\"}\n", || {});
    let (ok, _, err) = migrate(&vm, &to, &["--commit-gate", gate_path.to_str().unwrap()]);
    gate_thread.join().unwrap();
    assert!(!ok, "the gate said no");
    assert!(err.contains("refused the commit"), "{err}\nreceiver: {}", dest.stderr());
    still_runs(&vm, "the commit was refused");
    // The receiver discarded its mapping and waits on: the next try moves.
    let before = last_heartbeat(&vm).unwrap();
    let (ok, f, err) = migrate(&vm, &to, &[]);
    assert!(ok, "{err}\nreceiver: {}", dest.stderr());
    assert_eq!(f["memory"], "shared-fd", "{f}");
    let mut vm = vm;
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    dest.wait_api(T);
    heartbeat_goes_on(&dest, before, "after the second try");
    verified(&dest, "after the second try");
}

#[test]
fn without_memfd_on_either_side_memory_is_copied() {
    if !kvm_available("without_memfd_on_either_side_memory_is_copied") {
        return;
    }
    let mut vm = boot(256, "wss_mib=64 dirty_mib_s=20");
    // The source will not offer, then the destination will not take.
    for (leg, (source_flags, dest_flags)) in
        [(&["--no-memfd"][..], &[][..]), (&[][..], &["--no-memfd"][..])].into_iter().enumerate()
    {
        let dir = TempDir::new("memfd");
        let (mut dest, to) = receiver(&dir, dest_flags);
        let before = last_heartbeat(&vm).unwrap();
        let (ok, f, err) = migrate(&vm, &to, source_flags);
        assert!(ok, "leg {leg}: {err}");
        assert_eq!(f["memory"], "copy", "leg {leg}: {f}");
        assert!(f["pages_sent"].as_u64().unwrap() >= (64 << 20) / 4096, "leg {leg}: the working set was sent: {f}");
        assert_eq!(vm.wait_exit(T).code(), Some(0));
        std::mem::swap(&mut vm, &mut dest);
        vm.wait_api(T);
        heartbeat_goes_on(&vm, before, &format!("copy leg {leg}"));
        verified(&vm, &format!("copy leg {leg}"));
    }
}

#[test]
fn a_restored_vm_moves_by_copy_when_mapped_and_by_memfd_when_copied() {
    if !kvm_available("a_restored_vm_moves_by_copy_when_mapped_and_by_memfd_when_copied") {
        return;
    }
    let vm = boot(256, "wss_mib=64 dirty_mib_s=20");
    let snaps = TempDir::new("memfd-snap");
    let snap = snaps.path().join("s");
    let (ok, _, err) = vm.ferry(&["snapshot", "--to", snap.to_str().unwrap()]);
    assert!(ok, "{err}");
    drop(vm);
    // The default restore maps the image copy-on-write: its pages are not
    // in a file another process could map, so a same-host move copies.
    // `--copy-memory` gives the VM a memfd again: that one passes.
    for (flags, memory) in [(&[][..], "copy"), (&["--copy-memory"][..], "shared-fd")] {
        let mut args = vec![s("--from"), snap.display().to_string()];
        args.extend(flags.iter().map(|f| f.to_string()));
        let mut restored = Vm::launch(None, "restore", &args);
        restored.wait_api(T);
        restored.wait_line(T, |l| heartbeat_number(l).is_some());
        verified(&restored, &format!("restored ({memory})"));
        let dir = TempDir::new("memfd");
        let (dest, to) = receiver(&dir, &[]);
        let before = last_heartbeat(&restored).unwrap();
        let (ok, f, err) = migrate(&restored, &to, &[]);
        assert!(ok, "{err}");
        assert_eq!(f["memory"], memory, "{f}");
        assert_eq!(restored.wait_exit(T).code(), Some(0));
        dest.wait_api(T);
        heartbeat_goes_on(&dest, before, &format!("moved ({memory})"));
        verified(&dest, &format!("moved ({memory})"));
    }
}
