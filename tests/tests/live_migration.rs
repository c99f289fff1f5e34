//! Live migration between lab hosts: the guest keeps its memory, counter
//! and disk through every move (over one memory stream or several); every failure before commit leaves it
//! running on the source with its workload intact.

use std::time::Duration;

use ferry_e2e::{command, disk_image, heartbeat_number, kvm_available, last_heartbeat, s, Lab, TempDir, Vm};

const T: Duration = Duration::from_secs(60);
const GUEST_IP: &str = "10.200.77.10";

fn boot(lab: &Lab, host: &str, cmdline: &str, disk: Option<&std::path::Path>) -> Vm {
    let guest = ferry_e2e::guest_elf();
    let mut args = vec![
        s("--kernel"),
        guest.display().to_string(),
        s("--mem-mib"),
        s("256"),
        s("--cmdline"),
        format!("heartbeat_ms=200 ip={GUEST_IP} {cmdline}"),
        s("--net"),
        s("tap=vm0,mac=52:54:00:c0:ff:ee"),
    ];
    if let Some(d) = disk {
        args.extend([s("--disk"), d.display().to_string()]);
    }
    let vm = Vm::launch(Some(&lab.netns(host)), "run", &args);
    vm.wait_line(T, |l| l.starts_with("workload ready"));
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm
}

/// `ferry receive` on `host` with the tap for the guest's NIC.
fn receiver(lab: &Lab, host: &str, port: u16, extra: &[&str]) -> Vm {
    let tmp = std::env::temp_dir();
    let mut args = vec!["--net", "tap=vm0", "--allow-disks", tmp.to_str().unwrap()];
    args.extend_from_slice(extra);
    ferry_e2e::receiver_in_lab(lab, host, port, &args)
}

use ferry_e2e::migrate_in_lab as migrate;

fn assert_intact(vm: &Vm, disk_seed: Option<u64>, why: &str) {
    let v = command(vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{why}: every page stamp intact: {v}");
    if let Some(seed) = disk_seed {
        let d = command(vm, &format!("disk-verify 0 256 {seed}"), "disk-verify", T);
        assert!(d.starts_with("disk-verify ok"), "{why}: disk pattern holds: {d}");
    }
}

#[test]
fn dirtying_and_idle_guests_move_a_to_b_and_back_intact() {
    if !kvm_available("dirtying_and_idle_guests_move_a_to_b_and_back_intact") {
        return;
    }
    let lab = Lab::up("l1");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    let dir = TempDir::new("live");
    let disk = disk_image(dir.path(), "d.img", 16);
    let mut vm = boot(&lab, "a", "wss_mib=64 dirty_mib_s=50", Some(&disk));
    let w = command(&vm, "disk-write 0 256 99", "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{w}");
    let mut host = "a";
    for (leg, dirty) in [(1, 50), (2, 0)] {
        if dirty == 0 {
            command(&vm, "dirty 0", "dirty rate set", T);
        }
        let to = Lab::other_host(host);
        let mut dest = receiver(&lab, to, 7800 + leg, &[]);
        let before = last_heartbeat(&vm).unwrap();
        // The dirtying leg goes over three memory streams, the idle one
        // over the default.
        let streams: &[&str] = if dirty > 0 { &["--streams", "3"] } else { &[] };
        let (ok, f, err) = migrate(&lab, host, &vm, &format!("tcp:{}:{}", Lab::host_ip(to), 7800 + leg), streams);
        assert!(ok, "leg {leg}: {err}");
        assert_eq!(f["mode"], "live");
        assert_eq!(f["streams"], if dirty > 0 { 3 } else { 1 }, "{f}");
        assert!(f["rounds"].as_u64().unwrap() >= 2, "pre-copy rounds: {f}");
        assert!(f["downtime_ms"].as_f64().unwrap() < 1000.0, "{f}");
        assert_eq!(vm.wait_exit(T).code(), Some(0), "the source stops after commit");
        std::mem::swap(&mut vm, &mut dest);
        vm.wait_api(T);
        let (_, hb) = vm.wait_line_from(0, T, |l| heartbeat_number(l).is_some());
        assert!(heartbeat_number(&hb).unwrap() > before, "leg {leg}: heartbeat continues: {hb}");
        assert_intact(&vm, Some(99), &format!("leg {leg} (dirty {dirty} MiB/s)"));
        let ping = lab.ping_from_client(GUEST_IP, &["--count", "20"]);
        assert_eq!(ping["pings_lost"], 0, "the guest answers on host {to}: {ping}");
        eprintln!("leg {leg} {host}->{to} dirty {dirty}: {f}");
        host = to;
    }
}

#[test]
fn twenty_ping_pong_live_migrations_without_an_integrity_error() {
    if !kvm_available("twenty_ping_pong_live_migrations_without_an_integrity_error") {
        return;
    }
    let lab = Lab::up("l2");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    let mut vm = boot(&lab, "a", "wss_mib=32 dirty_mib_s=32", None);
    let mut host = "a";
    let mut report = Vec::new();
    for i in 0..20u16 {
        let to = Lab::other_host(host);
        let mut dest = receiver(&lab, to, 7900 + i, &[]);
        let pinger = {
            let ns = lab.netns("client");
            std::thread::spawn(move || {
                let out = std::process::Command::new(ferry_e2e::ferry_bin())
                    .args([
                        "ping",
                        "--netns",
                        &ns,
                        "--target",
                        GUEST_IP,
                        "--interval-ms",
                        "10",
                        "--duration-ms",
                        "1500",
                    ])
                    .output()
                    .unwrap();
                serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let (ok, f, err) = migrate(&lab, host, &vm, &format!("tcp:{}:{}", Lab::host_ip(to), 7900 + i), &[]);
        assert!(ok, "move {i}: {err}");
        let ping = pinger.join().unwrap();
        vm.wait_exit(T);
        std::mem::swap(&mut vm, &mut dest);
        vm.wait_api(T);
        assert_intact(&vm, None, &format!("move {i}"));
        report.push(format!(
            "move {i:2} {host}->{to}: downtime {:6.1} ms, rounds {}, pings lost {}, max gap {} ms",
            f["downtime_ms"].as_f64().unwrap_or(-1.0),
            f["rounds"],
            ping["pings_lost"],
            ping["max_gap_ms"]
        ));
        host = to;
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn every_failure_before_commit_leaves_the_vm_running_on_the_source() {
    if !kvm_available("every_failure_before_commit_leaves_the_vm_running_on_the_source") {
        return;
    }
    let lab = Lab::up("l3");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    let vm = boot(&lab, "a", "wss_mib=128 dirty_mib_s=64", None);
    let still_running = |why: &str| {
        assert_eq!(vm.info()["state"], "Running", "{why}");
        let n = vm.lines().len();
        vm.wait_line_from(n, T, |l| heartbeat_number(l).is_some());
        let ping = lab.ping_from_client(GUEST_IP, &["--count", "10"]);
        assert_eq!(ping["pings_lost"], 0, "{why}: still answering on host a: {ping}");
    };

    // A destination with another key.
    let other_key = TempDir::new("key");
    let wrong = other_key.path().join("wrong.key");
    ferry_e2e::write_key_file(&wrong, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
    let dest = Vm::launch(
        Some(&lab.netns("b")),
        "receive",
        &[s("--listen"), s("tcp:10.200.77.2:7701"), s("--key-file"), wrong.display().to_string()],
    );
    dest.wait_stderr(T, "waiting for a migration");
    let (ok, _, err) = migrate(&lab, "a", &vm, "tcp:10.200.77.2:7701", &[]);
    assert!(!ok && err.contains("authentication failed"), "{err}");
    dest.wait_stderr(T, "authentication failed");
    drop(dest);
    still_running("wrong key");

    // A destination whose CPU lacks features the guest uses.
    let dest = receiver(&lab, "b", 7702, &["--hide-cpu-features", "avx2,sse4_2"]);
    let (ok, _, err) = migrate(&lab, "a", &vm, "tcp:10.200.77.2:7702", &["--check-only"]);
    assert!(!ok, "{err}");
    assert!(err.contains("avx2: CPUID.(EAX=0x7,ECX=0):EBX[5]"), "refusal names the features: {err}");
    assert!(err.contains("sse4_2: CPUID.(EAX=0x1,ECX=0):ECX[20]"), "{err}");
    let (ok, _, err) = migrate(&lab, "a", &vm, "tcp:10.200.77.2:7702", &[]);
    assert!(!ok && err.contains("missing CPU features"), "{err}");
    drop(dest);
    still_running("preflight refused");

    // The destination killed mid pre-copy (the connection is cut).
    let dest = receiver(&lab, "b", 7703, &[]);
    let killer = {
        let pid = dest.pid() as i32;
        let api = vm.api_sock.clone();
        std::thread::spawn(move || {
            // Kill once pre-copy has begun sending memory.
            let deadline = std::time::Instant::now() + T;
            while std::time::Instant::now() < deadline {
                let r = vmm::api::client::request(&api, "GET", "vm.migration", b"", Duration::from_secs(1));
                if r.is_ok_and(|r| r.body.contains("\"phase\":\"round\"")) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            // SAFETY: killing a child of this test.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    };
    let (ok, _, err) = migrate(&lab, "a", &vm, "tcp:10.200.77.2:7703", &[]);
    killer.join().unwrap();
    assert!(!ok, "{err}");
    drop(dest);
    still_running("destination killed during pre-copy");

    assert_intact(&vm, None, "after every failed attempt");
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_cancelled_cleanly_or_converges_with_auto_converge() {
    if !kvm_available("a_guest_dirtying_faster_than_the_link_is_cancelled_cleanly_or_converges_with_auto_converge") {
        return;
    }
    let lab = Lab::up("l4");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    // 64 MiB/s of dirtying over a link capped at 16 MiB/s.
    let guest = ferry_e2e::guest_elf();
    let mut vm = Vm::launch(
        Some(&lab.netns("a")),
        "run",
        &[
            s("--kernel"),
            guest.display().to_string(),
            s("--mem-mib"),
            s("64"),
            s("--cmdline"),
            format!("heartbeat_ms=200 ip={GUEST_IP} wss_mib=16 dirty_mib_s=64"),
            s("--net"),
            s("tap=vm0,mac=52:54:00:c0:ff:ee"),
        ],
    );
    vm.wait_line(T, |l| heartbeat_number(l).is_some());

    // Without auto-converge and with policy cancel: cancelled, still here.
    // Meanwhile the migration owns the VM: the API may not pause it.
    let dest = receiver(&lab, "b", 7710, &[]);
    let (ok, f, err) = std::thread::scope(|scope| {
        let m = scope.spawn(|| {
            migrate(
                &lab,
                "a",
                &vm,
                "tcp:10.200.77.2:7710",
                &["--max-bandwidth", "16", "--no-auto-converge", "--max-rounds", "3", "--policy", "cancel"],
            )
        });
        std::thread::sleep(Duration::from_millis(600));
        for op in ["pause", "snapshot"] {
            let args: Vec<&str> = if op == "snapshot" { vec![op, "--to", "/tmp/ferry-never"] } else { vec![op] };
            let (ok, _, err) = vm.ferry(&args);
            assert!(!ok && err.contains("a migration is running"), "{op} during a migration: {err}");
        }
        m.join().unwrap()
    });
    assert!(!ok && err.contains("did not converge") && err.contains("cancelled"), "{f} {err}");
    drop(dest);
    assert_eq!(vm.info()["state"], "Running");
    assert_intact(&vm, None, "after a cancelled migration");

    // With auto-converge the vCPUs are slowed until it fits.
    let mut dest = receiver(&lab, "b", 7711, &[]);
    let (ok, f, err) = migrate(&lab, "a", &vm, "tcp:10.200.77.2:7711", &["--max-bandwidth", "16", "--timeout", "45"]);
    assert!(ok, "{err}");
    eprintln!("auto-converge: {f}");
    assert!(f["throttle_pct"].as_u64().unwrap() > 0, "the throttle had to engage: {f}");
    vm.wait_exit(T);
    std::mem::swap(&mut vm, &mut dest);
    vm.wait_api(T);
    assert_intact(&vm, None, "after an auto-converged move");
}

/// A guest whose dirty pages are tracked by KVM's dirty ring (small rings,
/// so its vCPU fills its ring and exits to make room many times a round)
/// moves a -> b -> a while dirtying, its memory and disk intact each way.
#[test]
fn a_guest_tracked_by_dirty_rings_moves_there_and_back_intact() {
    if !kvm_available("a_guest_tracked_by_dirty_rings_moves_there_and_back_intact") {
        return;
    }
    const RING: &str = "ring:1024";
    let lab = Lab::up("l5");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);
    let dir = TempDir::new("ring");
    let disk = disk_image(dir.path(), "d.img", 16).display().to_string();
    let mut vm = ferry_e2e::boot_in_lab_with(
        &lab,
        "a",
        256,
        "wss_mib=128 dirty_mib_s=50",
        &["--disk", &disk, "--dirty-tracking", RING],
    );
    let w = command(&vm, "disk-write 0 256 41", "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{w}");
    let mut host = "a";
    for leg in 1..=2u16 {
        let to = Lab::other_host(host);
        let port = 7830 + leg;
        let mut dest = receiver(&lab, to, port, &["--dirty-tracking", RING]);
        // A capped link: round 0 takes over a second, long enough for the
        // guest to dirty far more pages than a 1024-entry ring holds.
        let (ok, f, err) =
            migrate(&lab, host, &vm, &format!("tcp:{}:{port}", Lab::host_ip(to)), &["--max-bandwidth", "100"]);
        assert!(ok, "leg {leg}: {err}");
        assert_eq!(f["dirty_log"], "Ring", "leg {leg}: {f}");
        assert!(f["rounds"].as_u64().unwrap() >= 2, "{f}");
        assert_eq!(vm.wait_exit(T).code(), Some(0));
        std::mem::swap(&mut vm, &mut dest);
        vm.wait_api(T);
        assert_intact(&vm, Some(41), &format!("leg {leg} with dirty rings"));
        eprintln!("leg {leg} {host}->{to} (dirty rings): {f}");
        host = to;
    }
}
