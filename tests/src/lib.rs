//! Harness for Ferry's end-to-end tests: find the binaries `make` built,
//! insist on real KVM, and drive `ferry run` processes by their serial
//! console and API socket.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn artifact(env: &str, default: &str, make_target: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| workspace_root().join(default));
    assert!(path.exists(), "{} not found: run `make {make_target}` (or `make test`), or set {env}", path.display());
    path
}

/// The `ferry` binary.
pub fn ferry_bin() -> PathBuf {
    artifact("FERRY_BIN", "target/release/ferry", "build")
}

/// The bundled test guest.
pub fn guest_elf() -> PathBuf {
    artifact("FERRY_GUEST", "target/guest/ferry-guest.elf", "guest")
}

/// Debian's cloud kernel, unpacked by `make linux`.
pub fn linux_dir() -> PathBuf {
    artifact("FERRY_LINUX_DIR", "target/linux", "linux")
}

/// True if this test must run: /dev/kvm is there and we are root. Panics
/// (fails the test) if they are missing, unless FERRY_NO_KVM=1 says this
/// machine has no KVM on purpose, in which case the test is reported and
/// returns early.
pub fn kvm_available(test: &str) -> bool {
    if std::env::var("FERRY_NO_KVM").as_deref() == Ok("1") {
        eprintln!("{test}: not run: FERRY_NO_KVM=1");
        return false;
    }
    assert!(Path::new("/dev/kvm").exists(), "{test} needs /dev/kvm (set FERRY_NO_KVM=1 on a machine without KVM)");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "{test} needs root (or set FERRY_NO_KVM=1)");
    true
}

/// True when this host's KVM is PVM (the VMM's own test of it).
pub use vmm::vstate::vm::is_pvm_host;

/// `&str` to `String`, for argument lists.
pub fn s(v: &str) -> String {
    v.to_owned()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A failed test's logs are worth keeping.
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serial console lines collected from a child's stdout.
#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A `ferry run` process with its console and API socket.
pub struct Vm {
    child: Child,
    console: Arc<Console>,
    pub api_sock: PathBuf,
    pub started: Instant,
    stderr: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl Vm {
    /// Boots the test guest with `cmdline` and extra `ferry run` args.
    pub fn guest(cmdline: &str, extra: &[&str]) -> Vm {
        let guest = guest_elf();
        let mut args: Vec<String> =
            vec!["--kernel".into(), guest.display().to_string(), "--cmdline".into(), cmdline.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Vm::spawn(&args)
    }

    pub fn spawn(args: &[String]) -> Vm {
        Vm::launch(None, "run", args)
    }

    /// Starts `ferry SUBCOMMAND ARGS --api-sock ...`, inside network
    /// namespace `netns` if given (a lab host).
    pub fn launch(netns: Option<&str>, subcommand: &str, args: &[String]) -> Vm {
        Vm::launch_with_env(netns, subcommand, args, &[])
    }

    /// [`Vm::launch`] with extra environment variables (the VMM's test
    /// hooks, e.g. `FERRY_TEST_FAIL_HANDOFF`).
    pub fn launch_with_env(netns: Option<&str>, subcommand: &str, args: &[String], env: &[(&str, &str)]) -> Vm {
        let dir = TempDir::new("vm");
        let api_sock = dir.path().join("api.sock");
        let started = Instant::now();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .arg(subcommand)
            .args(args)
            .arg("--api-sock")
            .arg(&api_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry run");
        let console = Arc::new(Console::default());
        let stdout = child.stdout.take().unwrap();
        let c = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
                c.lines.lock().unwrap().push(line);
                c.grew.notify_all();
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, s) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = s.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        leftovers::PIDS.lock().unwrap_or_else(|p| p.into_inner()).insert(child.id());
        Vm { child, console, api_sock, started, stderr, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// All console lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.console.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a console line at index >= `from` that satisfies `pred`;
    /// returns its index and text. Panics with the console on timeout.
    pub fn wait_line_from(&self, from: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> (usize, String) {
        self.try_wait_line_from(from, timeout, pred).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Vm::wait_line_from`] for callers that must not panic (the
    /// benchmarks record a failure and go on): the timeout is an error
    /// naming the console's tail and the stderr.
    pub fn try_wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, String), String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.console.lines.lock().unwrap();
        loop {
            if let Some((i, l)) = lines.iter().enumerate().skip(from).find(|(_, l)| pred(l)) {
                return Ok((i, l.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let tail: Vec<_> = lines.iter().rev().take(20).rev().cloned().collect();
                drop(lines);
                return Err(format!(
                    "timed out after {timeout:?}; console tail:\n{}\nstderr:\n{}",
                    tail.join("\n"),
                    self.stderr()
                ));
            }
            lines = self.console.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line_from(0, timeout, pred).1
    }

    /// Runs `ferry <args> --api-sock <sock>`; returns (success, stdout, stderr).
    pub fn ferry(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(ferry_bin()).args(args).arg("--api-sock").arg(&self.api_sock).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a control command that must succeed.
    pub fn control(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.ferry(args);
        assert!(ok, "ferry {args:?} failed: {err}");
        out
    }

    pub fn info(&self) -> serde_json::Value {
        serde_json::from_str(&self.control(&["info"])).expect("vm.info is JSON")
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "ferry did not exit within {timeout:?}; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        leftovers::PIDS.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.child.id());
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses `key=value` out of a console line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The heartbeat counter of a `heartbeat N ...` line.
pub fn heartbeat_number(line: &str) -> Option<u64> {
    line.strip_prefix("heartbeat ")?.split_whitespace().next()?.parse().ok()
}

/// Runs `ferry` with `args` to completion (for error-path tests).
pub fn run_ferry(args: &[&str]) -> std::process::Output {
    Command::new(ferry_bin()).args(args).stdin(Stdio::null()).output().expect("run ferry")
}

// ---------------------------------------------------------------------------
// Hosts on one machine: the lab's network namespaces and `ferry ping`.

/// True if this test must run: we are root and iproute2 is there. Same rule
/// as [`kvm_available`]: panics (fails the test) if not, unless
/// FERRY_NO_KVM=1 says this machine cannot run the privileged tests, in
/// which case the test is reported and returns early.
pub fn root_available(test: &str) -> bool {
    if std::env::var("FERRY_NO_KVM").as_deref() == Ok("1") {
        eprintln!("{test}: not run: FERRY_NO_KVM=1");
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "{test} needs root (or set FERRY_NO_KVM=1)");
    let ip = Command::new("ip").arg("-V").output();
    assert!(ip.is_ok_and(|o| o.status.success()), "{test} needs iproute2's `ip` (make deps)");
    true
}

/// Runs `ferry ARGS`, killing it (and failing the test) if it runs past `timeout`.
pub fn ferry_bounded(args: &[&str], timeout: Duration) -> std::process::Output {
    run_bounded(Command::new(ferry_bin()).args(args), timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd` to completion, killing it past `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<std::process::Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    // Both pipes are read while it runs: one that fills (a command printing
    // more than 64 KiB) would stall the child until the timeout.
    let drain = |p: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut v = vec![];
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let err = stderr.join().unwrap_or_default();
                return Err(format!(
                    "{cmd:?} ran past {timeout:?} and was killed; stderr: {}",
                    String::from_utf8_lossy(&err).trim()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Names of all named network namespaces (`ip netns list`).
pub fn netns_names() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The named namespaces of lab `name` (those called `NAME-...`).
pub fn lab_netns(name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    netns_names().into_iter().filter(|n| n.starts_with(&prefix)).collect()
}

/// A lab made by `ferry lab up --name NAME`; `ferry lab down` on drop.
/// Use a short name unique to the test, so tests run in parallel.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub const SUBNET_HOST_A: &'static str = "10.200.77.1";
    pub const SUBNET_HOST_B: &'static str = "10.200.77.2";

    pub const SUBNET_HOST_C: &'static str = "10.200.77.3";

    /// The address of lab host `host` ("a", "b" or "c").
    pub fn host_ip(host: &str) -> &'static str {
        match host {
            "a" => Lab::SUBNET_HOST_A,
            "c" => Lab::SUBNET_HOST_C,
            _ => Lab::SUBNET_HOST_B,
        }
    }

    /// The other of the two VM hosts.
    pub fn other_host(host: &str) -> &'static str {
        match host {
            "a" => "b",
            _ => "a",
        }
    }
    pub const SUBNET_CLIENT: &'static str = "10.200.77.100";

    /// [`Lab::up`] with tap vm0 on hosts a and b (where the test guest's
    /// NIC, [`LAB_GUEST_NIC`], plugs in).
    pub fn up_with_taps(tag: &str) -> Lab {
        let lab = Lab::up(tag);
        lab.ok(&["tap", "add", "a", "vm0"]);
        lab.ok(&["tap", "add", "b", "vm0"]);
        lab
    }

    /// Brings up lab [`lab_name`]`(tag)` (the guard exists first, so a
    /// failed `up` is still taken down).
    pub fn up(tag: &str) -> Lab {
        let lab = Lab { name: lab_name(tag) };
        lab.ok(&["up"]);
        lab
    }

    /// `NAME-ROLE`, e.g. `netns("client")`.
    pub fn netns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }

    /// Runs `ferry lab ARGS --name NAME` (bounded).
    pub fn lab(&self, args: &[&str]) -> std::process::Output {
        if args.first() == Some(&"up") {
            leftovers::LABS.lock().unwrap_or_else(|p| p.into_inner()).insert(self.name.clone());
        }
        let mut all = vec!["lab"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--name", &self.name]);
        ferry_bounded(&all, Duration::from_secs(60))
    }

    /// Runs a lab command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.lab(args);
        assert!(
            out.status.success(),
            "ferry lab {args:?} --name {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status"])).expect("lab status is JSON")
    }

    /// `ferry ping --netns NAME-client --target TARGET EXTRA...`, parsed.
    pub fn ping_from_client(&self, target: &str, extra: &[&str]) -> serde_json::Value {
        let ns = self.netns("client");
        let mut args = vec!["ping", "--netns", &ns, "--target", target];
        args.extend_from_slice(extra);
        let out = ferry_bounded(&args, Duration::from_secs(120));
        assert!(out.status.success(), "ferry {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("ferry ping prints JSON")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        leftovers::LABS.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.name);
        let out = self.lab(&["down"]);
        if !out.status.success() {
            eprintln!("ferry lab down --name {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// A UDP echo service bound to `addr` inside namespace `netns`, on its own
/// thread, for at most `lifetime`; the thread returns how many datagrams it
/// echoed. Returns once the socket is bound.
pub fn udp_echo_in_netns(
    netns: &str,
    addr: std::net::SocketAddrV4,
    lifetime: Duration,
) -> std::thread::JoinHandle<u64> {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(netns);
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns on a valid namespace fd; only this thread moves.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns into {}", path.display());
        let sock = std::net::UdpSocket::bind(addr).expect("bind the echo socket");
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        tx.send(()).unwrap();
        let end = Instant::now() + lifetime;
        let mut buf = [0u8; 2048];
        let mut echoed = 0;
        while Instant::now() < end {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if sock.send_to(&buf[..n], from).is_ok() {
                    echoed += 1;
                }
            }
        }
        echoed
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("the echo service starts");
    handle
}

/// Sends a console command and waits for the line that answers it (the
/// first line from now on starting with `prefix`).
pub fn command(vm: &Vm, cmd: &str, prefix: &str, timeout: Duration) -> String {
    let from = vm.lines().len();
    vm.control(&["console", cmd]);
    vm.wait_line_from(from, timeout, |l| l.starts_with(prefix)).1
}

/// [`command`] for callers that must not panic.
pub fn try_command(vm: &Vm, cmd: &str, prefix: &str, timeout: Duration) -> Result<String, String> {
    let from = vm.lines().len();
    let (ok, _, err) = vm.ferry(&["console", cmd]);
    if !ok {
        return Err(format!("console {cmd:?}: {}", err.trim()));
    }
    vm.try_wait_line_from(from, timeout, |l| l.starts_with(prefix)).map(|(_, l)| l)
}

/// True while process `pid` exists and is not a zombie.
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Copies the ferry binary into `dir` and points FERRY_BIN at the copy, so
/// that a rebuild while a benchmark runs cannot pair a source and a
/// destination that disagree on the wire format. Call before starting
/// any ferry process.
pub fn pin_ferry_binary(dir: &Path) {
    let copy = dir.join("ferry");
    std::fs::copy(ferry_bin(), &copy).expect("copy the ferry binary");
    std::env::set_var("FERRY_BIN", &copy);
}

/// A raw disk image of `mib` MiB, zero-filled (sparse).
pub fn disk_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

/// The last heartbeat number seen.
pub fn last_heartbeat(vm: &Vm) -> Option<u64> {
    vm.lines().iter().rev().find_map(|l| heartbeat_number(l))
}

/// A cluster key file shared by this test process's migrations.
/// Kills child process `pid` (SIGKILL) and waits, at most a minute, until
/// it is gone (reaped if it is this process's child).
pub fn kill_and_reap(pid: i32) {
    // SAFETY: kill(2) on a child process of this test, by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    // SAFETY: kill(pid, 0) only probes whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: reaps the killed child if it is ours; never blocks.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A lab name unique to this test process: `tag` and the PID in base 36,
/// so two runs at once (two checkouts, a benchmark beside the suite) never
/// share a lab, and a stale lab of an earlier run is never mistaken for
/// this one's. Tags stay within 6 characters (lab names: 12).
pub fn lab_name(tag: &str) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let (mut n, mut pid) = (String::new(), std::process::id());
    while pid > 0 {
        n.insert(0, DIGITS[(pid % 36) as usize] as char);
        pid /= 36;
    }
    assert!(tag.len() <= 6, "lab tag {tag:?} is longer than 6 characters");
    format!("{tag}{n}")
}

pub fn cluster_key() -> PathBuf {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ferry-test-{}.key", std::process::id()));
        write_key_file(&p, "5f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766554433221100");
        p
    })
    .clone()
}

/// Writes a hex key as `ferry keygen` does: a new file, mode 0600 (the VMM
/// refuses a key other users can read). A stale one of this name is replaced.
pub fn write_key_file(path: &Path, hex: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    writeln!(f, "{hex}").unwrap();
}

/// The key in [`cluster_key`], for fake peers.
pub fn cluster_key_loaded() -> migrate::auth::Key {
    migrate::auth::Key::load(&cluster_key()).unwrap()
}

impl Vm {
    /// Waits until the VMM's API socket exists (a restored or received VM
    /// is up).
    pub fn wait_api(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.api_sock.exists() {
            assert!(Instant::now() < deadline, "VMM API never came up: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the VMM's stderr contains `text`.
    pub fn wait_stderr(&self, timeout: Duration, text: &str) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(text) {
            assert!(Instant::now() < deadline, "timed out waiting for '{text}' on stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// ---------------------------------------------------------------------------
// Moving VMs between lab hosts.

/// `ferry receive` on lab host `host`, listening on its lab address at
/// `port`, with this test process's cluster key and the host's name as its
/// host id (taps and the rest come in `extra`); returns once it listens.
pub fn receiver_in_lab(lab: &Lab, host: &str, port: u16, extra: &[&str]) -> Vm {
    let mut args = vec![
        s("--listen"),
        format!("tcp:{}:{port}", Lab::host_ip(host)),
        s("--key-file"),
        cluster_key().display().to_string(),
        s("--host-id"),
        host.to_owned(),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    let vm = Vm::launch(Some(&lab.netns(host)), "receive", &args);
    vm.wait_stderr(Duration::from_secs(60), "waiting for a migration");
    vm
}

/// `ferry migrate --json --to TO EXTRA` for `vm`, run inside lab host
/// `from`: (success, figures JSON, stderr).
pub fn migrate_in_lab(lab: &Lab, from: &str, vm: &Vm, to: &str, extra: &[&str]) -> (bool, serde_json::Value, String) {
    let key = cluster_key();
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns(from)])
        .arg(ferry_bin())
        .args(["migrate", "--json", "--key-file", key.to_str().unwrap(), "--to", to])
        .args(extra)
        .arg("--api-sock")
        .arg(&vm.api_sock)
        .output()
        .expect("run ferry migrate");
    let figures = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.success(), figures, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The test guest's address and NIC on the lab (tap vm0 on the host).
pub const LAB_GUEST_IP: &str = "10.200.77.10";
pub const LAB_GUEST_NIC: &str = "tap=vm0,mac=52:54:00:c0:ff:ee";

/// Boots the test guest on lab host `host` with `mem_mib` and `cmdline`
/// (after `heartbeat_ms=200 ip=LAB_GUEST_IP`), on tap vm0; returns once its
/// workload is ready and it heartbeats.
pub fn boot_in_lab(lab: &Lab, host: &str, mem_mib: u32, cmdline: &str) -> Vm {
    boot_in_lab_with(lab, host, mem_mib, cmdline, &[])
}

/// [`boot_in_lab`] with more `ferry run` arguments (a disk, a host id).
pub fn boot_in_lab_with(lab: &Lab, host: &str, mem_mib: u32, cmdline: &str, extra: &[&str]) -> Vm {
    let guest = guest_elf();
    let mut args = vec![
        s("--kernel"),
        guest.display().to_string(),
        s("--mem-mib"),
        mem_mib.to_string(),
        s("--cmdline"),
        format!("heartbeat_ms=200 ip={LAB_GUEST_IP} {cmdline}"),
        s("--net"),
        s(LAB_GUEST_NIC),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    let vm = Vm::launch(Some(&lab.netns(host)), "run", &args);
    let t = Duration::from_secs(60);
    vm.wait_line(t, |l| l.starts_with("workload ready"));
    vm.wait_line(t, |l| heartbeat_number(l).is_some());
    vm
}

/// [`migrate_in_lab`] on its own thread, for tests that act while it runs.
pub fn migrate_in_lab_background(
    lab: &Lab,
    from: &str,
    vm: &Vm,
    to: &str,
    extra: &[&str],
) -> std::thread::JoinHandle<(bool, serde_json::Value, String)> {
    let (ns, api) = (lab.netns(from), vm.api_sock.clone());
    let mut args: Vec<String> = vec![s("migrate"), s("--json"), s("--key-file"), cluster_key().display().to_string()];
    args.extend([s("--to"), to.to_owned()]);
    args.extend(extra.iter().map(|e| e.to_string()));
    std::thread::spawn(move || {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(ferry_bin())
            .args(&args)
            .arg("--api-sock")
            .arg(&api)
            .output()
            .expect("run ferry migrate");
        let figures = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.success(), figures, String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

impl Vm {
    /// Waits until `vm.info` reports lifecycle state `state` (e.g. "Migrating").
    pub fn wait_state(&self, timeout: Duration, state: &str) {
        let deadline = Instant::now() + timeout;
        while self.info()["state"] != state {
            assert!(Instant::now() < deadline, "the VM never became {state}: {}", self.info());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------
// A guest with a shared-volume disk moving between lab hosts.

/// How long a disk command on the guest console may take.
const DISK_WAIT: Duration = Duration::from_secs(60);

/// A volume under `dir` with a 32 MiB raw disk `d0`; returns the volume path.
pub fn volume_with_disk(dir: &TempDir) -> String {
    let vol = dir.path().join("vol").display().to_string();
    let out = run_ferry(&["volume", "create", &vol]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_ferry(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "32M", "d0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    vol
}

pub fn lease_owner(vol: &str) -> serde_json::Value {
    crate::cluster::disk_lease(vol, "d0")["owner"].clone()
}

/// The test guest on lab host a with disk d0 of `vol`, host id a, the
/// pattern `seed` written on its first 512 sectors.
pub fn boot_with_disk(lab: &Lab, vol: &str, mem_mib: u32, cmdline: &str, seed: u32) -> Vm {
    let disk = format!("csv:{vol}/disks/d0");
    let vm = crate::boot_in_lab_with(lab, "a", mem_mib, cmdline, &["--disk", &disk, "--host-id", "a"]);
    let w = command(&vm, &format!("disk-write 0 512 {seed}"), "disk-write", DISK_WAIT);
    assert!(w.starts_with("disk-write ok"), "{w}");
    vm
}

/// `ferry receive` on lab host b with tap vm0, allowed the disks under `dir`.
pub fn receiver_with_disks(lab: &Lab, dir: &TempDir, port: u16, extra: &[&str]) -> Vm {
    let allow = dir.path().display().to_string();
    let mut args = vec!["--net", "tap=vm0", "--allow-disks", &allow];
    args.extend_from_slice(extra);
    crate::receiver_in_lab(lab, "b", port, &args)
}

/// The VM's disk still holds pattern `seed` and takes new writes.
pub fn disk_intact(vm: &Vm, seed: u32, why: &str) {
    let v = command(vm, &format!("disk-verify 0 512 {seed}"), "disk-verify", DISK_WAIT);
    assert!(v.starts_with("disk-verify ok"), "{why}: {v}");
    let w = command(vm, "disk-write 1024 64 77", "disk-write", DISK_WAIT);
    assert!(w.starts_with("disk-write ok"), "{why}: the disk takes writes: {w}\n{}", vm.stderr());
}

/// Runs `f` on a new thread inside network namespace `netns` (threads it
/// starts inherit it): a relay or service that lives on a lab host.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(netns);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns on a valid namespace fd; only this thread moves.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns into {}", path.display());
        f()
    })
}

pub mod cluster;
pub mod stamps;

/// Milliseconds since the Unix epoch (as records and leases count them).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub mod stats {
    /// The median (the upper middle value of an even count), if any.
    pub fn median(v: &[f64]) -> Option<f64> {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    }

    /// The value at fraction `p` (0..=1) of the sorted values, if any.
    pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).copied()
    }

    /// Rounded to three decimals, for JSON that people read.
    pub fn round3(x: f64) -> f64 {
        (x * 1000.0).round() / 1000.0
    }

    /// A duration in milliseconds.
    pub fn ms(d: std::time::Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    /// A duration in milliseconds, rounded to three decimals.
    pub fn ms3(d: std::time::Duration) -> f64 {
        round3(ms(d))
    }
}

/// What a benchmark must not leave behind when it panics. Benchmarks are
/// built with panic = abort, so no `Drop` runs: a panic used to leave labs,
/// agents and spinning VMs behind. [`clean_up_on_panic`] installs a hook
/// that kills what this process started and takes its labs down.
mod leftovers {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    /// Labs this process brought up and has not taken down.
    pub static LABS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    /// VMM processes it started and has not reaped.
    pub static PIDS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
}

/// For benchmark `main`s: on a panic, after the usual message, kill every
/// VMM this process started and every process inside its labs' namespaces
/// (agents, the VMMs they started, pingers), then take the labs down.
pub fn clean_up_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let kill = |pid: u32| {
            // SAFETY: kill(2) with a PID and a signal number; no memory involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        };
        if let Ok(pids) = leftovers::PIDS.try_lock() {
            pids.iter().copied().for_each(kill);
        }
        let labs: Vec<String> = leftovers::LABS.try_lock().map(|l| l.iter().cloned().collect()).unwrap_or_default();
        for lab in labs {
            let all = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
            for ns in String::from_utf8_lossy(&all).lines().filter_map(|l| l.split_whitespace().next()) {
                if ns.strip_prefix(lab.as_str()).is_some_and(|rest| rest.starts_with('-')) {
                    let pids = Command::new("ip").args(["netns", "pids", ns]).output().map(|o| o.stdout);
                    String::from_utf8_lossy(&pids.unwrap_or_default())
                        .lines()
                        .filter_map(|p| p.trim().parse().ok())
                        .for_each(kill);
                }
            }
            let out = ferry_bounded(&["lab", "down", "--name", &lab], Duration::from_secs(60));
            eprintln!("after the panic: lab {lab} down (exit {:?})", out.status.code());
        }
    }));
}
