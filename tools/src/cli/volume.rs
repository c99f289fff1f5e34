//! `ferry volume` and `ferry disk`: the cluster shared volume, its disks
//! and their ownership leases.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use csv_fs::{Format, Lease, LeaseKeeper, LeaseOp as Op, LeaseRecord, LeaseStore, Volume};

const VOLUME_HELP: &str = "\
A volume is a directory every host can reach (NFSv4 or any POSIX filesystem
with working OFD locks): volume.json (id, format version), disks/, leases/,
vms/NAME/.

Example:
  ferry volume create /srv/csv
  ferry disk create --volume /srv/csv --format qcow2 --size 8G vm0
  ferry volume status /srv/csv";

#[derive(Args)]
#[command(after_help = VOLUME_HELP)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Make PATH (created if missing) a new, empty volume; prints its header.
    Create { path: PathBuf },
    /// Show a volume's id, format version, disks, live leases and free space.
    Status {
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn volume(args: VolumeArgs) -> anyhow::Result<i32> {
    match args.command {
        VolumeCommand::Create { path } => {
            let v = Volume::create(&path)?;
            println!("{}", serde_json::to_string_pretty(v.header())?);
        }
        VolumeCommand::Status { path, json } => {
            let st = Volume::open(&path)?.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("volume {}", st.path.display());
                println!("  id:      {}", st.id);
                println!("  version: {}", st.version);
                println!("  disks:   {} ({} leased)", st.disks, st.leased);
                println!("  free:    {} of {}", human(st.free_bytes), human(st.total_bytes));
            }
        }
    }
    Ok(0)
}

const DISK_HELP: &str = "\
Formats: raw, vhd-fixed, vhd-dynamic (Hyper-V's VHD), qcow2.

Leases: a disk is written by one host at a time, its owner, which renews
the lease before its TTL runs out. Every change of owner (acquire, handoff,
takeover) raises the epoch; a host whose epoch is no longer current is
refused (`check`). Lease commands print the lease as JSON.

Example:
  ferry disk lease acquire --volume /srv/csv --host a vm0        # epoch 1
  ferry disk lease handoff --volume /srv/csv --host a --epoch 1 --to b vm0
  ferry disk lease takeover --volume /srv/csv --host a vm0      # after b's lease expired";

#[derive(Args)]
#[command(after_help = DISK_HELP)]
pub struct DiskArgs {
    /// The volume (a directory made by `ferry volume create`).
    #[arg(long, global = true, value_name = "PATH")]
    volume: Option<PathBuf>,
    #[command(subcommand)]
    command: DiskCommand,
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create a disk image on the volume.
    Create {
        /// raw, vhd-fixed, vhd-dynamic or qcow2.
        #[arg(long, value_parser = parse_format)]
        format: Format,
        /// Virtual size: bytes, or with a K, M, G or T suffix (powers of
        /// 1024); a multiple of 512.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        name: String,
    },
    /// Show a disk's format, virtual size, allocated size and lease.
    Info {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the volume's disks.
    List {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Acquire, renew, release, hand off, take over or check a disk's lease.
    Lease(LeaseArgs),
}

#[derive(Args)]
struct LeaseArgs {
    #[command(subcommand)]
    op: LeaseOp,
}

#[derive(Args)]
struct Holder {
    /// This host's id (e.g. `a`).
    #[arg(long)]
    host: String,
    /// Lease time to live, in milliseconds.
    #[arg(long, default_value_t = csv_fs::DEFAULT_TTL.as_millis() as u64)]
    ttl_ms: u64,
    name: String,
}

#[derive(Args)]
struct Held {
    #[command(flatten)]
    holder: Holder,
    /// The epoch this host holds (from acquire, handoff or takeover).
    #[arg(long)]
    epoch: u64,
}

#[derive(Subcommand)]
enum LeaseOp {
    /// Take a disk nobody holds. Refused while another host holds it, even
    /// expired: that needs `takeover`.
    Acquire {
        #[command(flatten)]
        holder: Holder,
        /// Keep renewing until SIGTERM/SIGINT (then release), printing the
        /// lease first; exits 3 if the lease is lost.
        #[arg(long)]
        hold: bool,
    },
    /// Take a disk whose owner's lease has expired (a crashed host), with
    /// a higher epoch.
    Takeover {
        #[command(flatten)]
        holder: Holder,
        /// As for acquire.
        #[arg(long)]
        hold: bool,
    },
    /// Push this host's lease expiry out by the TTL.
    Renew(Held),
    /// Give the disk up. Refused while a running VMM (or `acquire --hold`)
    /// keeps renewing the lease, unless --force.
    Release {
        #[command(flatten)]
        held: Held,
        /// Release even though a keeper renews the lease: only when you know
        /// the process that renews it is gone (it would keep writing).
        #[arg(long)]
        force: bool,
    },
    /// Give the disk to host TO (epoch + 1); prints TO's lease. Refused
    /// while a running VMM keeps renewing the lease, unless --force.
    Handoff {
        #[command(flatten)]
        held: Held,
        #[arg(long)]
        to: String,
        /// As for release.
        #[arg(long)]
        force: bool,
    },
    /// Exit 0 if this host's epoch is still the disk's live lease, else
    /// name why not (the fence the VMM applies before writing).
    Check(Held),
    /// Print the disk's lease record (JSON; `null` if never leased).
    Show { name: String },
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?} (K, M, G, T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

pub fn disk(args: DiskArgs) -> anyhow::Result<i32> {
    let path = args.volume.context("--volume PATH is required")?;
    let volume = Volume::open(&path)?;
    match args.command {
        DiskCommand::Create { format, size, name } => {
            let info = volume.create_disk(&name, format, size)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        DiskCommand::Info { name, json } => {
            let info = volume.disk_info(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("disk {}", info.name);
                println!("  path:         {}", info.path.display());
                println!("  format:       {}", info.format);
                println!("  virtual size: {} ({})", info.virtual_size, human(info.virtual_size));
                println!("  allocated:    {} ({})", info.allocated_bytes, human(info.allocated_bytes));
                println!("  lease:        {}", lease_text(info.lease.as_ref()));
            }
        }
        DiskCommand::List { json } => {
            let names = volume.list_disks()?;
            if json {
                // A disk that cannot be read is listed with its error, not dropped.
                let rows: Vec<serde_json::Value> = names
                    .iter()
                    .map(|n| match volume.disk_info(n) {
                        Ok(info) => serde_json::to_value(info).unwrap_or_default(),
                        Err(e) => serde_json::json!({ "name": n, "error": e.to_string() }),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for n in &names {
                    match volume.disk_info(n) {
                        Ok(i) => println!(
                            "{:<20} {:<12} {:>10} {:>10}  {}",
                            i.name,
                            i.format,
                            human(i.virtual_size),
                            human(i.allocated_bytes),
                            lease_text(i.lease.as_ref())
                        ),
                        Err(e) => println!("{n:<20} error: {e}"),
                    }
                }
            }
        }
        DiskCommand::Lease(l) => return lease(&volume, l.op),
    }
    Ok(0)
}

fn store(volume: &Volume, ttl_ms: u64) -> Arc<dyn LeaseStore> {
    Arc::new(volume.lease_store(Duration::from_millis(ttl_ms.max(1))))
}

fn held(h: &Held) -> Lease {
    Lease {
        disk: h.holder.name.clone(),
        host: h.holder.host.clone(),
        epoch: h.epoch,
        expires_unix_ms: 0,
        ttl_ms: 0,
        kept: false,
    }
}

fn print_lease(lease: &Lease) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(lease)?)?;
    out.flush()?;
    Ok(())
}

fn lease(volume: &Volume, op: LeaseOp) -> anyhow::Result<i32> {
    match op {
        LeaseOp::Acquire { holder, hold } => take(volume, &holder, hold, false),
        LeaseOp::Takeover { holder, hold } => take(volume, &holder, hold, true),
        LeaseOp::Renew(h) => print_lease(&store(volume, h.holder.ttl_ms).renew(&held(&h))?).map(|_| 0),
        LeaseOp::Release { held: h, force } => {
            let lease = held(&h);
            store(volume, h.holder.ttl_ms).apply_by_hand(&lease.disk, Op::Release(&lease), force)?;
            Ok(0)
        }
        LeaseOp::Handoff { held: h, to, force } => {
            let lease = held(&h);
            let r = store(volume, h.holder.ttl_ms).apply_by_hand(
                &lease.disk,
                Op::Handoff { lease: &lease, to: &to },
                force,
            )?;
            print_lease(&Lease::from_record(&r)).map(|_| 0)
        }
        LeaseOp::Check(h) => {
            store(volume, h.holder.ttl_ms).check(&held(&h))?;
            Ok(0)
        }
        LeaseOp::Show { name } => {
            let r: Option<LeaseRecord> = store(volume, 1).read(&name)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(0)
        }
    }
}

/// Acquire or takeover; with `hold`, keep the lease alive until a stop
/// signal (then release it) or until it is lost (exit 3).
fn take(volume: &Volume, holder: &Holder, hold: bool, takeover: bool) -> anyhow::Result<i32> {
    if hold {
        // Before the keeper thread starts, so that only sigtimedwait sees them.
        block_stop_signals();
    }
    let s = store(volume, holder.ttl_ms);
    let lease = if takeover { s.takeover(&holder.name, &holder.host)? } else { s.acquire(&holder.name, &holder.host)? };
    print_lease(&lease)?;
    if !hold {
        return Ok(0);
    }
    let keeper = LeaseKeeper::start(Arc::clone(&s), lease);
    loop {
        if let Some(sig) = wait_stop_signal(Duration::from_millis(100)) {
            tracing::info!(sig, "stop signal: releasing the lease");
            let lease = keeper.stop().map_err(anyhow::Error::msg).context("lease lost before release")?;
            s.release(&lease)?;
            return Ok(0);
        }
        if let Err(why) = keeper.lease() {
            eprintln!("ferry: lease lost: {why}");
            return Ok(3);
        }
    }
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn block_stop_signals() {
    let set = stop_set();
    // SAFETY: changes only this thread's signal mask (inherited by threads
    // started later), with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// The stop signal that arrived within `timeout`, if any.
fn wait_stop_signal(timeout: Duration) -> Option<libc::c_int> {
    let set = stop_set();
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: a valid set and timespec; no siginfo wanted.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

fn lease_text(r: Option<&LeaseRecord>) -> String {
    let now = now_ms();
    match r {
        None => "never leased".into(),
        Some(r) => match &r.owner {
            Some(o) if !r.is_expired(now) => {
                format!("host {o}, epoch {}, expires in {:.1} s", r.epoch, (r.expires_unix_ms - now) as f64 / 1000.0)
            }
            Some(o) => format!(
                "host {o}, epoch {}, EXPIRED {:.1} s ago (another host may take it over)",
                r.epoch,
                (now - r.expires_unix_ms) as f64 / 1000.0
            ),
            None => format!("free (epoch {}, last held by {})", r.epoch, r.previous_owner.as_deref().unwrap_or("-")),
        },
    }
}

fn now_ms() -> u64 {
    csv_fs::error::now_ms()
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999T").is_err());
    }
}
