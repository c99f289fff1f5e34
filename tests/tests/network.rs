//! The guest on the lab network: ping and UDP echo from the client, a
//! pause seen as loss by `ferry ping`, and a quick migration from host a to
//! host b seen from the client.

use std::time::Duration;

use ferry_e2e::{command, heartbeat_number, kvm_available, s, Lab, Vm};

const T: Duration = Duration::from_secs(30);
const GUEST_IP: &str = "10.200.77.10";
const GUEST_MAC: &str = "52:54:00:c0:ff:ee";

/// Boots the test guest inside lab host `host` on tap `tap`.
fn guest_on(lab: &Lab, host: &str, tap: &str, extra_cmdline: &str) -> Vm {
    lab.ok(&["tap", "add", host, tap]);
    let guest = ferry_e2e::guest_elf();
    let vm = Vm::launch(
        Some(&lab.netns(host)),
        "run",
        &[
            s("--kernel"),
            guest.display().to_string(),
            s("--mem-mib"),
            s("128"),
            s("--cmdline"),
            format!("heartbeat_ms=200 ip={GUEST_IP} {extra_cmdline}"),
            s("--net"),
            format!("tap={tap},mac={GUEST_MAC}"),
        ],
    );
    vm.wait_line(T, |l| l.starts_with("virtio-net:"));
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn guest_answers_500_pings_from_the_client_without_loss() {
    if !kvm_available("guest_answers_500_pings_from_the_client_without_loss") {
        return;
    }
    let lab = Lab::up("n1");
    let vm = guest_on(&lab, "a", "vm0", "");
    let banner = vm.wait_line(T, |l| l.starts_with("virtio-net:"));
    assert!(banner.contains(GUEST_MAC) && banner.contains(GUEST_IP), "{banner}");
    let r = lab.ping_from_client(GUEST_IP, &["--count", "500", "--interval-ms", "10", "--wait-reply-ms", "3000"]);
    assert_eq!(n(&r, "pings_sent"), 500, "{r}");
    assert_eq!(n(&r, "pings_lost"), 0, "{r}");
    assert!(r["rtt_ms_median"].as_f64().unwrap() < 5.0, "{r}");

    let udp = lab.ping_from_client(GUEST_IP, &["--udp", "7", "--count", "200", "--interval-ms", "5"]);
    assert_eq!(n(&udp, "pings_lost"), 0, "UDP echo: {udp}");
    let status = command(&vm, "net-status", "net-status", T);
    assert!(status.contains("icmp_echoes=") && !status.contains("icmp_echoes=0 "), "{status}");
    let info = vm.info();
    assert_eq!(info["devices"][0]["type"], "net");
    assert_eq!(info["devices"][0]["mac"], GUEST_MAC);
}

#[test]
fn a_500ms_pause_shows_up_as_about_50_lost_pings() {
    if !kvm_available("a_500ms_pause_shows_up_as_about_50_lost_pings") {
        return;
    }
    let lab = Lab::up("n2");
    let vm = guest_on(&lab, "a", "vm0", "");
    lab.ping_from_client(GUEST_IP, &["--count", "5", "--wait-reply-ms", "3000"]);
    let pauser = {
        let api = vm.api_sock.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            let ferry = ferry_e2e::ferry_bin();
            let run = |cmd: &str| {
                std::process::Command::new(&ferry).args([cmd, "--api-sock"]).arg(&api).status().unwrap().success()
            };
            assert!(run("pause"));
            std::thread::sleep(Duration::from_millis(500));
            assert!(run("resume"));
        })
    };
    let r = lab.ping_from_client(GUEST_IP, &["--count", "200", "--interval-ms", "10"]);
    pauser.join().unwrap();
    let lost = n(&r, "pings_lost");
    assert!((40..=70).contains(&lost), "a 500 ms pause loses about 50 probes at 10 ms: {r}");
    let gap = r["max_gap_ms"].as_f64().unwrap();
    assert!((450.0..800.0).contains(&gap), "largest reply gap about 500 ms: {r}");
}

#[test]
fn tap_errors_are_named() {
    if !kvm_available("tap_errors_are_named") {
        return;
    }
    let lab = Lab::up("n3");
    let guest = ferry_e2e::guest_elf();
    let run = |tap: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.netns("a")])
            .arg(ferry_e2e::ferry_bin())
            .args(["run", "--kernel"])
            .arg(&guest)
            .args(["--net", &format!("tap={tap}")])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run("nosuchtap");
    assert_eq!(code, Some(1));
    assert!(err.contains("tap nosuchtap does not exist"), "{err}");
    let (_, err) = run("br0");
    assert!(err.contains("br0 is not a tap device"), "{err}");
    // A tap already attached to a running VMM is busy.
    let _vm = guest_on(&lab, "a", "vm1", "");
    let (_, err) = run("vm1");
    assert!(err.contains("tap vm1 is in use"), "{err}");
}

#[test]
fn quick_migration_from_host_a_to_b_is_a_bounded_gap_for_the_client() {
    if !kvm_available("quick_migration_from_host_a_to_b_is_a_bounded_gap_for_the_client") {
        return;
    }
    let lab = Lab::up("n4");
    let mut a = guest_on(&lab, "a", "vm0", "wss_mib=32 dirty_mib_s=16");
    lab.ok(&["tap", "add", "b", "vm0"]);
    let key = ferry_e2e::cluster_key().display().to_string();
    let b = Vm::launch(
        Some(&lab.netns("b")),
        "receive",
        &[s("--listen"), s("tcp:10.200.77.2:7700"), s("--key-file"), key.clone(), s("--net"), s("tap=vm0")],
    );
    lab.ping_from_client(GUEST_IP, &["--count", "5", "--wait-reply-ms", "3000"]);
    let migrator = {
        let api = a.api_sock.clone();
        let netns_a = lab.netns("a");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            std::process::Command::new("ip")
                .args(["netns", "exec", &netns_a])
                .arg(ferry_e2e::ferry_bin())
                .args(["migrate", "--mode", "quick", "--json", "--key-file", &key, "--to", "tcp:10.200.77.2:7700"])
                .arg("--api-sock")
                .arg(&api)
                .output()
                .unwrap()
        })
    };
    let r = lab.ping_from_client(GUEST_IP, &["--count", "300", "--interval-ms", "10"]);
    let out = migrator.join().unwrap();
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a.wait_exit(T).code(), Some(0));
    let gap = r["max_gap_ms"].as_f64().unwrap();
    let downtime = figures["downtime_ms"].as_f64().unwrap();
    assert!(gap < 1000.0, "the client's largest reply gap is bounded: {r} (downtime {downtime} ms)");
    assert!(n(&r, "pings_lost") < 100, "{r}");
    // The guest answers from host b now.
    let after = lab.ping_from_client(GUEST_IP, &["--count", "50"]);
    assert_eq!(n(&after, "pings_lost"), 0, "{after}");
    let v = command(&b, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
    eprintln!("quick migration a->b: downtime {downtime:.1} ms, client: {r}");
}
