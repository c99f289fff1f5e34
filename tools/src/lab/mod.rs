//! The lab: "hosts on one machine". It makes network namespaces that play
//! a fabric switch, two VM hosts (each with a bridge for VM taps) and a
//! client, wires them with veth pairs and gives them addresses in one
//! private /24 (see [`topology`]). It uses iproute2 (`ip`) and needs root.
//!
//! Rules it keeps:
//! - It touches only what it created, as recorded in its state file
//!   ([`state`]): a namespace with one of its names that the state file does
//!   not list (or lists with another identity) makes `up`, `down` and
//!   `tap` refuse before changing anything.
//! - `up` is idempotent: it creates what is missing and leaves the rest.
//! - `down` deletes every namespace it created (the veths, bridges and taps
//!   in them go with them) and its state file; it tolerates a partly built
//!   or partly removed lab.
//! - The only processes it starts are its etcd members (`up --etcd`, see
//!   [`etcd`]), recorded by PID and start time; `down` stops them (SIGTERM,
//!   a bounded wait, SIGKILL) before it deletes the namespaces. Any other
//!   process `down` finds inside its namespaces (e.g. a VMM still running)
//!   it reports (PID and command) and leaves alone, deleting the namespace
//!   names anyway; such a namespace lives on, unnamed, until they exit.
//! - Every `ip` call is bounded in time ([`ip::IP_TIMEOUT`]), and so are
//!   the wait for another lab command ([`state::LOCK_TIMEOUT`]), for links
//!   ([`OPERATIONAL_TIMEOUT`]) and for etcd ([`etcd::READY_TIMEOUT`]).

pub mod etcd;
pub mod ip;
pub mod netns;
pub mod state;
pub mod status;
pub mod topology;

use status::tap_status;
pub use status::{Status, TapStatus};

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use serde::Serialize;

use ip::Ip;
use state::{Lock, NsRecord, State};
use topology::{Role, HOST_BRIDGE, PREFIX_LEN};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (it creates network namespaces, bridges and taps); run it as root")]
    NotRoot,
    #[error("iproute2's `ip` command was not found (looked in PATH and /usr/sbin, /sbin): install iproute2")]
    IpMissing,
    #[error("invalid lab name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("invalid tap name {name:?}: {why}")]
    BadTapName { name: String, why: String },
    #[error("{0}")]
    BadHost(String),
    #[error("cannot run {}: {source}", bin.display())]
    Spawn { bin: PathBuf, source: std::io::Error },
    #[error("`ip {args}` failed: {stderr}")]
    IpFailed { args: String, stderr: String },
    #[error("`ip {args}` did not finish within {secs} s")]
    IpTimeout { args: String, secs: u64 },
    #[error("`ip {args}` printed malformed JSON: {source}")]
    IpJson { args: String, source: serde_json::Error },
    #[error(
        "{} {} but lab {lab:?} did not create {} (not recorded in {}); refusing to touch {}: \
         pick another --name, or delete {} yourself if stale",
        if names.len() == 1 { "network namespace" } else { "network namespaces" },
        if names.len() == 1 { format!("{} exists", names[0]) } else { format!("{} exist", names.join(", ")) },
        if names.len() == 1 { "it" } else { "them" },
        state.display(),
        if names.len() == 1 { "it" } else { "them" },
        if names.len() == 1 { "it" } else { "them" },
    )]
    Foreign { names: Vec<String>, lab: String, state: PathBuf },
    #[error("lab {lab:?} is not up: network namespace {netns} does not exist (run `ferry lab up --name {lab}`)")]
    NotUp { lab: String, netns: String },
    #[error("{what} in {netns} is not the lab's: {why}")]
    NotOurs { what: String, netns: String, why: String },
    #[error("lab {lab:?} has no tap {tap} on host {host}")]
    NoSuchTap { lab: String, host: Role, tap: String },
    #[error("state file {}: {source}", path.display())]
    StateIo { path: PathBuf, source: std::io::Error },
    #[error("state file {} is not valid lab state ({source}); inspect it, and remove it only if no lab namespaces remain", path.display())]
    StateCorrupt { path: PathBuf, source: serde_json::Error },
    #[error("state file {} belongs to lab {found:?}", path.display())]
    StateMismatch { path: PathBuf, found: String },
    #[error("another `ferry lab` command has held {} for more than {secs} s", path.display())]
    Busy { path: PathBuf, secs: u64 },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the lab's links did not come up within {secs} s: {links}")]
    NotOperational { links: String, secs: u64 },
    #[error("etcd was not found at /usr/bin/etcd nor in PATH: install Debian's etcd-server (make deps)")]
    EtcdMissing,
    #[error("etcd member {host} exited at once; its log {} ends:\n{tail}", log.display())]
    EtcdExited { host: Role, log: PathBuf, tail: String },
    #[error("etcd member {host} (PID {pid}) was still there {secs} s after SIGKILL")]
    EtcdWontDie { host: Role, pid: u32, secs: u64 },
    #[error("etcd was not healthy within {secs} s: {members}; logs in {}", logs.display())]
    EtcdNotReady { members: String, secs: u64, logs: PathBuf },
    #[error("lab {lab:?} runs no etcd (make it with `ferry lab up --name {lab} --etcd`)")]
    NoEtcd { lab: String },
    #[error("lab {lab:?} has no host {host} (its hosts: {hosts})")]
    NotInLab { lab: String, host: Role, hosts: String },
    #[error(
        "lab {lab:?} already runs etcd on hosts {have}; its members cannot change to {want}: \
         take it down first (`ferry lab down --name {lab}`)"
    )]
    EtcdHostsFixed { lab: String, have: String, want: String },
}

/// What `ferry lab up` builds.
#[derive(Clone, Debug, Default)]
pub struct UpOptions {
    /// The VM hosts (None: a and b, or what the lab already has). Hosts
    /// are only ever added: `up` never removes one.
    pub hosts: Option<Vec<Role>>,
    /// Run one etcd member in each host.
    pub etcd: bool,
}

/// The namespaces of a lab with this state: the fabric, its hosts, the
/// client (creation order).
pub(crate) fn lab_roles(state: Option<&State>) -> Vec<Role> {
    let hosts = state.map_or(&Role::DEFAULT_HOSTS[..], |s| &s.hosts[..]);
    Role::ALL.into_iter().filter(|r| !r.is_host() || hosts.contains(r)).collect()
}

/// The client URLs of the members on `hosts`, comma-separated.
pub fn etcd_endpoints(hosts: &[Role]) -> String {
    hosts.iter().map(|&h| etcd::client_url(h)).collect::<Vec<_>>().join(",")
}

fn host_list(hosts: &[Role]) -> String {
    hosts.iter().map(|h| h.suffix()).collect::<Vec<_>>().join(",")
}

/// How long `up` waits for the kernel to report every link operational
/// (link events are processed at most about once a second).
pub const OPERATIONAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether a namespace name is free, the lab's own, or someone else's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presence {
    Absent,
    Ours,
    Foreign,
}

/// One interface, as `ip -d -j link` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Link {
    pub name: String,
    pub kind: Option<String>,
    pub up: bool,
    /// The kernel's operational state (UP once it carries traffic).
    pub operstate: String,
    pub master: Option<String>,
    /// For tun/tap devices: "tap" or "tun".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tun_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vnet_hdr: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct StoppedProcess {
    pub pid: u32,
    pub host: Role,
    pub what: String,
    pub how: etcd::Stopped,
}

#[derive(Debug, Serialize)]
pub struct Process {
    pub netns: String,
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Serialize)]
pub struct DownReport {
    pub name: String,
    /// Namespaces deleted now.
    pub deleted: Vec<String>,
    /// Namespaces the state file listed that were already gone.
    pub already_gone: Vec<String>,
    /// Processes found inside the lab's namespaces when they were deleted.
    /// The lab did not start them and kills none; each keeps its (now
    /// unnamed) namespace alive until it exits.
    pub processes_left: Vec<Process>,
    /// The lab's own processes (etcd members) it stopped first.
    pub stopped: Vec<StoppedProcess>,
    pub state_file_removed: bool,
}

pub struct Lab {
    name: String,
    ip: Ip,
}

impl Lab {
    /// Checks the name, that we are root and that `ip` is there.
    pub fn open(name: &str) -> Result<Lab, LabError> {
        topology::validate_name(name).map_err(|why| LabError::BadName { name: name.into(), why })?;
        if !netns::is_root() {
            return Err(LabError::NotRoot);
        }
        Ok(Lab { name: name.to_owned(), ip: Ip::find()? })
    }

    fn netns(&self, role: Role) -> String {
        role.netns(&self.name)
    }

    fn presence(&self, state: Option<&State>, role: Role) -> Result<Presence, LabError> {
        let ns = self.netns(role);
        let id = netns::identity(&ns)
            .map_err(|source| LabError::Io { what: format!("cannot stat {}", netns::path(&ns).display()), source })?;
        let Some(id) = id else { return Ok(Presence::Absent) };
        let recorded = state.and_then(|s| s.namespaces.get(&role)).filter(|r| r.netns == ns);
        Ok(match recorded {
            Some(r) if r.id() == id && r.tag.as_deref().is_none_or(|t| self.has_tag(&ns, t)) => Presence::Ours,
            _ => Presence::Foreign,
        })
    }

    /// Whether namespace `ns`'s loopback carries the lab's tag as its alias.
    fn has_tag(&self, ns: &str, tag: &str) -> bool {
        self.ip.run_in(ns, &["-o", "link", "show", "lo"]).is_ok_and(|out| out.contains(&tag_alias(tag)))
    }

    /// Fails, naming them, if any of the lab's namespace names is taken by
    /// a namespace the lab did not create.
    fn refuse_foreign(&self, state: Option<&State>) -> Result<(), LabError> {
        let mut foreign = vec![];
        for role in lab_roles(state) {
            if self.presence(state, role)? == Presence::Foreign {
                foreign.push(self.netns(role));
            }
        }
        if foreign.is_empty() {
            return Ok(());
        }
        Err(LabError::Foreign { names: foreign, lab: self.name.clone(), state: state::path(&self.name) })
    }

    /// Checks that `role`'s namespace is up and the lab's.
    fn require_ours(&self, state: Option<&State>, role: Role) -> Result<String, LabError> {
        let ns = self.netns(role);
        match self.presence(state, role)? {
            Presence::Ours => Ok(ns),
            Presence::Absent => Err(LabError::NotUp { lab: self.name.clone(), netns: ns }),
            Presence::Foreign => {
                Err(LabError::Foreign { names: vec![ns], lab: self.name.clone(), state: state::path(&self.name) })
            }
        }
    }

    /// Creates whatever of the lab is missing; returns its status.
    pub fn up(&self, opts: &UpOptions) -> Result<Status, LabError> {
        let lock = Lock::acquire()?;
        let loaded = State::load(&self.name)?;
        let fresh = loaded.is_none();
        let mut state = loaded.unwrap_or_else(|| State::new(&self.name));
        let mut hosts = if fresh { vec![] } else { state.hosts.clone() };
        for &h in opts.hosts.as_deref().unwrap_or(if fresh { &Role::DEFAULT_HOSTS[..] } else { &[] }) {
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        hosts.sort();
        let etcd_running = state.pids_started.iter().any(|p| p.what == "etcd");
        if state.etcd && hosts != state.hosts && etcd_running {
            return Err(LabError::EtcdHostsFixed {
                lab: self.name.clone(),
                have: host_list(&state.hosts),
                want: host_list(&hosts),
            });
        }
        // Check the names the lab will use before creating any of them.
        let mut planned = state.clone();
        planned.hosts = hosts.clone();
        self.refuse_foreign(Some(&planned))?;
        state.hosts = hosts;
        state.etcd |= opts.etcd;
        if fresh {
            // A directory left by a lab of this name that is gone (no
            // state file): stale etcd data, ours by its name.
            let dir = state::dir(&self.name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|source| LabError::Io { what: format!("cannot remove {}", dir.display()), source })?;
            }
        }
        let roles = lab_roles(Some(&state));

        for &role in &roles {
            let ns = self.netns(role);
            if self.presence(Some(&state), role)? == Presence::Absent {
                tracing::info!("creating network namespace {ns}");
                self.ip.run(&["netns", "add", &ns])?;
                let id = netns::identity(&ns)
                    .map_err(|source| LabError::Io {
                        what: format!("cannot stat {}", netns::path(&ns).display()),
                        source,
                    })?
                    .ok_or_else(|| LabError::IpFailed {
                        args: format!("netns add {ns}"),
                        stderr: "the namespace vanished right after it was created".into(),
                    })?;
                let tag = new_tag()?;
                self.ip.run_in(&ns, &["link", "set", "lo", "alias", &tag_alias(&tag)])?;
                state.namespaces.insert(role, NsRecord { netns: ns.clone(), dev: id.dev, ino: id.ino, tag: Some(tag) });
                // Record it at once: a failure later still leaves it for `down`.
                state.save()?;
            }
        }

        for &role in &roles {
            let ns = self.netns(role);
            quiet_ipv6(&ns)?;
            self.ip.run_in(&ns, &["link", "set", "lo", "up"])?;
            if let Some(br) = role.bridge() {
                self.ensure_bridge(&ns, br, role.mac())?;
            }
        }
        for &role in &roles {
            if let Some(uplink) = role.uplink() {
                self.ensure_uplink(role, &uplink, state.cut.contains(&role))?;
            }
        }
        for &role in &roles {
            if let (Some(addr), Some(dev)) = (role.address(), role.address_dev()) {
                let ns = self.netns(role);
                self.ip.run_in(&ns, &["addr", "replace", &format!("{addr}/{PREFIX_LEN}"), "dev", dev])?;
            }
        }
        for (&role, taps) in &state.taps {
            let ns = self.netns(role);
            let links = self.links(&ns)?;
            for tap in taps {
                self.ensure_tap(&ns, tap, links.get(tap))?;
            }
        }
        state.save()?;
        self.wait_operational(&state)?;
        if state.etcd {
            self.ensure_etcd(&mut state)?;
        }
        drop(lock);
        self.status()
    }

    /// Starts every member that is not running (a first start, or one
    /// killed since), then waits until the reachable ones are healthy.
    fn ensure_etcd(&self, state: &mut State) -> Result<(), LabError> {
        for &host in &state.hosts.clone() {
            let running = state.pids_started.iter().find(|p| p.role == host && p.what == "etcd");
            if running.is_some_and(etcd::alive) {
                continue;
            }
            state.pids_started.retain(|p| !(p.role == host && p.what == "etcd"));
            let started = etcd::start(&self.name, host, &state.hosts)?;
            state.pids_started.push(started);
            state.save()?;
        }
        let reachable: Vec<Role> = state.hosts.iter().copied().filter(|h| !state.cut.contains(h)).collect();
        etcd::wait_healthy(&self.name, &reachable, etcd::READY_TIMEOUT)
    }

    /// Checks that the lab runs etcd and has host `host`.
    fn etcd_host(&self, state: Option<&State>, host: Role) -> Result<(), LabError> {
        let state = state.ok_or_else(|| LabError::NoEtcd { lab: self.name.clone() })?;
        if !state.etcd {
            return Err(LabError::NoEtcd { lab: self.name.clone() });
        }
        self.lab_host(state, host)
    }

    fn lab_host(&self, state: &State, host: Role) -> Result<(), LabError> {
        if !state.hosts.contains(&host) {
            return Err(LabError::NotInLab { lab: self.name.clone(), host, hosts: host_list(&state.hosts) });
        }
        Ok(())
    }

    /// Kills host `host`'s etcd member with SIGKILL, as a crash would, and
    /// waits (bounded) until it is gone. Its data stays: `etcd start`
    /// brings it back.
    pub fn etcd_kill(&self, host: Role) -> Result<etcd::MemberStatus, LabError> {
        let _lock = Lock::acquire()?;
        let mut state = State::load(&self.name)?;
        self.etcd_host(state.as_ref(), host)?;
        let state = state.as_mut().expect("checked above");
        if let Some(p) = state.pids_started.iter().find(|p| p.role == host && p.what == "etcd").cloned() {
            let how = etcd::kill(&p)?;
            tracing::info!("etcd member {host} (PID {}): {how:?}", p.pid);
            state.pids_started.retain(|q| q != &p);
            state.save()?;
        }
        Ok(etcd::member_status(&self.name, host, None))
    }

    /// Starts host `host`'s etcd member again if it is not running (on its
    /// old data: it rejoins) and waits (bounded) until it is healthy.
    pub fn etcd_start(&self, host: Role) -> Result<etcd::MemberStatus, LabError> {
        let _lock = Lock::acquire()?;
        let mut state = State::load(&self.name)?;
        self.etcd_host(state.as_ref(), host)?;
        let state = state.as_mut().expect("checked above");
        self.require_ours(Some(state), host)?;
        let current = state.pids_started.iter().find(|p| p.role == host && p.what == "etcd").cloned();
        if !current.as_ref().is_some_and(etcd::alive) {
            state.pids_started.retain(|p| !(p.role == host && p.what == "etcd"));
            let started = etcd::start(&self.name, host, &state.hosts)?;
            state.pids_started.push(started);
            state.save()?;
        }
        if !state.cut.contains(&host) {
            etcd::wait_healthy(&self.name, &[host], etcd::READY_TIMEOUT)?;
        }
        let p = state.pids_started.iter().find(|p| p.role == host && p.what == "etcd");
        Ok(etcd::member_status(&self.name, host, p))
    }

    /// The etcd client URLs of the lab, comma-separated.
    pub fn etcd_endpoints(&self) -> Result<String, LabError> {
        let state = State::load(&self.name)?.filter(|s| s.etcd);
        let state = state.ok_or_else(|| LabError::NoEtcd { lab: self.name.clone() })?;
        Ok(etcd_endpoints(&state.hosts))
    }

    /// Cuts host `host`'s link to the fabric (its switch port goes down):
    /// the host, its VMs and its etcd member are partitioned from the rest.
    pub fn cut(&self, host: Role) -> Result<(), LabError> {
        self.set_cut(host, true)
    }

    /// Restores a cut link and waits (bounded) until it carries traffic.
    pub fn heal(&self, host: Role) -> Result<(), LabError> {
        self.set_cut(host, false)
    }

    fn set_cut(&self, host: Role, cut: bool) -> Result<(), LabError> {
        let _lock = Lock::acquire()?;
        let mut state = State::load(&self.name)?;
        let ns = self.require_ours(state.as_ref(), host)?;
        let state = state.as_mut().expect("a lab namespace of ours implies a state file");
        self.lab_host(state, host)?;
        let fabric = self.require_ours(Some(state), Role::Fabric)?;
        let uplink = host.uplink().expect("hosts have uplinks");
        tracing::info!("{} {fabric}:{} ({ns}'s link)", if cut { "cutting" } else { "restoring" }, uplink.fabric_end);
        self.ip.run_in(&fabric, &["link", "set", uplink.fabric_end, if cut { "down" } else { "up" }])?;
        if cut {
            state.cut.insert(host);
        } else {
            state.cut.remove(&host);
        }
        state.save()?;
        if !cut {
            self.wait_operational(state)?;
        }
        Ok(())
    }

    /// The links the lab wires, by namespace: bridges and veth ends.
    /// (Cut links are left out: they are down on purpose.)
    fn wired_links(&self, state: &State) -> Vec<(String, &'static str)> {
        let mut out = vec![];
        for role in lab_roles(Some(state)) {
            if state.cut.contains(&role) {
                if let Some(br) = role.bridge() {
                    out.push((self.netns(role), br));
                }
                continue;
            }
            if let Some(br) = role.bridge() {
                out.push((self.netns(role), br));
            }
            if let Some(u) = role.uplink() {
                out.push((self.netns(Role::Fabric), u.fabric_end));
                out.push((self.netns(role), u.local_end));
            }
        }
        out
    }

    /// Waits until the kernel reports every wired link operational, so
    /// traffic sent right after `up` is neither dropped nor held back
    /// waiting for ARP.
    fn wait_operational(&self, state: &State) -> Result<(), LabError> {
        let deadline = std::time::Instant::now() + OPERATIONAL_TIMEOUT;
        loop {
            let mut pending = vec![];
            let mut by_ns: BTreeMap<String, BTreeMap<String, Link>> = BTreeMap::new();
            for (ns, name) in self.wired_links(state) {
                if !by_ns.contains_key(&ns) {
                    by_ns.insert(ns.clone(), self.links(&ns)?);
                }
                let state = by_ns[&ns].get(name).map_or("missing", |l| l.operstate.as_str());
                if state != "UP" {
                    pending.push(format!("{ns}:{name} ({state})"));
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(LabError::NotOperational {
                    links: pending.join(", "),
                    secs: OPERATIONAL_TIMEOUT.as_secs(),
                });
            }
            tracing::debug!("waiting for {}", pending.join(", "));
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }

    fn ensure_bridge(&self, ns: &str, br: &str, mac: &str) -> Result<(), LabError> {
        let links = self.links(ns)?;
        match links.get(br) {
            None => {
                tracing::info!("creating bridge {br} in {ns}");
                self.ip.run_in(
                    ns,
                    &[
                        "link",
                        "add",
                        br,
                        "address",
                        mac,
                        "type",
                        "bridge",
                        "stp_state",
                        "0",
                        "forward_delay",
                        "0",
                        "mcast_snooping",
                        "0",
                    ],
                )?;
            }
            Some(l) if l.kind.as_deref() != Some("bridge") => {
                return Err(LabError::NotOurs {
                    what: format!("interface {br}"),
                    netns: ns.into(),
                    why: format!("it is a {}, not the lab's bridge", l.kind.as_deref().unwrap_or("device")),
                });
            }
            Some(_) => {}
        }
        self.ip.run_in(ns, &["link", "set", br, "up"])?;
        Ok(())
    }

    /// A cut uplink is wired but left down at the fabric end.
    fn ensure_uplink(&self, role: Role, uplink: &topology::Uplink, cut: bool) -> Result<(), LabError> {
        let fabric = self.netns(Role::Fabric);
        let ns = self.netns(role);
        let far = self.links(&fabric)?.get(uplink.fabric_end).cloned();
        let near = self.links(&ns)?.get(uplink.local_end).cloned();
        for (l, in_ns) in [(&far, &fabric), (&near, &ns)] {
            if let Some(l) = l.as_ref().filter(|l| l.kind.as_deref() != Some("veth")) {
                return Err(LabError::NotOurs {
                    what: format!("interface {}", l.name),
                    netns: in_ns.clone(),
                    why: format!("it is a {}, not the lab's veth", l.kind.as_deref().unwrap_or("device")),
                });
            }
        }
        if far.is_none() || near.is_none() {
            // Half a pair cannot normally exist (a veth pair dies whole);
            // if it does, it is ours (our name in our namespace): rebuild.
            if far.is_some() {
                self.ip.run_in(&fabric, &["link", "del", uplink.fabric_end])?;
            }
            if near.is_some() {
                self.ip.run_in(&ns, &["link", "del", uplink.local_end])?;
            }
            tracing::info!("creating veth {fabric}:{} <-> {ns}:{}", uplink.fabric_end, uplink.local_end);
            self.ip.run_in(
                &fabric,
                &["link", "add", uplink.fabric_end, "type", "veth", "peer", "name", uplink.local_end, "netns", &ns],
            )?;
        }
        let state = if cut { "down" } else { "up" };
        self.ip.run_in(&fabric, &["link", "set", uplink.fabric_end, "master", topology::FABRIC_BRIDGE, state])?;
        match role.bridge() {
            Some(br) => self.ip.run_in(&ns, &["link", "set", uplink.local_end, "master", br, "up"])?,
            None => self.ip.run_in(&ns, &["link", "set", uplink.local_end, "address", role.mac(), "up"])?,
        };
        Ok(())
    }

    fn ensure_tap(&self, ns: &str, tap: &str, existing: Option<&Link>) -> Result<(), LabError> {
        match existing {
            None => {
                tracing::info!("creating tap {tap} in {ns}");
                self.ip.run_in(ns, &["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])?;
            }
            Some(l) if l.tun_type.as_deref() != Some("tap") => {
                return Err(LabError::NotOurs {
                    what: format!("interface {tap}"),
                    netns: ns.into(),
                    why: format!("it is a {}, not a tap", l.kind.as_deref().unwrap_or("device")),
                });
            }
            Some(_) => {}
        }
        self.ip.run_in(ns, &["link", "set", tap, "master", HOST_BRIDGE, "up"])?;
        Ok(())
    }

    /// Deletes everything the lab made. Refuses, before deleting anything,
    /// if one of its names is held by a namespace it did not create.
    pub fn down(&self) -> Result<DownReport, LabError> {
        let _lock = Lock::acquire()?;
        let state = State::load(&self.name)?;
        self.refuse_foreign(state.as_ref())?;
        let mut report = DownReport {
            name: self.name.clone(),
            deleted: vec![],
            already_gone: vec![],
            processes_left: vec![],
            stopped: vec![],
            state_file_removed: false,
        };
        let Some(mut state) = state else {
            // No state and (checked above) no namespace of ours: nothing to do.
            return Ok(report);
        };
        // Its own processes first (etcd members), by recorded PID.
        for p in state.pids_started.clone() {
            let how = etcd::stop(&p)?;
            tracing::info!("{} member {} (PID {}): {how:?}", p.what, p.role, p.pid);
            report.stopped.push(StoppedProcess { pid: p.pid, host: p.role, what: p.what.clone(), how });
            state.pids_started.retain(|q| q != &p);
            state.save()?;
        }
        for role in Role::ALL.into_iter().rev() {
            let Some(record) = state.namespaces.get(&role).cloned() else { continue };
            if self.presence(Some(&state), role)? == Presence::Absent {
                report.already_gone.push(record.netns.clone());
            } else {
                for pid in self.pids(&record.netns)? {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    let comm = comm.trim().to_owned();
                    tracing::warn!(
                        "process {pid} ({comm}) is still inside {}: deleting the name anyway; \
                         the namespace lives on until it exits",
                        record.netns
                    );
                    report.processes_left.push(Process { netns: record.netns.clone(), pid, comm });
                }
                tracing::info!("deleting network namespace {}", record.netns);
                self.ip.run(&["netns", "del", &record.netns])?;
                report.deleted.push(record.netns.clone());
            }
            state.namespaces.remove(&role);
            state.taps.remove(&role);
            state.save()?;
        }
        let dir = state::dir(&self.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|source| LabError::Io { what: format!("cannot remove {}", dir.display()), source })?;
        }
        state.remove()?;
        report.state_file_removed = true;
        Ok(report)
    }

    /// Adds a persistent VM tap (vnet_hdr) to host `role`'s bridge.
    pub fn tap_add(&self, role: Role, tap: &str) -> Result<TapStatus, LabError> {
        let ns = self.tap_checks(role, tap)?;
        let _lock = Lock::acquire()?;
        let mut state = State::load(&self.name)?;
        self.require_ours(state.as_ref(), role)?;
        let state = state.as_mut().expect("a lab namespace of ours implies a state file");
        let listed = state.taps.get(&role).is_some_and(|t| t.contains(tap));
        let links = self.links(&ns)?;
        if links.contains_key(tap) && !listed {
            return Err(LabError::NotOurs {
                what: format!("interface {tap}"),
                netns: ns,
                why: "it exists but the lab did not create it".into(),
            });
        }
        if !links.contains_key(tap) {
            self.ip.run_in(&ns, &["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])?;
            state.taps.entry(role).or_default().insert(tap.to_owned());
            state.save()?;
        }
        let links = self.links(&ns)?;
        self.ensure_tap(&ns, tap, links.get(tap))?;
        let l = self.links(&ns)?.remove(tap);
        Ok(tap_status(tap, l.as_ref()))
    }

    /// Deletes a tap the lab made.
    pub fn tap_del(&self, role: Role, tap: &str) -> Result<(), LabError> {
        let ns = self.tap_checks(role, tap)?;
        let _lock = Lock::acquire()?;
        let mut state = State::load(&self.name)?;
        self.require_ours(state.as_ref(), role)?;
        let state = state.as_mut().expect("a lab namespace of ours implies a state file");
        let listed = state.taps.get(&role).is_some_and(|t| t.contains(tap));
        let exists = self.links(&ns)?.contains_key(tap);
        if !listed {
            if exists {
                return Err(LabError::NotOurs {
                    what: format!("interface {tap}"),
                    netns: ns,
                    why: "the lab did not create it".into(),
                });
            }
            return Err(LabError::NoSuchTap { lab: self.name.clone(), host: role, tap: tap.into() });
        }
        if exists {
            tracing::info!("deleting tap {tap} in {ns}");
            self.ip.run_in(&ns, &["tuntap", "del", "dev", tap, "mode", "tap"])?;
        }
        if let Some(t) = state.taps.get_mut(&role) {
            t.remove(tap);
            if t.is_empty() {
                state.taps.remove(&role);
            }
        }
        state.save()
    }

    fn tap_checks(&self, role: Role, tap: &str) -> Result<String, LabError> {
        if !role.is_host() {
            return Err(LabError::BadHost(format!(
                "taps live on the VM hosts a and b (and c in a three-host lab), not on {role}"
            )));
        }
        topology::validate_tap_name(tap).map_err(|why| LabError::BadTapName { name: tap.into(), why })?;
        Ok(self.netns(role))
    }

    /// The argv that runs `cmd` inside `role`'s namespace (`ip netns exec`,
    /// which also gives the command a /sys of that namespace).
    pub fn exec_argv(&self, role: Role, cmd: &[OsString]) -> Result<Vec<OsString>, LabError> {
        let state = State::load(&self.name)?;
        let ns = self.require_ours(state.as_ref(), role)?;
        let mut argv: Vec<OsString> = vec![self.ip.bin().into(), "netns".into(), "exec".into(), ns.into()];
        argv.extend(cmd.iter().cloned());
        Ok(argv)
    }

    /// The interfaces in `ns`, by name.
    fn links(&self, ns: &str) -> Result<BTreeMap<String, Link>, LabError> {
        let v = self.ip.json(Some(ns), &["-d", "link", "show"])?;
        Ok(parse_links(&v).into_iter().map(|l| (l.name.clone(), l)).collect())
    }

    /// "ADDR/LEN dev IF" for every IPv4 address in `ns`.
    fn ipv4(&self, ns: &str) -> Result<Vec<String>, LabError> {
        let v = self.ip.json(Some(ns), &["-4", "addr", "show"])?;
        let mut out = vec![];
        for dev in v.as_array().into_iter().flatten() {
            let ifname = dev["ifname"].as_str().unwrap_or("?");
            for a in dev["addr_info"].as_array().into_iter().flatten() {
                if let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                    out.push(format!("{local}/{len} dev {ifname}"));
                }
            }
        }
        Ok(out)
    }

    fn pids(&self, ns: &str) -> Result<Vec<u32>, LabError> {
        let out = self.ip.run(&["netns", "pids", ns])?;
        Ok(out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
    }
}

fn parse_links(v: &serde_json::Value) -> Vec<Link> {
    let mut out = vec![];
    for l in v.as_array().into_iter().flatten() {
        let Some(name) = l["ifname"].as_str() else { continue };
        let flags: Vec<&str> = l["flags"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).collect();
        let info = &l["linkinfo"];
        out.push(Link {
            name: name.to_owned(),
            kind: info["info_kind"].as_str().map(str::to_owned),
            up: flags.contains(&"UP"),
            operstate: l["operstate"].as_str().unwrap_or("UNKNOWN").to_owned(),
            master: l["master"].as_str().map(str::to_owned),
            tun_type: info["info_data"]["type"].as_str().map(str::to_owned),
            vnet_hdr: info["info_data"]["vnet_hdr"].as_bool(),
        });
    }
    out
}

/// Turns IPv6 off inside `ns` (all, default and existing interfaces), so no
/// duplicate address detection, router or multicast listener traffic flows:
/// only what the tests send. A kernel without IPv6 needs nothing.
fn quiet_ipv6(ns: &str) -> Result<(), LabError> {
    netns::run_in(ns, || {
        for conf in ["all", "default", "lo"] {
            let p = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            match std::fs::write(&p, b"1") {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r.map_err(|e| std::io::Error::new(e.kind(), format!("{p}: {e}")))?,
            }
        }
        Ok(())
    })
    .map_err(|source| LabError::Io { what: format!("cannot turn IPv6 off in {ns}"), source })
}

/// The loopback alias that marks a namespace as this lab's.
fn tag_alias(tag: &str) -> String {
    format!("ferry-lab-{tag}")
}

/// 64 random bits as hex, from the kernel.
fn new_tag() -> Result<String, LabError> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|source| LabError::Io { what: "cannot read /dev/urandom".into(), source })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_ip_json() {
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"]},
                {"ifindex":3,"ifname":"tp0","flags":["BROADCAST","MULTICAST"],"master":"br0",
                 "linkinfo":{"info_kind":"tun","info_data":{"type":"tap","pi":false,"vnet_hdr":true}}},
                {"ifindex":2,"ifname":"br0","flags":["UP"],"linkinfo":{"info_kind":"bridge"}}]"#,
        )
        .unwrap();
        let links = parse_links(&v);
        assert_eq!(links.len(), 3);
        assert!(links[0].up && links[0].kind.is_none());
        assert_eq!(links[1].tun_type.as_deref(), Some("tap"));
        assert_eq!(links[1].vnet_hdr, Some(true));
        assert_eq!(links[1].master.as_deref(), Some("br0"));
        assert!(!links[1].up);
        assert_eq!(links[2].kind.as_deref(), Some("bridge"));
        let t = tap_status("tp0", Some(&links[1]));
        assert!(t.exists && !t.up);
        assert!(!tap_status("x", None).exists);
    }
}
