//! `ferry migrate` (source side, through the VMM's API), `ferry receive`
//! (destination side, a new VMM process) and `ferry keygen`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use migrate::auth::{Key, DEFAULT_KEY_FILE};
use migrate::progress::Progress;
use migrate::source::{Options, Policy};
use migrate::transport::Listener;
use migrate::wire::Mode;
use migrate::Endpoint;
use vmm::Vmm;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// Pre-copy with dirty logging; the guest keeps running until a short
    /// switchover.
    Live,
    /// Pause, move state and memory, resume on the destination.
    Quick,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PolicyArg {
    /// Leave the VM running here.
    Cancel,
    /// Switch over anyway, with a longer downtime.
    Force,
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    api: super::control::ApiArgs,
    /// Where `ferry receive` listens: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ENDPOINT")]
    to: Endpoint,
    #[arg(long, value_enum, default_value = "live")]
    mode: ModeArg,
    /// The cluster's pre-shared key (the same file on every host).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KEY_FILE)]
    key_file: PathBuf,
    /// Switch over once the remaining memory fits this downtime.
    #[arg(long, value_name = "MS", default_value_t = 20.0)]
    downtime_ms: f64,
    /// Give pre-copy this long before applying --policy.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    timeout: f64,
    /// Give pre-copy at most this many rounds before applying --policy.
    #[arg(long, value_name = "N", default_value_t = 30)]
    max_rounds: u32,
    /// What to do when pre-copy does not converge in time.
    #[arg(long, value_enum, default_value = "cancel")]
    policy: PolicyArg,
    /// Do not slow the vCPUs down when they dirty memory faster than the
    /// link drains it.
    #[arg(long)]
    no_auto_converge: bool,
    /// Only run the destination's preflight (CPU, memory, devices).
    #[arg(long)]
    check_only: bool,
    /// Cap the migration's bandwidth (MiB/s), to spare a shared network.
    #[arg(long, value_name = "MIB_S")]
    max_bandwidth: Option<f64>,
    /// Print the figures as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<i32> {
    let key_file = std::path::absolute(&args.key_file).context("bad --key-file")?;
    Key::load(&key_file)?;
    let body = serde_json::json!({
        "to": args.to.to_string(),
        "mode": match args.mode { ModeArg::Live => "live", ModeArg::Quick => "quick" },
        "key_file": key_file,
        "downtime_ms": args.downtime_ms,
        "timeout_s": args.timeout,
        "max_rounds": args.max_rounds,
        "policy": match args.policy { PolicyArg::Cancel => "cancel", PolicyArg::Force => "force" },
        "auto_converge": !args.no_auto_converge,
        "check_only": args.check_only,
        "max_bandwidth_mib_s": args.max_bandwidth,
    })
    .to_string();
    let sock = args.api.api_sock.clone();
    let request = std::thread::spawn(move || {
        vmm::api::client::request(&sock, "PUT", "vm.migrate", body.as_bytes(), Duration::from_secs(24 * 3600))
    });
    let show = std::io::stderr().is_terminal();
    while !request.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        if show {
            if let Ok(r) =
                vmm::api::client::request(&args.api.api_sock, "GET", "vm.migration", b"", Duration::from_secs(2))
            {
                if let Ok(p) = serde_json::from_str::<serde_json::Value>(&r.body) {
                    eprint!(
                        "\r{:>10} round {:>3}  {:>8.1} MiB left  {:>7.0} MiB/s  est. downtime {:>6.1} ms  throttle {:>2}%   ",
                        p["phase"].as_str().unwrap_or(""),
                        p["round"],
                        p["remaining_mib"].as_f64().unwrap_or(0.0),
                        p["rate_mib_s"].as_f64().unwrap_or(0.0),
                        p["estimated_downtime_ms"].as_f64().unwrap_or(0.0),
                        p["throttle_pct"],
                    );
                }
            }
        }
    }
    if show {
        eprintln!();
    }
    let r = request.join().expect("request thread")?;
    if !r.is_success() {
        anyhow::bail!("migration failed: {}", r.error_message());
    }
    if args.json {
        println!("{}", r.body);
    } else {
        let f: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        if f["mode"] == "check-only" {
            println!("preflight passed: {} can run this VM", args.to);
        } else {
            println!(
                "{} migration to {}: total {:.1} ms, downtime {:.1} ms, {} rounds, {:.1} MiB sent ({} pages, {} zero)",
                f["mode"].as_str().unwrap_or("?"),
                args.to,
                f["total_ms"].as_f64().unwrap_or(0.0),
                f["downtime_ms"].as_f64().unwrap_or(0.0),
                f["rounds"],
                f["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
                f["pages_sent"],
                f["pages_zero"],
            );
        }
    }
    Ok(0)
}

/// Runs migrations for the API, in the source VMM.
#[derive(Default)]
pub struct ApiMigrator {
    progress: migrate::progress::Shared,
    busy: AtomicBool,
}

impl ApiMigrator {
    pub fn new() -> Arc<ApiMigrator> {
        Arc::new(ApiMigrator { progress: Arc::new(Mutex::new(Progress::default())), busy: AtomicBool::new(false) })
    }
}

fn options(body: &serde_json::Value) -> Result<(Endpoint, Options), String> {
    let to: Endpoint = body.get("to").and_then(|t| t.as_str()).ok_or("vm.migrate needs \"to\"")?.parse()?;
    let mode = match body.get("mode").and_then(|m| m.as_str()).unwrap_or("live") {
        "live" => Mode::Live,
        "quick" => Mode::Quick,
        other => return Err(format!("unknown migration mode '{other}'")),
    };
    let key_file = body.get("key_file").and_then(|k| k.as_str()).unwrap_or(DEFAULT_KEY_FILE);
    let key = Key::load(std::path::Path::new(key_file)).map_err(|e| e.to_string())?;
    let mut o = Options::new(mode, key);
    if let Some(v) = body.get("downtime_ms").and_then(|v| v.as_f64()) {
        o.downtime_ms = v;
    }
    if let Some(v) = body.get("timeout_s").and_then(|v| v.as_f64()) {
        o.timeout = Duration::from_secs_f64(v.max(0.0));
    }
    if let Some(v) = body.get("max_rounds").and_then(|v| v.as_u64()) {
        o.max_rounds = v as u32;
    }
    if body.get("policy").and_then(|v| v.as_str()) == Some("force") {
        o.policy = Policy::Force;
    }
    if let Some(v) = body.get("auto_converge").and_then(|v| v.as_bool()) {
        o.auto_converge = v;
    }
    o.check_only = body.get("check_only").and_then(|v| v.as_bool()).unwrap_or(false);
    o.max_bandwidth_mib_s = body.get("max_bandwidth_mib_s").and_then(|v| v.as_f64());
    Ok((to, o))
}

impl vmm::api::server::Migrator for ApiMigrator {
    fn migrate(&self, vmm: &Arc<Vmm>, body: &serde_json::Value) -> Result<serde_json::Value, String> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err("a migration is already running".into());
        }
        let result = options(body).and_then(|(to, opts)| {
            *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Progress::default();
            migrate::source::migrate(vmm, &to, &opts, &self.progress).map_err(|e| e.to_string())
        });
        self.busy.store(false, Ordering::SeqCst);
        match &result {
            Ok(f) => eprintln!("ferry: migration figures: {}", serde_json::to_string(f).unwrap_or_default()),
            Err(e) => {
                migrate::progress::update(&self.progress, |p| p.phase = "failed".into());
                eprintln!("ferry: migration failed: {e}");
            }
        }
        result.map(|f| serde_json::to_value(f).unwrap_or_default())
    }

    fn progress(&self) -> serde_json::Value {
        serde_json::to_value(&*self.progress.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or_default()
    }
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Where to listen: tcp:ADDR:PORT or unix:PATH.
    #[arg(long, value_name = "ENDPOINT")]
    listen: Endpoint,
    /// The cluster's pre-shared key (the same file on every host).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KEY_FILE)]
    key_file: PathBuf,
    /// Treat these CPU features as absent here (comma-separated names, e.g.
    /// avx512f,avx2): the preflight then refuses guests that use them, as a
    /// host whose KVM lacks them would.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    hide_cpu_features: Vec<String>,
    /// Offer guests no more than this CPU profile, as a host whose KVM
    /// offered only that would (a lesser host, for testing baselines).
    #[arg(long, value_name = "FILE")]
    cpu_profile: Option<PathBuf>,
    #[command(flatten)]
    host: super::snapshot::HostArgs,
}

pub fn receive(args: ReceiveArgs) -> anyhow::Result<i32> {
    crate::signals::block();
    let key = Key::load(&args.key_file)?;
    let listener = Listener::bind(&args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("ferry: waiting for a migration on {}", listener.local_addr());
    let host_args = args.host.clone();
    let host = migrate::destination::Host {
        key,
        apply: Box::new(move |config| host_args.apply(config).map_err(|e| e.to_string())),
        hide_cpu_features: args.hide_cpu_features.clone(),
        cpu_profile: args.cpu_profile.as_deref().map(vmm::arch::x86_64::cpu_profile::CpuProfile::load).transpose()?,
    };
    let vmm = migrate::destination::receive(&listener, &host)?;
    drop(listener);
    eprintln!("ferry: VM received and running");
    super::run::serve(vmm, args.host.api_sock.as_deref())
}

#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write the new key (mode 0600). Copy it to every host.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KEY_FILE)]
    out: PathBuf,
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<i32> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", args.out.display()))?;
    writeln!(f, "{}", migrate::auth::new_key_hex()?)?;
    eprintln!("ferry: wrote a new cluster key to {}", args.out.display());
    Ok(0)
}
