//! `ferry lab`: network namespaces that play hosts on one machine.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::lab::topology::Role;
use crate::lab::Lab;

const LAB_HELP: &str = "\
Topology (NAME defaults to `ferry`):
  NAME-fabric  bridge `fabric`, with veths to-a, to-b, to-client
  NAME-a       bridge br0 10.200.77.1/24 (port: uplink), VM taps
  NAME-b       bridge br0 10.200.77.2/24 (port: uplink), VM taps
  NAME-c       bridge br0 10.200.77.3/24 (port: uplink), VM taps
               (only with --hosts a,b,c; a and b are the default)
  NAME-client  eth0 10.200.77.100/24
Addresses: 10.200.77.0/24, inside the lab's namespaces only; guests use
10.200.77.10-10.200.77.99. IPv6 is off in the lab's namespaces. `up` returns
once every link is operational.

State: /run/ferry-lab/NAME.json records what the lab created. A namespace
with one of the lab's names that the state file does not list is someone
else's: up, down and tap refuse, naming it, and change nothing.
etcd (`up --etcd`, not started otherwise): one member per host, inside the
host's namespace on its address (clients http://10.200.77.N:2379, also
127.0.0.1:2379 inside the host; peers :2380), data in
/run/ferry-lab/NAME/etcd-HOST, log in /run/ferry-lab/NAME/etcd-HOST.log.
`up` returns once every member reports healthy (at most 20 s). These
members are the only processes the lab starts: it records their PIDs, and
`down` stops them (SIGTERM, 5 s, SIGKILL) before deleting the namespaces.
Any other process still inside its namespaces `down` reports (PID and
command), kills none of, and deletes the names anyway.

Failures to inject: `etcd kill HOST` (SIGKILL the member, a crash),
`etcd start HOST` (it rejoins with its data), `cut HOST` (the host's switch
port on the fabric goes down: host, VMs and member are partitioned) and
`heal HOST`.

Example:
  ferry lab up
  ferry lab tap add a tap0
  ip netns exec ferry-a ferry run --net tap=tap0,... &
  ferry ping --netns ferry-client --target 10.200.77.10 --duration-ms 5000
  ferry lab down

  ferry lab up --name c1 --hosts a,b,c --etcd
  ferry lab etcd endpoints --name c1   # http://10.200.77.1:2379,...
  ferry lab cut a --name c1; ferry lab heal a --name c1
  ferry lab down --name c1";

#[derive(Args)]
#[command(after_help = LAB_HELP)]
pub struct LabArgs {
    /// The lab's name: the prefix of its namespaces (NAME-fabric, NAME-a,
    /// NAME-b, NAME-client); 1-12 characters of a-z, 0-9 and '_'.
    #[arg(long, global = true, value_name = "NAME", default_value = "ferry")]
    name: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create the lab, or whatever of it is missing (idempotent); prints
    /// its status (JSON, as `status`).
    Up {
        /// The VM hosts, from a, b and c (default: a,b). Hosts are only
        /// added, never removed, by a later `up`.
        #[arg(long, value_name = "HOSTS", value_parser = parse_hosts)]
        hosts: Option<Hosts>,
        /// Run one etcd member in each host and wait until they are healthy.
        #[arg(long)]
        etcd: bool,
    },
    /// Delete everything the lab created (its namespaces, and so the veths,
    /// bridges and taps in them, and its state file); prints what it did (JSON).
    Down,
    /// Print the lab's namespaces, addresses, interfaces and taps, and
    /// whether each exists (JSON).
    Status,
    /// Add or delete a VM tap on a host's bridge br0.
    Tap {
        #[command(subcommand)]
        command: TapCommand,
    },
    /// Kill, restart or list the lab's etcd members.
    Etcd {
        #[command(subcommand)]
        command: EtcdCommand,
    },
    /// Cut a host's link to the fabric (its port on the fabric bridge goes
    /// down): the host, its VMs and its etcd member are partitioned.
    Cut {
        /// a, b or c.
        host: Role,
    },
    /// Restore a host's cut link; returns once it carries traffic.
    Heal {
        /// a, b or c.
        host: Role,
    },
    /// Run a command inside one of the lab's namespaces (via `ip netns
    /// exec`); exits with the command's status.
    Exec {
        /// a, b, client or fabric.
        host: Role,
        /// Kill the command after this many milliseconds (exit status 124).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
}

#[derive(Subcommand)]
enum EtcdCommand {
    /// SIGKILL a host's member (a crash) and wait until it is gone; prints
    /// the member's status (JSON).
    Kill {
        /// a, b or c.
        host: Role,
    },
    /// Start a host's member again (on its data: it rejoins) unless it
    /// runs; waits until it is healthy; prints its status (JSON).
    Start {
        /// a, b or c.
        host: Role,
    },
    /// Print the client URLs, comma-separated (for `--etcd`).
    Endpoints,
}

#[derive(Clone)]
struct Hosts(Vec<Role>);

fn parse_hosts(s: &str) -> Result<Hosts, String> {
    crate::lab::topology::parse_hosts(s).map(Hosts)
}

#[derive(Subcommand)]
enum TapCommand {
    /// Create a persistent tap (vnet_hdr) in the host's namespace, attached
    /// to br0 and up; idempotent. A VMM opens it by name from inside the
    /// namespace: `ip netns exec NAME-a ferry run --net tap=TAP,...`.
    Add {
        /// a or b.
        host: Role,
        /// Interface name, at most 15 characters.
        tap: String,
    },
    /// Delete a tap the lab created.
    Del {
        /// a or b.
        host: Role,
        tap: String,
    },
}

pub fn lab(args: LabArgs) -> anyhow::Result<i32> {
    let lab = Lab::open(&args.name)?;
    match args.command {
        LabCommand::Up { hosts, etcd } => {
            print_json(&lab.up(&crate::lab::UpOptions { hosts: hosts.map(|h| h.0), etcd })?)?
        }
        LabCommand::Etcd { command: EtcdCommand::Kill { host } } => print_json(&lab.etcd_kill(host)?)?,
        LabCommand::Etcd { command: EtcdCommand::Start { host } } => print_json(&lab.etcd_start(host)?)?,
        LabCommand::Etcd { command: EtcdCommand::Endpoints } => println!("{}", lab.etcd_endpoints()?),
        LabCommand::Cut { host } => lab.cut(host)?,
        LabCommand::Heal { host } => lab.heal(host)?,
        LabCommand::Down => print_json(&lab.down()?)?,
        LabCommand::Status => print_json(&lab.status()?)?,
        LabCommand::Tap { command: TapCommand::Add { host, tap } } => print_json(&lab.tap_add(host, &tap)?)?,
        LabCommand::Tap { command: TapCommand::Del { host, tap } } => lab.tap_del(host, &tap)?,
        LabCommand::Exec { host, timeout_ms, command } => {
            let argv = lab.exec_argv(host, &command)?;
            return exec(&argv, timeout_ms.map(Duration::from_millis));
        }
    }
    Ok(0)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs argv: in place of this process, or as a child killed at `timeout`.
fn exec(argv: &[OsString], timeout: Option<Duration>) -> anyhow::Result<i32> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let Some(timeout) = timeout else {
        let err = cmd.exec();
        return Err(err).with_context(|| format!("cannot run {}", argv[0].to_string_lossy()));
    };
    let mut child = cmd.spawn().with_context(|| format!("cannot run {}", argv[0].to_string_lossy()))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
        }
        if Instant::now() >= deadline {
            eprintln!("ferry: the command ran past --timeout-ms {}; killing it", timeout.as_millis());
            child.kill()?;
            child.wait()?;
            return Ok(124);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
