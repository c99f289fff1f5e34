//! Cluster-aware updating on real etcd: three lab hosts with agents run
//! from a copy of the `ferry` binary, two HA VMs pinged throughout. The
//! update replaces that binary on every node in turn; a failing command
//! stops the run; --preview changes nothing; a second run is refused.
//! Needs root, KVM and etcd; fails without them unless FERRY_NO_KVM=1.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::{wait_guest, Agent, ClusterLab, VmmReaper};
use ferry_e2e::{ferry_bin, kvm_available, run_ferry, TempDir};
use serde_json::Value;

const VMS: usize = 2;

fn vm_ip(i: usize) -> String {
    format!("10.200.77.{}", 40 + i)
}

/// The inode of the binary a process runs (even once replaced on disk).
fn exe_inode(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/exe")).map(|m| m.ino()).unwrap_or(0)
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
    let agents: Vec<Agent> = ["a", "b", "c"].iter().map(|n| Agent::start_with(&cl, n, &bin, &[])).collect();
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
        let create = ["vm", "create", &name, "--kernel", &guest, "--mem-mib", "128", "--cmdline", &cmdline];
        let args: Vec<&str> =
            create.into_iter().chain(["--disk", &disk, "--net", &mac, "--preferred-owners", "a,b"]).collect();
        cl.cli_ok(&args);
        cl.cli_ok(&["vm", "start", &name, "--on", "a", "--wait"]);
        wait_guest(&cl.console("a", &name));
    }

    // --preview: the plan, and nothing changes.
    let out = cl.cli_ok(&["cluster", "update", "--preview"]);
    eprintln!("--- ferry cluster update --preview\n{out}---");
    assert!(out.contains("1. node a") && out.contains("app0: a -> b") && out.contains("nothing was changed"), "{out}");
    assert_eq!(cl.owner("app0").as_deref(), Some("a"));

    // The update: a marker per node, and a new copy of the binary.
    let markers = dir.path().join("markers");
    let cmd = format!(
        "echo $FERRY_NODE >> {m} && cp {b} {b}.new && mv {b}.new {b}",
        m = markers.display(),
        b = bin.display()
    );
    let pings: Vec<_> = (0..VMS)
        .map(|i| {
            let lab = ferry_e2e::Lab { name: cl.lab.name.clone() };
            let ip = vm_ip(i);
            std::thread::spawn(move || {
                let v = lab.ping_from_client(&ip, &["--duration-ms", "25000", "--interval-ms", "10"]);
                std::mem::forget(lab);
                v
            })
        })
        .collect();
    let report = dir.path().join("report");
    let t = Instant::now();
    let r: Value = serde_json::from_str(&cl.cli_ok(&[
        "cluster",
        "update",
        "--run",
        &cmd,
        "--lab",
        &cl.lab.name,
        "--failback",
        "immediate",
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    eprintln!("update of 3 nodes: {:.1} s, {} moves", t.elapsed().as_secs_f64(), r["moves"]);
    assert_eq!((r["state"].as_str(), r["nodes_updated"].as_u64()), (Some("finished"), Some(3)), "{r:#}");
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "a\nb\nc\n", "every node once, in order");
    for a in &agents {
        assert_ne!(exe_inode(a.child.id()), original, "agent {} restarted on the new binary", a.node);
        assert!(a.log().contains("restarting as asked"), "{}", a.log());
    }
    for i in 0..VMS {
        assert_eq!(cl.owner(&format!("app{i}")).as_deref(), Some("a"), "app{i} back on its preferred owner");
    }
    let moves: Vec<&Value> =
        r["nodes"].as_array().unwrap().iter().flat_map(|n| n["moves"].as_array().unwrap()).collect();
    assert!(moves.iter().all(|m| m["ok"] == true), "{r:#}");
    let per_vm_moves = moves.len() / VMS;
    for (i, h) in pings.into_iter().enumerate() {
        let p = h.join().unwrap();
        eprintln!("app{i}: {} of {} pings lost over {per_vm_moves} moves", p["pings_lost"], p["pings_sent"]);
        // As in cluster_moves.rs: the goal is 1 per move; held to 10 here.
        assert!(p["pings_lost"].as_u64().unwrap() <= 10 * per_vm_moves as u64, "at most 10 lost pings per move: {p}");
    }
    let html = std::fs::read_to_string(report.join("update-report.html")).unwrap();
    assert!(html.contains("<table>") && !html.contains("http"), "an offline HTML report");
    // Printed for the README's excerpt.
    eprintln!("--- update-report.json\n{}\n---", std::fs::read_to_string(report.join("update-report.json")).unwrap());

    // A second run while one is in progress is refused.
    let slow = cl.cli_spawn(&["cluster", "update", "--nodes", "c", "--run", "sleep 4", "--lab", &cl.lab.name]);
    std::thread::sleep(Duration::from_millis(1500));
    let e = cl.cli_refused(&["cluster", "update", "--run", "true", "--lab", &cl.lab.name]);
    assert!(e.contains("already running"), "{e}");
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A failing command on b stops the run with b paused and empty.
    std::fs::write(&markers, "").unwrap();
    let cmd = format!("echo $FERRY_NODE >> {m} && test $FERRY_NODE != b", m = markers.display());
    let out = cl.cli(&["cluster", "update", "--run", &cmd, "--lab", &cl.lab.name, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["state"], "failed", "{r:#}");
    let b = r["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "b").unwrap();
    assert_eq!(b["ok"], false);
    assert!(b["error"].as_str().unwrap().contains("update command failed"), "{b:#}");
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "a\nb\n", "c untouched");
    let s = cl.status();
    let state = |id: &str| s["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap()["state"].clone();
    assert_eq!(state("b"), "Paused");
    assert_eq!(state("c"), "Up");
    for v in s["vms"].as_array().unwrap() {
        assert_ne!(v["owner"], "b", "b is empty: {s:#}");
    }
    assert!(Path::new(&report).exists());
    eprintln!("whole test: {:?}", t0.elapsed());
}
