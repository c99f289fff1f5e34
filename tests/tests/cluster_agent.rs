//! The node agent against real etcd: three lab hosts with one etcd member
//! and one `ferry node run` each, a real shared volume, real taps on each
//! host's br0 and real `ferry run` VMMs booting the test guest, driven by
//! the `ferry vm` commands from the lab's client namespace. Needs root,
//! KVM and etcd; fails without them unless FERRY_NO_KVM=1.

use serde_json::Value;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::{disk_lease, processes_with, wait_guest, Agent, ClusterLab, VmmReaper};
use ferry_e2e::{kvm_available, run_ferry, TempDir};

const GUEST_IP: &str = "10.200.77.10";
const AGENT_FLAGS: [&str; 4] = ["--lease-ttl-ms", "3000", "--disk-lease-ttl-ms", "3000"];

#[test]
fn agents_run_ha_vms_from_etcd_and_a_restarted_agent_adopts_its_vmm() {
    let test = "agents_run_ha_vms_from_etcd_and_a_restarted_agent_adopts_its_vmm";
    if !kvm_available(test) {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("agent");
    let vol = dir.path().join("vol").display().to_string();
    let out = run_ferry(&["volume", "create", &vol]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", "d0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plain = ferry_e2e::disk_image(dir.path(), "plain.img", 1);

    let cl = ClusterLab::up("ag1", "a,b,c", "agt", dir.path());
    let (lab, states) = (&cl.lab, cl.states.clone());
    let _reaper = VmmReaper(states.clone());
    let mut agents: Vec<Agent> = ["a", "b", "c"].iter().map(|n| Agent::start(&cl, n, &AGENT_FLAGS)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = cl.status();
        let up = s["nodes"].as_array().unwrap().iter().filter(|n| n["state"] == "Up").count();
        if up == 3 {
            let a = &s["nodes"][0];
            assert_eq!(a["id"], "a");
            assert!(a["offers"]["mem_free_mib"].as_u64().unwrap() > 0, "{a}");
            assert_eq!(a["offers"]["vm_bridge"], "br0");
            assert!(a["ferry_version"].is_string());
            break;
        }
        assert!(Instant::now() < deadline, "3 agents up: {s:#}\n{}", agents[0].log());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("lab and 3 agents up after {:?}", t0.elapsed());

    let guest = ferry_e2e::guest_elf().display().to_string();
    let cmdline = format!("heartbeat_ms=200 ip={GUEST_IP}");
    let disk = format!("csv:{vol}/disks/d0");
    let create = |name: &str, disk: &str| {
        vec![
            "vm".to_owned(),
            "create".into(),
            name.into(),
            "--kernel".into(),
            guest.clone(),
            "--mem-mib".into(),
            "128".into(),
            "--cmdline".into(),
            cmdline.clone(),
            "--disk".into(),
            disk.into(),
            "--net".into(),
            "mac=52:54:00:a9:00:01".into(),
            "--preferred-owners".into(),
            "a,b".into(),
        ]
    };
    let args = create("web", &disk);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cl.cli_ok(&args);

    // Bad input: one clear line, exit 1.
    let e = cl.cli_refused(&args);
    assert!(e.contains("VM web already exists"), "{e}");
    let bad = create("other", plain.to_str().unwrap());
    let e = cl.cli_refused(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("not on a shared volume"), "{e}");
    let e = cl.cli_refused(&["vm", "start", "nosuch"]);
    assert!(e.contains("no VM named nosuch"), "{e}");
    let e = cl.cli_refused(&["vm", "start", "web", "--on", "zz"]);
    assert!(e.contains("unknown node zz"), "{e}");
    let e = cl.cli_refused(&["vm", "show", "nosuch"]);
    assert!(e.contains("no VM named nosuch"), "{e}");

    // Start: its first preferred owner, a.
    let t = Instant::now();
    let out = cl.cli_ok(&["vm", "start", "web", "--wait"]);
    assert!(out.contains("running on node a"), "{out}");
    eprintln!("vm start --wait: {:?}", t.elapsed());
    let s = cl.status();
    let web = &s["vms"][0];
    assert_eq!(
        (web["name"].as_str(), web["owner"].as_str(), web["state"].as_str()),
        (Some("web"), Some("a"), Some("Running")),
        "{s:#}"
    );
    assert_eq!(cl.taps_on("a").len(), 1, "the agent made the VM's tap on a");
    assert!(cl.taps_on("b").is_empty());
    wait_guest(&states.join("a/vms/web/serial.log"));
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "20"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers on a: {ping}");
    assert_eq!(disk_lease(&vol, "d0")["owner"], "a", "the VMM holds the disk lease as node a");
    let pid = web["pid"].as_u64().unwrap() as u32;
    let sock = states.join("a/vms/web/api.sock").display().to_string();
    assert_eq!(processes_with(&sock), [pid], "one VMM");
    let table = cl.cli_ok(&["vm", "list"]);
    assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("web") && l.contains("Running")), "{table}");

    // kill -9 the agent on a: the VM keeps answering; a new agent adopts it.
    agents[0].kill9();
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10"]);
    assert_eq!(ping["pings_lost"], 0, "the VM outlives its agent: {ping}");
    let t = Instant::now();
    agents[0] = Agent::start(&cl, "a", &AGENT_FLAGS);
    let v = cl.wait_show("web", "the restarted agent adopting web", |v| {
        v["status"]["detail"].as_str().is_some_and(|d| d.contains("re-adopted"))
    });
    eprintln!("restarted agent adopted the VMM after {:?}", t.elapsed());
    assert_eq!(v["status"]["pid"].as_u64(), Some(u64::from(pid)), "the same VMM: {v:#}");
    assert_eq!(v["status"]["state"], "Running");
    assert_eq!(processes_with(&sock), [pid], "still one VMM, not two");
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10"]);
    assert_eq!(ping["pings_lost"], 0, "{ping}");

    // Stop: a clean shutdown, the disk lease released, the tap gone.
    let t = Instant::now();
    let out = cl.cli_ok(&["vm", "stop", "web", "--wait"]);
    assert!(out.contains("stopped"), "{out}");
    eprintln!("vm stop --wait: {:?}", t.elapsed());
    assert!(processes_with(&sock).is_empty(), "the VMM exited");
    assert!(disk_lease(&vol, "d0")["owner"].is_null(), "the disk lease is released: {}", disk_lease(&vol, "d0"));
    assert!(cl.taps_on("a").is_empty(), "the tap is removed: {:?}", cl.taps_on("a"));
    let v = cl.vm_show("web");
    assert!(v["owner"]["node"].is_null() && v["status"].is_null(), "{v:#}");
    let vmm_log = std::fs::read_to_string(states.join("a/vms/web/vmm.log")).unwrap_or_default();
    assert!(vmm_log.contains("VM stopped"), "a clean VMM exit: {vmm_log}");

    let h: Value = serde_json::from_str(&cl.cli_ok(&["vm", "history", "web", "--json"])).unwrap();
    let kinds: Vec<&str> = h.as_array().unwrap().iter().map(|e| e["entry"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "started", "stopped"], "{h:#}");

    // Fencing: node a cut off from the fabric (its etcd member loses the
    // quorum) cannot renew its lease, so its agent kills the VMM and exits
    // before the lease could expire.
    let out = cl.cli_ok(&["vm", "start", "web", "--on", "a", "--wait"]);
    assert!(out.contains("running on node a"), "{out}");
    let pid = cl.vm_show("web")["status"]["pid"].as_u64().unwrap() as u32;
    let cut = Instant::now();
    lab.ok(&["cut", "a"]);
    // Watch both ends from outside: when the agent ends, and when etcd
    // (the other members) lets node a's lease go.
    let deadline = cut + Duration::from_secs(20);
    let (mut fenced, mut down) = (None, None);
    while fenced.is_none() || down.is_none() {
        if fenced.is_none() {
            if let Some(st) = agents[0].child.try_wait().unwrap() {
                fenced = Some((cut.elapsed(), st.code()));
            }
        }
        if down.is_none() {
            let s = cl.status();
            if s["nodes"].as_array().unwrap().iter().any(|n| n["id"] == "a" && n["state"] == "Down") {
                down = Some(cut.elapsed());
            }
        }
        assert!(Instant::now() < deadline, "fenced {fenced:?}, down {down:?}: {}", agents[0].log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let ((fenced_after, code), down_after) = (fenced.unwrap(), down.unwrap());
    assert_eq!(code, Some(3), "fenced: {}", agents[0].log());
    assert!(agents[0].log().contains("fencing"), "{}", agents[0].log());
    assert!(processes_with(&sock).is_empty(), "the VMM {pid} was killed");
    assert!(fenced_after < down_after, "a fences itself ({fenced_after:?}) before its lease is gone ({down_after:?})");
    eprintln!("node a cut: fenced itself after {fenced_after:?}; its lease gone after {down_after:?} (TTL 3 s)");
    lab.ok(&["heal", "a"]);
    eprintln!("whole test: {:?}", t0.elapsed());
    drop(agents);
}
