//! `ferry validate`: check that a set of hosts can form a cluster, before
//! any VM depends on it (Hyper-V's "Validate a Configuration"). Writes a
//! JSON and an HTML report; exits 1 if any check failed. Each failed check
//! says what to do about it.
//!
//! Hosts are lab hosts (network namespaces); every probe runs inside its
//! host through `ip netns exec` as `ferry validate-probe`, with a timeout,
//! so an unreachable host is a failed check, never a hang.
//!
//! [`run_checks`] is the check itself, printing nothing: `ferry cluster
//! create` and `ferry cluster validate` run it too.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};
use vmm::arch::x86_64::cpu_profile::CpuProfile;

const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
const BANDWIDTH_BYTES: u64 = 128 << 20;
const BANDWIDTH_PORT: u16 = 7399;
/// Clocks further apart than this confuse leases and logs.
const MAX_SKEW_MS: f64 = 100.0;

#[derive(Args)]
pub struct ValidateArgs {
    /// The lab whose hosts to check (`ferry lab up --name NAME`).
    #[arg(long, value_name = "NAME", default_value = "ferry")]
    lab: String,
    /// Hosts to check, comma-separated (a,b or a,b,c).
    #[arg(long, value_name = "HOSTS", value_delimiter = ',', default_value = "a,b")]
    hosts: Vec<String>,
    /// The shared volume: one PATH for every host, or HOST=PATH pairs where
    /// hosts mount it at different places.
    #[arg(long, value_name = "PATH|HOST=PATH,...", value_delimiter = ',')]
    volume: Vec<String>,
    /// Write the JSON report here (also printed on stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
}

impl ValidateArgs {
    fn target(&self) -> Target {
        Target { lab: self.lab.clone(), hosts: self.hosts.clone(), volume: self.volume.clone() }
    }
}

/// What to validate: hosts of a lab and the shared volume (one PATH, or
/// HOST=PATH pairs).
#[derive(Clone, Debug)]
pub struct Target {
    pub lab: String,
    pub hosts: Vec<String>,
    pub volume: Vec<String>,
}

/// One check's result.
#[derive(Serialize, Clone, Debug)]
pub struct Check {
    pub check: String,
    pub subject: String,
    pub ok: bool,
    pub detail: String,
    /// What to do about a failure (empty when it passed).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Check {
    /// `CHECK SUBJECT: DETAIL -> FIX`, one line.
    pub fn line(&self) -> String {
        if self.fix.is_empty() {
            format!("{} {}: {}", self.check, self.subject, self.detail)
        } else {
            format!("{} {}: {} -> {}", self.check, self.subject, self.detail, self.fix)
        }
    }
}

/// A finished validation.
pub struct Validation {
    /// Every check passed.
    pub ok: bool,
    pub checks: Vec<Check>,
    /// The whole report (checks, host facts, CPU matrix and baseline), as
    /// the JSON file holds it.
    pub report: Value,
}

impl Validation {
    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }
}

struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, check: &str, subject: &str, ok: bool, detail: impl Into<String>, fix: &str) {
        self.checks.push(Check {
            check: check.into(),
            subject: subject.into(),
            ok,
            detail: detail.into(),
            fix: if ok { String::new() } else { fix.into() },
        });
    }
}

/// Runs `ferry validate-probe ARGS` inside `netns`, with a timeout.
fn probe(netns: &str, args: &[&str]) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(exe)
        .arg("validate-probe")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip netns exec: {e}"))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let mut out = String::new();
            let mut err = String::new();
            child.stdout.take().map(|mut o| o.read_to_string(&mut out));
            child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            if !status.success() {
                return Err(err.trim().lines().last().unwrap_or("probe failed").to_owned());
            }
            return serde_json::from_str(&out).map_err(|e| format!("probe sent bad JSON: {e}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {PROBE_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

fn lab_addresses(lab: &str) -> BTreeMap<String, String> {
    let out = Command::new(std::env::current_exe().unwrap_or_default()).args(["lab", "status", "--name", lab]).output();
    let mut map = BTreeMap::new();
    if let Ok(out) = out {
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
            for n in v["namespaces"].as_array().into_iter().flatten() {
                if let (Some(role), Some(addr)) = (n["role"].as_str(), n["address"].as_str()) {
                    map.insert(role.to_owned(), addr.split('/').next().unwrap_or(addr).to_owned());
                }
            }
        }
    }
    map
}

fn volume_for(args: &Target, host: &str) -> Option<String> {
    let mut default = None;
    for v in &args.volume {
        match v.split_once('=') {
            Some((h, p)) if h == host => return Some(p.to_owned()),
            Some(_) => {}
            None => default = Some(v.clone()),
        }
    }
    default
}

pub fn validate(args: ValidateArgs) -> anyhow::Result<i32> {
    let target = args.target();
    let v = run_checks(&target);
    let text = serde_json::to_string_pretty(&v.report)?;
    if let Some(p) = &args.json {
        std::fs::write(p, &text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &args.html {
        std::fs::write(p, html(&v.checks, v.ok, &target)).with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!("{text}");
    for c in v.failed() {
        eprintln!("FAILED {}", c.line());
    }
    Ok(if v.ok { 0 } else { 1 })
}

/// Free memory a host needs (VMs moving here need room).
pub const MIN_FREE_MIB: u64 = 1024;

/// The checks of one host's own facts ([`host_facts`]): KVM, dirty
/// logging, memory. `ferry validate` runs them on each host's probe; a
/// node's agent on its own facts when it starts.
pub fn host_checks(h: &str, v: &Value) -> Vec<Check> {
    let mut r = Report { checks: Vec::new() };
    let kvm_ok = v["kvm"]["ok"].as_bool().unwrap_or(false);
    r.add(
        "kvm",
        h,
        kvm_ok,
        format!(
            "/dev/kvm: {} ({})",
            v["kvm"]["detail"].as_str().unwrap_or("?"),
            v["kvm"]["flavour"].as_str().unwrap_or("?")
        ),
        "load kvm_intel, kvm_amd or kvm_pvm and make /dev/kvm accessible",
    );
    let caps = &v["kvm"]["caps"];
    let dirty =
        caps["manual_dirty_log_protect2"].as_bool().unwrap_or(false) || caps["dirty_log"].as_bool().unwrap_or(false);
    r.add(
        "dirty-logging",
        h,
        kvm_ok && dirty,
        format!(
            "manual_dirty_log_protect2={} dirty_log_ring={} tsc_control={}",
            caps["manual_dirty_log_protect2"], caps["dirty_log_ring"], caps["tsc_control"]
        ),
        "live migration needs KVM dirty logging: use a newer kernel",
    );
    let free = v["mem_available_mib"].as_u64().unwrap_or(0);
    r.add(
        "memory",
        h,
        free >= MIN_FREE_MIB,
        format!("{free} MiB available"),
        "free memory or add RAM: VMs moving here need room",
    );
    r.checks
}

/// Runs every check on `args`' hosts (bounded in time: each probe has a
/// timeout) and returns the report; prints nothing.
pub fn run_checks(args: &Target) -> Validation {
    let mut r = Report { checks: Vec::new() };
    let addresses = lab_addresses(&args.lab);
    let mut facts: BTreeMap<String, Value> = BTreeMap::new();
    let mut profiles: BTreeMap<String, CpuProfile> = BTreeMap::new();

    for h in &args.hosts {
        let ns = format!("{}-{h}", args.lab);
        let before = now_ms();
        match probe(&ns, &[]) {
            Err(e) => r.add(
                "reachable",
                h,
                false,
                format!("host {h} ({ns}) did not answer: {e}"),
                "start the host (ferry lab up), or remove it from --hosts",
            ),
            Ok(v) => {
                let after = now_ms();
                r.add("reachable", h, true, format!("probe answered in {:.0} ms", after - before), "");
                r.checks.extend(host_checks(h, &v));
                let skew = v["realtime_ms"].as_f64().unwrap_or(0.0) - (before + after) / 2.0;
                r.add(
                    "clock",
                    h,
                    skew.abs() <= MAX_SKEW_MS.max((after - before) / 2.0),
                    format!("skew {skew:+.1} ms against this host"),
                    "run NTP/chrony on every host",
                );
                if let Ok(p) = serde_json::from_value::<CpuProfile>(v["cpu_profile"].clone()) {
                    profiles.insert(h.clone(), p);
                }
                facts.insert(h.clone(), v);
            }
        }
    }

    // CPU compatibility matrix and baseline.
    let mut matrix = BTreeMap::new();
    for (x, px) in &profiles {
        for (y, py) in &profiles {
            if x == y {
                continue;
            }
            let (missing_on_y, _) = px.diff(py);
            matrix.insert(format!("{x}->{y}"), json!({"ok": missing_on_y.is_empty(), "missing": missing_on_y}));
            if !missing_on_y.is_empty() {
                r.add(
                    "cpu-compatibility",
                    &format!("{x}->{y}"),
                    true,
                    format!("a guest on {x}'s full CPU cannot move to {y}: {} feature(s) missing", missing_on_y.len()),
                    "",
                );
            }
        }
    }
    let baseline = if profiles.is_empty() {
        None
    } else {
        match CpuProfile::common(&profiles.values().cloned().collect::<Vec<_>>()) {
            Ok(b) => {
                r.add("cpu-baseline", "cluster", true, format!("{} named features in common", b.features.len()), "");
                Some(b)
            }
            Err(e) => {
                r.add("cpu-baseline", "cluster", false, e.to_string(), "put hosts of one CPU vendor in a cluster");
                None
            }
        }
    };

    // Migration network: reachability, bandwidth, latency, MTU.
    let reachable: Vec<&String> = args.hosts.iter().filter(|h| facts.contains_key(*h)).collect();
    for (i, x) in reachable.iter().enumerate() {
        for y in reachable.iter().skip(i + 1) {
            let subject = format!("{x}->{y}");
            let Some(addr) = addresses.get(*y) else {
                r.add("network", &subject, false, format!("no address known for host {y}"), "check `ferry lab status`");
                continue;
            };
            let ns_y = format!("{}-{y}", args.lab);
            let ns_x = format!("{}-{x}", args.lab);
            let listen = format!("{addr}:{BANDWIDTH_PORT}");
            let sink = std::thread::spawn({
                let (ns_y, listen) = (ns_y.clone(), listen.clone());
                move || probe(&ns_y, &["--sink", &listen])
            });
            std::thread::sleep(Duration::from_millis(300));
            match probe(&ns_x, &["--send", &listen]) {
                Ok(v) => {
                    let mb_s = v["mb_s"].as_f64().unwrap_or(0.0);
                    let rtt = v["rtt_ms"].as_f64().unwrap_or(0.0);
                    r.add("network", &subject, true, format!("TCP {mb_s:.0} MB/s, round trip {rtt:.3} ms"), "");
                }
                Err(e) => r.add(
                    "network",
                    &subject,
                    false,
                    format!("no TCP connection from {x} to {y} ({listen}): {e}"),
                    "open the migration port between hosts and check routes",
                ),
            }
            let _ = sink.join();
            let mtu = |h: &str| facts[h]["mtu"].as_u64().unwrap_or(0);
            let (mx, my) = (mtu(x), mtu(y));
            r.add(
                "mtu",
                &subject,
                mx == my && mx > 0,
                format!("{x} {mx}, {y} {my}"),
                "use one MTU on the migration network",
            );
        }
    }

    // Shared volume: reachable from every host, and its lock shared.
    if !args.volume.is_empty() {
        let token = format!("ferry-validate-{}-{}", std::process::id(), now_ms() as u64);
        let first = reachable.first().map(|h| h.to_string());
        for h in &reachable {
            let Some(path) = volume_for(args, h) else {
                r.add("volume", h, false, "no volume path for this host", "give --volume PATH or HOST=PATH");
                continue;
            };
            let ns = format!("{}-{h}", args.lab);
            let is_first = first.as_deref() == Some(h.as_str());
            let mode = if is_first { "--volume-write" } else { "--volume-read" };
            match probe(&ns, &[mode, &path, "--token", &token]) {
                Ok(v) if v["ok"].as_bool() == Some(true) => {
                    r.add("volume", h, true, format!("{path}: {}", v["detail"].as_str().unwrap_or("")), "")
                }
                Ok(v) => r.add(
                    "volume",
                    h,
                    false,
                    format!("{path}: {}", v["detail"].as_str().unwrap_or("")),
                    "mount the same shared volume on every host",
                ),
                Err(e) => {
                    r.add("volume", h, false, format!("{path}: {e}"), "mount the shared volume and make it writable")
                }
            }
        }
        // The lock: host 1 holds it; every other host must be refused.
        if let Some(first) = &first {
            if let Some(path) = volume_for(args, first) {
                let holder = std::thread::spawn({
                    let ns = format!("{}-{first}", args.lab);
                    move || probe(&ns, &["--lock-hold", &path])
                });
                std::thread::sleep(Duration::from_millis(400));
                for h in reachable.iter().filter(|h| h.as_str() != first) {
                    let Some(p) = volume_for(args, h) else { continue };
                    let ns = format!("{}-{h}", args.lab);
                    match probe(&ns, &["--lock-try", &p]) {
                        Ok(v) => {
                            let shared = v["held_elsewhere"].as_bool() == Some(true);
                            r.add(
                                "volume-lock",
                                &format!("{first}/{h}"),
                                shared,
                                if shared {
                                    format!("{h} saw the lock {first} holds")
                                } else {
                                    format!("{h} took the lock {first} was holding: the volume's locks are not shared")
                                },
                                "two hosts could write one disk: use one shared volume with working OFD locks (NFSv4, a cluster filesystem)",
                            );
                        }
                        Err(e) => r.add("volume-lock", &format!("{first}/{h}"), false, e, "check the volume"),
                    }
                }
                let _ = holder.join();
            }
        }
    }

    let ok = r.checks.iter().all(|c| c.ok);
    let report = json!({
        "ok": ok,
        "lab": args.lab,
        "hosts": args.hosts,
        "checks": r.checks,
        "facts": facts,
        "cpu_matrix": matrix,
        "cluster_baseline": baseline,
    });
    Validation { ok, checks: r.checks, report }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn html(checks: &[Check], ok: bool, args: &Target) -> String {
    let mut rows = String::new();
    for c in checks {
        rows.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            if c.ok { "ok" } else { "fail" },
            if c.ok { "passed" } else { "FAILED" },
            escape(&c.check),
            escape(&c.subject),
            escape(&c.detail),
            escape(&c.fix)
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Ferry cluster validation</title><style>\
         body{{font-family:sans-serif}} td,th{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}}\
         tr.fail td{{background:#fdd}} tr.ok td:first-child{{color:#080}}</style></head><body>\
         <h1>Ferry cluster validation: {}</h1><p>Lab <b>{}</b>, hosts {}.</p>\
         <table><tr><th>result</th><th>check</th><th>subject</th><th>detail</th><th>what to do</th></tr>\n{rows}</table></body></html>\n",
        if ok { "passed" } else { "FAILED" },
        escape(&args.lab),
        escape(&args.hosts.join(", "))
    )
}

#[derive(Args)]
pub struct ProbeArgs {
    /// Accept one TCP connection here and read what comes (bandwidth test).
    #[arg(long)]
    sink: Option<String>,
    /// Send to a sink and measure bandwidth and round trip.
    #[arg(long)]
    send: Option<String>,
    #[arg(long)]
    volume_write: Option<PathBuf>,
    #[arg(long)]
    volume_read: Option<PathBuf>,
    #[arg(long, default_value = "")]
    token: String,
    #[arg(long)]
    lock_hold: Option<PathBuf>,
    #[arg(long)]
    lock_try: Option<PathBuf>,
}

fn ofd_lock(file: &std::fs::File) -> bool {
    let mut fl: libc::flock = unsafe_zeroed_flock();
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK with a valid flock on a descriptor we own.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) == 0 }
}

fn unsafe_zeroed_flock() -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

fn lock_path(volume: &Path) -> PathBuf {
    volume.join(".ferry-validate.lock")
}

fn open_lock(volume: &Path) -> anyhow::Result<std::fs::File> {
    let path = lock_path(volume);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// `ferry validate-probe`: facts about the host it runs in, as JSON.
pub fn probe_main(args: ProbeArgs) -> anyhow::Result<i32> {
    let out = if let Some(addr) = args.sink {
        let listener = TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut one = [0u8; 1];
        s.read_exact(&mut one)?;
        s.write_all(&one)?;
        let mut total = 0u64;
        while total < BANDWIDTH_BYTES {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        s.write_all(b"k")?;
        json!({ "received": total })
    } else if let Some(addr) = args.send {
        let mut s = TcpStream::connect_timeout(&addr.parse().context("bad address")?, Duration::from_secs(3))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let t = Instant::now();
        s.write_all(b"p")?;
        let mut one = [0u8; 1];
        s.read_exact(&mut one)?;
        let rtt_ms = t.elapsed().as_secs_f64() * 1000.0;
        let buf = vec![0x5au8; 1 << 20];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < BANDWIDTH_BYTES {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        s.read_exact(&mut one)?;
        json!({ "rtt_ms": rtt_ms, "mb_s": sent as f64 / t.elapsed().as_secs_f64() / 1e6 })
    } else if let Some(v) = args.volume_write {
        let ok = v.is_dir() && std::fs::write(v.join(".ferry-validate-token"), &args.token).is_ok();
        let detail = if ok {
            "writable"
        } else if !v.exists() {
            "does not exist (is the volume mounted?)"
        } else if !v.is_dir() {
            "is not a directory"
        } else {
            "not writable"
        };
        json!({ "ok": ok, "detail": detail })
    } else if let Some(v) = args.volume_read {
        let seen = std::fs::read_to_string(v.join(".ferry-validate-token")).unwrap_or_default();
        let ok = seen == args.token;
        let detail = if ok {
            "sees the first host's writes"
        } else if !v.is_dir() {
            "does not exist (is the volume mounted?)"
        } else {
            "does not see what the first host wrote: not the same volume"
        };
        json!({ "ok": ok, "detail": detail })
    } else if let Some(v) = args.lock_hold {
        let f = open_lock(&v)?;
        let held = ofd_lock(&f);
        std::thread::sleep(Duration::from_millis(1500));
        json!({ "held": held })
    } else if let Some(v) = args.lock_try {
        let f = open_lock(&v)?;
        json!({ "held_elsewhere": !ofd_lock(&f) })
    } else {
        host_facts(Path::new(vmm::vstate::vm::DEFAULT_KVM_DEVICE))
    };
    println!("{out}");
    Ok(0)
}

/// What `ferry validate` learns about the host it runs on (KVM through
/// `kvm_device`, CPU profile, memory, clock, MTU); a node's agent checks
/// the same facts when it starts (`crate::agent::health`).
pub fn host_facts(kvm_device: &Path) -> Value {
    let flavour = if Path::new("/sys/module/kvm_pvm").exists() {
        "pvm"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "vmx"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "svm"
    } else {
        "none"
    };
    let kvm = match vmm::vstate::vm::open_kvm(kvm_device) {
        Ok(kvm) => {
            let raw = |cap: u32| kvm.check_extension_raw(libc::c_ulong::from(cap)) > 0;
            let profile = CpuProfile::of_host(&kvm, &super::cpu::host_name()).ok();
            json!({
                "ok": true,
                "detail": format!("API version {}", kvm.get_api_version()),
                "flavour": flavour,
                "caps": {
                    "dirty_log": true,
                    "manual_dirty_log_protect2": raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
                    "dirty_log_ring": raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING),
                    "tsc_control": kvm.check_extension(kvm_ioctls::Cap::TscControl),
                },
                "profile": profile,
            })
        }
        Err(e) => json!({ "ok": false, "detail": e.to_string(), "flavour": flavour, "caps": {} }),
    };
    let mtu = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| std::fs::read_to_string(e.path().join("mtu")).ok()?.trim().parse::<u64>().ok())
        .min()
        .unwrap_or(0);
    json!({
        "kvm": kvm,
        "cpu_profile": kvm["profile"],
        "mem_available_mib": vmm::memory::host_available_mib(),
        "realtime_ms": now_ms(),
        "mtu": mtu,
    })
}
