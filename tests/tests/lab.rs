//! The lab (`ferry lab`) on real network namespaces, and `ferry ping`
//! across it. Each test uses its own short lab name, so they run in
//! parallel; a `Lab` guard takes its lab down at the end. Traffic goes only
//! to addresses inside namespaces these tests create.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::{ferry_bin, ferry_bounded, lab_netns, root_available, udp_echo_in_netns, Lab, TempDir};
use serde_json::Value;

fn ns_entry<'a>(status: &'a Value, role: &str) -> &'a Value {
    status["namespaces"].as_array().unwrap().iter().find(|n| n["role"] == role).unwrap_or_else(|| panic!("{role}"))
}

fn iface<'a>(ns: &'a Value, name: &str) -> &'a Value {
    ns["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap_or_else(|| panic!("{name}"))
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Interface names in a namespace.
fn links(netns: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&ip(&["-j", "-n", netns, "link", "show"])).unwrap();
    let mut names: Vec<String> =
        v.as_array().unwrap().iter().map(|l| l["ifname"].as_str().unwrap().to_owned()).collect();
    names.sort();
    names
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A namespace this test makes by hand (to play "someone else's"); deleted on drop.
struct HandMadeNetns(String);

impl HandMadeNetns {
    fn add(name: &str) -> HandMadeNetns {
        ip(&["netns", "add", name]);
        HandMadeNetns(name.to_owned())
    }
    fn ino(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.0)).unwrap().ino()
    }
}

impl Drop for HandMadeNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn up_twice_is_idempotent_and_status_lists_everything() {
    if !root_available("up_twice_is_idempotent_and_status_lists_everything") {
        return;
    }
    let lab = Lab::up("t1");
    let first = lab.status();
    let state1 = std::fs::read_to_string(format!("/run/ferry-lab/{}.json", lab.name)).unwrap();
    let links1: Vec<_> = ["fabric", "a", "b", "client"].iter().map(|r| links(&lab.netns(r))).collect();

    let again: Value = serde_json::from_str(&lab.ok(&["up"])).expect("up prints the status");
    assert_eq!(again["complete"], true, "{again:#}");
    let second = lab.status();
    assert_eq!(first, second, "a second up changes nothing");
    assert_eq!(
        state1,
        std::fs::read_to_string(format!("/run/ferry-lab/{}.json", lab.name)).unwrap(),
        "same namespaces recorded"
    );
    let links2: Vec<_> = ["fabric", "a", "b", "client"].iter().map(|r| links(&lab.netns(r))).collect();
    assert_eq!(links1, links2, "no interface added or lost");

    let mut names = lab_netns(&lab.name);
    names.sort();
    assert_eq!(names, ["a", "b", "client", "fabric"].map(|r| lab.netns(r)));

    let s = &second;
    assert_eq!(s["complete"], true, "{s:#}");
    assert_eq!(s["subnet"], "10.200.77.0/24");
    assert_eq!(s["guest_range"], "10.200.77.10-10.200.77.99");
    for (role, addr, dev) in
        [("a", "10.200.77.1/24", "br0"), ("b", "10.200.77.2/24", "br0"), ("client", "10.200.77.100/24", "eth0")]
    {
        let n = ns_entry(s, role);
        assert_eq!(n["netns"], lab.netns(role));
        assert_eq!(n["exists"], true);
        assert_eq!(n["created_by_lab"], true);
        assert_eq!(n["address"], addr);
        assert_eq!(n["address_present"], true);
        assert!(n["ipv4"].as_array().unwrap().iter().any(|a| a == &format!("{addr} dev {dev}")), "{n:#}");
    }
    let fabric = ns_entry(s, "fabric");
    assert_eq!(iface(fabric, "fabric")["kind"], "bridge");
    for port in ["to-a", "to-b", "to-client"] {
        let p = iface(fabric, port);
        assert_eq!(
            (p["exists"].as_bool(), p["up"].as_bool(), p["master"].as_str()),
            (Some(true), Some(true), Some("fabric"))
        );
    }
    for host in ["a", "b"] {
        let n = ns_entry(s, host);
        assert_eq!(iface(n, "br0")["kind"], "bridge");
        assert_eq!(iface(n, "uplink")["master"], "br0");
        assert_eq!(n["taps"], serde_json::json!([]));
    }
    // Only our traffic: IPv6 is off and lo is up in every namespace.
    for role in ["fabric", "a", "b", "client"] {
        let ns = lab.netns(role);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{ns}");
        assert!(ip(&["-n", &ns, "link", "show", "lo"]).contains(",UP"), "lo up in {ns}");
    }
    // Exec runs in the namespace and passes the exit status through.
    let out = ferry_bounded(
        &["lab", "exec", "b", "--name", &lab.name, "--", "ip", "-br", "-4", "addr"],
        Duration::from_secs(10),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.200.77.2/24"), "{out:?}");
    let out = ferry_bounded(
        &["lab", "exec", "client", "--name", &lab.name, "--", "sh", "-c", "exit 7"],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn taps_on_both_hosts() {
    if !root_available("taps_on_both_hosts") {
        return;
    }
    let lab = Lab::up("t2");
    let t: Value = serde_json::from_str(&lab.ok(&["tap", "add", "a", "tap0"])).unwrap();
    assert_eq!(t, serde_json::json!({"name": "tap0", "exists": true, "up": true, "master": "br0", "vnet_hdr": true}));
    lab.ok(&["tap", "add", "b", "tap0"]);
    lab.ok(&["tap", "add", "b", "vm-2"]);
    lab.ok(&["tap", "add", "a", "tap0"]); // idempotent
    let s = lab.status();
    assert_eq!(s["complete"], true, "{s:#}");
    let names = |role: &str| -> Vec<String> {
        ns_entry(&s, role)["taps"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names("a"), ["tap0"]);
    assert_eq!(names("b"), ["tap0", "vm-2"]);
    let detail = ip(&["-d", "-n", &lab.netns("b"), "link", "show", "vm-2"]);
    assert!(detail.contains("master br0") && detail.contains("tun type tap"), "{detail}");
    assert!(detail.contains("vnet_hdr on") && detail.contains("persist on"), "{detail}");
    // A second `up` keeps the taps.
    lab.ok(&["up"]);
    assert!(links(&lab.netns("a")).contains(&"tap0".to_owned()));

    lab.ok(&["tap", "del", "b", "vm-2"]);
    assert!(!links(&lab.netns("b")).contains(&"vm-2".to_owned()));
    let out = lab.lab(&["tap", "del", "b", "vm-2"]);
    assert!(!out.status.success() && stderr(&out).contains("has no tap vm-2"), "{}", stderr(&out));

    // An interface the lab did not make is not its to take over or delete.
    ip(&["-n", &lab.netns("a"), "link", "add", "hand0", "type", "bridge"]);
    let out = lab.lab(&["tap", "add", "a", "hand0"]);
    assert!(!out.status.success() && stderr(&out).contains("did not create it"), "{}", stderr(&out));
    let out = lab.lab(&["tap", "del", "a", "hand0"]);
    assert!(!out.status.success() && stderr(&out).contains("did not create it"), "{}", stderr(&out));
    assert!(links(&lab.netns("a")).contains(&"hand0".to_owned()));

    for (args, msg) in [
        (&["tap", "add", "client", "tap1"][..], "taps live on the VM hosts a and b"),
        (&["tap", "add", "a", "a-very-long-tapname"][..], "at most 15 characters"),
        (&["tap", "add", "a", "br0"][..], "the lab uses that interface name itself"),
        (&["tap", "add", "a", "x/y"][..], "invalid tap name"),
    ] {
        let out = lab.lab(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(msg), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn ping_from_the_client_reaches_both_hosts() {
    if !root_available("ping_from_the_client_reaches_both_hosts") {
        return;
    }
    let lab = Lab::up("t3");
    for target in [Lab::SUBNET_HOST_A, Lab::SUBNET_HOST_B] {
        let started = Instant::now();
        let r = lab.ping_from_client(target, &["--count", "100", "--interval-ms", "10"]);
        let took = started.elapsed();
        eprintln!("ping {target}: {r}");
        assert_eq!(r["mode"], "icmp");
        assert_eq!(r["target"], target);
        assert_eq!(r["interval_ms"], 10.0);
        assert_eq!((r["pings_sent"].as_u64(), r["pings_received"].as_u64()), (Some(100), Some(100)), "{r}");
        assert_eq!((r["pings_lost"].as_u64(), r["late"].as_u64()), (Some(0), Some(0)), "{r}");
        let median = r["rtt_ms_median"].as_f64().unwrap();
        assert!(median > 0.0 && median < 5.0, "median RTT {median} ms");
        assert!(r["rtt_ms_p99"].as_f64().unwrap() <= r["rtt_ms_max"].as_f64().unwrap());
        assert!(r["rtt_ms_max"].as_f64().unwrap() < 200.0);
        // 99 intervals and the last probe's 200 ms window.
        let d = r["duration_ms"].as_f64().unwrap();
        assert!((1185.0..1400.0).contains(&d), "duration {d} ms");
        let gap = r["max_gap_ms"].as_f64().unwrap();
        assert!((5.0..150.0).contains(&gap), "max gap {gap} ms with no loss");
        assert!(took < Duration::from_secs(5), "the run stops by itself: {took:?}");
    }

    // --duration-ms, --wait-reply-ms and --payload-bytes.
    let r = lab.ping_from_client(
        Lab::SUBNET_HOST_B,
        &["--duration-ms", "300", "--interval-ms", "5", "--wait-reply-ms", "2000", "--payload-bytes", "1000"],
    );
    assert_eq!(r["pings_sent"], 60, "{r}");
    assert_eq!(r["pings_lost"], 0, "{r}");
    assert_eq!(r["warmup_replied"], true, "{r}");
    assert_eq!(r["payload_bytes"], 1000);

    // UDP probes against an echo service on host a, port 7.
    let echo =
        udp_echo_in_netns(&lab.netns("a"), SocketAddrV4::new(Ipv4Addr::new(10, 200, 77, 1), 7), Duration::from_secs(4));
    let r = lab.ping_from_client(Lab::SUBNET_HOST_A, &["--udp", "7", "--count", "50", "--wait-reply-ms", "1000"]);
    assert_eq!(r["mode"], "udp");
    assert_eq!(r["udp_port"], 7);
    assert_eq!((r["pings_sent"].as_u64(), r["pings_lost"].as_u64()), (Some(50), Some(0)), "{r}");
    assert!(echo.join().unwrap() >= 50);

    // Nobody answers on a guest address no VM holds: all lost, and the
    // largest gap is the whole run.
    let r = lab.ping_from_client("10.200.77.99", &["--count", "10", "--timeout-ms", "100"]);
    assert_eq!((r["pings_received"].as_u64(), r["pings_lost"].as_u64()), (Some(0), Some(10)), "{r}");
    assert_eq!(r["max_gap_ms"], r["duration_ms"]);
    assert_eq!(r["rtt_ms_median"], Value::Null);
}

#[test]
fn ping_measures_an_outage() {
    if !root_available("ping_measures_an_outage") {
        return;
    }
    let lab = Lab::up("t4");
    let ns = lab.netns("client");
    let pinger = Command::new(ferry_bin())
        .args(["ping", "--netns", &ns, "--target", Lab::SUBNET_HOST_A, "--duration-ms", "2000", "--interval-ms", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cut host a off the fabric for 500 ms, from 0.7 s into the run, by
    // disabling its uplink's bridge port (instant both ways; a link
    // down/up would add the kernel's up-to-1-s link-event delay).
    let port = |state: &str| {
        let out = Command::new("bridge")
            .args(["-n", &lab.netns("a"), "link", "set", "dev", "uplink", "state", state])
            .output();
        assert!(out.is_ok_and(|o| o.status.success()), "bridge link set state {state}");
    };
    std::thread::sleep(Duration::from_millis(700));
    port("0");
    let cut = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    port("3");
    let outage = cut.elapsed();
    let out = pinger.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("outage of {outage:?}: {r}");
    assert_eq!(r["pings_sent"], 200);
    let lost = r["pings_lost"].as_u64().unwrap();
    let gap = r["max_gap_ms"].as_f64().unwrap();
    let outage_ms = outage.as_secs_f64() * 1e3;
    assert!((40..=70).contains(&lost), "about 50 lost: {r}");
    assert!(
        gap >= outage_ms - 20.0 && gap <= outage_ms + 100.0,
        "max gap {gap} ms for a {outage_ms:.0} ms outage: {r}"
    );
    assert_eq!(r["lost_bursts"], 1, "{r}");
}

#[test]
fn foreign_namespaces_are_never_touched() {
    if !root_available("foreign_namespaces_are_never_touched") {
        return;
    }
    // Someone else's namespace with one of the lab's names: `up` refuses
    // before making anything; `down` refuses and leaves it.
    let lab = Lab { name: ferry_e2e::lab_name("t5") };
    let foreign = HandMadeNetns::add(&lab.netns("a"));
    let ino = foreign.ino();
    let out = lab.lab(&["up"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("network namespace {}-a exists but lab \"{0}\" did not create it", lab.name)),
        "{err}"
    );
    assert_eq!(lab_netns(&lab.name), [lab.netns("a")], "up made nothing");
    assert!(!std::path::Path::new(&format!("/run/ferry-lab/{}.json", lab.name)).exists());
    let s = lab.status();
    assert_eq!(ns_entry(&s, "a")["foreign"], true);
    assert_eq!(ns_entry(&s, "a")["created_by_lab"], false);
    assert_eq!(s["complete"], false);
    let out = lab.lab(&["down"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&lab.netns("a")), "{}", stderr(&out));
    assert_eq!(foreign.ino(), ino, "the foreign namespace is still there, the same one");
    let name = lab.name.clone();
    drop(lab);
    assert_eq!(lab_netns(&name), [format!("{name}-a")]);

    // A namespace of a lab that was replaced behind its back is not its any
    // more (its identity changed): refused too, until it is gone.
    let lab = Lab::up("t6");
    ip(&["netns", "del", &lab.netns("b")]);
    let impostor = HandMadeNetns::add(&lab.netns("b"));
    // Even were its inode number the old one's (the kernel reuses them; the
    // test plays that by writing it into the lab's record), the tag the lab
    // put on its namespaces' loopback tells them apart.
    let record = &format!("/run/ferry-lab/{}.json", lab.name);
    let mut st: Value = serde_json::from_str(&std::fs::read_to_string(record).unwrap()).unwrap();
    st["namespaces"]["b"]["ino"] = impostor.ino().into();
    std::fs::write(record, st.to_string()).unwrap();
    for cmd in [&["up"][..], &["down"][..], &["tap", "add", "b", "tap0"][..]] {
        let out = lab.lab(cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        assert!(
            stderr(&out)
                .contains(&format!("network namespace {}-b exists but lab \"{0}\" did not create it", lab.name)),
            "{}",
            stderr(&out)
        );
    }
    let mut names = lab_netns(&lab.name);
    names.sort();
    assert_eq!(names, ["a", "b", "client", "fabric"].map(|r| lab.netns(r)), "down deleted nothing");
    drop(impostor);
    // With the impostor gone, the lab comes down completely.
    lab.ok(&["down"]);
    assert_eq!(lab_netns(&lab.name), Vec::<String>::new());
}

#[test]
fn down_removes_everything() {
    if !root_available("down_removes_everything") {
        return;
    }
    let lab = Lab::up("t7");
    lab.ok(&["tap", "add", "a", "tap0"]);
    lab.ok(&["tap", "add", "b", "tap0"]);
    // A process left inside host b: reported, not killed, the name deleted.
    let mut sleeper = Command::new(ferry_bin())
        .args(["lab", "exec", "b", "--name", &lab.name, "--", "sleep", "30"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ip(&["netns", "pids", &lab.netns("b")]).contains(&sleeper.id().to_string()) {
        assert!(Instant::now() < deadline, "the sleeper entered t7-b");
        std::thread::sleep(Duration::from_millis(10));
    }
    let report: Value = serde_json::from_str(&lab.ok(&["down"])).unwrap();
    eprintln!("{report:#}");
    let mut deleted: Vec<&str> = report["deleted"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    deleted.sort();
    assert_eq!(deleted, ["a", "b", "client", "fabric"].map(|r| lab.netns(r)));
    let left = report["processes_left"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{report:#}");
    assert_eq!(left[0]["pid"], sleeper.id());
    assert_eq!(left[0]["netns"], lab.netns("b"));
    assert_eq!(left[0]["comm"], "sleep");
    assert!(sleeper.try_wait().unwrap().is_none(), "down kills nothing");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();

    assert_eq!(lab_netns(&lab.name), Vec::<String>::new(), "no t7-* namespace remains");
    assert!(!std::path::Path::new(&format!("/run/ferry-lab/{}.json", lab.name)).exists());
    // Down again is fine, and up after down builds a fresh lab.
    let again: Value = serde_json::from_str(&lab.ok(&["down"])).unwrap();
    assert_eq!(again["deleted"], serde_json::json!([]));
    let s: Value = serde_json::from_str(&lab.ok(&["up"])).unwrap();
    assert_eq!(s["complete"], true);
    assert_eq!(ns_entry(&s, "a")["taps"], serde_json::json!([]), "taps went with the old lab");
    let name = lab.name.clone();
    drop(lab);
    assert_eq!(lab_netns(&name), Vec::<String>::new());
}

#[test]
fn bad_input_is_refused_clearly() {
    if !root_available("bad_input_is_refused_clearly") {
        return;
    }
    let t = Duration::from_secs(10);
    for (args, msg) in [
        (&["lab", "up", "--name", "Bad"][..], "invalid lab name \"Bad\""),
        (&["lab", "up", "--name", "thirteen_char"][..], "longer than 12 characters"),
        (&["lab", "down", "--name", "a-b"][..], "invalid lab name"),
        (&["lab", "exec", "a", "--name", "t8nothere", "--", "true"][..], "lab \"t8nothere\" is not up"),
        (&["lab", "tap", "add", "a", "tap0", "--name", "t8nothere"][..], "lab \"t8nothere\" is not up"),
        (
            &["ping", "--netns", "t8-nonexistent", "--target", "10.200.77.1"][..],
            "network namespace t8-nonexistent does not exist",
        ),
        (&["ping", "--netns", "t8-nonexistent", "--target", "fe80::1"][..], "is not an IPv4 address"),
        (
            &["ping", "--netns", "t8-nonexistent", "--target", "10.200.77.1", "--payload-bytes", "4"][..],
            "--payload-bytes must be between",
        ),
    ] {
        let out = ferry_bounded(args, t);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(msg), "{args:?}: {}", stderr(&out));
    }
    let out =
        ferry_bounded(&["ping", "--netns", "x", "--target", "10.200.77.1", "--count", "5", "--duration-ms", "5"], t);
    assert_eq!(out.status.code(), Some(2), "clap refuses --count with --duration-ms");
    let out = ferry_bounded(&["lab", "exec", "z", "--", "true"], t);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("expected a, b, client or fabric"), "{}", stderr(&out));

    // Not root: both commands say so.
    let dir = TempDir::new("lab-nobody");
    let bin = dir.path().join("ferry");
    std::fs::copy(ferry_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for args in [&["lab", "status"][..], &["ping", "--netns", "ferry-client", "--target", "10.200.77.1"][..]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin)
            .args(args)
            .output()
            .expect("setpriv (util-linux) runs");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("needs root"), "{args:?}: {}", stderr(&out));
    }

    let help = String::from_utf8_lossy(&ferry_bounded(&["ping", "--help"], t).stdout).into_owned();
    for s in [
        "--netns",
        "--target",
        "--interval-ms",
        "--count",
        "--duration-ms",
        "--timeout-ms",
        "--udp",
        "--wait-reply-ms",
        "max_gap_ms",
    ] {
        assert!(help.contains(s), "ping --help mentions {s}");
    }
    let help = String::from_utf8_lossy(&ferry_bounded(&["lab", "--help"], t).stdout).into_owned();
    for s in ["up", "down", "status", "tap", "exec", "10.200.77.0/24"] {
        assert!(help.contains(s), "lab --help mentions {s}");
    }
}
