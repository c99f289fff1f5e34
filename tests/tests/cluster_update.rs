//! Cluster-aware updating on real etcd: three lab hosts with agents run
//! from a copy of the `ferry` binary, four HA VMs (two on a, two on b),
//! each pinged by the update throughout every run. In turn:
//! - `--preview` prints the plan for each failback mode and changes nothing;
//! - an update whose command (run by each node's agent, in its host)
//!   replaces the binary goes node by node, restarts every agent on the
//!   new binary, moves every VM only live (none stopped) and brings each
//!   back to its preferred owner, losing few pings per move;
//! - a second run while one is in progress is refused;
//! - a command failing on b (which runs VMs) stops the run with b paused
//!   and empty, its output in the report, and a and c untouched;
//! - `--max-failed-nodes 1` goes on past a failure on a;
//! - a command past `--command-timeout` is killed and fails its node;
//! - an update that breaks c's binary fails c's health wait within
//!   `--health-timeout`, and with c down the next run is refused (quorum).
//!
//! Needs root, KVM and etcd; fails without them unless FERRY_NO_KVM=1.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::{wait_guest, Agent, ClusterLab, VmmReaper};
use ferry_e2e::{ferry_bin, kvm_available, run_ferry, Lab, TempDir};
use serde_json::Value;

/// app0 and app1 start on a (preferred a, b); app2 and app3 on b
/// (preferred b, c).
const VMS: usize = 4;

/// Pings lost while one move is under way (pinged every 10 ms by the
/// update). The goal is 1 per move; it is not met on this 2-core
/// machine. A move loses about its downtime's worth of pings and nothing
/// more (none were lost outside moves), and with four polling guests,
/// three etcd members, two switchovers at a time and other engineers'
/// builds (load average 7-8), a switchover took 18-205 ms: 2-6 pings lost
/// per move typically, 20 at worst in the first runs (each run prints
/// every move's figures). So each move is held to what its own downtime
/// explains, plus [`PINGS_LOST_OVER_DOWNTIME`] (the announcement, a late
/// reply), and to [`PINGS_LOST_PER_MOVE`] (300 ms, the downtime target
/// QEMU and Cloud Hypervisor default to) whatever its downtime.
const PINGS_LOST_PER_MOVE: u64 = 30;
const PINGS_LOST_OVER_DOWNTIME: u64 = 3;
const PING_INTERVAL_MS: f64 = 10.0;

fn vm_ip(i: usize) -> String {
    format!("10.200.77.{}", 40 + i)
}

fn home(i: usize) -> &'static str {
    if i < 2 {
        "a"
    } else {
        "b"
    }
}

/// The inode of the binary a process runs (even once replaced on disk).
fn exe_inode(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/exe")).map(|m| m.ino()).unwrap_or(0)
}

/// How many processes run exactly `cmdline` (arguments joined by spaces).
fn processes_running(cmdline: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).trim_end_matches('\0').replace('\0', " ") == cmdline)
        .count()
}

fn node_state(s: &Value, id: &str) -> String {
    let n = s["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id);
    n.map_or("(absent)".into(), |n| n["state"].as_str().unwrap_or("").to_owned())
}

fn history(cl: &ClusterLab, vm: &str) -> Vec<Value> {
    let h: Value = serde_json::from_str(&cl.cli_ok(&["vm", "history", vm, "--json"])).unwrap();
    h.as_array().unwrap().iter().map(|e| e["entry"].clone()).collect()
}

/// `--ping app0=IP,...` for every VM.
fn ping_arg() -> String {
    (0..VMS).map(|i| format!("app{i}={}", vm_ip(i))).collect::<Vec<_>>().join(",")
}

fn node_report<'a>(r: &'a Value, node: &str) -> &'a Value {
    r["nodes"].as_array().unwrap().iter().find(|n| n["node"] == node).unwrap_or_else(|| panic!("no {node}: {r:#}"))
}

/// Prints every move's figures and checks the pings lost during each.
fn check_moves(what: &str, r: &Value) -> usize {
    let moves: Vec<&Value> =
        r["nodes"].as_array().unwrap().iter().flat_map(|n| n["moves"].as_array().unwrap()).collect();
    for m in &moves {
        let f = &m["figures"];
        eprintln!(
            "{what}: {} {} -> {} ({}, {}): downtime {:.1} ms, total {:.0} ms, pings lost {} of {}",
            m["vm"].as_str().unwrap(),
            m["from"].as_str().unwrap(),
            m["to"].as_str().unwrap(),
            f["reason"].as_str().unwrap_or("?"),
            m["mode"].as_str().unwrap(),
            f["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            f["total_ms"].as_f64().unwrap_or(f64::NAN),
            f["pings_lost"],
            f["pings_sent"],
        );
        assert_eq!((m["ok"].as_bool(), m["mode"].as_str()), (Some(true), Some("live")), "{what}: {m:#}");
        assert!(f["pings_sent"].as_u64().unwrap() > 0, "{what}: the VM was pinged during its move: {m:#}");
        let lost = f["pings_lost"].as_u64().unwrap();
        let explained = (f["downtime_ms"].as_f64().unwrap() / PING_INTERVAL_MS).ceil() as u64;
        assert!(
            lost <= (explained + PINGS_LOST_OVER_DOWNTIME).min(PINGS_LOST_PER_MOVE),
            "{what}: {lost} pings lost, more than the downtime explains ({explained} + \
             {PINGS_LOST_OVER_DOWNTIME}) or past {PINGS_LOST_PER_MOVE}: {m:#}"
        );
    }
    for p in r["pings"].as_array().unwrap() {
        assert!(p["error"].is_null(), "{what}: {p:#}");
        eprintln!(
            "{what}: {} pinged: {} of {} lost, {} during its moves",
            p["vm"], p["lost"], p["sent"], p["lost_during_moves"]
        );
    }
    moves.len()
}

#[test]
fn an_update_runs_node_by_node_restarts_agents_and_brings_vms_home() {
    let test = "an_update_runs_node_by_node_restarts_agents_and_brings_vms_home";
    if !kvm_available(test) {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("update");
    let vol = dir.path().join("vol").display().to_string();
    assert!(run_ferry(&["volume", "create", &vol]).status.success());
    let bin = dir.path().join("bin/ferry");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(ferry_bin(), &bin).unwrap();
    let cl = ClusterLab::up("up1", "a,b,c", "upd", dir.path());
    let _reaper = VmmReaper(cl.states.clone());
    // With the volume as witness directory, each agent's health checks
    // include writing to it.
    let mut agents: Vec<Agent> =
        ["a", "b", "c"].iter().map(|n| Agent::start_with(&cl, n, &bin, &["--witness", &vol])).collect();
    cl.wait_nodes_up(3);
    let original = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&bin).unwrap().ino()
    };
    assert!(agents.iter().all(|a| exe_inode(a.child.id()) == original));
    let guest = ferry_e2e::guest_elf().display().to_string();
    for i in 0..VMS {
        let name = format!("app{i}");
        let d = format!("d{i}");
        assert!(run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", &d])
            .status
            .success());
        let (disk, mac, cmdline) = (
            format!("csv:{vol}/disks/{d}"),
            format!("mac=52:54:00:a9:03:{i:02x}"),
            format!("heartbeat_ms=200 ip={}", vm_ip(i)),
        );
        let preferred = if home(i) == "a" { "a,b" } else { "b,c" };
        let create = ["vm", "create", &name, "--kernel", &guest, "--mem-mib", "128", "--cmdline", &cmdline];
        let args: Vec<&str> =
            create.into_iter().chain(["--disk", &disk, "--net", &mac, "--preferred-owners", preferred]).collect();
        cl.cli_ok(&args);
        cl.cli_ok(&["vm", "start", &name, "--on", home(i), "--wait"]);
        wait_guest(&cl.console(home(i), &name));
    }
    let owners = || (0..VMS).map(|i| cl.owner(&format!("app{i}")).unwrap_or_default()).collect::<Vec<_>>();
    let homes: Vec<String> = (0..VMS).map(|i| home(i).to_owned()).collect();

    // --preview: the plan, by failback mode, and nothing changes.
    let out = cl.cli_ok(&["cluster", "update", "--preview"]);
    eprintln!("--- ferry cluster update --preview\n{out}---");
    for want in [
        "1. node a (others up: quorum kept)",
        "app0: a -> b, back to a after its update",
        "app2: b -> c, back to b after its update",
        "3. node c",
        "nothing was changed",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    let out = cl.cli_ok(&["cluster", "update", "--preview", "--failback", "none"]);
    assert!(out.contains("app1: a -> b, stays on b (no failback)"), "{out}");
    let out = cl.cli_ok(&["cluster", "update", "--preview", "--failback", "policy", "--nodes", "b"]);
    assert!(out.contains("app3: b -> c, back to b after its update (its first preferred owner)"), "{out}");
    assert_eq!(owners(), homes);
    assert!(["a", "b", "c"].iter().all(|n| node_state(&cl.status(), n) == "Up"));

    // The update: each node's agent runs the command in its host (it sees
    // its host's address), which notes the node and replaces the binary.
    let markers = dir.path().join("markers");
    let cmd = format!(
        "echo $FERRY_NODE >> {m} && ip -4 -o addr show && cp {b} {b}.new && mv {b}.new {b}",
        m = markers.display(),
        b = bin.display()
    );
    let report = dir.path().join("report");
    let t = Instant::now();
    let r: Value = serde_json::from_str(&cl.cli_ok(&[
        "cluster",
        "update",
        "--run",
        &cmd,
        "--failback",
        "immediate",
        "--ping",
        &ping_arg(),
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let moves = check_moves("update", &r);
    eprintln!(
        "update of 3 nodes: {:.1} s ({:.1} s in the report), {moves} moves, {} pings lost in all, at most {} in one move",
        t.elapsed().as_secs_f64(),
        r["total_ms"].as_f64().unwrap() / 1000.0,
        r["pings_lost"],
        r["pings_lost_max_per_move"]
    );
    assert_eq!((r["state"].as_str(), r["nodes_updated"].as_u64()), (Some("finished"), Some(3)), "{r:#}");
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "a\nb\nc\n", "every node once, in order");
    for n in ["a", "b", "c"] {
        let nr = node_report(&r, n);
        assert_eq!(nr["command_state"], "exited", "{nr:#}");
        let out = nr["command_output"].as_str().unwrap();
        assert!(out.contains(&format!("inet {}/", Lab::host_ip(n))), "node {n}'s command ran in its host: {out}");
        let health = nr["health"].as_array().unwrap();
        let checks: Vec<&str> = health.iter().map(|c| c["check"].as_str().unwrap()).collect();
        assert_eq!(checks, ["kvm", "dirty-logging", "memory", "vm-bridge", "cluster-key", "volume", "vms"]);
        assert!(health.iter().all(|c| c["ok"] == true), "{nr:#}");
        for f in ["drain_ms", "update_ms", "healthy_ms", "total_ms"] {
            assert!(nr[f].as_f64().unwrap() > 0.0, "{f}: {nr:#}");
        }
    }
    for a in &agents {
        assert_ne!(exe_inode(a.child.id()), original, "agent {} restarted on the new binary", a.node);
        assert!(a.log().contains("restarting as asked"), "{}", a.log());
    }
    // Every VM back on its preferred owner, having moved only live: out
    // and back, never stopped or restarted.
    assert_eq!(owners(), homes);
    assert_eq!(moves, 2 * VMS, "{r:#}");
    for i in 0..VMS {
        let kinds: Vec<String> =
            history(&cl, &format!("app{i}")).iter().map(|e| e["kind"].as_str().unwrap().to_owned()).collect();
        assert_eq!(kinds, ["created", "started", "live_move", "live_move"], "app{i}: out and back, live");
    }
    // The new owner's agent reports a VM it took over on its next pass:
    // until then its state reads Unknown.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cl.status();
        let vms = status["vms"].as_array().unwrap().clone();
        if vms.iter().all(|v| v["state"] == "Running") {
            break;
        }
        let late: Vec<&Value> = vms.iter().filter(|v| v["state"] != "Running").collect();
        assert!(Instant::now() < deadline, "every VM reports Running: {late:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let html = std::fs::read_to_string(report.join("update-report.html")).unwrap();
    assert!(html.contains("<table>") && !html.contains("http"), "an offline HTML report");
    assert!(html.contains("<th>pings lost</th>") && html.contains("Command output"), "{html}");
    // Printed for the README's excerpt.
    eprintln!("--- update-report.json\n{}\n---", std::fs::read_to_string(report.join("update-report.json")).unwrap());

    // A second run while one is in progress is refused.
    let slow = cl.cli_spawn(&["cluster", "update", "--nodes", "c", "--run", "sleep 4"]);
    std::thread::sleep(Duration::from_millis(1500));
    let e = cl.cli_refused(&["cluster", "update", "--run", "true"]);
    assert!(e.contains("already running"), "{e}");
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A failing command on b, which runs app2 and app3: the run stops with
    // b paused and empty, and a and c untouched afterwards.
    std::fs::write(&markers, "").unwrap();
    let cmd = format!(
        "echo $FERRY_NODE >> {m}; if [ $FERRY_NODE = b ]; then echo 'E: <dpkg> was interrupted' >&2; exit 3; fi",
        m = markers.display()
    );
    assert_eq!(owners(), homes, "b runs VMs before the run");
    let report = dir.path().join("report-failed");
    let restarts_before: Vec<usize> = agents.iter().map(|a| a.log().matches("restarting as asked").count()).collect();
    let out = cl.cli(&[
        "cluster",
        "update",
        "--run",
        &cmd,
        "--ping",
        &ping_arg(),
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let after_failure: Vec<(String, usize)> =
        (0..VMS).map(|i| (cl.owner(&format!("app{i}")).unwrap(), history(&cl, &format!("app{i}")).len())).collect();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_moves("failed on b", &r);
    assert_eq!((r["state"].as_str(), r["nodes_failed"].as_u64()), (Some("failed"), Some(1)), "{r:#}");
    let b = node_report(&r, "b");
    assert_eq!(b["ok"], false);
    assert_eq!(b["error"], "the update command failed (exit status 3)", "{b:#}");
    assert!(b["command_output"].as_str().unwrap().contains("E: <dpkg> was interrupted"), "{b:#}");
    assert_eq!(b["moves"].as_array().unwrap().len(), 2, "b was drained of app2 and app3 first: {b:#}");
    assert!(r["nodes"].as_array().unwrap().iter().all(|n| n["node"] != "c"), "c never started: {r:#}");
    let html = std::fs::read_to_string(report.join("update-report.html")).unwrap();
    assert!(html.contains("<td>b</td><td>FAILED</td>") && html.contains("E: &lt;dpkg&gt; was interrupted"), "{html}");
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "a\nb\n", "c's command never ran");
    // Nothing moves after the failure; a and c stay up with every VM running.
    std::thread::sleep(Duration::from_secs(2));
    let s = cl.status();
    assert_eq!(["a", "b", "c"].map(|n| node_state(&s, n)), ["Up", "Paused", "Up"].map(String::from), "{s:#}");
    for v in s["vms"].as_array().unwrap() {
        assert_ne!(v["owner"], "b", "b is empty: {s:#}");
        assert_eq!(v["state"], "Running", "{v:#}");
    }
    let now: Vec<(String, usize)> =
        (0..VMS).map(|i| (cl.owner(&format!("app{i}")).unwrap(), history(&cl, &format!("app{i}")).len())).collect();
    assert_eq!(now, after_failure, "nothing moved after the failure");
    let restarts: Vec<usize> = agents.iter().map(|a| a.log().matches("restarting as asked").count()).collect();
    assert_eq!(restarts, [restarts_before[0] + 1, restarts_before[1], restarts_before[2]], "only a's agent restarted");
    cl.cli_ok(&["node", "resume", "b", "--failback", "immediate"]);
    assert_eq!(owners(), homes);

    // --max-failed-nodes 1: a fails, the run goes on with b and c.
    std::fs::write(&markers, "").unwrap();
    let cmd = format!("echo $FERRY_NODE >> {m}; test $FERRY_NODE != a", m = markers.display());
    let out = cl.cli(&["cluster", "update", "--run", &cmd, "--max-failed-nodes", "1", "--ping", &ping_arg(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_moves("max-failed-nodes 1", &r);
    let results: Vec<(&str, bool)> =
        r["nodes"].as_array().unwrap().iter().map(|n| (n["node"].as_str().unwrap(), n["ok"] == true)).collect();
    assert_eq!(results, [("a", false), ("b", true), ("c", true)], "{r:#}");
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "a\nb\nc\n");
    assert_eq!(node_state(&cl.status(), "a"), "Paused");
    cl.cli_ok(&["node", "resume", "a", "--failback", "immediate"]);
    assert_eq!(owners(), homes);

    // A command past --command-timeout is killed with what it started, and
    // its node fails.
    let out = cl.cli(&[
        "cluster",
        "update",
        "--nodes",
        "c",
        "--run",
        "echo started; sleep 29.7",
        "--command-timeout",
        "1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = node_report(&r, "c");
    assert_eq!(c["error"], "the update command ran past 1 s and was killed", "{c:#}");
    assert_eq!((c["command_state"].as_str(), c["command_output"].as_str()), (Some("timed_out"), Some("started\n")));
    assert!(c["update_ms"].as_f64().unwrap() < 10_000.0, "{c:#}");
    assert_eq!(processes_running("sleep 29.7"), 0, "the command's sleep was killed too");
    assert_eq!(node_state(&cl.status(), "c"), "Paused");
    cl.cli_ok(&["node", "resume", "c"]);

    // An update that breaks c's binary: c's agent cannot come back, and the
    // run fails c within --health-timeout, c paused and empty.
    let broken = dir.path().join("bin/broken");
    std::fs::write(&broken, "#!/bin/sh\necho broken ferry >&2\nexit 1\n").unwrap();
    let cmd = format!("chmod +x {k} && cp {k} {b}.new && mv {b}.new {b}", k = broken.display(), b = bin.display());
    let t = Instant::now();
    let out = cl.cli(&["cluster", "update", "--nodes", "c", "--run", &cmd, "--health-timeout", "5", "--json"]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = node_report(&r, "c");
    assert_eq!(c["error"], "node c's agent did not come back within 5 s", "{c:#}");
    let healthy_ms = c["healthy_ms"].as_f64().unwrap();
    assert!((5000.0..8000.0).contains(&healthy_ms), "bounded by --health-timeout: {healthy_ms} ms");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(agents[2].child.try_wait().unwrap().map(|s| s.code()), Some(Some(1)), "c's agent ran the broken binary");

    // With c down, an update is refused before it changes anything.
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_state(&cl.status(), "c") != "Down" {
        assert!(Instant::now() < deadline, "c's lease expires");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = cl.cli_ok(&["cluster", "update", "--preview", "--nodes", "a"]);
    assert!(out.contains("REFUSED: node(s) c down"), "{out}");
    std::fs::write(&markers, "").unwrap();
    let cmd = format!("echo $FERRY_NODE >> {m}", m = markers.display());
    let e = cl.cli_refused(&["cluster", "update", "--nodes", "a,b", "--run", &cmd]);
    assert!(e.contains("refusing to update: node(s) c down"), "{e}");
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "");
    let s = cl.status();
    assert_eq!(["a", "b"].map(|n| node_state(&s, n)), ["Up", "Up"].map(String::from), "{s:#}");
    assert_eq!(owners(), homes);
    assert_eq!(s["update"]["running"], false, "the lock was never taken: {s:#}");
    agents.truncate(2);
    assert!(Path::new(&report).exists());
    eprintln!("whole test: {:?}", t0.elapsed());
}
