//! Snapshot and restore: the guest continues exactly where it was.

use std::time::Duration;

use ferry_e2e::{command, disk_image, field, heartbeat_number, kvm_available, last_heartbeat, s, TempDir, Vm};
use vmm::state::VmState;

const T: Duration = Duration::from_secs(20);

#[test]
fn snapshot_restore_keeps_heartbeat_memory_and_disk() {
    if !kvm_available("snapshot_restore_keeps_heartbeat_memory_and_disk") {
        return;
    }
    let dir = TempDir::new("snap");
    let disk = disk_image(dir.path(), "disk.img", 16);
    let snap = dir.path().join("snap");
    let guest = ferry_e2e::guest_elf();
    let mut vm = Vm::spawn(&[
        s("--kernel"),
        guest.display().to_string(),
        s("--cmdline"),
        s("heartbeat_ms=100 wss_mib=32"),
        s("--mem-mib"),
        s("128"),
        s("--disk"),
        disk.display().to_string(),
    ]);
    vm.wait_line(T, |l| l.starts_with("workload ready"));
    let w = command(&vm, "disk-write 100 64 777", "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{w}");
    let before = command(&vm, "verify", "verify", T);
    assert!(before.starts_with("verify ok"), "{before}");
    let checksum = before.split_whitespace().find(|w| w.starts_with("checksum=")).unwrap().to_owned();
    let n = vm.lines().len();
    vm.wait_line_from(n, T, |l| heartbeat_number(l).is_some());

    let out = vm.control(&["snapshot", "--to", snap.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["pages_data"].as_u64().unwrap() >= 32 * 256, "{report}");
    assert_eq!(vm.info()["state"], "Paused", "snapshot leaves the VM paused");
    let last = last_heartbeat(&vm).unwrap();
    vm.control(&["shutdown"]);
    vm.wait_exit(T);
    let mem = std::fs::metadata(snap.join("memory.bin")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        mem.blocks() * 512 < mem.len() / 2,
        "memory image is sparse: {} of {} bytes",
        mem.blocks() * 512,
        mem.len()
    );

    let restored = Vm::launch(None, "restore", &[s("--from"), snap.display().to_string()]);
    let (_, hb) = restored.wait_line_from(0, T, |l| heartbeat_number(l).is_some());
    assert_eq!(heartbeat_number(&hb), Some(last + 1), "heartbeat continues from the snapshot");
    let after = command(&restored, "verify", "verify", T);
    assert!(after.starts_with("verify ok") && after.contains(&checksum), "memory identical: {after} vs {checksum}");
    let v = command(&restored, "disk-verify 100 64 777", "disk-verify", T);
    assert!(v.starts_with("disk-verify ok"), "{v}");
    let info = restored.info();
    assert_eq!(info["boot_protocol"], "restored");
}

#[test]
fn every_vcpu_comes_back_intact() {
    if !kvm_available("every_vcpu_comes_back_intact") {
        return;
    }
    let dir = TempDir::new("snap2");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let guest = ferry_e2e::guest_elf();
    let vm = Vm::spawn(&[
        s("--kernel"),
        guest.display().to_string(),
        s("--cmdline"),
        s("heartbeat_ms=100"),
        s("--mem-mib"),
        s("64"),
        s("--vcpus"),
        s("2"),
    ]);
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm.control(&["snapshot", "--to", a.to_str().unwrap()]);
    vm.control(&["shutdown"]);
    // Restore paused and snapshot again without running a single
    // instruction: both vCPUs must read back exactly as saved.
    let restored = Vm::launch(None, "restore", &[s("--from"), a.display().to_string(), s("--paused")]);
    restored.wait_api(T);
    assert_eq!(restored.info()["state"], "Paused");
    restored.control(&["snapshot", "--to", b.to_str().unwrap()]);
    let load = |d: &std::path::Path| VmState::decode(&std::fs::read(d.join("state.bin")).unwrap()).unwrap();
    let (sa, sb) = (load(&a), load(&b));
    assert_eq!(sa.vcpus.len(), 2);
    for (x, y) in sa.vcpus.iter().zip(&sb.vcpus) {
        let id = x.id;
        assert_eq!(x.regs, y.regs, "vCPU {id} registers");
        assert_eq!(x.sregs, y.sregs, "vCPU {id} special registers");
        assert_eq!(x.mp_state, y.mp_state, "vCPU {id} mp_state");
        assert_eq!(x.xcrs, y.xcrs, "vCPU {id} xcrs");
        assert_eq!(x.debugregs, y.debugregs, "vCPU {id} debug registers");
        assert_eq!(x.lapic.regs[..0x3e0], y.lapic.regs[..0x3e0], "vCPU {id} local APIC (timer count aside)");
        assert_eq!(x.cpuid, y.cpuid, "vCPU {id} CPUID");
        assert!(x.msrs.len() > 10, "vCPU {id} MSRs saved: {}", x.msrs.len());
    }
    assert_eq!(sa.vcpus[1].mp_state.mp_state, kvm_bindings_mp_uninitialized(), "the AP stays parked");
    restored.control(&["resume"]);
    let n = restored.lines().len();
    restored.wait_line_from(n, T, |l| heartbeat_number(l).is_some());
}

fn kvm_bindings_mp_uninitialized() -> u32 {
    1 // KVM_MP_STATE_UNINITIALIZED
}

#[test]
fn damaged_snapshots_are_refused_by_name() {
    if !kvm_available("damaged_snapshots_are_refused_by_name") {
        return;
    }
    let dir = TempDir::new("snap3");
    let snap = dir.path().join("s");
    let guest = ferry_e2e::guest_elf();
    let vm = Vm::spawn(&[
        s("--kernel"),
        guest.display().to_string(),
        s("--cmdline"),
        s("heartbeat_ms=100"),
        s("--mem-mib"),
        s("32"),
    ]);
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm.control(&["snapshot", "--to", snap.to_str().unwrap()]);
    vm.control(&["shutdown"]);
    let state = std::fs::read(snap.join("state.bin")).unwrap();
    let restore_err = |bytes: &[u8]| {
        std::fs::write(snap.join("state.bin"), bytes).unwrap();
        let out = ferry_e2e::run_ferry(&["restore", "--from", snap.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = restore_err(&state[..state.len() / 2]);
    assert!(e.contains("truncated"), "{e}");
    let mut flipped = state.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    assert!(restore_err(&flipped).contains("checksum"));
    let mut future = state.clone();
    future[8..12].copy_from_slice(&9u32.to_le_bytes());
    let e = restore_err(&future);
    assert!(e.contains("format version 9 is not supported"), "{e}");
    assert!(restore_err(b"#!/bin/sh\n").contains("not a Ferry VM state"));
    let _ = field("", "");
}

/// A snapshot that cannot be written (its directory sits under a file)
/// fails with the reason and leaves the VM running, not parked; a second
/// snapshot into a used directory replaces the pair whole (its restore
/// continues from the second).
#[test]
fn a_failed_snapshot_leaves_the_vm_running_and_a_new_one_replaces_the_pair() {
    if !kvm_available("a_failed_snapshot_leaves_the_vm_running_and_a_new_one_replaces_the_pair") {
        return;
    }
    let dir = TempDir::new("snap4");
    let snap = dir.path().join("s");
    let vm = Vm::guest("heartbeat_ms=50", &["--mem-mib", "32"]);
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let bad = blocker.join("snap");
    let out =
        ferry_e2e::run_ferry(&["snapshot", "--api-sock", vm.api_sock.to_str().unwrap(), "--to", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write snapshot"), "{err}");
    assert_eq!(vm.info()["state"], "Running", "a failed snapshot gives the VM back running");
    let n = vm.lines().len();
    vm.wait_line_from(n, T, |l| heartbeat_number(l).is_some());

    vm.control(&["snapshot", "--to", snap.to_str().unwrap()]);
    let first = last_heartbeat(&vm).unwrap();
    vm.control(&["resume"]);
    let n = vm.lines().len();
    vm.wait_line_from(n, T, |l| heartbeat_number(l).is_some_and(|h| h > first + 3));
    vm.control(&["snapshot", "--to", snap.to_str().unwrap()]);
    let second = last_heartbeat(&vm).unwrap();
    vm.control(&["shutdown"]);
    assert!(second > first + 3);
    let leftovers: Vec<_> = std::fs::read_dir(&snap).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only state.bin and memory.bin remain: {leftovers:?}");
    let restored = Vm::launch(None, "restore", &[s("--from"), snap.display().to_string()]);
    let (_, hb) = restored.wait_line_from(0, T, |l| heartbeat_number(l).is_some());
    assert_eq!(heartbeat_number(&hb), Some(second + 1), "the second snapshot's state, with its memory");
}
