//! The node agent against real etcd: three lab hosts with one etcd member
//! and one `ferry node run` each, a real shared volume, real taps on each
//! host's br0 and real `ferry run` VMMs booting the test guest, driven by
//! the `ferry vm` commands from the lab's client namespace. Needs root,
//! KVM and etcd; fails without them unless FERRY_NO_KVM=1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::{ferry_bin, kvm_available, run_bounded, run_ferry, Lab, TempDir};
use serde_json::Value;

const CLUSTER: &str = "agt";
const GUEST_IP: &str = "10.200.77.10";

/// A `ferry node run` in a lab host; killed (-9) on drop. Its VMMs are
/// left to [`VmmReaper`].
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(lab: &Lab, node: &str, eps: &str, dir: &Path) -> Agent {
        let log = dir.join(format!("agent-{node}.log"));
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.netns(node)])
            .arg(ferry_bin())
            .args(["node", "run", "--etcd", eps, "--cluster", CLUSTER, "--node-id", node])
            .args(["--lease-ttl-ms", "3000", "--disk-lease-ttl-ms", "3000", "--vm-bridge", "br0"])
            .arg("--state-dir")
            .arg(dir.join(node))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start ferry node run");
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kills every VMM the agents under `dir` started, whatever became of
/// the agents (the VMMs run in their own sessions).
struct VmmReaper(PathBuf);

impl Drop for VmmReaper {
    fn drop(&mut self) {
        for pid in vmm_pids(&self.0) {
            // SAFETY: SIGKILL to a VMM this test's agents started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// PIDs of live VMMs started by agents under `dir` (by their pid files,
/// checked against the process's command line).
fn vmm_pids(dir: &Path) -> Vec<u32> {
    let mut out = vec![];
    for node in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for vm in std::fs::read_dir(node.path().join("vms")).into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read_to_string(vm.path().join("vmm.pid")) else { continue };
            let Ok(pid) = text.trim().parse::<u32>() else { continue };
            let sock = vm.path().join("api.sock");
            if processes_with(&sock.display().to_string()).contains(&pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// PIDs whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && cmd.contains(" run ") {
            out.push(pid);
        }
    }
    out
}

/// `ferry ARGS --etcd EPS --cluster agt` from the client namespace.
fn cli(lab: &Lab, eps: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.netns("client")]).arg(ferry_bin()).args(args);
    cmd.args(["--etcd", eps, "--cluster", CLUSTER]);
    run_bounded(&mut cmd, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}"))
}

fn cli_ok(lab: &Lab, eps: &str, args: &[&str]) -> String {
    let out = cli(lab, eps, args);
    assert!(out.status.success(), "ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail with exit 1 and one line on stderr;
/// returns the line.
fn cli_refused(lab: &Lab, eps: &str, args: &[&str]) -> String {
    let out = cli(lab, eps, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "ferry {args:?} must fail: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err.trim().to_owned()
}

fn status(lab: &Lab, eps: &str) -> Value {
    serde_json::from_str(&cli_ok(lab, eps, &["cluster", "status", "--json"])).unwrap()
}

fn vm_show(lab: &Lab, eps: &str, name: &str) -> Value {
    serde_json::from_str(&cli_ok(lab, eps, &["vm", "show", name, "--json"])).unwrap()
}

/// Waits (bounded) until `pred` holds for `ferry vm show NAME --json`.
fn wait_show(lab: &Lab, eps: &str, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = vm_show(lab, eps, name);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn disk_lease(vol: &str, disk: &str) -> Value {
    let out = run_ferry(&["disk", "lease", "show", "--volume", vol, disk]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Waits (bounded) until the VM's serial console, as its agent logs it,
/// shows the guest's heartbeat (its network is up by then).
fn wait_guest(console: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("heartbeat ")) {
            return;
        }
        assert!(Instant::now() < deadline, "no heartbeat on {}:\n{text}", console.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn taps_on(lab: &Lab, host: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-n", &lab.netns(host), "-o", "link", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("fy"))
        .collect()
}

#[test]
fn agents_run_ha_vms_from_etcd_and_a_restarted_agent_adopts_its_vmm() {
    let test = "agents_run_ha_vms_from_etcd_and_a_restarted_agent_adopts_its_vmm";
    if !kvm_available(test) {
        return;
    }
    assert!(Path::new("/usr/bin/etcd").exists(), "etcd is missing: run `make deps` (Debian's etcd-server)");
    let t0 = Instant::now();
    let dir = TempDir::new("agent");
    let vol = dir.path().join("vol").display().to_string();
    let out = run_ferry(&["volume", "create", &vol]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "16M", "d0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plain = ferry_e2e::disk_image(dir.path(), "plain.img", 1);

    let lab = Lab { name: "ag1".into() };
    lab.ok(&["up", "--hosts", "a,b,c", "--etcd"]);
    let eps = lab.ok(&["etcd", "endpoints"]).trim().to_owned();
    let states = dir.path().join("nodes");
    std::fs::create_dir_all(&states).unwrap();
    let _reaper = VmmReaper(states.clone());
    let mut agents: Vec<Agent> = ["a", "b", "c"].iter().map(|n| Agent::start(&lab, n, &eps, &states)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(&lab, &eps);
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
    cli_ok(&lab, &eps, &args);

    // Bad input: one clear line, exit 1.
    let e = cli_refused(&lab, &eps, &args);
    assert!(e.contains("VM web already exists"), "{e}");
    let bad = create("other", plain.to_str().unwrap());
    let e = cli_refused(&lab, &eps, &bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("not on a shared volume"), "{e}");
    let e = cli_refused(&lab, &eps, &["vm", "start", "nosuch"]);
    assert!(e.contains("no VM named nosuch"), "{e}");
    let e = cli_refused(&lab, &eps, &["vm", "start", "web", "--on", "zz"]);
    assert!(e.contains("unknown node zz"), "{e}");
    let e = cli_refused(&lab, &eps, &["vm", "show", "nosuch"]);
    assert!(e.contains("no VM named nosuch"), "{e}");

    // Start: its first preferred owner, a.
    let t = Instant::now();
    let out = cli_ok(&lab, &eps, &["vm", "start", "web", "--wait"]);
    assert!(out.contains("running on node a"), "{out}");
    eprintln!("vm start --wait: {:?}", t.elapsed());
    let s = status(&lab, &eps);
    let web = &s["vms"][0];
    assert_eq!(
        (web["name"].as_str(), web["owner"].as_str(), web["state"].as_str()),
        (Some("web"), Some("a"), Some("Running")),
        "{s:#}"
    );
    assert_eq!(taps_on(&lab, "a").len(), 1, "the agent made the VM's tap on a");
    assert!(taps_on(&lab, "b").is_empty());
    wait_guest(&states.join("a/vms/web/serial.log"));
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "20"]);
    assert_eq!(ping["pings_lost"], 0, "the guest answers on a: {ping}");
    assert_eq!(disk_lease(&vol, "d0")["owner"], "a", "the VMM holds the disk lease as node a");
    let pid = web["pid"].as_u64().unwrap() as u32;
    let sock = states.join("a/vms/web/api.sock").display().to_string();
    assert_eq!(processes_with(&sock), [pid], "one VMM");
    let table = cli_ok(&lab, &eps, &["vm", "list"]);
    assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("web") && l.contains("Running")), "{table}");

    // kill -9 the agent on a: the VM keeps answering; a new agent adopts it.
    agents[0].kill9();
    let ping = lab.ping_from_client(GUEST_IP, &["--count", "10"]);
    assert_eq!(ping["pings_lost"], 0, "the VM outlives its agent: {ping}");
    let t = Instant::now();
    agents[0] = Agent::start(&lab, "a", &eps, &states);
    let v = wait_show(&lab, &eps, "web", "the restarted agent adopting web", |v| {
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
    let out = cli_ok(&lab, &eps, &["vm", "stop", "web", "--wait"]);
    assert!(out.contains("stopped"), "{out}");
    eprintln!("vm stop --wait: {:?}", t.elapsed());
    assert!(processes_with(&sock).is_empty(), "the VMM exited");
    assert!(disk_lease(&vol, "d0")["owner"].is_null(), "the disk lease is released: {}", disk_lease(&vol, "d0"));
    assert!(taps_on(&lab, "a").is_empty(), "the tap is removed: {:?}", taps_on(&lab, "a"));
    let v = vm_show(&lab, &eps, "web");
    assert!(v["owner"]["node"].is_null() && v["status"].is_null(), "{v:#}");
    let vmm_log = std::fs::read_to_string(states.join("a/vms/web/vmm.log")).unwrap_or_default();
    assert!(vmm_log.contains("VM stopped"), "a clean VMM exit: {vmm_log}");

    let h: Value = serde_json::from_str(&cli_ok(&lab, &eps, &["vm", "history", "web", "--json"])).unwrap();
    let kinds: Vec<&str> = h.as_array().unwrap().iter().map(|e| e["entry"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "started", "stopped"], "{h:#}");

    // Fencing: node a cut off from the fabric (its etcd member loses the
    // quorum) cannot renew its lease, so its agent kills the VMM and exits
    // before the lease could expire.
    let out = cli_ok(&lab, &eps, &["vm", "start", "web", "--on", "a", "--wait"]);
    assert!(out.contains("running on node a"), "{out}");
    let pid = vm_show(&lab, &eps, "web")["status"]["pid"].as_u64().unwrap() as u32;
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
            let s = status(&lab, &eps);
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
