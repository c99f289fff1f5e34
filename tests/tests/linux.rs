//! Linux smoke test: Debian's cloud kernel (fetched by `make linux`, not
//! built) booted by `ferry run`.
//!
//! On a PVM host Linux stops at its int3 self-test, so the test asserts the
//! early messages: "Linux version", the e820 map we handed it, and that it
//! found our ACPI tables and takes both vCPUs from the MADT (this kernel has
//! no MP-table parser). On a VMX/SVM host it must reach a shell prompt in a
//! busybox initramfs with both CPUs up, load the virtio-mmio network driver
//! (found through our DSDT) and answer pings from the lab's client. These
//! PVM machines have never run that branch.

use std::time::Duration;

use ferry_e2e::{is_pvm_host, kvm_available, linux_dir, s, Lab, TempDir, Vm, LAB_GUEST_IP, LAB_GUEST_NIC};

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
        eprintln!("VMX/SVM host: a busybox initramfs with 2 CPUs, virtio-net, pinged from the lab client");
        let dir = TempDir::new("initramfs");
        let initrd = dir.path().join("initramfs.cpio");
        std::fs::write(&initrd, initramfs(&std::fs::read(linux_dir().join("busybox")).unwrap())).unwrap();
        let lab = Lab::up_with_taps("lx");
        let vm = Vm::launch(
            Some(&lab.netns("a")),
            "run",
            &[
                s("--kernel"),
                linux_dir().join("vmlinux").display().to_string(),
                s("--boot"),
                s("linux64"),
                s("--initrd"),
                initrd.display().to_string(),
                s("--mem-mib"),
                s("256"),
                s("--vcpus"),
                s("2"),
                s("--net"),
                s(LAB_GUEST_NIC),
                // An interrupt-driven guest: queue notifies on the device
                // thread, interrupts by irqfd.
                s("--virtio-notify"),
                s("ioeventfd"),
                s("--cmdline"),
                format!("console=ttyS0 panic=-1 rdinit=/init ferry_ip={LAB_GUEST_IP}/24"),
            ],
        );
        vm.wait_line(BOOT, |l| l.contains("smp: Brought up 1 node, 2 CPUs"));
        vm.wait_line(BOOT, |l| l.contains("ferry-initramfs: cpus=2"));
        vm.wait_line(BOOT, |l| l.contains("ferry-initramfs: eth0 up"));
        vm.wait_line(BOOT, |l| l.contains("ferry-initramfs: shell ready"));
        let r = lab.ping_from_client(LAB_GUEST_IP, &["--count", "20", "--wait-reply-ms", "10000"]);
        assert_eq!(r["pings_lost"], 0, "Linux answers over virtio-net: {r}");
        assert_eq!(vm.info()["devices"][0]["notify"], "ioeventfd", "Linux's notifies went to the device thread");
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

/// The cloud kernel's virtio-net driver and what it needs, in load order
/// (`make linux` copies them out of the kernel package).
const MODULES: [&str; 6] = ["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net"];

/// A newc cpio with busybox, /dev/console, the virtio-net modules and an
/// /init that counts CPUs, brings eth0 up at `ferry_ip=` from the kernel
/// command line, announces each step and runs a shell.
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
    let insmods: String = MODULES.iter().map(|m| format!("insmod /lib/{m}.ko\n")).collect();
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sysfs /sys\n\
         echo ferry-initramfs: cpus=$(nproc)\n{insmods}\
         ip=$(sed -n 's/.*ferry_ip=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
         n=0; while ! ip link show eth0 >/dev/null 2>&1 && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done\n\
         ip link set lo up\nip addr add $ip dev eth0 && ip link set eth0 up && echo ferry-initramfs: eth0 up $ip\n\
         echo ferry-initramfs: shell ready\nexec sh\n"
    );
    let mut out = Vec::new();
    let mut ino = 0;
    let mut add = |out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        ino += 1;
        entry(out, ino, name, mode, rdev, data);
    };
    for d in ["bin", "dev", "proc", "sys", "lib"] {
        add(&mut out, d, 0o040755, (0, 0), &[]);
    }
    add(&mut out, "dev/console", 0o020600, (5, 1), &[]);
    add(&mut out, "bin/busybox", 0o100755, (0, 0), busybox);
    for m in MODULES {
        let ko = std::fs::read(linux_dir().join("modules").join(format!("{m}.ko")))
            .unwrap_or_else(|e| panic!("{m}.ko: {e} (run `make linux`)"));
        add(&mut out, &format!("lib/{m}.ko"), 0o100644, (0, 0), &ko);
    }
    add(&mut out, "init", 0o100755, (0, 0), init.as_bytes());
    add(&mut out, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

/// The VMX/SVM branch's initramfs cannot boot here, so its form is checked
/// on the host: busybox unpacks it, every module is in it, and busybox's sh
/// parses its /init.
#[test]
fn the_vmx_initramfs_unpacks_and_its_init_parses() {
    let busybox = linux_dir().join("busybox");
    let dir = TempDir::new("initramfs-check");
    let cpio = dir.path().join("initramfs.cpio");
    std::fs::write(&cpio, initramfs(&std::fs::read(&busybox).expect("busybox (run `make linux`)"))).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let out = std::process::Command::new(&busybox)
        .args(["cpio", "-i", "-d", "-F"])
        .arg(&cpio)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "busybox cpio -i: {}", String::from_utf8_lossy(&out.stderr));
    for m in MODULES {
        let ko = std::fs::read(root.join(format!("lib/{m}.ko"))).unwrap();
        assert_eq!(&ko[..4], b"\x7fELF", "{m}.ko");
    }
    let init = std::fs::read_to_string(root.join("init")).unwrap();
    assert!(init.contains("insmod /lib/virtio_net.ko") && init.contains("ferry-initramfs: cpus="), "{init}");
    let out = std::process::Command::new(&busybox).args(["sh", "-n"]).arg(root.join("init")).output().unwrap();
    assert!(out.status.success(), "/init does not parse: {}\n{init}", String::from_utf8_lossy(&out.stderr));
    // The address comes from the kernel command line as the script reads it.
    let line = init.lines().find(|l| l.starts_with("ip=$(sed")).unwrap();
    let sed = line.trim_start_matches("ip=$(").trim_end_matches(" /proc/cmdline)");
    let out = std::process::Command::new(&busybox)
        .args(["sh", "-c", &format!("echo 'console=ttyS0 ferry_ip=10.200.77.10/24 panic=-1' | {sed}")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.200.77.10/24", "{line}");
}
