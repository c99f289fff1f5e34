//! Ctrl-C during `ferry cluster update`, on real etcd: three lab hosts,
//! two HA VMs on node a. SIGINT goes to the update's whole process group
//! (as a terminal sends it) while node a's command runs; the run finishes
//! node a (command, agent restart, failback), stops before b, releases its
//! lock and records "interrupted", and a rerun goes on from b. Node a's
//! command prints 1 MiB on the way, streamed through etcd to the
//! terminal. During the rerun, b's agent is killed (-9) while b's command
//! runs and a new one started: the command runs on, once, and the new
//! agent records its end.
//! Needs root, KVM and etcd; fails without them unless FERRY_NO_KVM=1.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::{wait_guest, Agent, ClusterLab, VmmReaper};
use ferry_e2e::{kvm_available, run_ferry, TempDir};
use serde_json::Value;

const VMS: usize = 2;

#[test]
fn ctrl_c_stops_the_update_after_the_current_node_and_a_rerun_goes_on() {
    let test = "ctrl_c_stops_the_update_after_the_current_node_and_a_rerun_goes_on";
    if !kvm_available(test) {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("update-int");
    let vol = dir.path().join("vol").display().to_string();
    assert!(run_ferry(&["volume", "create", &vol]).status.success());
    let cl = ClusterLab::up("upi", "a,b,c", "upi", dir.path());
    let _reaper = VmmReaper(cl.states.clone());
    let mut agents: Vec<Agent> = ["a", "b", "c"].iter().map(|n| Agent::start(&cl, n, &[])).collect();
    cl.wait_nodes_up(3);
    let guest = ferry_e2e::guest_elf().display().to_string();
    for i in 0..VMS {
        let (name, d) = (format!("app{i}"), format!("d{i}"));
        assert!(run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", &d])
            .status
            .success());
        let (disk, mac, cmdline) = (
            format!("csv:{vol}/disks/{d}"),
            format!("mac=52:54:00:a9:05:{i:02x}"),
            format!("heartbeat_ms=200 ip=10.200.77.{}", 60 + i),
        );
        let create = ["vm", "create", &name, "--kernel", &guest, "--mem-mib", "128", "--cmdline", &cmdline];
        let args: Vec<&str> =
            create.into_iter().chain(["--disk", &disk, "--net", &mac, "--preferred-owners", "a,b"]).collect();
        cl.cli_ok(&args);
        cl.cli_ok(&["vm", "start", &name, "--on", "a", "--wait"]);
        wait_guest(&cl.console("a", &name));
    }
    // For the README: a real plan.
    eprintln!("--- ferry cluster update --preview\n{}---", cl.cli_ok(&["cluster", "update", "--preview"]));

    // Node a's command: a marker, 1 MiB of output, then time for the Ctrl-C.
    let markers = dir.path().join("markers");
    let cmd = format!(
        "echo $FERRY_NODE >> {m}; yes 'Unpacking libfoo1 (1.2.3-4) ...' | head -c 1048576; echo unpacked; sleep 3",
        m = markers.display()
    );
    let report = dir.path().join("report");
    let mut update =
        cl.cli_command(&["cluster", "update", "--run", &cmd, "--report", report.to_str().unwrap(), "--json"]);
    // Its own process group, as a shell gives a foreground job: the SIGINT
    // below reaches whatever ferry started in that group too.
    let child = update
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry cluster update");
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&markers).unwrap_or_default() != "a\n" {
        assert!(Instant::now() < deadline, "node a's command never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = cl.status();
    let node = |s: &Value, id: &str| s["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap().clone();
    assert_eq!(node(&s, "a")["state"], "Paused", "a is drained while its command runs: {s:#}");
    assert!(s["vms"].as_array().unwrap().iter().all(|v| v["owner"] != "a"), "{s:#}");
    // SAFETY: SIGINT to the process group of the update this test started.
    assert_eq!(unsafe { libc::kill(-pid, libc::SIGINT) }, 0);
    let sent = Instant::now();

    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = |s: &str| s.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!(
        "update exited {:?} {:.1} s after SIGINT; stderr ends:\n{}",
        out.status,
        sent.elapsed().as_secs_f64(),
        tail(&stderr)
    );
    assert_eq!(out.status.code(), Some(1), "an interrupted run fails: {}", tail(&stderr));
    assert!(stderr.contains("interrupted: the update stops once the current node is back"), "{}", tail(&stderr));
    assert!(stderr.contains("interrupted before node b"), "{}", tail(&stderr));
    // The command's output was shown as it came, with its node's name.
    assert!(stderr.contains("  a| Unpacking libfoo1 (1.2.3-4) ...\n") && stderr.contains("  a| unpacked\n"));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = r["nodes"].as_array().unwrap();
    assert_eq!((r["state"].as_str(), nodes.len()), (Some("interrupted"), 1), "only node a was touched");
    let a = &nodes[0];
    // For messages: the node's part without its 64 KiB of output.
    let a_short = {
        let mut v = a.clone();
        v["command_output"] = Value::from("(left out)");
        v
    };
    assert_eq!((a["node"].as_str(), a["ok"].as_bool()), (Some("a"), Some(true)), "{a_short:#}");
    // Not killed by the SIGINT: node a's agent runs it, in its own process group.
    assert_eq!(a["command_status"], 0, "{a_short:#}");
    assert_eq!(a["command_output_bytes"], 1048576 + "unpacked\n".len() as u64);
    let kept = a["command_output"].as_str().unwrap();
    assert!(kept.len() <= 64 * 1024 && kept.ends_with("Unpacking libfoo1 (1.2.3-4) ...\nunpacked\n"), "{}", kept.len());
    assert!(a["failback_ms"].as_f64().unwrap() > 0.0, "a was resumed before the run stopped: {a_short:#}");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(report.join("update-report.json")).unwrap()).unwrap();
    assert_eq!(on_disk["state"], "interrupted");

    // b and c were never drained or updated; a is back with its VMs, which
    // only ever moved live (none stopped, none restarted).
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "a\n", "b and c untouched");
    assert!(agents[0].log().contains("restarting as asked"), "{}", agents[0].log());
    for ag in &agents[1..] {
        assert!(!ag.log().contains("restarting as asked"), "agent {} was not restarted", ag.node);
    }
    let s = cl.status();
    for id in ["a", "b", "c"] {
        assert_eq!(node(&s, id)["state"], "Up", "{s:#}");
    }
    for v in s["vms"].as_array().unwrap() {
        assert_eq!((v["owner"].as_str(), v["state"].as_str()), (Some("a"), Some("Running")), "{s:#}");
    }
    for i in 0..VMS {
        let h: Value = serde_json::from_str(&cl.cli_ok(&["vm", "history", &format!("app{i}"), "--json"])).unwrap();
        let kinds: Vec<&str> = h.as_array().unwrap().iter().map(|e| e["entry"]["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["created", "started", "live_move", "live_move"], "app{i}: a -> b -> a, live");
    }
    // The lock is gone and etcd says where the run stopped.
    let u = &s["update"];
    assert_eq!(u["running"], false, "{u:#}");
    let p = &u["progress"];
    assert_eq!((p["state"].as_str(), p["current"].is_null()), (Some("interrupted"), true), "{p:#}");
    assert_eq!(p["done"], serde_json::json!(["a"]), "{p:#}");

    // A rerun of the same update goes on from b. b's agent dies (-9) while
    // b's command runs; a new agent follows the run to its end.
    let cmd = format!(
        "echo $FERRY_NODE >> {m}; if [ $FERRY_NODE = b ]; then echo before; sleep 3; echo after; fi",
        m = markers.display()
    );
    let rerun = cl.cli_spawn(&["cluster", "update", "--run", &cmd, "--json"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&markers).unwrap_or_default() != "a\nb\n" {
        assert!(Instant::now() < deadline, "node b's command never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    agents[1].kill9();
    agents[1] = Agent::start(&cl, "b", &[]);
    let out = rerun.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("resuming update {} after 1 node(s): a", r["id"].as_str().unwrap())), "{stderr}");
    let r2: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r2["id"].as_str(), r2["state"].as_str()), (r["id"].as_str(), Some("finished")), "{r2:#}");
    let updated: Vec<&str> = r2["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(updated, ["b", "c"]);
    let b = &r2["nodes"][0];
    assert_eq!(
        (b["command_state"].as_str(), b["command_output"].as_str()),
        (Some("exited"), Some("before\nafter\n")),
        "{b:#}"
    );
    assert!(stderr.contains("  b| before\n") && stderr.contains("  b| after\n"), "{stderr}");
    assert!(agents[1].log().contains("was started by an earlier agent; following it"), "{}", agents[1].log());
    assert_eq!(std::fs::read_to_string(&markers).unwrap(), "a\nb\nc\n", "b's command ran once");
    assert_eq!(cl.status()["update"]["progress"]["state"], "finished");
    eprintln!("whole test: {:?}", t0.elapsed());
}
