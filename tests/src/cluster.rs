//! A lab cluster for end-to-end tests: lab hosts with one etcd member
//! each, a `ferry node run` agent per host, and the `ferry vm|node|cluster`
//! commands run from the client namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{cluster_key, ferry_bin, run_bounded, run_ferry, Lab};

/// A lab with etcd members on its hosts and the cluster's name.
pub struct ClusterLab {
    pub lab: Lab,
    pub eps: String,
    pub cluster: String,
    /// Agents' state directories live under here, one per node.
    pub states: PathBuf,
}

impl ClusterLab {
    /// `ferry lab up --hosts HOSTS --etcd`; states under `dir`.
    pub fn up(tag: &str, hosts: &str, cluster: &str, dir: &Path) -> ClusterLab {
        assert!(Path::new("/usr/bin/etcd").exists(), "etcd is missing: run `make deps` (Debian's etcd-server)");
        let lab = Lab { name: crate::lab_name(tag) };
        lab.ok(&["up", "--hosts", hosts, "--etcd"]);
        let eps = lab.ok(&["etcd", "endpoints"]).trim().to_owned();
        let states = dir.join("nodes");
        std::fs::create_dir_all(&states).unwrap();
        ClusterLab { lab, eps, cluster: cluster.into(), states }
    }

    /// `ferry ARGS --etcd EPS --cluster NAME` from the client namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.cli_command(args), Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`ClusterLab::cli`], in the background.
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.cli_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry")
    }

    /// The command [`ClusterLab::cli`] runs, for a caller that starts it
    /// its own way (in its own process group, say).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.lab.netns("client")]).arg(ferry_bin()).args(args);
        cmd.args(["--etcd", &self.eps, "--cluster", &self.cluster]);
        cmd
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "ferry {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command that must fail with exit 1 and one line on stderr;
    /// returns the line.
    pub fn cli_refused(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "ferry {args:?} must fail: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err.trim().to_owned()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["cluster", "status", "--json"])).unwrap()
    }

    pub fn vm_show(&self, name: &str) -> Value {
        serde_json::from_str(&self.cli_ok(&["vm", "show", name, "--json"])).unwrap()
    }

    /// The node the owner key names.
    pub fn owner(&self, name: &str) -> Option<String> {
        self.vm_show(name)["owner"]["node"].as_str().map(str::to_owned)
    }

    /// Waits (bounded) until `pred` holds for `ferry vm show NAME --json`.
    pub fn wait_show(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.vm_show(name);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {v:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until `n` nodes are Up.
    pub fn wait_nodes_up(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if s["nodes"].as_array().unwrap().iter().filter(|n| n["state"] == "Up").count() == n {
                return;
            }
            assert!(Instant::now() < deadline, "{n} agents up: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The serial console of VM `vm` as node `node`'s agent logs it.
    pub fn console(&self, node: &str, vm: &str) -> PathBuf {
        self.states.join(node).join("vms").join(vm).join("serial.log")
    }

    /// Sends a console line to VM `vm` on node `node` and waits for the
    /// first new console line starting with `prefix`.
    pub fn console_command(&self, node: &str, vm: &str, cmd: &str, prefix: &str) -> String {
        self.try_console_command(node, vm, cmd, prefix, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Taps (the agent's `fy...` names) in host `host`.
    pub fn taps_on(&self, host: &str) -> Vec<String> {
        let out = Command::new("ip").args(["-n", &self.lab.netns(host), "-o", "link", "show"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with("fy"))
            .collect()
    }
}

/// The complete lines of a console log: the guest writes a byte at a time,
/// so the last line may still be half written ("verify" before " ok").
fn complete_lines(text: &str) -> &str {
    &text[..text.rfind('\n').map_or(0, |n| n + 1)]
}

/// Waits (bounded) until a serial console shows the guest's heartbeat
/// (its network is up by then).
pub fn wait_guest(console: &Path) {
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

/// A `ferry node run` in a lab host; killed (-9) on drop. Its VMMs are
/// left to [`VmmReaper`].
pub struct Agent {
    pub child: Child,
    pub node: String,
    log: PathBuf,
}

impl Agent {
    /// Starts node `node`'s agent with `extra` flags (lease TTLs and the
    /// like), its address, the test's cluster key and br0 as VM bridge.
    pub fn start(cl: &ClusterLab, node: &str, extra: &[&str]) -> Agent {
        Agent::start_with(cl, node, &ferry_bin(), extra)
    }

    /// As [`Agent::start`], from the `ferry` binary at `bin`.
    pub fn start_with(cl: &ClusterLab, node: &str, bin: &Path, extra: &[&str]) -> Agent {
        Agent::start_env(cl, node, bin, extra, &[])
    }

    /// As [`Agent::start_with`], with environment variables `env` (the
    /// agent's test hooks).
    pub fn start_env(cl: &ClusterLab, node: &str, bin: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let log = cl.states.join(format!("agent-{node}.log"));
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new("ip")
            .envs(env.iter().copied())
            .args(["netns", "exec", &cl.lab.netns(node)])
            .arg(bin)
            .args(["node", "run", "--etcd", &cl.eps, "--cluster", &cl.cluster, "--node-id", node])
            .args(["--vm-bridge", "br0", "--address", Lab::host_ip(node)])
            .arg("--key-file")
            .arg(cluster_key())
            .args(extra)
            .arg("--state-dir")
            .arg(cl.states.join(node))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start ferry node run");
        Agent { child, node: node.into(), log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
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
pub struct VmmReaper(pub PathBuf);

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
pub fn vmm_pids(dir: &Path) -> Vec<u32> {
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

/// PIDs of VMMs (`ferry run` or `ferry receive`) whose command line
/// mentions `needle`.
pub fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && (cmd.contains(" run ") || cmd.contains(" receive ")) {
            out.push(pid);
        }
    }
    out
}

/// The shared-volume lease of `disk`, as `ferry disk lease show` prints it.
pub fn disk_lease(vol: &str, disk: &str) -> Value {
    let out = run_ferry(&["disk", "lease", "show", "--volume", vol, disk]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

impl ClusterLab {
    /// [`ClusterLab::console_command`] for callers that must not panic (the
    /// benchmarks record a failure and go on): sends `cmd` to VM `vm` on
    /// node `node` and waits at most `timeout` for the first new console
    /// line starting with `prefix`.
    pub fn try_console_command(
        &self,
        node: &str,
        vm: &str,
        cmd: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let log = self.console(node, vm);
        let before = complete_lines(&std::fs::read_to_string(&log).unwrap_or_default()).lines().count();
        let sock = self.states.join(node).join("vms").join(vm).join("api.sock");
        let out = run_ferry(&["console", "--api-sock", sock.to_str().unwrap_or_default(), cmd]);
        if !out.status.success() {
            return Err(format!("console {cmd} on {vm}@{node}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(l) = complete_lines(&text).lines().skip(before).find(|l| l.starts_with(prefix)) {
                return Ok(l.trim_end_matches('\r').to_owned());
            }
            if Instant::now() >= deadline {
                return Err(format!("no '{prefix}' line on {} within {timeout:?} after {cmd}", log.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The most moves under way at one instant, from the `requested_unix_ms`
/// and `ended_unix_ms` of a drain's or failback's `--json` moves (an end
/// and a start in the same millisecond do not overlap).
pub fn max_in_flight(moves: &[Value]) -> usize {
    let mut edges: Vec<(u64, i32)> = vec![];
    for m in moves {
        if let (Some(a), Some(b)) = (m["requested_unix_ms"].as_u64(), m["ended_unix_ms"].as_u64()) {
            edges.push((a, 1));
            edges.push((b, -1));
        }
    }
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}
