//! Failover on real etcd: three lab hosts, each with an etcd member and an
//! agent (default lease TTLs, the witness on the shared volume), a VM with
//! a shared-volume disk, pinged from the client. A host crashes (every
//! process of it killed -9, its etcd member too), a host is cut off, and
//! two hosts die at once (quorum lost). Needs root, KVM and etcd; fails
//! without them unless FERRY_NO_KVM=1.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::{disk_lease, processes_with, vmm_pids, wait_guest, Agent, ClusterLab, VmmReaper};
use ferry_e2e::{kvm_available, run_ferry, TempDir};
use serde_json::Value;

const VM: &str = "db";
const VM_IP: &str = "10.200.77.30";

/// Kills -9 every VMM host `node`'s agent started.
fn kill_vmms_of(cl: &ClusterLab, node: &str) {
    for pid in vmm_pids(&cl.states) {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let needle = cl.states.join(node).display().to_string();
        if String::from_utf8_lossy(&cmd).replace('\0', " ").contains(&needle) {
            // SAFETY: SIGKILL to a VMM this test's agent started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// The VMMs running VM `VM` on any node, by their API socket.
fn vm_processes(cl: &ClusterLab) -> Vec<(String, u32)> {
    let mut out = vec![];
    for node in ["a", "b", "c"] {
        let sock = cl.states.join(node).join("vms").join(VM).join("api.sock");
        for pid in processes_with(&sock.display().to_string()) {
            out.push((node.to_owned(), pid));
        }
    }
    out
}

fn start_agents(cl: &ClusterLab, vol: &str) -> Vec<Agent> {
    ["a", "b", "c"].iter().map(|n| Agent::start(cl, n, &["--witness", vol])).collect()
}

fn setup(lab: &str, dir: &Path) -> (ClusterLab, String) {
    let vol = dir.join("vol").display().to_string();
    assert!(run_ferry(&["volume", "create", &vol]).status.success());
    let out = run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", "d0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (ClusterLab::up(lab, "a,b,c", "fo", dir), vol)
}

fn create_and_start(cl: &ClusterLab, vol: &str, on: &str) {
    let guest = ferry_e2e::guest_elf().display().to_string();
    let disk = format!("csv:{vol}/disks/d0");
    let cmdline = format!("heartbeat_ms=200 ip={VM_IP}");
    let create = ["vm", "create", VM, "--kernel", &guest, "--mem-mib", "128", "--cmdline", &cmdline, "--disk", &disk];
    let args: Vec<&str> =
        create.into_iter().chain(["--net", "mac=52:54:00:a9:02:01", "--preferred-owners", "b,c"]).collect();
    cl.cli_ok(&args);
    cl.cli_ok(&["vm", "start", VM, "--on", on, "--wait"]);
    wait_guest(&cl.console(on, VM));
    let w = cl.console_command(on, VM, "disk-write 0 64 5", "disk-write");
    assert!(w.starts_with("disk-write ok"), "{w}");
    let p = cl.lab.ping_from_client(VM_IP, &["--count", "20", "--wait-reply-ms", "3000"]);
    assert_eq!(p["pings_lost"], 0, "{p}");
}

/// Pings until the first reply (bounded); returns the time from `since`.
fn first_reply_after(cl: &ClusterLab, since: Instant) -> Duration {
    let p = cl.lab.ping_from_client(VM_IP, &["--count", "5", "--wait-reply-ms", "30000"]);
    assert_eq!(p["warmup_replied"], true, "the VM answers again: {p}");
    since.elapsed() - Duration::from_millis(5 * 10 + 200)
}

fn events(cl: &ClusterLab) -> Vec<Value> {
    let v: Value = serde_json::from_str(&cl.cli_ok(&["cluster", "events", "--json"])).unwrap();
    v.as_array().unwrap().iter().map(|e| e["event"].clone()).collect()
}

#[test]
fn a_crashed_or_cut_off_node_has_its_vm_restarted_elsewhere_once() {
    let test = "a_crashed_or_cut_off_node_has_its_vm_restarted_elsewhere_once";
    if !kvm_available(test) {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("failover");
    let (cl, vol) = setup("fo1", dir.path());
    let _reaper = VmmReaper(cl.states.clone());
    let mut agents = start_agents(&cl, &vol);
    cl.wait_nodes_up(3);
    create_and_start(&cl, &vol, "a");

    // Crash: every process of host a dies at once.
    let crash = Instant::now();
    agents[0].kill9();
    kill_vmms_of(&cl, "a");
    cl.lab.ok(&["etcd", "kill", "a"]);
    let back = first_reply_after(&cl, crash);
    let owner = cl.owner(VM).expect("an owner");
    assert!(owner == "b" || owner == "c", "restarted on b or c, not {owner}");
    eprintln!("crash of a: {VM} answers from {owner} {:.2} s after the crash", back.as_secs_f64());
    assert!(back < Duration::from_secs(15), "restarted within seconds: {back:?}");
    let procs = vm_processes(&cl);
    assert_eq!(procs.len(), 1, "runs on exactly one node: {procs:?}");
    assert_eq!(procs[0].0, owner);
    let v = cl.console_command(&owner, VM, "disk-verify 0 64 5", "disk-verify");
    assert!(v.starts_with("disk-verify ok"), "the disk written before the crash: {v}");
    let lease = disk_lease(&vol, "d0");
    assert_eq!(
        (lease["owner"].as_str(), lease["previous_owner"].as_str()),
        (Some(owner.as_str()), Some("a")),
        "{lease}"
    );
    let h: Value = serde_json::from_str(&cl.cli_ok(&["vm", "history", VM, "--json"])).unwrap();
    let last = &h.as_array().unwrap().last().unwrap()["entry"];
    assert_eq!((last["kind"].as_str(), last["from"].as_str()), (Some("failover"), Some("a")), "{last:#}");
    let f = &last["figures"];
    eprintln!(
        "  detected {} ms after the crash's node lease, fence wait {} ms, restart at {}",
        f["detected_unix_ms"], f["fence_wait_ms"], f["restart_unix_ms"]
    );
    let kinds: Vec<String> = events(&cl).iter().map(|e| e["kind"].as_str().unwrap().to_owned()).collect();
    assert!(kinds.contains(&"node-down".into()) && kinds.contains(&"vm-restarted".into()), "{kinds:?}");

    // a comes back: it runs none of its old VMs.
    cl.lab.ok(&["etcd", "start", "a"]);
    agents[0] = Agent::start(&cl, "a", &["--witness", &vol]);
    cl.wait_nodes_up(3);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm_processes(&cl).len(), 1, "a runs nothing of its old: {:?}", vm_processes(&cl));
    assert_eq!(cl.owner(VM).as_deref(), Some(owner.as_str()));

    // Partition: the owner's host is cut off. It fences itself (its VMM
    // dies) before the VM restarts elsewhere, and never resumes it.
    let cut_node = owner.clone();
    let idx = ["a", "b", "c"].iter().position(|n| *n == cut_node).unwrap();
    let old_pid = vm_processes(&cl)[0].1;
    let cut = Instant::now();
    cl.lab.ok(&["cut", &cut_node]);
    let mut died = None;
    let deadline = cut + Duration::from_secs(30);
    loop {
        if died.is_none() && !Path::new(&format!("/proc/{old_pid}")).exists() {
            died = Some(ferry_e2e::unix_ms_now());
        }
        let lease = disk_lease(&vol, "d0");
        if lease["owner"].as_str().is_some_and(|o| o != cut_node) {
            let taken = lease["updated_unix_ms"].as_u64().unwrap();
            let died = died.expect("the old VMM was dead before its disk was taken over");
            assert!(died <= taken, "the fenced VMM ({died}) stopped before the takeover ({taken})");
            eprintln!("cut {cut_node}: its VMM died {} ms before the takeover", taken - died);
            break;
        }
        assert!(Instant::now() < deadline, "no takeover after the cut: {lease}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let back = first_reply_after(&cl, cut);
    let new_owner = cl.owner(VM).unwrap();
    assert_ne!(new_owner, cut_node);
    eprintln!("cut of {cut_node}: {VM} answers from {new_owner} {:.2} s after the cut", back.as_secs_f64());
    let st = agents[idx].child.wait().unwrap();
    assert_eq!(st.code(), Some(3), "the cut node's agent fenced itself: {}", agents[idx].log());
    let v = cl.console_command(&new_owner, VM, "disk-verify 0 64 5", "disk-verify");
    assert!(v.starts_with("disk-verify ok"), "{v}");
    cl.lab.ok(&["heal", &cut_node]);
    agents[idx] = Agent::start(&cl, &cut_node, &["--witness", &vol]);
    cl.wait_nodes_up(3);
    std::thread::sleep(Duration::from_secs(2));
    let procs = vm_processes(&cl);
    assert_eq!(procs, [(new_owner.clone(), procs[0].1)], "the healed node does not resume the old VM");
    eprintln!("whole test: {:?}", t0.elapsed());
}

#[test]
fn with_quorum_lost_nothing_moves_and_the_survivor_keeps_its_vm() {
    let test = "with_quorum_lost_nothing_moves_and_the_survivor_keeps_its_vm";
    if !kvm_available(test) {
        return;
    }
    let dir = TempDir::new("quorum");
    let (cl, vol) = setup("fo2", dir.path());
    let _reaper = VmmReaper(cl.states.clone());
    let mut agents = start_agents(&cl, &vol);
    cl.wait_nodes_up(3);
    create_and_start(&cl, &vol, "a");

    // One etcd member down: the cluster still moves VMs.
    cl.lab.ok(&["etcd", "kill", "c"]);
    let r: Value = serde_json::from_str(&cl.cli_ok(&["vm", "move", VM, "--to", "b", "--json"])).unwrap();
    assert_eq!(r["ok"], true, "a move with one etcd member down: {r:#}");
    cl.cli_ok(&["vm", "move", VM, "--to", "a"]);
    cl.lab.ok(&["etcd", "start", "c"]);

    // Two hosts die (agents and members): no quorum anywhere.
    let pid = vm_processes(&cl)[0].1;
    agents[1].kill9();
    agents[2].kill9();
    cl.lab.ok(&["etcd", "kill", "b"]);
    cl.lab.ok(&["etcd", "kill", "c"]);
    let p = cl.lab.ping_from_client(VM_IP, &["--duration-ms", "8000", "--interval-ms", "10"]);
    assert!(p["pings_lost"].as_u64().unwrap() < 10, "the survivor's VM keeps answering: {p}");
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "its VMM still runs");
    assert!(agents[0].child.try_wait().unwrap().is_none(), "a's agent did not fence: {}", agents[0].log());
    assert!(agents[0].log().contains("no other node is alive"), "{}", agents[0].log());
    let out = cl.cli(&["vm", "move", VM, "--to", "b", "--no-wait"]);
    assert!(!out.status.success(), "no move starts without quorum");

    // Quorum back: a registers again, its VM never stopped.
    cl.lab.ok(&["etcd", "start", "b"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agents[0].log().contains("registered again") {
        assert!(Instant::now() < deadline, "a re-registers: {}", agents[0].log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the same VMM");
    let v = cl.wait_show(VM, "a reports db again", |v| v["status"]["node"] == "a" && v["status"]["state"] == "Running");
    assert_eq!(v["owner"]["node"], "a");
}

#[test]
fn a_hung_agent_is_fenced_by_its_watchdog_and_its_vm_restarts_elsewhere_once() {
    let test = "a_hung_agent_is_fenced_by_its_watchdog_and_its_vm_restarts_elsewhere_once";
    if !kvm_available(test) {
        return;
    }
    let dir = TempDir::new("watchdog");
    let (cl, vol) = setup("fq1", dir.path());
    let _reaper = VmmReaper(cl.states.clone());
    // Test-only hook: a's main loop blocks its thread for good once this
    // file exists, as a loop stuck in a syscall would.
    let hang = dir.path().join("hang-a").display().to_string();
    let mut agents: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let env: &[(&str, &str)] = if *n == "a" { &[("FERRY_AGENT_TEST_HANG_FILE", &hang)] } else { &[] };
            Agent::start_env(&cl, n, &ferry_e2e::ferry_bin(), &["--witness", &vol], env)
        })
        .collect();
    cl.wait_nodes_up(3);
    create_and_start(&cl, &vol, "a");
    let old_pid = vm_processes(&cl)[0].1;

    std::fs::write(&hang, "").unwrap();
    let started = Instant::now();
    let hung_at = loop {
        let log = agents[0].log();
        if let Some(rest) = log.split("the main loop hangs now (at_unix_ms=").nth(1) {
            break rest.split(')').next().unwrap().parse::<u64>().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the hook did not fire: {log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let died = loop {
        if !Path::new(&format!("/proc/{old_pid}")).exists() {
            break ferry_e2e::unix_ms_now();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the hung agent's VMM still runs");
        std::thread::sleep(Duration::from_millis(20));
    };
    // SIGKILL to gone takes a VMM about a second here (its guest memory
    // is torn down): the watchdog's own timing is checked from its line.
    let fence_ms = died - hung_at;
    eprintln!("hung agent: its VMM gone {fence_ms} ms after the hang");
    assert!(fence_ms < 6000, "fenced by the watchdog: {fence_ms} ms");
    let code = loop {
        if let Some(st) = agents[0].child.try_wait().unwrap() {
            break st.code();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the hung agent did not exit: {}", agents[0].log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(4), "exit status 4 (watchdog): {}", agents[0].log());
    let log = agents[0].log();
    let line = log.lines().find(|l| l.contains("watchdog:")).unwrap_or_else(|| panic!("no watchdog line: {log}"));
    eprintln!("  {line}");
    // The deadline at the default 3 s TTL is 2.4 s since the last pet (one
    // every 240 ms, looked at as often): fired after at most 2.64 s,
    // plus this busy machine's scheduling.
    let stalled: f64 =
        line.split("has not run for ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!((2.4..3.2).contains(&stalled), "fired at the deadline: {line}");

    // Restarted elsewhere, once, after the old VMM died.
    let back = first_reply_after(&cl, started);
    let owner = cl.owner(VM).expect("an owner");
    assert!(owner == "b" || owner == "c", "restarted on b or c, not {owner}");
    eprintln!("hung agent: {VM} answers from {owner} {:.2} s after the hang", back.as_secs_f64());
    let lease = disk_lease(&vol, "d0");
    assert_eq!(lease["owner"].as_str(), Some(owner.as_str()), "{lease}");
    let taken = lease["updated_unix_ms"].as_u64().unwrap();
    assert!(died <= taken, "the VMM died ({died}) before its disk was taken over ({taken})");
    let procs = vm_processes(&cl);
    assert_eq!(procs.len(), 1, "runs on exactly one node: {procs:?}");
    let h: Value = serde_json::from_str(&cl.cli_ok(&["vm", "history", VM, "--json"])).unwrap();
    let failovers: Vec<&Value> =
        h.as_array().unwrap().iter().map(|e| &e["entry"]).filter(|e| e["kind"] == "failover").collect();
    assert_eq!(failovers.len(), 1, "restarted exactly once: {h:#}");
    assert_eq!(failovers[0]["from"], "a");
    let down = events(&cl).into_iter().find(|e| e["kind"] == "node-down" && e["node"] == "a");
    if let Some(d) = down {
        let at = d["at_unix_ms"].as_u64().unwrap();
        eprintln!("  a seen down {} ms after its VMM died", at as i64 - died as i64);
    }
    let v = cl.console_command(&owner, VM, "disk-verify 0 64 5", "disk-verify");
    assert!(v.starts_with("disk-verify ok"), "{v}");
}
