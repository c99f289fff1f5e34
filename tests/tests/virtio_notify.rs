//! `--virtio-notify ioeventfd`: the test guest's queue notifies go through
//! KVM ioeventfds to the device thread. It pings and does disk I/O, and no
//! notify is lost across pauses or live migrations that land while disk
//! requests and pings are in flight (a lost one would leave the guest's
//! request without completion: it gives up after 5 s and says "no
//! completion"). One destination serves notifies on its vCPU instead: the
//! choice is the host's, and a move between the two must lose nothing.
//! The window in which a notify is still unread at a pause is short (the
//! vCPUs stop first), so this rarely lands in it; the event loop's unit
//! tests (vmm devices::event_loop) check that case deterministically.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_e2e::{
    boot_in_lab_with, command, disk_image, heartbeat_number, kvm_available, migrate_in_lab_background, receiver_in_lab,
    Lab, TempDir, Vm, LAB_GUEST_IP,
};

const T: Duration = Duration::from_secs(60);
/// Sectors per guest disk command (its maximum, 8 MiB: 128 requests).
const SECTORS: u64 = 16384;

/// Every device serves its notifies the way `mode` says.
fn assert_notify(vm: &Vm, mode: &str) {
    let info = vm.info();
    let devices = info["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 2, "{info}");
    for d in devices {
        assert_eq!(d["notify"], mode, "{d}");
    }
    assert_eq!(info["config"]["host"]["virtio_notify"], mode, "{info}");
}

fn no_lost_request(vm: &Vm, why: &str) {
    let lost: Vec<String> = vm.lines().into_iter().filter(|l| l.contains("no completion")).collect();
    assert!(lost.is_empty(), "{why}: a request lost its notify: {lost:?}");
}

/// Pings from the client namespace every 2 ms for `ms`, on a thread.
fn pinger(lab: &Lab, ms: u64) -> std::thread::JoinHandle<serde_json::Value> {
    let ns = lab.netns("client");
    std::thread::spawn(move || {
        let out = ferry_e2e::ferry_bounded(
            &["ping", "--netns", &ns, "--target", LAB_GUEST_IP, "--interval-ms", "2", "--duration-ms", &ms.to_string()],
            Duration::from_secs(120),
        );
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    })
}

/// Writes 8 MiB regions (region k with seed 500 + k) on `vm` one after
/// another until `stop` or until the VM's API is gone (it migrated);
/// returns the regions it started. The answer to the last one may come
/// from the destination.
fn write_until(vm: &Vm, stop: &AtomicBool) -> Vec<u64> {
    let mut started = Vec::new();
    for k in 0..6u64 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let from = vm.lines().len();
        let (ok, _, _) = vm.ferry(&["console", &format!("disk-write {} {SECTORS} {}", k * SECTORS, 500 + k)]);
        if !ok {
            break;
        }
        started.push(k);
        loop {
            match vm.try_wait_line_from(from, Duration::from_millis(200), |l| l.starts_with("disk-write")) {
                Ok((_, l)) => {
                    assert!(l.starts_with("disk-write ok"), "region {k}: {l}");
                    break;
                }
                Err(_) if stop.load(Ordering::SeqCst) => return started,
                Err(_) => {}
            }
        }
    }
    started
}

#[test]
fn ioeventfd_guest_pings_does_disk_io_and_loses_no_notify_across_pause_and_migration() {
    if !kvm_available("ioeventfd_guest_pings_does_disk_io_and_loses_no_notify_across_pause_and_migration") {
        return;
    }
    let lab = Lab::up_with_taps("ioev1");
    let dir = TempDir::new("ioev");
    let disk = disk_image(dir.path(), "d.img", 64);
    let disk_arg = disk.display().to_string();
    let mut vm = boot_in_lab_with(
        &lab,
        "a",
        256,
        "wss_mib=32 dirty_mib_s=20",
        &["--disk", &disk_arg, "--virtio-notify", "ioeventfd"],
    );
    assert_notify(&vm, "ioeventfd");

    // Plain service: pings and a disk round trip.
    let ping = lab.ping_from_client(LAB_GUEST_IP, &["--count", "200", "--interval-ms", "5", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "{ping}");
    let w = command(&vm, &format!("disk-write 0 {SECTORS} 1"), "disk-write", T);
    assert!(w.starts_with("disk-write ok"), "{w}");

    // Pauses while 8 MiB of writes and a ping flood are in flight.
    let pings = pinger(&lab, 1500);
    let from = vm.lines().len();
    vm.control(&["console", &format!("disk-write {SECTORS} {SECTORS} 2")]);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(15));
        vm.control(&["pause"]);
        std::thread::sleep(Duration::from_millis(40));
        vm.control(&["resume"]);
    }
    let (_, w) = vm.wait_line_from(from, T, |l| l.starts_with("disk-write"));
    assert!(w.starts_with("disk-write ok"), "writes across pauses: {w}");
    let pings = pings.join().unwrap();
    eprintln!("pings across 8 pauses: {pings}");
    no_lost_request(&vm, "pause/resume");
    let v = command(&vm, &format!("disk-verify {SECTORS} {SECTORS} 2"), "disk-verify", T);
    assert!(v.starts_with("disk-verify ok"), "{v}");
    let ping = lab.ping_from_client(LAB_GUEST_IP, &["--count", "50", "--interval-ms", "5", "--wait-reply-ms", "3000"]);
    assert_eq!(ping["pings_lost"], 0, "after the pauses: {ping}");

    // Live moves a -> b (whose VMM serves notifies on the vCPU) -> a, each
    // while disk writes and pings run.
    let mut host = "a";
    for (leg, dest_mode) in [(1u16, "vcpu"), (2, "ioeventfd")] {
        let to = Lab::other_host(host);
        let port = 7840 + leg;
        let tmp = std::env::temp_dir();
        let mut dest = receiver_in_lab(
            &lab,
            to,
            port,
            &["--net", "tap=vm0", "--allow-disks", tmp.to_str().unwrap(), "--virtio-notify", dest_mode],
        );
        let before = vm.lines().len();
        let pings = pinger(&lab, 2500);
        let stop = AtomicBool::new(false);
        let (started, (ok, f, err)) = std::thread::scope(|sc| {
            let writes = sc.spawn(|| write_until(&vm, &stop));
            std::thread::sleep(Duration::from_millis(150));
            let mig = migrate_in_lab_background(&lab, host, &vm, &format!("tcp:{}:{port}", Lab::host_ip(to)), &[]);
            let out = mig.join().unwrap();
            stop.store(true, Ordering::SeqCst);
            (writes.join().unwrap(), out)
        });
        assert!(ok, "leg {leg}: {err}");
        assert_eq!(vm.wait_exit(T).code(), Some(0), "leg {leg}: the source stops after commit");
        std::mem::swap(&mut vm, &mut dest);
        vm.wait_api(T);
        assert_notify(&vm, dest_mode);
        // Every write started finished, on the source or here.
        let answered =
            |v: &Vm, skip: usize| v.lines().iter().skip(skip).filter(|l| l.starts_with("disk-write")).count();
        let deadline = std::time::Instant::now() + T;
        while answered(&dest, before) + answered(&vm, 0) < started.len() {
            assert!(std::time::Instant::now() < deadline, "leg {leg}: a write never finished: {:?}", vm.lines());
            std::thread::sleep(Duration::from_millis(20));
        }
        for l in dest.lines().iter().skip(before).chain(vm.lines().iter()).filter(|l| l.starts_with("disk-write")) {
            assert!(l.starts_with("disk-write ok"), "leg {leg}: {l}");
        }
        no_lost_request(&dest, &format!("leg {leg} source"));
        no_lost_request(&vm, &format!("leg {leg} destination"));
        let pings = pings.join().unwrap();
        eprintln!(
            "leg {leg} {host}->{to} ({dest_mode}): {} regions written across it; {f}; pings {pings}",
            started.len()
        );
        let (_, hb) = vm.wait_line_from(0, T, |l| heartbeat_number(l).is_some());
        assert!(heartbeat_number(&hb).is_some());
        let m = command(&vm, "verify", "verify", T);
        assert!(m.starts_with("verify ok"), "leg {leg}: memory intact: {m}");
        for k in started {
            let v = command(&vm, &format!("disk-verify {} {SECTORS} {}", k * SECTORS, 500 + k), "disk-verify", T);
            assert!(v.starts_with("disk-verify ok"), "leg {leg}: region {k}: {v}");
        }
        let ping =
            lab.ping_from_client(LAB_GUEST_IP, &["--count", "50", "--interval-ms", "5", "--wait-reply-ms", "3000"]);
        assert_eq!(ping["pings_lost"], 0, "leg {leg}: the guest answers on host {to}: {ping}");
        host = to;
    }
    vm.control(&["shutdown"]);
    vm.wait_exit(T);
}
