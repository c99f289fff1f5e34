//! Quarantine on real etcd: three lab hosts with an agent each
//! (`--quarantine-after 2` to keep it short), a VM with a shared-volume
//! disk. A node that goes down twice is quarantined: `ferry cluster
//! status` says so, neither a failover nor a drain places a VM on it (even
//! as the VM's first preferred owner), and `ferry node resume NODE
//! --clear-quarantine` lifts it. The failover on the way is seen in
//! `cluster status` as Restarting while the leader waits for the disk
//! lease (a 6 s disk lease TTL makes that wait long enough to see). Needs
//! root, KVM and etcd; fails without them unless FERRY_NO_KVM=1.

use std::time::{Duration, Instant};

use ferry_e2e::cluster::{vmm_pids, wait_guest, Agent, ClusterLab, VmmReaper};
use ferry_e2e::{kvm_available, run_ferry, TempDir};
use serde_json::Value;

const VM: &str = "qv";
const VM_IP: &str = "10.200.77.31";
const NODES: [&str; 3] = ["a", "b", "c"];

fn flags(vol: &str) -> Vec<&str> {
    vec!["--witness", vol, "--quarantine-after", "2", "--disk-lease-ttl-ms", "6000"]
}

fn idx(node: &str) -> usize {
    NODES.iter().position(|n| *n == node).unwrap()
}

/// Node `node`'s state in `ferry cluster status --json`.
fn node_state(cl: &ClusterLab, node: &str) -> String {
    let s = cl.status();
    let n = s["nodes"].as_array().unwrap().iter().find(|n| n["id"] == node).cloned().unwrap_or_default();
    n["state"].as_str().unwrap_or("absent").to_owned()
}

fn wait_node_state(cl: &ClusterLab, node: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = node_state(cl, node);
        if pred(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "node {node}: {what}; it is {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills -9 every VMM host `node`'s agent started.
fn kill_vmms_of(cl: &ClusterLab, node: &str) {
    let needle = cl.states.join(node).display().to_string();
    for pid in vmm_pids(&cl.states) {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if String::from_utf8_lossy(&cmd).replace('\0', " ").contains(&needle) {
            // SAFETY: SIGKILL to a VMM this test's agent started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn vm_of(status: &Value) -> Value {
    status["vms"].as_array().unwrap().iter().find(|v| v["name"] == VM).cloned().unwrap_or_default()
}

#[test]
fn a_node_down_twice_is_quarantined_until_cleared() {
    let test = "a_node_down_twice_is_quarantined_until_cleared";
    if !kvm_available(test) {
        return;
    }
    let dir = TempDir::new("quarantine");
    let vol = dir.path().join("vol").display().to_string();
    assert!(run_ferry(&["volume", "create", &vol]).status.success());
    let out = run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", "q0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cl = ClusterLab::up("fq2", "a,b,c", "fq", dir.path());
    let _reaper = VmmReaper(cl.states.clone());
    let mut agents: Vec<Agent> = NODES.iter().map(|n| Agent::start(&cl, n, &flags(&vol))).collect();
    cl.wait_nodes_up(3);

    // q fails, h hosts the VM, l leads (a leader going down is not seen
    // going down by itself).
    let leader = cl.status()["leader"].as_str().expect("a leader").to_owned();
    let others: Vec<&str> = NODES.iter().copied().filter(|n| *n != leader).collect();
    let (q, h, l) = (others[0], others[1], leader.as_str());
    eprintln!("leader {l}, quarantined-to-be {q}, VM host {h}");

    let guest = ferry_e2e::guest_elf().display().to_string();
    let disk = format!("csv:{vol}/disks/q0");
    let cmdline = format!("heartbeat_ms=200 ip={VM_IP}");
    let preferred = format!("{q},{l}");
    cl.cli_ok(&[
        "vm",
        "create",
        VM,
        "--kernel",
        &guest,
        "--mem-mib",
        "128",
        "--cmdline",
        &cmdline,
        "--disk",
        &disk,
        "--net",
        "mac=52:54:00:a9:03:01",
        "--preferred-owners",
        &preferred,
    ]);
    cl.cli_ok(&["vm", "start", VM, "--on", h, "--wait"]);
    wait_guest(&cl.console(h, VM));

    // q goes down twice (its agent killed; it holds no VM): quarantined.
    for round in 1..=2 {
        agents[idx(q)].kill9();
        let st = wait_node_state(&cl, q, "seen down", |s| s.starts_with("Down"));
        eprintln!("round {round}: {q} is {st}");
        agents[idx(q)] = Agent::start(&cl, q, &flags(&vol));
        wait_node_state(&cl, q, "registered again", |s| !s.starts_with("Down"));
    }
    assert_eq!(node_state(&cl, q), "Quarantined");
    let human = cl.cli_ok(&["cluster", "status"]);
    assert!(human.lines().any(|line| line.starts_with(q) && line.contains("Quarantined")), "{human}");
    let ev: Value = serde_json::from_str(&cl.cli_ok(&["cluster", "events", "--json"])).unwrap();
    let quarantines: Vec<&Value> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["event"])
        .filter(|e| e["kind"] == "node-quarantined" && e["node"] == q)
        .collect();
    assert_eq!(quarantines.len(), 1, "{ev:#}");

    // h crashes: the VM restarts on l, not on q (its first preferred
    // owner), and is Restarting meanwhile.
    agents[idx(h)].kill9();
    kill_vmms_of(&cl, h);
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let v = vm_of(&cl.status());
        if v["state"] == "Restarting" {
            break v;
        }
        assert!(Instant::now() < deadline, "no Restarting in cluster status: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("cluster status during the failover: {} {}", seen["state"], seen["detail"]);
    assert_eq!(seen["restart"]["from"], h, "{seen:#}");
    assert_eq!(seen["restart"]["to"], l, "planned on the leader's node, not the quarantined {q}: {seen:#}");
    assert!(seen["restart"]["since_unix_ms"].as_u64().is_some(), "{seen:#}");
    let human = cl.cli_ok(&["cluster", "status"]);
    let line = human.lines().find(|line| line.starts_with(VM)).unwrap_or_default().to_owned();
    if line.contains("Restarting") {
        assert!(line.contains(&format!("from {h}")) && line.contains(&format!("to {l}")), "{line}");
    }
    cl.wait_show(VM, "the VM runs on l", |v| v["owner"]["node"] == l && v["status"]["state"] == "Running");
    let v = vm_of(&cl.status());
    assert_eq!(v["state"], "Running", "no longer Restarting once it runs: {v:#}");
    assert!(v.get("restart").is_none(), "{v:#}");

    // h back; a drain of l moves the VM to h, not to q.
    agents[idx(h)] = Agent::start(&cl, h, &flags(&vol));
    wait_node_state(&cl, h, "up again", |s| s == "Up");
    let d: Value = serde_json::from_str(&cl.cli_ok(&["node", "pause", l, "--drain", "--json"])).unwrap();
    assert_eq!(cl.owner(VM).as_deref(), Some(h), "drained to {h}, not the quarantined {q}: {d:#}");
    cl.cli_ok(&["node", "resume", l]);

    // Lifted: q is Up and takes VMs again (a drain of h sends the VM to
    // its first preferred owner).
    let out = cl.cli_ok(&["node", "resume", q, "--clear-quarantine"]);
    assert!(out.contains("quarantine lifted"), "{out}");
    assert_eq!(node_state(&cl, q), "Up");
    let d: Value = serde_json::from_str(&cl.cli_ok(&["node", "pause", h, "--drain", "--json"])).unwrap();
    assert_eq!(cl.owner(VM).as_deref(), Some(q), "placed on {q} again: {d:#}");
    cl.cli_ok(&["node", "resume", h]);
}
