//! etcd members in the lab's hosts (`ferry lab up --etcd`): one per host,
//! inside the host's namespace, on the host's lab address, so a host's
//! crash (`ferry lab etcd kill`) or partition (`ferry lab cut`) takes its
//! member with it.
//!
//! Each member runs Debian's /usr/bin/etcd, detached (its own session),
//! with its data in /run/ferry-lab/NAME/etcd-HOST and its log in
//! /run/ferry-lab/NAME/etcd-HOST.log. The lab records its PID and start
//! time in the state file and signals it only while /proc still shows
//! that same process (a PID reused by someone else is left alone).
//! Readiness is etcd's own `/health` (true once the member sees a leader
//! and can serve a quorum read), asked from inside the host's namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::netns;
use super::state::{self, Started};
use super::topology::Role;
use super::LabError;

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// Where Debian's etcd-server puts the binary (scripts/install-deps.sh).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long `up` waits for every member to report healthy (a member is
/// ready in about 1 s here; a three-member election takes a few more).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// SIGTERM, then this long for the member to exit, then SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a SIGKILLed member may take to disappear.
pub const KILL_WAIT: Duration = Duration::from_secs(3);
/// The members' raft heartbeat and election timeout (see `start`).
pub const HEARTBEAT_MS: u64 = 50;
pub const ELECTION_TIMEOUT_MS: u64 = 500;
/// One `/health` request.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);

/// The member's client URL (what Ferry's `--etcd` takes).
pub fn client_url(role: Role) -> String {
    format!("http://{}:{CLIENT_PORT}", address(role))
}

fn peer_url(role: Role) -> String {
    format!("http://{}:{PEER_PORT}", address(role))
}

fn address(role: Role) -> std::net::Ipv4Addr {
    role.address().expect("etcd runs on hosts, which have addresses")
}

pub fn data_dir(lab: &str, role: Role) -> PathBuf {
    state::dir(lab).join(format!("etcd-{role}"))
}

pub fn log_path(lab: &str, role: Role) -> PathBuf {
    state::dir(lab).join(format!("etcd-{role}.log"))
}

fn etcd_bin() -> Result<PathBuf, LabError> {
    let p = Path::new(ETCD_BIN);
    if p.exists() {
        return Ok(p.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("etcd")).find(|p| p.is_file()).ok_or(LabError::EtcdMissing)
}

/// Starts host `role`'s member of the cluster of `hosts`, detached;
/// returns its record. Its data directory is kept if it exists (a
/// restarted member rejoins with its data).
pub fn start(lab: &str, role: Role, hosts: &[Role]) -> Result<Started, LabError> {
    let bin = etcd_bin()?;
    let io = |what: String| move |source| LabError::Io { what, source };
    let dir = state::dir(lab);
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let log_p = log_path(lab, role);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_p)
        .map_err(io(format!("cannot open {}", log_p.display())))?;
    let log2 = log.try_clone().map_err(io(format!("cannot open {}", log_p.display())))?;
    let ns_name = role.netns(lab);
    let ns = std::fs::File::open(netns::path(&ns_name))
        .map_err(io(format!("cannot open {}", netns::path(&ns_name).display())))?;
    let ns_fd = ns.as_raw_fd();
    let initial: Vec<String> = hosts.iter().map(|&h| format!("{h}={}", peer_url(h))).collect();
    let mut cmd = Command::new(&bin);
    cmd.arg("--name")
        .arg(role.suffix())
        .arg("--data-dir")
        .arg(data_dir(lab, role))
        .arg("--listen-client-urls")
        .arg(format!("{},http://127.0.0.1:{CLIENT_PORT}", client_url(role)))
        .arg("--advertise-client-urls")
        .arg(client_url(role))
        .arg("--listen-peer-urls")
        .arg(peer_url(role))
        .arg("--initial-advertise-peer-urls")
        .arg(peer_url(role))
        .arg("--initial-cluster")
        .arg(initial.join(","))
        .arg("--initial-cluster-token")
        .arg(format!("ferry-lab-{lab}"))
        .arg("--initial-cluster-state")
        .arg("new")
        // A member cut off keeps raising its term; without pre-vote it
        // deposes the leader when its link comes back, and the cluster has
        // no leader (no lease renewals, no writes) for seconds. etcd 3.5
        // turns this on by default; Debian's 3.4 does not.
        .arg("--pre-vote")
        // A crashed raft leader costs a failover the election (one to two
        // election timeouts) plus one more: the new leader extends every
        // lease by an election timeout, as it cannot know when the old
        // one last saw a keepalive. At etcd's 100/1000 ms defaults the VM
        // of a node whose member led answered after 5.6-6.1 s, at
        // 50/500 ms after 4.2-4.8 s (bench-failover, README). The lab's
        // members share one machine and keep their data in /run (tmpfs:
        // no slow fsync), so 50 ms heartbeats are sent on time even with
        // the box busy; 10 heartbeats per election timeout, as etcd
        // advises. Lease TTLs at least 1.5 election timeouts: 1 s here.
        .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
        .args(["--election-timeout", &ELECTION_TIMEOUT_MS.to_string()])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: between fork and exec the child only makes two system calls,
    // setns (into the host's namespace, through a descriptor this process
    // holds open until spawn returns) and setsid (so the member outlives
    // the lab command and its terminal); both are async-signal-safe and
    // touch no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| LabError::Spawn { bin: bin.clone(), source })?;
    drop(ns);
    let pid = child.id();
    // Not waited for: it runs on after this command exits.
    drop(child);
    let start_ticks = proc_stat(pid).map(|s| s.start_ticks).ok_or_else(|| LabError::EtcdExited {
        host: role,
        log: log_p.clone(),
        tail: log_tail(&log_p),
    })?;
    tracing::info!("started etcd member {role} in {ns_name} (PID {pid}), log {}", log_p.display());
    Ok(Started { pid, start_ticks, role, what: "etcd".into() })
}

struct Stat {
    state: char,
    start_ticks: u64,
}

/// State and start time of `pid`, from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE ..." where COMM may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat { state: fields.first()?.chars().next()?, start_ticks: fields.get(19)?.parse().ok()? })
}

/// True while the recorded process is still that process and not a zombie.
pub fn alive(s: &Started) -> bool {
    proc_stat(s.pid).is_some_and(|st| st.start_ticks == s.start_ticks && !matches!(st.state, 'Z' | 'X'))
}

fn signal(s: &Started, sig: i32) {
    if alive(s) {
        // SAFETY: kill(2) on a PID just checked to be the process we started.
        unsafe { libc::kill(s.pid as i32, sig) };
    }
}

fn wait_gone(s: &Started, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(s) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// How a member was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    NotRunning,
    Terminated,
    Killed,
}

/// SIGTERM, a bounded wait, then SIGKILL.
pub fn stop(s: &Started) -> Result<Stopped, LabError> {
    if !alive(s) {
        return Ok(Stopped::NotRunning);
    }
    signal(s, libc::SIGTERM);
    if wait_gone(s, STOP_GRACE) {
        return Ok(Stopped::Terminated);
    }
    tracing::warn!("etcd member {} (PID {}) ignored SIGTERM for {STOP_GRACE:?}; killing it", s.role, s.pid);
    kill(s)
}

/// SIGKILL (a crash), and a bounded wait until it is gone.
pub fn kill(s: &Started) -> Result<Stopped, LabError> {
    if !alive(s) {
        return Ok(Stopped::NotRunning);
    }
    signal(s, libc::SIGKILL);
    if wait_gone(s, KILL_WAIT) {
        Ok(Stopped::Killed)
    } else {
        Err(LabError::EtcdWontDie { host: s.role, pid: s.pid, secs: KILL_WAIT.as_secs() })
    }
}

/// Asks host `role`'s member for `/health` from inside its namespace.
pub fn health(lab: &str, role: Role) -> Result<(), String> {
    let addr = SocketAddr::from((address(role), CLIENT_PORT));
    let ns = role.netns(lab);
    let body = netns::run_in(&ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, HEALTH_TIMEOUT)?;
        s.set_read_timeout(Some(HEALTH_TIMEOUT))?;
        s.set_write_timeout(Some(HEALTH_TIMEOUT))?;
        s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .map_err(|e| e.to_string())?;
    let json = body.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if json.contains(r#""health":"true""#) {
        Ok(())
    } else {
        Err(if json.is_empty() { "no answer".to_owned() } else { json.to_owned() })
    }
}

/// Waits (bounded) until every member in `roles` is healthy.
pub fn wait_healthy(lab: &str, roles: &[Role], timeout: Duration) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let pending: Vec<String> =
            roles.iter().filter_map(|&r| health(lab, r).err().map(|e| format!("{r} ({e})"))).collect();
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::EtcdNotReady {
                members: pending.join(", "),
                secs: timeout.as_secs(),
                logs: state::dir(lab),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of a member's log, for error messages.
pub fn log_tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// One member, as `ferry lab status` shows it.
#[derive(Debug, Serialize)]
pub struct MemberStatus {
    pub host: Role,
    pub client_url: String,
    pub pid: Option<u32>,
    pub running: bool,
    /// `/health` says true (it has a leader and a quorum).
    pub healthy: bool,
    pub health_error: Option<String>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

pub fn member_status(lab: &str, role: Role, started: Option<&Started>) -> MemberStatus {
    let running = started.is_some_and(alive);
    let health = if running { health(lab, role) } else { Err("not running".into()) };
    MemberStatus {
        host: role,
        client_url: client_url(role),
        pid: started.filter(|s| alive(s)).map(|s| s.pid),
        running,
        healthy: health.is_ok(),
        health_error: health.err(),
        data_dir: data_dir(lab, role),
        log: log_path(lab, role),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_others_are_not() {
        let me = std::process::id();
        let st = proc_stat(me).unwrap();
        assert!(!matches!(st.state, 'Z' | 'X'));
        let s = Started { pid: me, start_ticks: st.start_ticks, role: Role::A, what: "test".into() };
        assert!(alive(&s));
        assert!(!alive(&Started { start_ticks: st.start_ticks + 1, ..s.clone() }), "another start time");
        assert!(!alive(&Started { pid: u32::MAX, ..s }));
    }

    #[test]
    fn urls() {
        assert_eq!(client_url(Role::C), "http://10.200.77.3:2379");
        assert_eq!(peer_url(Role::A), "http://10.200.77.1:2380");
        assert_eq!(data_dir("x", Role::B), Path::new("/run/ferry-lab/x/etcd-b"));
    }
}
