//! Failover on real etcd: three lab hosts, each with an etcd member and an
//! agent (default lease TTLs, the witness on the shared volume), a VM with
//! a shared-volume disk, pinged from the client. A host crashes (every
//! process of it killed -9, its etcd member too), a host is cut off, the
//! cluster leader is cut off alone, and two hosts die at once (quorum
//! lost). Needs root, KVM and etcd; fails without them unless
//! FERRY_NO_KVM=1.
//!
//! The guests stamp their disks from boot (`stamp_ms=`, see
//! tests/src/stamps.rs): after a failover the disk itself shows whether
//! the old copy wrote anything once the new one had started.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::{disk_lease, processes_with, vmm_pids, wait_guest, Agent, ClusterLab, VmmReaper};
use ferry_e2e::{kvm_available, run_ferry, stamps, TempDir};
use serde_json::Value;

const VM: &str = "db";
const VM_IP: &str = "10.200.77.30";
/// A disk stamp every 20 ms: 50 chances a second for a fenced copy to
/// show it still writes.
const STAMP_MS: u64 = 20;
const T: Duration = Duration::from_secs(30);

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
    processes_of(cl, VM)
}

/// The VMMs running VM `vm` on any node, by their API socket.
fn processes_of(cl: &ClusterLab, vm: &str) -> Vec<(String, u32)> {
    let mut out = vec![];
    for node in ["a", "b", "c"] {
        let sock = cl.states.join(node).join("vms").join(vm).join("api.sock");
        for pid in processes_with(&sock.display().to_string()) {
            out.push((node.to_owned(), pid));
        }
    }
    out
}

fn start_agents(cl: &ClusterLab, vol: &str) -> Vec<Agent> {
    ["a", "b", "c"].iter().map(|n| Agent::start(cl, n, &["--witness", vol])).collect()
}

/// Disks d0 (VM `VM`'s) and d1 on a new volume; the lab up.
fn setup(lab: &str, dir: &Path) -> (ClusterLab, String) {
    let vol = dir.join("vol").display().to_string();
    assert!(run_ferry(&["volume", "create", &vol]).status.success());
    for d in ["d0", "d1"] {
        let out = run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", d]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    (ClusterLab::up(lab, "a,b,c", "fo", dir), vol)
}

/// An HA VM of these tests: the test guest with a disk on the volume,
/// stamping it from boot.
struct HaVm {
    name: &'static str,
    ip: &'static str,
    mac: &'static str,
    disk: &'static str,
}

const DB: HaVm = HaVm { name: VM, ip: VM_IP, mac: "52:54:00:a9:02:01", disk: "d0" };

/// Creates VM `VM` (preferred owners b, c) and starts it on `on`; returns
/// its disk stamps' writer there.
fn create_and_start(cl: &ClusterLab, vol: &str, on: &str) -> u64 {
    create_and_start_vm(cl, vol, &DB, on, &["--preferred-owners", "b,c"])
}

/// Creates `vm` with more `vm create` flags and starts it on `on`: its
/// guest answers pings and has written the disk pattern (seed 5) at
/// sectors 0-63. Returns its disk stamps' writer.
fn create_and_start_vm(cl: &ClusterLab, vol: &str, vm: &HaVm, on: &str, extra: &[&str]) -> u64 {
    let guest = ferry_e2e::guest_elf().display().to_string();
    let disk = format!("csv:{vol}/disks/{}", vm.disk);
    let cmdline = format!("heartbeat_ms=200 ip={} stamp_ms={STAMP_MS}", vm.ip);
    let mac = format!("mac={}", vm.mac);
    let create =
        ["vm", "create", vm.name, "--kernel", &guest, "--mem-mib", "128", "--cmdline", &cmdline, "--disk", &disk];
    let args: Vec<&str> = create.into_iter().chain(["--net", &mac]).chain(extra.iter().copied()).collect();
    cl.cli_ok(&args);
    cl.cli_ok(&["vm", "start", vm.name, "--on", on, "--wait"]);
    wait_guest(&cl.console(on, vm.name));
    let writer = stamp_writer(cl, on, vm.name);
    let w = cl.console_command(on, vm.name, "disk-write 0 64 5", "disk-write");
    assert!(w.starts_with("disk-write ok"), "{w}");
    let p = cl.lab.ping_from_client(vm.ip, &["--count", "20", "--wait-reply-ms", "3000"]);
    assert_eq!(p["pings_lost"], 0, "{p}");
    writer
}

/// The disk stamps' writer the guest of `vm` on `node` started at boot;
/// its records carry the node's name from now on.
fn stamp_writer(cl: &ClusterLab, node: &str, vm: &str) -> u64 {
    let writer = stamps::started_writer(&cl.console(node, vm), T).unwrap_or_else(|e| panic!("{e}"));
    let line = cl.console_command(node, vm, &format!("disk-stamp {node}"), "disk-stamp");
    assert!(line.starts_with(&format!("disk-stamp tag={node} writer={writer:#x}")), "{line}");
    writer
}

/// Proves from disk `disk` that its writers took turns: in slot order
/// exactly `expected` (writer, node), none writing once the next had
/// started (see tests/src/stamps.rs). Waits (bounded) for the last one's
/// first record. Returns the TSC milliseconds the disk was quiet between
/// each writer and the next.
fn assert_writers_took_turns(vol: &str, disk: &str, expected: &[(u64, &str)]) -> Vec<f64> {
    let image = stamps::volume_image(Path::new(vol), disk);
    let deadline = Instant::now() + T;
    let ws = loop {
        let all = stamps::read(&image, stamps::DEFAULT_AT, stamps::DEFAULT_SECTORS).unwrap();
        let ws = stamps::check_no_overlap(&all)
            .unwrap_or_else(|bad| panic!("two copies wrote {disk} at once:\n{}", bad.join("\n")));
        if ws.last().map(|w| w.writer) == expected.last().map(|e| e.0) {
            break ws;
        }
        assert!(Instant::now() < deadline, "no record of the last writer {expected:x?} on {disk}: {ws:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let ids: Vec<u64> = ws.iter().map(|w| w.writer).collect();
    let want: Vec<u64> = expected.iter().map(|e| e.0).collect();
    assert_eq!(ids, want, "{disk}'s writers in slot order (expected {expected:x?}): {ws:#?}");
    let mut quiet = vec![];
    for (pair, nodes) in ws.windows(2).zip(expected.windows(2)) {
        let (old, new) = (&pair[0], &pair[1]);
        assert!(
            old.high < new.low,
            "{}'s last record ({}) precedes {}'s first ({})",
            nodes[0].1,
            old.high,
            nodes[1].1,
            new.low
        );
        let ms = stamps::quiet_ms(old, new);
        eprintln!(
            "  {disk}: {} records of {} (slots {}-{}), then {} of {} from slot {}: the disk was quiet {ms:.0} ms between them",
            old.records, nodes[0].1, old.low, old.high, new.records, nodes[1].1, new.low
        );
        // The guests' TSC is the host's on PVM: one clock for both writers.
        if ferry_e2e::is_pvm_host() {
            assert!(ms > 0.0, "by the TSC too, {} stopped writing before {} started: {ms} ms", nodes[0].1, nodes[1].1);
        }
        quiet.push(ms);
    }
    quiet
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
    let writer_a = create_and_start(&cl, &vol, "a");

    // Crash: every process of host a dies at once.
    let crash = Instant::now();
    agents[0].kill9();
    kill_vmms_of(&cl, "a");
    cl.lab.ok(&["etcd", "kill", "a"]);
    let back = first_reply_after(&cl, crash);
    let owner = cl.owner(VM).expect("an owner");
    assert!(owner == "b" || owner == "c", "restarted on b or c, not {owner}");
    eprintln!("crash of a: {VM} answers from {owner} {:.2} s after the crash", back.as_secs_f64());
    // The goal is 5 s; measured 3.4-4.9 s (4.9 when a's etcd member led
    // raft), so 8 s leaves this shared 2-core box room without hiding a
    // regression to the 5.5-6 s of etcd's default election timeout.
    assert!(back < Duration::from_secs(8), "restarted within seconds: {back:?}");
    let procs = vm_processes(&cl);
    assert_eq!(procs.len(), 1, "runs on exactly one node: {procs:?}");
    assert_eq!(procs[0].0, owner);
    let v = cl.console_command(&owner, VM, "disk-verify 0 64 5", "disk-verify");
    assert!(v.starts_with("disk-verify ok"), "the disk written before the crash: {v}");
    let writer_owner = stamp_writer(&cl, &owner, VM);
    assert_writers_took_turns(&vol, "d0", &[(writer_a, "a"), (writer_owner, &owner)]);
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
    // From the disk: the cut node's copy wrote nothing once the new one
    // had started.
    let writer_new = stamp_writer(&cl, &new_owner, VM);
    let writers = [(writer_a, "a"), (writer_owner, cut_node.as_str()), (writer_new, new_owner.as_str())];
    let quiet = assert_writers_took_turns(&vol, "d0", &writers);
    eprintln!("cut {cut_node}: its last disk write came {:.0} ms before {new_owner}'s first", quiet[1]);
    cl.lab.ok(&["heal", &cut_node]);
    agents[idx] = Agent::start(&cl, &cut_node, &["--witness", &vol]);
    cl.wait_nodes_up(3);
    std::thread::sleep(Duration::from_secs(2));
    let procs = vm_processes(&cl);
    assert_eq!(procs, [(new_owner.clone(), procs[0].1)], "the healed node does not resume the old VM");
    // Its fence, on record since it registered again.
    let fenced = events(&cl).into_iter().find(|e| e["kind"] == "node-fenced" && e["node"] == cut_node.as_str());
    let fenced = fenced.unwrap_or_else(|| panic!("{cut_node}'s fence in the events: {:#?}", events(&cl)));
    assert_eq!(fenced["figures"]["killed"], serde_json::json!([VM]), "{fenced}");
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
    let writer = create_and_start(&cl, &vol, "a");

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
    // Two live moves and the outage later, the disk has had one writer:
    // the guest that booted first, never restarted.
    assert_writers_took_turns(&vol, "d0", &[(writer, "a")]);
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
    let writer_a = create_and_start(&cl, &vol, "a");
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
    let writer = stamp_writer(&cl, &owner, VM);
    assert_writers_took_turns(&vol, "d0", &[(writer_a, "a"), (writer, &owner)]);
}

/// Waits (bounded) until the cluster has a leader for which `pred` holds;
/// returns it.
fn wait_leader(cl: &ClusterLab, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let s = cl.status();
        if let Some(l) = s["leader"].as_str().filter(|l| pred(l)) {
            return l.to_owned();
        }
        assert!(Instant::now() < deadline, "no leader as expected: {s:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until node `node` shows as `state` in the status.
fn wait_node_state(cl: &ClusterLab, node: &str, state: &str) {
    let deadline = Instant::now() + T;
    loop {
        let s = cl.status();
        if s["nodes"].as_array().unwrap().iter().any(|n| n["id"] == node && n["state"] == state) {
            return;
        }
        assert!(Instant::now() < deadline, "node {node} never {state}: {s:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_leader_cut_off_alone_restarts_nothing_and_the_others_elect_a_new_one() {
    let test = "the_leader_cut_off_alone_restarts_nothing_and_the_others_elect_a_new_one";
    if !kvm_available(test) {
        return;
    }
    const CACHE: HaVm = HaVm { name: "cache", ip: "10.200.77.31", mac: "52:54:00:a9:02:02", disk: "d1" };
    let dir = TempDir::new("minority");
    let (cl, vol) = setup("fo3", dir.path());
    let _reaper = VmmReaper(cl.states.clone());
    let mut agents = start_agents(&cl, &vol);
    cl.wait_nodes_up(3);
    let leader = wait_leader(&cl, |_| true);
    let li = ["a", "b", "c"].iter().position(|n| *n == leader).unwrap();
    let others: Vec<&str> = ["a", "b", "c"].into_iter().filter(|n| *n != leader).collect();
    // The VMs run on the two other nodes, one each.
    let vms = [(&DB, others[0]), (&CACHE, others[1])];
    let mut before = vec![];
    for (vm, on) in vms {
        let writer = create_and_start_vm(&cl, &vol, vm, on, &[]);
        let procs = processes_of(&cl, vm.name);
        assert_eq!(procs.len(), 1, "{} runs once: {procs:?}", vm.name);
        before.push((writer, procs, cl.vm_show(vm.name)["owner"].clone()));
    }
    let events_before = events(&cl).len();

    // The leader alone is cut off (its etcd member with it); both VMs are
    // pinged all the while.
    let cut = Instant::now();
    cl.lab.ok(&["cut", &leader]);
    let (pings, new_leader, elected_after) = std::thread::scope(|s| {
        let pingers: Vec<_> = vms
            .iter()
            .map(|(vm, _)| {
                let cl = &cl;
                s.spawn(move || cl.lab.ping_from_client(vm.ip, &["--duration-ms", "15000", "--interval-ms", "10"]))
            })
            .collect();
        let new_leader = wait_leader(&cl, |l| l != leader);
        let elected_after = cut.elapsed();
        let pings: Vec<Value> = pingers.into_iter().map(|p| p.join().unwrap()).collect();
        (pings, new_leader, elected_after)
    });
    eprintln!("{leader} (the leader) cut off: {new_leader} leads {:.1} s later", elected_after.as_secs_f64());
    assert!(others.contains(&new_leader.as_str()), "a new leader among the majority: {new_leader}");
    for ((vm, on), p) in vms.iter().zip(&pings) {
        eprintln!("  {} on {on}: {} of {} pings lost", vm.name, p["pings_lost"], p["pings_sent"]);
        // Kept answering: a restart (a cold boot elsewhere) would cost
        // hundreds of probes; a loaded 2-core box delays a few past the
        // 200 ms probe timeout (the unchanged PIDs below are the proof).
        assert!(p["pings_lost"].as_u64().unwrap() < 50, "{} keeps answering: {p}", vm.name);
    }
    // The cut-off leader fenced itself (others are alive: the witness)
    // with nothing to kill; it restarted nothing.
    let deadline = Instant::now() + T;
    let code = loop {
        if let Some(st) = agents[li].child.try_wait().unwrap() {
            break st.code();
        }
        assert!(Instant::now() < deadline, "the cut-off leader did not fence: {}", agents[li].log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(3), "fenced on lease loss: {}", agents[li].log());
    assert!(agents[li].log().contains("killing 0 VMM(s)"), "{}", agents[li].log());
    let check_untouched = |when: &str| {
        for ((vm, _), (_, procs, owner)) in vms.iter().zip(&before) {
            assert_eq!(&cl.vm_show(vm.name)["owner"], owner, "{}'s owner never changed ({when})", vm.name);
            assert_eq!(&processes_of(&cl, vm.name), procs, "{}: the same VMM runs ({when})", vm.name);
        }
    };
    check_untouched("after the cut");
    let new: Vec<Value> = events(&cl).into_iter().skip(events_before).collect();
    assert!(new.iter().all(|e| e["vm"].is_null() && e["node"] == leader.as_str()), "only about {leader}: {new:#?}");
    assert!(new.iter().any(|e| e["kind"] == "node-down"), "{leader} seen down: {new:#?}");
    for ((vm, on), (writer, _, _)) in vms.iter().zip(&before) {
        let h: Value = serde_json::from_str(&cl.cli_ok(&["vm", "history", vm.name, "--json"])).unwrap();
        assert!(h.as_array().unwrap().iter().all(|e| e["entry"]["kind"] != "failover"), "no failover: {h:#}");
        assert_writers_took_turns(&vol, vm.disk, &[(*writer, on)]);
    }

    // The old leader comes back, paused as its operator asks: it takes no
    // VMs, runs none, and its fence is on record.
    cl.lab.ok(&["heal", &leader]);
    agents[li] = Agent::start(&cl, &leader, &["--witness", &vol, "--paused"]);
    wait_node_state(&cl, &leader, "Paused");
    check_untouched("after the heal");
    let fenced = events(&cl).into_iter().find(|e| e["kind"] == "node-fenced" && e["node"] == leader.as_str());
    let fenced = fenced.unwrap_or_else(|| panic!("{leader}'s fence in the events: {:#?}", events(&cl)));
    eprintln!("  event: {fenced}");
    let at = fenced["at_unix_ms"].as_u64().unwrap();
    let recorded = fenced["figures"]["recorded_unix_ms"].as_u64().unwrap();
    assert!(at < recorded, "the fence's own time, recorded later: {fenced}");
    cl.cli_ok(&["node", "resume", &leader]);
    cl.wait_nodes_up(3);
}
