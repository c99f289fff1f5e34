//! One VM's VMM process as the agent supervises it: a `ferry run` child in
//! its own session (so killing the agent leaves it running), with its API
//! socket, console log and PID under the VM's directory in the state dir:
//!
//! ```text
//! STATE/vms/<name>/machine.json   the MachineConfig it was booted with
//! STATE/vms/<name>/api.sock       its control API
//! STATE/vms/<name>/serial.log     its serial console
//! STATE/vms/<name>/vmm.log        its stderr
//! STATE/vms/<name>/vmm.pid        its PID
//! ```
//!
//! A restarted agent finds a running VMM again by asking its socket
//! (`vm.info`), and learns of its exit from a pidfd, so it never needs to
//! be the VMM's parent.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::mpsc::UnboundedSender;
use vmm::config::MachineConfig;

/// What the supervision threads tell the agent.
#[derive(Debug)]
pub enum Event {
    /// The VMM answered its API in state `state`.
    Ready { name: String, pid: u32, state: String },
    /// It did not answer in time.
    NotReady { name: String, pid: u32, why: String },
    /// It exited (`code`: its exit status, when the agent is its parent).
    Exited { name: String, pid: u32, code: Option<i32> },
    /// A clean stop was asked that long ago: kill it if it still runs.
    StopOverdue { name: String, pid: u32 },
    /// A `ferry receive` for move `move_id` listens at `endpoint`.
    Listening { name: String, pid: u32, move_id: String, endpoint: String },
    /// The source VMM's `vm.migrate` for move `move_id` returned.
    MoveDone { name: String, move_id: String, result: Result<serde_json::Value, String> },
    /// The destination of move `move_id` had that long to get ready.
    MoveOverdue { name: String, move_id: String },
}

pub fn vm_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("vms").join(name)
}

pub fn api_sock(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

/// How a VMM is booted on this node.
pub struct Launch<'a> {
    pub ferry: &'a Path,
    pub dir: &'a Path,
    pub machine: &'a MachineConfig,
    pub taps: &'a [String],
    pub host_id: &'a str,
    pub disk_lease_ttl_ms: u64,
    pub kvm_device: &'a Path,
}

/// Starts `ferry run --machine` in its own session; returns its PID. A
/// thread waits for it and reports [`Event::Exited`].
pub fn spawn(name: &str, l: &Launch<'_>, events: &UnboundedSender<Event>) -> anyhow::Result<u32> {
    std::fs::create_dir_all(l.dir).with_context(|| format!("cannot create {}", l.dir.display()))?;
    let machine_file = l.dir.join("machine.json");
    std::fs::write(&machine_file, serde_json::to_vec_pretty(l.machine)?)
        .with_context(|| format!("cannot write {}", machine_file.display()))?;
    let sock = api_sock(l.dir);
    let _ = std::fs::remove_file(&sock);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(l.dir.join("vmm.log"))
        .with_context(|| format!("cannot open {}", l.dir.join("vmm.log").display()))?;
    let mut cmd = Command::new(l.ferry);
    cmd.arg("run").arg("--machine").arg(&machine_file);
    for tap in l.taps {
        cmd.arg("--net").arg(format!("tap={tap}"));
    }
    cmd.arg("--api-sock").arg(&sock);
    cmd.arg("--serial").arg(format!("file:{}", l.dir.join("serial.log").display()));
    cmd.args(["--host-id", l.host_id, "--lease-ttl-ms", &l.disk_lease_ttl_ms.to_string()]);
    // The owner key is the authority: a disk lease left by a node that
    // went down is taken once it has expired (never while renewed).
    cmd.arg("--takeover");
    cmd.arg("--kvm-device").arg(l.kvm_device);
    start(name, cmd, l.dir, log, events)
}

/// Starts a VMM command (`ferry run` or `ferry receive`) in its own
/// session with its stderr in `log`, records its PID in `dir`, and has a
/// thread report [`Event::Exited`].
pub fn start(
    name: &str,
    mut cmd: Command,
    dir: &Path,
    log: std::fs::File,
    events: &UnboundedSender<Event>,
) -> anyhow::Result<u32> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: setsid is async-signal-safe and touches only the child: it
    // gets its own session and process group, so signals sent to the
    // agent's group (a terminal's ^C, systemd's KillMode=control-group
    // aside) do not reach it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_owned();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", Path::new(&program).display()))?;
    let pid = child.id();
    std::fs::write(dir.join("vmm.pid"), format!("{pid}\n"))?;
    let (tx, name) = (events.clone(), name.to_owned());
    std::thread::Builder::new().name(format!("wait-{pid}")).spawn(move || {
        let code = child.wait().ok().and_then(|s| s.code());
        let _ = tx.send(Event::Exited { name, pid, code });
    })?;
    Ok(pid)
}

/// `vm.info` of the VMM behind `sock`.
pub fn info(sock: &Path, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let r = vmm::api::client::request(sock, "GET", "vm.info", b"", timeout)?;
    if !r.is_success() {
        bail!("vm.info: {}", r.error_message());
    }
    Ok(serde_json::from_str(&r.body)?)
}

/// A VMM found running in `dir` (a previous agent's): its PID and state,
/// if its socket answers and it still runs a VM. A thread watches it by
/// pidfd and reports [`Event::Exited`].
pub fn adopt(name: &str, dir: &Path, events: &UnboundedSender<Event>) -> Option<(u32, String)> {
    let sock = api_sock(dir);
    if !sock.exists() {
        return None;
    }
    let v = match info(&sock, Duration::from_secs(2)) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("VM {name}: a socket at {} but no VMM answers ({e}); not adopted", sock.display());
            return None;
        }
    };
    let state = v["state"].as_str().unwrap_or("unknown").to_owned();
    let pid = v["pid"].as_u64()? as u32;
    if matches!(state.as_str(), "Stopped" | "Retired") {
        return None;
    }
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    let fd = fd as libc::c_int;
    let (tx, name) = (events.clone(), name.to_owned());
    let spawned = std::thread::Builder::new().name(format!("watch-{pid}")).spawn(move || {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        loop {
            // SAFETY: one valid pollfd, owned by this thread; blocks until
            // the process exits (the pidfd becomes readable).
            let r = unsafe { libc::poll(&mut p, 1, -1) };
            if r > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        // SAFETY: closes the pidfd this thread owns.
        unsafe { libc::close(fd) };
        let _ = tx.send(Event::Exited { name, pid, code: None });
    });
    if spawned.is_err() {
        // SAFETY: the thread did not start; the fd is still ours.
        unsafe { libc::close(fd) };
        return None;
    }
    Some((pid, state))
}

/// Waits (at most `limit`) until the VMM answers `vm.info`; reports
/// [`Event::Ready`] or [`Event::NotReady`].
pub fn wait_ready(name: String, pid: u32, sock: PathBuf, limit: Duration, events: UnboundedSender<Event>) {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no socket yet");
    while Instant::now() < deadline {
        if sock.exists() {
            match info(&sock, Duration::from_secs(2)) {
                Ok(v) => {
                    let state = v["state"].as_str().unwrap_or("unknown").to_owned();
                    let _ = events.send(Event::Ready { name, pid, state });
                    return;
                }
                Err(e) => last = e.to_string(),
            }
        }
        if !alive(pid) {
            return; // Event::Exited says the rest.
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = events.send(Event::NotReady { name, pid, why: format!("no API answer within {limit:?}: {last}") });
}

/// Asks the VMM to stop cleanly (`vm.shutdown`: it releases its disk
/// leases and exits).
pub fn shutdown(sock: &Path) -> anyhow::Result<()> {
    let r = vmm::api::client::request(sock, "PUT", "vm.shutdown", b"", Duration::from_secs(5))?;
    if !r.is_success() {
        bail!("vm.shutdown: {}", r.error_message());
    }
    Ok(())
}

pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

pub fn kill(pid: u32) {
    // SAFETY: SIGKILL to a VMM this agent supervises (its PID was checked
    // against the live entry by the caller).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}
