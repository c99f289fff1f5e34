//! `ferry migrate` (source side, through the VMM's API), `ferry receive`
//! (destination side, a new VMM process) and `ferry keygen`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use migrate::api::MigrateRequest;
use migrate::auth::{Key, DEFAULT_KEY_FILE};
use migrate::preflight::CpuPolicy;
use migrate::source::Policy;
use migrate::transport::Listener;
use migrate::wire::Mode;
use migrate::Endpoint;
use vmm::config::NetConfig;
use vmm::migration::KvmDestination;

use super::host::{serve, HostArgs};

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
    /// A single read or write on the migration stream that takes longer
    /// means the destination is gone (a silent network cut shows as this).
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    io_timeout: f64,
    /// The switchover (pause to commit) must fit this, or the VM resumes
    /// here; the destination waits for the commit a little longer.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    switchover_timeout: f64,
    /// Ask this Unix socket before committing (the cluster agent's; see
    /// migrate::source::gate): the move commits only if it agrees.
    #[arg(long, value_name = "PATH")]
    commit_gate: Option<PathBuf>,
    /// Send memory and state unencrypted (the handshake still proves the
    /// cluster key): for a link you trust, or to measure what encryption
    /// costs. The receiver must be started with --no-encryption too.
    #[arg(long)]
    no_encryption: bool,
    /// Copy guest memory even to a destination on this host. By default a
    /// move over unix: passes the guest memory's file descriptor
    /// (SCM_RIGHTS) and the destination maps the same pages: nothing is
    /// copied, the downtime is the pause and the state alone. A destination
    /// on another host (tcp:), or one that cannot, always gets a copy.
    #[arg(long)]
    no_memfd: bool,
    /// Carry memory over this many connections (1-8), each with its own
    /// sender and receiver thread, pages split in 1 MiB stripes; the
    /// switchover still ends on the first one. More streams help where a
    /// single thread's sealing or copying is the limit and cores are free.
    /// A receiver older than this option takes one.
    #[arg(long, value_name = "N", default_value_t = migrate::source::DEFAULT_STREAMS)]
    streams: u8,
    /// Print the figures as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<i32> {
    let key_file = std::path::absolute(&args.key_file).context("bad --key-file")?;
    Key::load(&key_file)?;
    let mut request = MigrateRequest::new(&args.to);
    request.mode = match args.mode {
        ModeArg::Live => Mode::Live,
        ModeArg::Quick => Mode::Quick,
    };
    request.key_file = key_file;
    request.downtime_ms = args.downtime_ms;
    request.timeout_s = args.timeout;
    request.max_rounds = args.max_rounds;
    request.policy = match args.policy {
        PolicyArg::Cancel => Policy::Cancel,
        PolicyArg::Force => Policy::Force,
    };
    request.auto_converge = !args.no_auto_converge;
    request.check_only = args.check_only;
    request.max_bandwidth_mib_s = args.max_bandwidth;
    request.switchover_timeout_s = args.switchover_timeout;
    request.io_timeout_s = args.io_timeout;
    request.commit_gate = args.commit_gate.clone();
    request.encryption = !args.no_encryption;
    request.share_memory = !args.no_memfd;
    request.streams = args.streams;
    // Refuse bad numbers here, with the same words the API would use.
    request.options().map_err(|e| anyhow::anyhow!("{e}"))?;
    let body = serde_json::to_vec(&request)?;
    let sock = args.api.api_sock.clone();
    let request = std::thread::spawn(move || {
        vmm::api::client::request(&sock, "PUT", "vm.migrate", &body, Duration::from_secs(24 * 3600))
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
                "{} migration to {} (memory: {}): total {:.1} ms, downtime {:.1} ms, {} rounds, {:.1} MiB sent ({} pages, {} zero)",
                f["mode"].as_str().unwrap_or("?"),
                args.to,
                f["memory"].as_str().unwrap_or("?"),
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

/// `ferry migrate-cancel`: the running migration gives up before its
/// commit; the VM keeps running here.
pub fn cancel(api: &super::control::ApiArgs) -> anyhow::Result<i32> {
    super::control::put(&api.api_sock, "vm.migration-cancel")
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Where to listen: tcp:ADDR:PORT or unix:PATH.
    #[arg(long, value_name = "ENDPOINT")]
    listen: Endpoint,
    /// The cluster's pre-shared key (the same file on every host).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KEY_FILE)]
    key_file: PathBuf,
    /// The taps on this host for the incoming VM's NICs, in order:
    /// tap=NAME (one per NIC; the MAC travels with the VM).
    #[arg(long, value_name = "tap=NAME")]
    net: Vec<NetConfig>,
    /// Treat these CPU features as absent here (comma-separated names, e.g.
    /// avx512f,avx2): the preflight then refuses guests that use them, as a
    /// host whose KVM lacks them would.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    hide_cpu_features: Vec<String>,
    /// Offer guests no more than this CPU profile, as a host whose KVM
    /// offered only that would (a lesser host, for testing baselines).
    #[arg(long, value_name = "FILE")]
    cpu_profile: Option<PathBuf>,
    /// A volume or directory the incoming VM's disks may live in
    /// (repeatable). The source names the disks; this host opens only
    /// those under a place it allows, of the size and identity the guest
    /// knows. Without it, a VM with disks is refused.
    #[arg(long, value_name = "DIR")]
    allow_disks: Vec<PathBuf>,
    /// Once listening, write the endpoint (tcp:IP:PORT) to this file; with
    /// --listen tcp:IP:0 the kernel picks the port.
    #[arg(long, value_name = "FILE")]
    endpoint_file: Option<PathBuf>,
    /// When the commit does not arrive after the VM is ready here, ask
    /// this Unix socket (the cluster agent's) whether the move committed
    /// (see migrate::destination::oracle).
    #[arg(long, value_name = "PATH")]
    commit_oracle: Option<PathBuf>,
    /// Accept only sources that send memory and state unencrypted
    /// (`ferry migrate --no-encryption`); the handshake still proves the
    /// cluster key. For a link you trust, or to measure what encryption
    /// costs.
    #[arg(long)]
    no_encryption: bool,
    /// Refuse a same-host source's offer to pass its guest memory's file
    /// descriptor: memory is copied instead.
    #[arg(long)]
    no_memfd: bool,
    #[command(flatten)]
    host: HostArgs,
}

pub fn receive(args: ReceiveArgs) -> anyhow::Result<i32> {
    crate::signals::block();
    args.host.confine()?;
    let key = Key::load(&args.key_file)?;
    let listener = Listener::bind(&args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("ferry: waiting for a migration on {}", listener.local_addr());
    if let Some(path) = &args.endpoint_file {
        // Whole or absent: written aside, then renamed.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", listener.local_addr()))
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let taps = args.net.iter().map(|n| n.tap.clone()).collect();
    let mut host = args.host.host_config(taps, false);
    host.disk_roots = args.allow_disks.clone();
    let dest = std::sync::Arc::new(KvmDestination { host });
    let policy = migrate::destination::Policy {
        key,
        cpu: CpuPolicy {
            hide_features: args.hide_cpu_features.clone(),
            profile: args.cpu_profile.as_deref().map(vmm::arch::x86_64::cpu_profile::CpuProfile::load).transpose()?,
        },
        commit_oracle: args.commit_oracle.clone(),
        records: if args.no_encryption { migrate::secure::Records::Plain } else { migrate::secure::Records::Sealed },
        share_memory: !args.no_memfd,
    };
    let stop = crate::signals::stop_flag();
    let Some(vmm) = migrate::destination::receive(&listener, dest, std::sync::Arc::new(policy), &stop) else {
        eprintln!("ferry: stopped by a signal; no VM was received");
        return Ok(0);
    };
    drop(listener);
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("ferry: the stop signal came while this VM was being received; it runs (signal again to stop it)");
    }
    eprintln!("ferry: VM received and {}", vmm.lifecycle().name().to_lowercase());
    serve(vmm, args.host.api_sock.as_deref(), Some(migrate::api::ApiMigrator::new()))
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
