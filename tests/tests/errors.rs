//! Bad input to `ferry run` gets one clear line, not a crash.

use ferry_e2e::{ferry_bin, guest_elf, kvm_available, run_ferry, TempDir};

fn stderr_of(args: &[&str]) -> (Option<i32>, String) {
    let out = run_ferry(args);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_file_that_is_not_a_kernel_is_named() {
    if !kvm_available("a_file_that_is_not_a_kernel_is_named") {
        return;
    }
    let dir = TempDir::new("badkernel");
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let (code, err) = stderr_of(&["run", "--kernel", junk.to_str().unwrap(), "--mem-mib", "32"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a kernel"), "{err}");
    assert!(err.contains("junk.bin"), "{err}");

    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let (_, err) = stderr_of(&["run", "--kernel", empty.to_str().unwrap(), "--mem-mib", "32"]);
    assert!(err.contains("is not a kernel"), "{err}");

    // A truncated ELF: the header promises segments the file does not have.
    let guest = std::fs::read(guest_elf()).unwrap();
    let cut = dir.path().join("cut.elf");
    std::fs::write(&cut, &guest[..200]).unwrap();
    let (code, err) = stderr_of(&["run", "--kernel", cut.to_str().unwrap(), "--mem-mib", "32"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load kernel"), "{err}");

    let (_, err) = stderr_of(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert!(err.contains("cannot read kernel /nonexistent/vmlinux"), "{err}");
}

#[test]
fn missing_or_wrong_kvm_device_is_explained() {
    if !kvm_available("missing_or_wrong_kvm_device_is_explained") {
        return;
    }
    let guest = guest_elf();
    let g = guest.to_str().unwrap();
    let (code, err) = stderr_of(&["run", "--kernel", g, "--kvm-device", "/nonexistent/kvm"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/kvm does not exist: KVM is not available"), "{err}");
    let (_, err) = stderr_of(&["run", "--kernel", g, "--kvm-device", "/dev/null"]);
    assert!(err.contains("is not a KVM device"), "{err}");
}

#[test]
fn unprivileged_user_is_told_about_kvm_permissions() {
    if !kvm_available("unprivileged_user_is_told_about_kvm_permissions") {
        return;
    }
    // Run a copy of ferry as nobody against the root-only /dev/kvm.
    let dir = TempDir::new("nobody");
    let bin = dir.path().join("ferry");
    std::fs::copy(ferry_bin(), &bin).unwrap();
    let guest = dir.path().join("guest.elf");
    std::fs::copy(guest_elf(), &guest).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kvm_mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode();
    assert_eq!(kvm_mode & 0o006, 0, "this test needs /dev/kvm closed to other users");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["run", "--kernel"])
        .arg(&guest)
        .output()
        .expect("setpriv (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied opening /dev/kvm"), "{err}");
}

#[test]
fn impossible_resources_and_bad_arguments_are_refused() {
    if !kvm_available("impossible_resources_and_bad_arguments_are_refused") {
        return;
    }
    let guest = guest_elf();
    let g = guest.to_str().unwrap();
    let (code, err) = stderr_of(&["run", "--kernel", g, "--mem-mib", "100000000"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("more than this host has available"), "{err}");
    let (_, err) = stderr_of(&["run", "--kernel", g, "--mem-mib", "4"]);
    assert!(err.contains("at least 16 MiB"), "{err}");
    let (_, err) = stderr_of(&["run", "--kernel", g, "--vcpus", "0"]);
    assert!(err.contains("--vcpus must be between 1 and"), "{err}");
    let (code, err) = stderr_of(&["run", "--kernel", g, "--serial", "printer"]);
    assert_eq!(code, Some(2), "clap usage error");
    assert!(err.contains("bad serial output 'printer'"), "{err}");
    let (code, err) = stderr_of(&["run", "--kernel", g, "--boot", "bios"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown boot protocol 'bios'"), "{err}");
    let (_, err) = stderr_of(&["pause", "--api-sock", "/nonexistent/api.sock"]);
    assert!(err.contains("cannot reach the VMM at /nonexistent/api.sock"), "{err}");
}

#[test]
fn help_explains_the_commands() {
    let out = run_ferry(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "info", "pause", "resume", "shutdown", "console"] {
        assert!(text.contains(cmd), "--help lists {cmd}: {text}");
    }
    let out = run_ferry(&["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--kernel", "--initrd", "--cmdline", "--mem-mib", "--vcpus", "--serial", "--api-sock"] {
        assert!(text.contains(flag), "run --help lists {flag}");
    }
}
