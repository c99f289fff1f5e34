//! `ferry ping`: loss and reply gaps, measured from inside a namespace.

use std::time::Duration;

use clap::Args;

use crate::ping::{self, Config, Mode, Stop};

const PING_HELP: &str = "\
Output: one JSON object on one line:
  mode (icmp|udp), target, udp_port (udp only), netns, interval_ms, timeout_ms,
  payload_bytes, pings_sent, pings_received, pings_lost (no reply within
  --timeout-ms; late replies count as lost), late, duplicates, send_errors,
  max_gap_ms (longest stretch without an on-time reply: from the start to the
  first reply, between replies, and, if the last probe went unanswered, from
  the last reply to the end of the last probe's timeout window),
  rtt_ms_min, rtt_ms_median, rtt_ms_p99, rtt_ms_max (null without replies),
  duration_ms (last probe's send time + timeout), lost_bursts,
  longest_lost_burst, send_lag_ms_max (the most any probe left behind its
  schedule), warmup_ms and warmup_replied (with --wait-reply-ms).
Probe i is due at start + i * interval (absolute deadlines: no drift). The
run stops by itself after the last probe's timeout window. Exit status 0
whenever the run completed, whatever the loss.

Example:
  ferry ping --netns ferry-client --target 10.200.77.1 --count 100";

#[derive(Args)]
#[command(after_help = PING_HELP)]
pub struct PingArgs {
    /// Network namespace to probe from (a name under /run/netns).
    #[arg(long, value_name = "NS")]
    netns: String,
    /// IPv4 address to probe.
    #[arg(long, value_name = "IP")]
    target: String,
    /// Time between probes.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    interval_ms: u64,
    /// Number of probes [default: 100 unless --duration-ms is given].
    #[arg(long, value_name = "N", conflicts_with = "duration_ms")]
    count: Option<u64>,
    /// Send probes for this long instead of a count.
    #[arg(long, value_name = "MS")]
    duration_ms: Option<u64>,
    /// A reply later than this after its probe counts as lost.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    timeout_ms: u64,
    /// Send UDP probes to this port (the test guest echoes UDP on port 7)
    /// instead of ICMP echo requests.
    #[arg(long, value_name = "PORT")]
    udp: Option<u16>,
    /// Probe payload size (ICMP: after the 8-byte header), 16-1472.
    #[arg(long, value_name = "N", default_value_t = 56)]
    payload_bytes: usize,
    /// Before the measured run, probe until the first reply or this many
    /// milliseconds (e.g. right after a VM boots). The warm-up is not
    /// counted; the run follows either way (see warmup_replied).
    #[arg(long, value_name = "MS")]
    wait_reply_ms: Option<u64>,
}

pub fn ping(args: PingArgs) -> anyhow::Result<i32> {
    let stop = match (args.count, args.duration_ms) {
        (_, Some(d)) => Stop::Duration(Duration::from_millis(d)),
        (Some(n), None) => Stop::Count(n),
        (None, None) => Stop::Count(100),
    };
    let cfg = Config {
        netns: args.netns,
        target: ping::parse_target(&args.target)?,
        interval: Duration::from_millis(args.interval_ms),
        stop,
        timeout: Duration::from_millis(args.timeout_ms),
        mode: args.udp.map_or(Mode::Icmp, Mode::Udp),
        payload_bytes: args.payload_bytes,
        wait_reply: args.wait_reply_ms.map(Duration::from_millis),
    };
    let report = ping::run(&cfg)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}
