//! `ferry ping`: the ruler for migration figures. It sends probes at a fixed
//! interval from inside a network namespace (ICMP echo, or UDP to an echo
//! port), paced against absolute deadlines so the schedule never drifts,
//! matches replies by run token and sequence number, and reports loss, the
//! longest reply gap and RTTs ([`figures`]). It stops by itself: after the
//! last probe's timeout window.

pub mod figures;
pub mod socket;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lab::netns;
use figures::Probe;
use socket::ProbeSocket;

/// At most this many probes per run (memory: ~40 bytes each).
pub const MAX_PROBES: u64 = 2_000_000;
pub const MAX_PAYLOAD: usize = 1472;

#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("ferry ping needs root (raw sockets and entering a network namespace); run it as root")]
    NotRoot,
    #[error("network namespace {netns} does not exist ({} is missing)", netns::path(netns).display())]
    NoNamespace { netns: String },
    #[error("cannot enter network namespace {netns}: {source}")]
    Netns { netns: String, source: std::io::Error },
    #[error("target {0:?} is not an IPv4 address (IPv6 and host names are not supported)")]
    BadTarget(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Icmp,
    /// UDP probes to this port (the test guest echoes UDP on port 7).
    Udp(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Count(u64),
    /// Send probes due before this much time has passed.
    Duration(Duration),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub netns: String,
    pub target: Ipv4Addr,
    pub interval: Duration,
    pub stop: Stop,
    pub timeout: Duration,
    pub mode: Mode,
    pub payload_bytes: usize,
    /// Before measuring, probe until a first reply or this much time.
    pub wait_reply: Option<Duration>,
}

/// Parses an IPv4 target; anything else gets a clear error.
pub fn parse_target(s: &str) -> Result<Ipv4Addr, PingError> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        _ => Err(PingError::BadTarget(s.to_owned())),
    }
}

/// The one JSON object `ferry ping` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_port: Option<u16>,
    pub netns: String,
    pub interval_ms: f64,
    pub timeout_ms: f64,
    pub payload_bytes: usize,
    pub pings_sent: u64,
    pub pings_received: u64,
    pub pings_lost: u64,
    pub late: u64,
    pub duplicates: u64,
    pub send_errors: u64,
    pub max_gap_ms: f64,
    pub rtt_ms_min: Option<f64>,
    pub rtt_ms_median: Option<f64>,
    pub rtt_ms_p99: Option<f64>,
    pub rtt_ms_max: Option<f64>,
    pub duration_ms: f64,
    pub lost_bursts: u64,
    pub longest_lost_burst: u64,
    /// How late the most delayed probe left against its schedule.
    pub send_lag_ms_max: f64,
    /// The warm-up (`--wait-reply-ms`), if asked for: how long it took and
    /// whether a reply came. It is not part of the figures above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_replied: Option<bool>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Config {
    fn validate(&self) -> Result<u64, PingError> {
        let bad = |m: String| Err(PingError::Invalid(m));
        if self.interval < Duration::from_millis(1) || self.interval > Duration::from_secs(60) {
            return bad("--interval-ms must be between 1 and 60000".into());
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > Duration::from_secs(60) {
            return bad("--timeout-ms must be between 1 and 60000".into());
        }
        if !(wire::TAG_LEN..=MAX_PAYLOAD).contains(&self.payload_bytes) {
            return bad(format!("--payload-bytes must be between {} and {MAX_PAYLOAD}", wire::TAG_LEN));
        }
        if self.wait_reply.is_some_and(|w| w > Duration::from_secs(600)) {
            return bad("--wait-reply-ms must be at most 600000".into());
        }
        if self.mode == Mode::Udp(0) {
            return bad("--udp needs a port between 1 and 65535".into());
        }
        let count = match self.stop {
            Stop::Count(n) => n,
            Stop::Duration(d) => {
                let (d, i) = (d.as_nanos(), self.interval.as_nanos());
                d.div_ceil(i).min(u128::from(u64::MAX)) as u64
            }
        };
        if count == 0 {
            return bad("nothing to send: --count and --duration-ms must be positive".into());
        }
        if count > MAX_PROBES {
            return bad(format!("{count} probes is too many (at most {MAX_PROBES} per run)"));
        }
        Ok(count)
    }
}

/// Measures, from inside `cfg.netns` (this thread enters it and stays).
pub fn run(cfg: &Config) -> Result<Report, PingError> {
    let count = cfg.validate()?;
    if !netns::is_root() {
        return Err(PingError::NotRoot);
    }
    match netns::enter(&cfg.netns) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PingError::NoNamespace { netns: cfg.netns.clone() })
        }
        Err(source) => return Err(PingError::Netns { netns: cfg.netns.clone(), source }),
    }
    socket::tighten_timer_slack();
    let sock = match cfg.mode {
        Mode::Icmp => ProbeSocket::icmp(cfg.target),
        Mode::Udp(port) => ProbeSocket::udp(cfg.target, port),
    }
    .map_err(|source| PingError::Io { what: "cannot open the probe socket".into(), source })?;

    let token = run_token();
    let mut prober = Prober { sock: &sock, cfg, buf: vec![0u8; 65536] };
    let warmup = match cfg.wait_reply {
        Some(limit) => {
            let (took, replied) = prober.warm_up(token.wrapping_add(0x0001_0001), limit)?;
            if !replied {
                tracing::warn!("no reply from {} within {} ms of warm-up; measuring anyway", cfg.target, ms(took));
            }
            Some((took, replied))
        }
        None => None,
    };
    let run = prober.measure(token, count)?;
    let f = figures::compute(&run.probes, cfg.timeout);
    Ok(Report {
        mode: match cfg.mode {
            Mode::Icmp => "icmp",
            Mode::Udp(_) => "udp",
        },
        target: cfg.target.to_string(),
        udp_port: match cfg.mode {
            Mode::Udp(p) => Some(p),
            Mode::Icmp => None,
        },
        netns: cfg.netns.clone(),
        interval_ms: ms(cfg.interval),
        timeout_ms: ms(cfg.timeout),
        payload_bytes: cfg.payload_bytes,
        pings_sent: f.sent,
        pings_received: f.received,
        pings_lost: f.lost,
        late: f.late,
        duplicates: run.duplicates,
        send_errors: run.send_errors,
        max_gap_ms: ms(f.max_gap),
        rtt_ms_min: f.rtt_min.map(ms),
        rtt_ms_median: f.rtt_median.map(ms),
        rtt_ms_p99: f.rtt_p99.map(ms),
        rtt_ms_max: f.rtt_max.map(ms),
        duration_ms: ms(f.duration),
        lost_bursts: f.lost_bursts,
        longest_lost_burst: f.longest_lost_burst,
        send_lag_ms_max: ms(run.send_lag_max),
        warmup_ms: warmup.map(|w| ms(w.0)),
        warmup_replied: warmup.map(|w| w.1),
    })
}

/// A probe of a [`follow`] run: when it was sent (Unix ms) and whether a
/// reply came within the timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub unix_ms: u64,
    pub answered: bool,
}

/// Probes `target` by ICMP echo from this thread's network namespace
/// every `interval` (absolute deadlines, as [`run`]) until `stop` is set
/// or [`MAX_PROBES`] went out, then waits `timeout` for the last replies.
/// Each probe comes back with its send time, so that losses can be
/// matched to events (a VM's moves during `ferry cluster update`).
pub fn follow(
    target: Ipv4Addr,
    interval: Duration,
    timeout: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Sent>, PingError> {
    use std::sync::atomic::Ordering;
    let cfg = Config {
        netns: String::new(),
        target,
        interval,
        stop: Stop::Count(1),
        timeout,
        mode: Mode::Icmp,
        payload_bytes: 56,
        wait_reply: None,
    };
    cfg.validate()?;
    if !netns::is_root() {
        return Err(PingError::NotRoot);
    }
    socket::tighten_timer_slack();
    let sock = ProbeSocket::icmp(target)
        .map_err(|source| PingError::Io { what: "cannot open the probe socket".into(), source })?;
    let mut prober = Prober { sock: &sock, cfg: &cfg, buf: vec![0u8; 65536] };
    let token = run_token();
    let start = Instant::now();
    let start_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut sent: Vec<Duration> = vec![];
    let mut replies: Vec<Option<Duration>> = vec![];
    let mut end: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let wake = match end {
            Some(end) if now >= end => break,
            Some(end) => end,
            None if stop.load(Ordering::Relaxed) || sent.len() as u64 >= MAX_PROBES => {
                end = Some(now + timeout);
                continue;
            }
            None => {
                let due = start + interval * u32::try_from(sent.len()).unwrap_or(u32::MAX);
                if now >= due {
                    sent.push(now - start);
                    replies.push(None);
                    prober.send(token, sent.len() as u64 - 1);
                    continue;
                }
                // The stop flag is looked at at least every 100 ms.
                due.min(now + Duration::from_millis(100))
            }
        };
        if prober.wait(wake)? {
            prober.drain(token, |seq, at| {
                if let Some(slot) = replies.get_mut(seq as usize) {
                    slot.get_or_insert(at - start);
                }
            })?;
        }
    }
    Ok(sent
        .into_iter()
        .zip(replies)
        .map(|(s, r)| Sent {
            unix_ms: start_unix_ms + s.as_millis() as u64,
            answered: r.is_some_and(|r| r >= s && r - s <= timeout),
        })
        .collect())
}

/// A token that tells this run's replies from any other's.
fn run_token() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 4 {
        return u32::from_ne_bytes(b);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    std::process::id().rotate_left(16) ^ nanos
}

struct Measured {
    probes: Vec<Probe>,
    duplicates: u64,
    send_errors: u64,
    send_lag_max: Duration,
}

struct Prober<'a> {
    sock: &'a ProbeSocket,
    cfg: &'a Config,
    buf: Vec<u8>,
}

impl Prober<'_> {
    fn packet(&self, token: u32, seq: u64) -> Vec<u8> {
        match self.cfg.mode {
            Mode::Icmp => wire::icmp_echo_request(token, seq, self.cfg.payload_bytes),
            Mode::Udp(_) => wire::payload(token, seq, self.cfg.payload_bytes),
        }
    }

    /// Sends probe `seq`; a failed send (e.g. no route, ARP failed) is
    /// counted and the probe stays unanswered.
    fn send(&self, token: u32, seq: u64) -> bool {
        match self.sock.send(&self.packet(token, seq)) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("probe {seq}: send failed: {e}");
                false
            }
        }
    }

    /// Reads every waiting datagram; calls `on_reply(seq, arrival)` for
    /// those that answer run `token`.
    fn drain(&mut self, token: u32, mut on_reply: impl FnMut(u64, Instant)) -> Result<(), PingError> {
        loop {
            let n = match self.sock.try_recv(&mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(()),
                // UDP: an ICMP error (port unreachable...) for an earlier probe.
                Err(e)
                    if matches!(self.cfg.mode, Mode::Udp(_))
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
                        ) =>
                {
                    tracing::debug!("udp: {e}");
                    continue;
                }
                Err(source) => return Err(PingError::Io { what: "receiving replies".into(), source }),
            };
            let at = Instant::now();
            let pkt = &self.buf[..n];
            let seq = match self.cfg.mode {
                Mode::Icmp => wire::parse_icmp_echo_reply(pkt, self.cfg.target, token),
                Mode::Udp(_) => wire::parse_udp_echo(pkt, token),
            };
            if let Some(seq) = seq {
                on_reply(seq, at);
            }
        }
    }

    fn wait(&self, until: Instant) -> Result<bool, PingError> {
        let left = until.saturating_duration_since(Instant::now());
        self.sock.wait_readable(left).map_err(|source| PingError::Io { what: "waiting for replies".into(), source })
    }

    /// Probes every interval until a reply of run `token` comes or `limit`
    /// passes; returns the time taken and whether a reply came.
    fn warm_up(&mut self, token: u32, limit: Duration) -> Result<(Duration, bool), PingError> {
        let start = Instant::now();
        let deadline = start + limit;
        let mut seq = 0u64;
        let mut next = start;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok((now - start, false));
            }
            if now >= next {
                self.send(token, seq);
                seq += 1;
                next = start + self.cfg.interval * u32::try_from(seq).unwrap_or(u32::MAX);
                continue;
            }
            if self.wait(next.min(deadline))? {
                let mut replied = false;
                self.drain(token, |s, _| replied |= s < seq)?;
                if replied {
                    return Ok((start.elapsed(), true));
                }
            }
        }
    }

    /// The measured run: `count` probes, probe i due at start + i * interval,
    /// then replies are collected until the last probe's timeout passes.
    fn measure(&mut self, token: u32, count: u64) -> Result<Measured, PingError> {
        let interval_ns = self.cfg.interval.as_nanos() as u64;
        let mut sent: Vec<Duration> = Vec::with_capacity(count as usize);
        let mut replies: Vec<Option<Duration>> = vec![None; count as usize];
        let (mut duplicates, mut send_errors, mut lag) = (0u64, 0u64, Duration::ZERO);
        let start = Instant::now();
        let mut end = None;
        loop {
            let now = Instant::now();
            let next = sent.len() as u64;
            let wake = if next < count {
                let due = start + Duration::from_nanos(interval_ns * next);
                if now >= due {
                    lag = lag.max(now - due);
                    sent.push(now - start);
                    if !self.send(token, next) {
                        send_errors += 1;
                    }
                    if next + 1 == count {
                        end = Some(now + self.cfg.timeout);
                    }
                    continue;
                }
                due
            } else {
                let end = end.expect("set with the last probe");
                if now >= end {
                    break;
                }
                end
            };
            if self.wait(wake)? {
                let n = sent.len() as u64;
                self.drain(token, |seq, at| {
                    if seq < n {
                        let slot = &mut replies[seq as usize];
                        if slot.is_some() {
                            duplicates += 1;
                        } else {
                            *slot = Some(at - start);
                        }
                    }
                })?;
            }
        }
        let probes = sent.into_iter().zip(replies).map(|(sent, reply)| Probe { sent, reply }).collect();
        Ok(Measured { probes, duplicates, send_errors, send_lag_max: lag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            netns: "x".into(),
            target: Ipv4Addr::new(10, 200, 77, 1),
            interval: Duration::from_millis(10),
            stop: Stop::Count(100),
            timeout: Duration::from_millis(200),
            mode: Mode::Icmp,
            payload_bytes: 56,
            wait_reply: None,
        }
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target("10.200.77.1").unwrap(), Ipv4Addr::new(10, 200, 77, 1));
        assert!(matches!(parse_target("::1"), Err(PingError::BadTarget(_))));
        assert!(matches!(parse_target("example.com"), Err(PingError::BadTarget(_))));
        assert!(matches!(parse_target("10.200.77.1/24"), Err(PingError::BadTarget(_))));
    }

    #[test]
    fn probe_counts() {
        assert_eq!(cfg().validate().unwrap(), 100);
        let d = |ms| Config { stop: Stop::Duration(Duration::from_millis(ms)), ..cfg() };
        assert_eq!(d(1000).validate().unwrap(), 100);
        assert_eq!(d(1001).validate().unwrap(), 101);
        assert_eq!(d(1).validate().unwrap(), 1);
        assert!(d(0).validate().is_err());
        assert!(Config { stop: Stop::Count(0), ..cfg() }.validate().is_err());
        assert!(Config { payload_bytes: 8, ..cfg() }.validate().is_err());
        assert!(Config { interval: Duration::ZERO, ..cfg() }.validate().is_err());
        assert!(Config { mode: Mode::Udp(0), ..cfg() }.validate().is_err());
        assert!(Config { stop: Stop::Count(MAX_PROBES + 1), ..cfg() }.validate().is_err());
    }

    #[test]
    fn ms_rounds_to_microseconds() {
        assert_eq!(ms(Duration::from_nanos(1_234_567)), 1.235);
        assert_eq!(ms(Duration::from_millis(500)), 500.0);
    }
}
