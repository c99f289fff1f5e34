//! Quick migration: the VM moves with its memory, state and disk; any
//! failure before the destination confirms leaves it running on the source;
//! a destination fed garbage never runs anything.

use std::io::Write;
use std::net::{TcpListener, TcpStream};

use migrate::secure::Duplex;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::disk_lease;
use ferry_e2e::{
    cluster_key, cluster_key_loaded, command, disk_image, heartbeat_number, kvm_available, last_heartbeat, s, TempDir,
    Vm,
};
use migrate::wire::{self, Kind};

const T: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn source_vm(cmdline: &str, mem_mib: u64, extra: &[String]) -> Vm {
    source_vm_with_env(cmdline, mem_mib, extra, &[])
}

/// [`source_vm`] with environment variables for the VMM (test hooks).
fn source_vm_with_env(cmdline: &str, mem_mib: u64, extra: &[String], env: &[(&str, &str)]) -> Vm {
    let guest = ferry_e2e::guest_elf();
    let mut args = vec![
        s("--kernel"),
        guest.display().to_string(),
        s("--cmdline"),
        cmdline.to_owned(),
        s("--mem-mib"),
        mem_mib.to_string(),
    ];
    args.extend_from_slice(extra);
    let vm = Vm::launch_with_env(None, "run", &args, env);
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm
}

/// A volume under `dir` with raw disks d0 and d1; its path.
fn two_disk_volume(dir: &TempDir) -> String {
    let vol = dir.path().join("vol").display().to_string();
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(ferry_e2e::run_ferry(&["volume", "create", &vol]));
    for d in ["d0", "d1"] {
        ok(ferry_e2e::run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", d]));
    }
    vol
}

/// `ferry run` arguments for both disks of [`two_disk_volume`], as host a
/// with a short lease TTL.
fn two_disk_args(vol: &str) -> Vec<String> {
    vec![
        s("--disk"),
        format!("csv:{vol}/disks/d0"),
        s("--disk"),
        format!("csv:{vol}/disks/d1"),
        s("--host-id"),
        s("a"),
        s("--lease-ttl-ms"),
        s("1500"),
    ]
}

/// The guest writes pattern `seed` on its first disk and reads it back.
fn first_disk_writes(vm: &Vm, seed: u32, why: &str) {
    let w = command(vm, &format!("disk-write 0 64 {seed}"), "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{why}: {w}");
    let v = command(vm, &format!("disk-verify 0 64 {seed}"), "disk-verify", T);
    assert!(v.starts_with("disk-verify ok"), "{why}: {v}");
}

fn receiver(endpoint: &str) -> Vm {
    Vm::launch(
        None,
        "receive",
        &[
            s("--listen"),
            endpoint.to_owned(),
            s("--key-file"),
            cluster_key().display().to_string(),
            s("--allow-disks"),
            std::env::temp_dir().display().to_string(),
        ],
    )
}

/// `ferry migrate --mode quick` to `to` (JSON figures on success).
fn migrate_quick(vm: &Vm, to: &str) -> (bool, String, String) {
    let key = cluster_key();
    vm.ferry(&["migrate", "--mode", "quick", "--json", "--key-file", key.to_str().unwrap(), "--to", to])
}

/// The source still runs: a new heartbeat arrives after `from`.
fn assert_still_running(vm: &Vm, why: &str) {
    assert_eq!(vm.info()["state"], "Running", "{why}");
    let n = vm.lines().len();
    vm.wait_line_from(n, T, |l| heartbeat_number(l).is_some());
}

#[test]
fn quick_migration_there_and_back_keeps_counter_memory_and_disk() {
    if !kvm_available("quick_migration_there_and_back_keeps_counter_memory_and_disk") {
        return;
    }
    let dir = TempDir::new("qm");
    let disk = disk_image(dir.path(), "disk.img", 16);
    let mut a = source_vm(
        "heartbeat_ms=100 wss_mib=64 dirty_mib_s=32",
        256,
        &[s("--disk"), disk.display().to_string(), s("--vcpus"), s("2")],
    );
    let w = command(&a, "disk-write 0 128 4242", "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{w}");

    // a -> b over TCP
    let port = free_port();
    let mut b = receiver(&format!("tcp:127.0.0.1:{port}"));
    std::thread::sleep(Duration::from_millis(200));
    let last_a = last_heartbeat(&a).unwrap();
    let (ok, out, err) = migrate_quick(&a, &format!("tcp:127.0.0.1:{port}"));
    assert!(ok, "{err}");
    let figures: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(figures["mode"], "quick");
    assert_eq!(figures["mem_mib"], 256);
    assert!(figures["pages_sent"].as_u64().unwrap() >= 64 * 256, "{figures}");
    assert!(figures["pages_zero"].as_u64().unwrap() > 0, "{figures}");
    assert!(figures["bytes_sent"].as_u64().unwrap() < 200 << 20, "zero pages travel as markers: {figures}");
    assert!(figures["downtime_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(a.wait_exit(T).code(), Some(0), "source exits after the move");
    assert!(a.stderr().contains("migrated to tcp:"), "{}", a.stderr());

    b.wait_api(T);
    let (_, hb) = b.wait_line_from(0, T, |l| heartbeat_number(l).is_some());
    assert!(heartbeat_number(&hb).unwrap() > last_a, "counter continues on b: {hb} after {last_a}");
    let v = command(&b, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
    let d = command(&b, "disk-verify 0 128 4242", "disk-verify", T);
    assert!(d.starts_with("disk-verify ok"), "{d}");

    // b -> a' over a Unix socket
    let sock = dir.path().join("mig.sock");
    let back = receiver(&format!("unix:{}", sock.display()));
    std::thread::sleep(Duration::from_millis(200));
    let (ok, _, err) = migrate_quick(&b, &format!("unix:{}", sock.display()));
    assert!(ok, "{err}");
    assert_eq!(b.wait_exit(T).code(), Some(0));
    back.wait_api(T);
    let v = command(&back, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
    let d = command(&back, "disk-verify 0 128 4242", "disk-verify", T);
    assert!(d.starts_with("disk-verify ok"), "{d}");
    let banner_cpus = back.info()["config"]["machine"]["vcpus"].clone();
    assert_eq!(banner_cpus, 2);
}

/// The encrypted session a real peer would open, over a raw stream.
fn secure_accept(stream: migrate::transport::Stream) -> Duplex {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = Duplex::new(migrate::secure::accept(stream, &cluster_key_loaded(), deadline).unwrap());
    c.set_timeout(Some(T)).unwrap();
    c
}

fn secure_connect(port: u16) -> Duplex {
    let to: migrate::Endpoint = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let stream = migrate::transport::connect(&to, Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    Duplex::new(migrate::secure::connect(stream, &cluster_key_loaded(), deadline).unwrap())
}

/// A destination that follows the protocol up to `fail_at`, then fails.
fn fake_destination(fail_at: &'static str) -> (u16, std::thread::JoinHandle<()>) {
    let listener = migrate::transport::Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let port: u16 = listener.local_addr().rsplit(':').next().unwrap().parse().unwrap();
    let t = std::thread::spawn(move || {
        let mut c = secure_accept(listener.accept().unwrap());
        let hello = wire::read_frame(&mut c).unwrap();
        assert_eq!(hello.kind, Kind::Hello);
        match fail_at {
            "hello" => return,
            "refuse" => {
                wire::send(&mut c, Kind::Refuse, &wire::Reason { reason: "no room for you".into() }).unwrap();
                c.flush().unwrap();
                return;
            }
            "garbage" => {
                c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
                c.flush().unwrap();
                return;
            }
            // A destination whose host id cannot hold a lease: the source's
            // handoff of a shared disk to it fails.
            "bad-host-id" => wire::send(&mut c, Kind::HelloAck, &wire::Ack { host_id: "no/such/host".into() }).unwrap(),
            _ => wire::send(&mut c, Kind::HelloAck, &wire::Ack { host_id: "fake".into() }).unwrap(),
        }
        c.flush().unwrap();
        let mut frames = 0;
        loop {
            let Ok(f) = wire::read_frame(&mut c) else { return };
            frames += 1;
            if fail_at == "memory" && frames == 3 {
                return;
            }
            if f.kind == Kind::State {
                break;
            }
        }
        match fail_at {
            "abort" => {
                wire::send(&mut c, Kind::Abort, &wire::Reason { reason: "restore failed here".into() }).unwrap();
                c.flush().unwrap();
            }
            "state" => {}
            "bad-host-id" | "handoff-fails" => {
                wire::write_frame(&mut c, Kind::Ready, &[]).unwrap();
                c.flush().unwrap();
                let verdict = wire::read_frame(&mut c).unwrap();
                assert_eq!(verdict.kind, Kind::Abort, "never a commit after a failed handoff");
            }
            other => panic!("unknown failure point {other}"),
        }
    });
    (port, t)
}

#[test]
fn source_keeps_running_whichever_step_the_destination_fails_at() {
    if !kvm_available("source_keeps_running_whichever_step_the_destination_fails_at") {
        return;
    }
    let vm = source_vm("heartbeat_ms=100 wss_mib=16 dirty_mib_s=16", 64, &[]);
    for (fail_at, expect) in [
        ("hello", "closed"),
        ("refuse", "no room for you"),
        ("garbage", "bad frame magic"),
        ("memory", "migration failed"),
        ("state", "closed"),
        ("abort", "restore failed here"),
    ] {
        let (port, t) = fake_destination(fail_at);
        let (ok, _, err) = migrate_quick(&vm, &format!("tcp:127.0.0.1:{port}"));
        t.join().unwrap();
        assert!(!ok, "{fail_at}: migration must fail");
        assert!(err.contains(expect), "{fail_at}: error names the cause ({expect}): {err}");
        assert_still_running(&vm, fail_at);
    }
    let v = command(&vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
    let (ok, _, err) = migrate_quick(&vm, "tcp:127.0.0.1:1");
    assert!(!ok && err.contains("cannot connect"), "{err}");
    assert_still_running(&vm, "nobody listening");
}

#[test]
fn killing_the_destination_mid_transfer_leaves_the_source_running() {
    if !kvm_available("killing_the_destination_mid_transfer_leaves_the_source_running") {
        return;
    }
    let vm = source_vm("heartbeat_ms=100 wss_mib=768 dirty_mib_s=64", 1024, &[]);
    vm.wait_line(T, |l| l.starts_with("workload ready"));
    let port = free_port();
    let mut dest = receiver(&format!("tcp:127.0.0.1:{port}"));
    std::thread::sleep(Duration::from_millis(200));
    let killer = {
        let pid = dest.pid() as i32;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            // SAFETY: killing our own child process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    };
    let (ok, out, err) = migrate_quick(&vm, &format!("tcp:127.0.0.1:{port}"));
    killer.join().unwrap();
    dest.wait_exit(T);
    assert!(!ok, "the migration cannot have succeeded: {out}");
    assert!(err.contains("migration failed"), "{err}");
    assert_still_running(&vm, "destination killed");
    let v = command(&vm, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
}

#[test]
fn a_destination_fed_garbage_refuses_and_never_runs_a_vm() {
    if !kvm_available("a_destination_fed_garbage_refuses_and_never_runs_a_vm") {
        return;
    }
    let hello = |mem_mib: u64| wire::Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        mode: wire::Mode::Quick,
        requirements: vmm::migration::Requirements {
            mem_bytes: mem_mib << 20,
            vcpus: 1,
            nics: Vec::new(),
            disks: Vec::new(),
            guest_cpuid: Vec::new(),
            tsc_khz: 0,
        },
        check_only: false,
        switchover_timeout_ms: 10_000,
    };
    type Feed = Box<dyn Fn(u16)>;
    let cases: Vec<(&str, Feed)> = vec![
        (
            // Not a Noise handshake at all: what an old or foreign peer sends.
            "secure handshake",
            Box::new(|port: u16| {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.write_all(&[0x42; 64]).unwrap();
            }),
        ),
        (
            "outside guest memory",
            Box::new(move |port: u16| {
                let mut c = secure_connect(port);
                wire::send(&mut c, Kind::Hello, &hello(32)).unwrap();
                c.flush().unwrap();
                let _ = wire::read_frame(&mut c);
                wire::write_frame(&mut c, Kind::MemData, &wire::mem_data_payload(1 << 40, &[1; 4096])).unwrap();
                c.flush().unwrap();
            }),
        ),
        (
            "closed",
            Box::new(move |port: u16| {
                let mut c = secure_connect(port);
                wire::send(&mut c, Kind::Hello, &hello(32)).unwrap();
                c.flush().unwrap();
                let _ = wire::read_frame(&mut c);
                wire::write_frame(&mut c, Kind::MemData, &wire::mem_data_payload(0, &[1; 4096])).unwrap();
                c.flush().unwrap();
                // ...and the source vanishes mid-stream.
            }),
        ),
        (
            "checksum",
            Box::new(move |port: u16| {
                let mut c = secure_connect(port);
                wire::send(&mut c, Kind::Hello, &hello(32)).unwrap();
                c.flush().unwrap();
                let _ = wire::read_frame(&mut c);
                let mut frame = Vec::new();
                wire::write_frame(&mut frame, Kind::MemData, &wire::mem_data_payload(0, &[7; 4096])).unwrap();
                frame[100] ^= 1;
                c.write_all(&frame).unwrap();
                c.flush().unwrap();
            }),
        ),
        (
            "more than this host has available",
            Box::new(move |port: u16| {
                let mut c = secure_connect(port);
                wire::send(&mut c, Kind::Hello, &hello(64 << 20)).unwrap();
                c.flush().unwrap();
                let _ = wire::read_frame(&mut c);
            }),
        ),
    ];
    for (expect, feed) in cases {
        let port = free_port();
        let dest = receiver(&format!("tcp:127.0.0.1:{port}"));
        dest.wait_stderr(T, "waiting for a migration");
        feed(port);
        dest.wait_stderr(T, expect);
        assert!(
            dest.stderr().contains("nothing kept") && dest.stderr().contains("still waiting"),
            "{expect}: {}",
            dest.stderr()
        );
        assert!(!dest.api_sock.exists(), "{expect}: no VM ever ran");
        assert!(!dest.lines().iter().any(|l| heartbeat_number(l).is_some()));
        // ...and the destination still takes a proper connection after it.
        // A proper session still opens: the receiver kept listening.
        drop(secure_connect(port));
    }
}

#[test]
fn a_failed_disk_handoff_gives_every_disk_back_and_the_guest_keeps_writing() {
    if !kvm_available("a_failed_disk_handoff_gives_every_disk_back_and_the_guest_keeps_writing") {
        return;
    }
    let dir = TempDir::new("handoff");
    let vol_s = two_disk_volume(&dir);
    let vm = source_vm("heartbeat_ms=100", 64, &two_disk_args(&vol_s));
    let epoch = |disk: &str| -> u64 {
        let v = disk_lease(&vol_s, disk);
        assert_eq!(v["owner"], "a", "{disk} is a's: {v}");
        v["epoch"].as_u64().unwrap()
    };
    let before = (epoch("d0"), epoch("d1"));
    let (port, t) = fake_destination("bad-host-id");
    let (migrated, _, err) = migrate_quick(&vm, &format!("tcp:127.0.0.1:{port}"));
    t.join().unwrap();
    assert!(!migrated, "the migration fails");
    assert!(err.contains("no/such/host") || err.contains("host"), "{err}");
    assert_still_running(&vm, "failed handoff");
    // Both disks are a's again, and stay so past several lease TTLs: their
    // keepers run (nothing was handed over, or it was taken back).
    std::thread::sleep(Duration::from_millis(3500));
    let after = (epoch("d0"), epoch("d1"));
    assert!(after.0 >= before.0 && after.1 >= before.1, "{before:?} -> {after:?}");
    first_disk_writes(&vm, 777, "the guest still writes its disk");
}

/// The handoff of the second disk fails after the first was handed over
/// (the VMM's FERRY_TEST_FAIL_HANDOFF makes d1's lease write fail as a
/// full volume would): all or nothing, the first disk comes back under the
/// source's lease at a higher epoch with its keeper running, and the guest
/// writes it.
#[test]
fn a_handoff_failing_on_the_second_disk_takes_the_first_back() {
    if !kvm_available("a_handoff_failing_on_the_second_disk_takes_the_first_back") {
        return;
    }
    let dir = TempDir::new("handoff2");
    let vol_s = two_disk_volume(&dir);
    let vm = source_vm_with_env("heartbeat_ms=100", 64, &two_disk_args(&vol_s), &[("FERRY_TEST_FAIL_HANDOFF", "d1")]);
    let lease = |disk: &str| disk_lease(&vol_s, disk);
    let before = lease("d0")["epoch"].as_u64().unwrap();
    let (port, t) = fake_destination("handoff-fails");
    let (migrated, _, err) = migrate_quick(&vm, &format!("tcp:127.0.0.1:{port}"));
    t.join().unwrap();
    assert!(!migrated, "the migration fails");
    assert!(err.contains("d1") && err.contains("full"), "the failing disk is named: {err}");
    assert_still_running(&vm, "a handoff that failed on the second disk");
    // d0 went to the destination and came back: a's, two epochs on (the
    // handoff, then the take-back), and still a's after several TTLs.
    std::thread::sleep(Duration::from_millis(3500));
    let d0 = lease("d0");
    assert_eq!(d0["owner"], "a", "{d0}");
    assert!(d0["epoch"].as_u64().unwrap() >= before + 2, "handed over and taken back: {before} -> {d0}");
    assert_eq!(lease("d1")["owner"], "a");
    // The guest drives its first disk, the one that went and came back.
    first_disk_writes(&vm, 31, "d0 takes writes");
}

/// The destination decides where disks come from: its preflight refuses,
/// by name and with the VM left running on the source, a disk outside
/// the places it allows, a different file at the same path, an image of
/// another size than the guest's, and a host id no lease can name.
#[test]
fn the_preflight_refuses_disks_and_hosts_the_destination_cannot_vouch_for() {
    if !kvm_available("the_preflight_refuses_disks_and_hosts_the_destination_cannot_vouch_for") {
        return;
    }
    let dir = TempDir::new("preflight-disks");
    let disk = disk_image(dir.path(), "disk.img", 16);
    let vm = source_vm("heartbeat_ms=100", 64, &[s("--disk"), disk.display().to_string()]);
    let elsewhere = TempDir::new("preflight-elsewhere");
    let key = cluster_key();
    let check = |port: u16, allow: &std::path::Path, host_id: &str| -> String {
        let endpoint = format!("tcp:127.0.0.1:{port}");
        let dest = Vm::launch(
            None,
            "receive",
            &[
                s("--listen"),
                endpoint.clone(),
                s("--key-file"),
                key.display().to_string(),
                s("--allow-disks"),
                allow.display().to_string(),
                s("--host-id"),
                host_id.to_owned(),
            ],
        );
        dest.wait_stderr(T, "waiting for a migration");
        let (ok, _, err) =
            vm.ferry(&["migrate", "--check-only", "--key-file", key.to_str().unwrap(), "--to", &endpoint]);
        assert!(!ok, "the preflight refuses");
        assert_still_running(&vm, "a refused preflight");
        assert!(!dest.api_sock.exists(), "nothing ran on the destination");
        err
    };
    let err = check(7791, elsewhere.path(), "b");
    assert!(err.contains("outside the places this host allows disks from"), "{err}");

    // Another file now sits at the disk's path (the guest keeps its own).
    let kept = dir.path().join("disk.img.guests");
    std::fs::rename(&disk, &kept).unwrap();
    disk_image(dir.path(), "disk.img", 16);
    let err = check(7792, dir.path(), "b");
    assert!(err.contains("is a different image"), "{err}");

    // The guest's own file, grown behind its back.
    std::fs::rename(&kept, &disk).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(32 << 20).unwrap();
    let err = check(7793, dir.path(), "b");
    assert!(err.contains("bytes here, the guest's is 16777216 bytes"), "{err}");
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(16 << 20).unwrap();

    let err = check(7794, dir.path(), "no/such/host");
    assert!(err.contains("this host's id cannot name a lease holder"), "{err}");
}
