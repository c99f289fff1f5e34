//! Linux smoke test: Debian's cloud kernel (fetched by `make linux`, not
//! built) booted by `ferry run`.
//!
//! On a PVM host Linux stops at its int3 self-test, so the test asserts the
//! early messages: "Linux version", the e820 map we handed it, and that it
//! found our ACPI tables and takes both vCPUs from the MADT (this kernel has
//! no MP-table parser). On a VMX/SVM host it must reach a shell prompt in a
//! busybox initramfs.

use std::time::Duration;

use ferry_e2e::{is_pvm_host, kvm_available, linux_dir, TempDir, Vm};

const BOOT: Duration = Duration::from_secs(60);

fn boot_and_check_early_messages(protocol: &str) -> Vm {
    let kernel = linux_dir().join("vmlinux");
    let vm = Vm::spawn(&[
        "--kernel".into(),
        kernel.display().to_string(),
        "--boot".into(),
        protocol.into(),
        "--mem-mib".into(),
        "256".into(),
        "--vcpus".into(),
        "2".into(),
        "--cmdline".into(),
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1".into(),
    ]);
    let version = vm.wait_line(BOOT, |l| l.contains("Linux version"));
    assert!(version.contains("cloud-amd64"), "{version}");
    vm.wait_line(BOOT, |l| l.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"));
    vm.wait_line(BOOT, |l| l.contains("BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved"));
    vm.wait_line(BOOT, |l| l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"));
    vm.wait_line(BOOT, |l| l.contains("Command line: console=ttyS0"));
    check_acpi(&vm);
    vm
}

/// Linux found the RSDP where we put it, the tables it points to, and takes
/// its CPUs from the MADT, with no ACPI complaint on the way.
fn check_acpi(vm: &Vm) {
    vm.wait_line(BOOT, |l| l.contains("ACPI: RSDP 0x00000000000E0000 000024 (v02 FERRY )"));
    for table in ["XSDT", "FACP", "DSDT", "APIC"] {
        let prefix = format!("ACPI: {table} 0x00000000000E");
        vm.wait_line(BOOT, |l| l.contains(&prefix) && l.contains("FERRY"));
    }
    vm.wait_line(BOOT, |l| l.contains("IOAPIC[0]: apic_id 3, version 17, address 0xfec00000, GSI 0-23"));
    vm.wait_line(BOOT, |l| l.contains("ACPI: Using ACPI (MADT) for SMP configuration information"));
    vm.wait_line(BOOT, |l| l.contains("smpboot: Allowing 2 CPUs, 0 hotplug CPUs"));
    let complaints: Vec<String> = vm
        .lines()
        .into_iter()
        .filter(|l| {
            ["ACPI Error", "ACPI BIOS", "ACPI Warning", "Invalid BIOS MADT", "disabling ACPI"]
                .iter()
                .any(|c| l.contains(c))
        })
        .collect();
    assert!(complaints.is_empty(), "Linux complains about the ACPI tables:\n{}", complaints.join("\n"));
}

#[test]
fn linux_vmlinux_boots_through_the_64bit_protocol() {
    if !kvm_available("linux_vmlinux_boots_through_the_64bit_protocol") {
        return;
    }
    if is_pvm_host() {
        eprintln!("PVM host: asserting Linux's early boot messages (64-bit protocol)");
        let vm = boot_and_check_early_messages("linux64");
        assert_eq!(vm.info()["boot_protocol"], "linux64");
    } else {
        eprintln!("VMX/SVM host: asserting a shell prompt in a busybox initramfs");
        let dir = TempDir::new("initramfs");
        let initrd = dir.path().join("initramfs.cpio");
        std::fs::write(&initrd, initramfs(&std::fs::read(linux_dir().join("busybox")).unwrap())).unwrap();
        let vm = Vm::spawn(&[
            "--kernel".into(),
            linux_dir().join("vmlinux").display().to_string(),
            "--boot".into(),
            "linux64".into(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--mem-mib".into(),
            "256".into(),
            "--cmdline".into(),
            "console=ttyS0 panic=-1 rdinit=/init".into(),
        ]);
        vm.wait_line(BOOT, |l| l.contains("ferry-initramfs: shell ready"));
    }
}

#[test]
fn linux_vmlinux_boots_through_pvh() {
    if !kvm_available("linux_vmlinux_boots_through_pvh") {
        return;
    }
    let vm = boot_and_check_early_messages("pvh");
    assert_eq!(vm.info()["boot_protocol"], "pvh");
}

#[test]
fn linux_bzimage_is_loaded_and_started() {
    if !kvm_available("linux_bzimage_is_loaded_and_started") {
        return;
    }
    // Under PVM the bzImage decompressor runs emulated for minutes; here we
    // check the VMM loads it where the boot protocol says and starts it.
    // (vmm's boot unit tests check every field of the zero page.)
    let vm = Vm::spawn(&[
        "--kernel".into(),
        linux_dir().join("bzImage").display().to_string(),
        "--mem-mib".into(),
        "256".into(),
        "--cmdline".into(),
        "console=ttyS0".into(),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let info = vm.info();
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["boot_protocol"], "linux64");
    assert_eq!(info["kernel_load"], 0x10_0000);
}

/// A newc cpio with busybox, /dev/console and an /init that announces itself
/// and runs a shell.
fn initramfs(busybox: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let init = b"#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\necho ferry-initramfs: shell ready\nexec sh\n";
    let mut out = Vec::new();
    entry(&mut out, 1, "bin", 0o040755, (0, 0), &[]);
    entry(&mut out, 2, "dev", 0o040755, (0, 0), &[]);
    entry(&mut out, 3, "dev/console", 0o020600, (5, 1), &[]);
    entry(&mut out, 4, "bin/busybox", 0o100755, (0, 0), busybox);
    entry(&mut out, 5, "init", 0o100755, (0, 0), init);
    entry(&mut out, 6, "TRAILER!!!", 0, (0, 0), &[]);
    out
}
