//! virtio-blk with the test guest: a pattern outlives the VM, and malformed
//! requests get an error status while the VM keeps running.

use std::time::Duration;

use ferry_e2e::{command, disk_image, heartbeat_number, kvm_available, s, TempDir, Vm};

const T: Duration = Duration::from_secs(30);

fn guest_with_disk(disk: &std::path::Path, readonly: bool) -> Vm {
    let guest = ferry_e2e::guest_elf();
    let spec = if readonly { format!("{},readonly", disk.display()) } else { disk.display().to_string() };
    let vm = Vm::spawn(&[
        s("--kernel"),
        guest.display().to_string(),
        s("--mem-mib"),
        s("64"),
        s("--cmdline"),
        s("heartbeat_ms=200"),
        s("--disk"),
        spec,
    ]);
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm
}

#[test]
fn disk_pattern_survives_a_vm_restart() {
    if !kvm_available("disk_pattern_survives_a_vm_restart") {
        return;
    }
    let dir = TempDir::new("disk");
    let img = disk_image(dir.path(), "d.img", 32);
    let mut vm = guest_with_disk(&img, false);
    let banner = vm.wait_line(T, |l| l.starts_with("virtio-blk:"));
    assert!(banner.contains("capacity_sectors=65536"), "{banner}");
    let id = command(&vm, "disk-id", "disk-id", T);
    assert_eq!(id, "disk-id d.img");
    let w = command(&vm, "disk-write 1000 4096 31337", "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{w}");
    vm.control(&["shutdown"]);
    vm.wait_exit(T);

    let vm = guest_with_disk(&img, false);
    let v = command(&vm, "disk-verify 1000 4096 31337", "disk-verify", T);
    assert!(v.starts_with("disk-verify ok"), "the pattern outlived the VM: {v}");
    let wrong = command(&vm, "disk-verify 1000 16 1", "disk-verify", T);
    assert!(wrong.starts_with("disk-verify FAILED"), "a wrong seed is caught: {wrong}");
}

#[test]
fn malformed_requests_get_an_error_status_and_the_vm_runs_on() {
    if !kvm_available("malformed_requests_get_an_error_status_and_the_vm_runs_on") {
        return;
    }
    let dir = TempDir::new("diskbad");
    let img = disk_image(dir.path(), "d.img", 8);
    let vm = guest_with_disk(&img, false);
    for kind in ["oob", "loop", "huge", "sector"] {
        let r = command(&vm, &format!("disk-bad {kind}"), "disk-bad", T);
        assert_eq!(r, format!("disk-bad {kind} status=1"), "malformed '{kind}' request gets IOERR");
    }
    let info = vm.info();
    assert_eq!(info["state"], "Running");
    let stats = &info["devices"][0]["stats"];
    let failed = stats["errors"].as_u64().unwrap() + stats["bad_chains"].as_u64().unwrap();
    assert_eq!(failed, 4, "every malformed request is counted: {stats}");
    let w = command(&vm, "disk-write 0 64 5", "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "the device still works: {w}");
    let v = command(&vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "guest memory untouched: {v}");
}

#[test]
fn readonly_disks_refuse_writes_and_bad_images_are_named() {
    if !kvm_available("readonly_disks_refuse_writes_and_bad_images_are_named") {
        return;
    }
    let dir = TempDir::new("diskro");
    let img = disk_image(dir.path(), "ro.img", 8);
    let vm = guest_with_disk(&img, true);
    let w = command(&vm, "disk-write 0 8 1", "disk-write", T);
    assert!(w.starts_with("disk-write FAILED") && w.contains("io-error"), "{w}");
    drop(vm);

    let guest = ferry_e2e::guest_elf();
    let g = guest.to_str().unwrap();
    let err = |disk: &str| {
        let out = ferry_e2e::run_ferry(&["run", "--kernel", g, "--disk", disk]);
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err("/nonexistent/x.img").contains("disk image /nonexistent/x.img does not exist"));
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    assert!(err(odd.to_str().unwrap()).contains("non-zero multiple of 512 bytes"));
    // Two VMMs never write the same image.
    let img2 = disk_image(dir.path(), "busy.img", 8);
    let _holder = guest_with_disk(&img2, false);
    assert!(err(img2.to_str().unwrap()).contains("in use by another VMM"));
}
