//! The figures of a ping run, computed from send and reply times alone (no
//! I/O here, so they can be checked against made-up runs).
//!
//! Definitions (all times are offsets from the run's start, which is the
//! moment probe 0 was due):
//! - a probe is *received* if its first reply came within `timeout` of its
//!   send time; otherwise it is *lost*. A reply that came later still counts
//!   as lost, and also as *late*.
//! - `duration` is the end of the last probe's timeout window: its send
//!   time plus `timeout`.
//! - `max_gap` is the longest stretch without an on-time reply: the largest
//!   of (start → first on-time reply), the gaps between consecutive on-time
//!   replies (in arrival order), and, when the last probe got no on-time
//!   reply, (last on-time reply → end of the last probe's timeout window).
//!   A run whose last probe was answered simply ended; its tail is not an
//!   outage. A run with no reply at all has `max_gap == duration`.
//! - RTT figures use on-time replies only; the percentiles are nearest-rank
//!   (`p99` is the smallest RTT that at least 99 % of replies do not exceed),
//!   the median is the mean of the two middle values for an even count.

use std::time::Duration;

/// One probe: when it was sent and when its first reply arrived (if any
/// arrived before the run ended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub sent: Duration,
    pub reply: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub late: u64,
    pub max_gap: Duration,
    pub rtt_min: Option<Duration>,
    pub rtt_median: Option<Duration>,
    pub rtt_p99: Option<Duration>,
    pub rtt_max: Option<Duration>,
    pub duration: Duration,
    /// Runs of consecutive lost probes (each outage is one burst).
    pub lost_bursts: u64,
    pub longest_lost_burst: u64,
}

/// Computes the figures of a run whose probes are given in send order.
pub fn compute(probes: &[Probe], timeout: Duration) -> Figures {
    let on_time = |p: &Probe| p.reply.filter(|&r| r.saturating_sub(p.sent) <= timeout && r >= p.sent);
    let mut rtts: Vec<Duration> = vec![];
    let mut arrivals: Vec<Duration> = vec![];
    let mut late = 0u64;
    let (mut bursts, mut longest, mut run) = (0u64, 0u64, 0u64);
    for p in probes {
        match on_time(p) {
            Some(r) => {
                rtts.push(r - p.sent);
                arrivals.push(r);
                run = 0;
            }
            None => {
                if p.reply.is_some() {
                    late += 1;
                }
                if run == 0 {
                    bursts += 1;
                }
                run += 1;
                longest = longest.max(run);
            }
        }
    }
    let duration = probes.iter().map(|p| p.sent).max().map(|s| s + timeout).unwrap_or_default();

    arrivals.sort_unstable();
    let mut max_gap = Duration::ZERO;
    let mut prev = Duration::ZERO;
    for &a in &arrivals {
        max_gap = max_gap.max(a.saturating_sub(prev));
        prev = a;
    }
    let last_answered = probes.iter().max_by_key(|p| p.sent).map(|p| on_time(p).is_some());
    if last_answered == Some(false) {
        max_gap = max_gap.max(duration.saturating_sub(prev));
    }

    rtts.sort_unstable();
    let n = rtts.len();
    let rank = |q: f64| -> Option<Duration> {
        if n == 0 {
            return None;
        }
        let k = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(rtts[k - 1])
    };
    let median = match n {
        0 => None,
        _ if n % 2 == 1 => Some(rtts[n / 2]),
        _ => Some((rtts[n / 2 - 1] + rtts[n / 2]) / 2),
    };
    Figures {
        sent: probes.len() as u64,
        received: n as u64,
        lost: (probes.len() - n) as u64,
        late,
        max_gap,
        rtt_min: rtts.first().copied(),
        rtt_median: median,
        rtt_p99: rank(0.99),
        rtt_max: rtts.last().copied(),
        duration,
        lost_bursts: bursts,
        longest_lost_burst: longest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    /// `count` probes every `interval`, answered after `rtt` unless `lost(i)`.
    fn run(count: u32, interval: Duration, rtt: Duration, lost: impl Fn(Duration) -> bool) -> Vec<Probe> {
        (0..count)
            .map(|i| {
                let sent = interval * i;
                Probe { sent, reply: (!lost(sent)).then_some(sent + rtt) }
            })
            .collect()
    }

    #[test]
    fn clean_run() {
        let p = run(100, 10 * MS, 200 * US, |_| false);
        let f = compute(&p, 200 * MS);
        assert_eq!((f.sent, f.received, f.lost, f.late), (100, 100, 0, 0));
        assert_eq!(f.max_gap, 10 * MS);
        assert_eq!(f.rtt_median, Some(200 * US));
        assert_eq!(f.rtt_p99, Some(200 * US));
        assert_eq!(f.rtt_max, Some(200 * US));
        assert_eq!(f.duration, 990 * MS + 200 * MS);
        assert_eq!((f.lost_bursts, f.longest_lost_burst), (0, 0));
    }

    #[test]
    fn outage_of_500ms_at_10ms() {
        // 3 s of probes; the path is down from 1.000 s to 1.500 s.
        let p = run(300, 10 * MS, 300 * US, |t| t >= 1000 * MS && t < 1500 * MS);
        let f = compute(&p, 200 * MS);
        assert_eq!(f.lost, 50);
        assert_eq!(f.received, 250);
        // Last reply before: 990.3 ms; first after: 1500.3 ms.
        assert_eq!(f.max_gap, 510 * MS);
        assert!((500 * MS..=520 * MS).contains(&f.max_gap));
        assert_eq!((f.lost_bursts, f.longest_lost_burst), (1, 50));
    }

    #[test]
    fn late_reply_is_lost_and_late() {
        let mut p = run(10, 10 * MS, MS, |_| false);
        p[4].reply = Some(p[4].sent + 250 * MS);
        let f = compute(&p, 200 * MS);
        assert_eq!((f.received, f.lost, f.late), (9, 1, 1));
        assert_eq!(f.max_gap, 20 * MS);
        assert_eq!(f.rtt_max, Some(MS));
    }

    #[test]
    fn reply_at_exactly_the_timeout_is_on_time() {
        let p = vec![Probe { sent: Duration::ZERO, reply: Some(200 * MS) }];
        let f = compute(&p, 200 * MS);
        assert_eq!((f.received, f.late), (1, 0));
        assert_eq!(f.max_gap, 200 * MS);
    }

    #[test]
    fn nothing_answered() {
        let p = run(50, 10 * MS, MS, |_| true);
        let f = compute(&p, 200 * MS);
        assert_eq!((f.received, f.lost), (0, 50));
        assert_eq!(f.duration, 490 * MS + 200 * MS);
        assert_eq!(f.max_gap, f.duration);
        assert_eq!(f.rtt_median, None);
        assert_eq!(f.rtt_p99, None);
    }

    #[test]
    fn outage_at_the_start_counts_from_the_start() {
        let p = run(100, 10 * MS, MS, |t| t < 300 * MS);
        let f = compute(&p, 200 * MS);
        assert_eq!(f.lost, 30);
        assert_eq!(f.max_gap, 301 * MS);
    }

    #[test]
    fn outage_at_the_end_runs_to_the_last_timeout() {
        let p = run(100, 10 * MS, MS, |t| t >= 900 * MS);
        let f = compute(&p, 200 * MS);
        assert_eq!(f.lost, 10);
        // Last reply at 891 ms; the last probe (990 ms) times out at 1190 ms.
        assert_eq!(f.max_gap, 1190 * MS - 891 * MS);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        // RTTs 1..=100 ms.
        let p: Vec<Probe> = (1..=100u32)
            .map(|i| {
                let sent = 10 * MS * i;
                Probe { sent, reply: Some(sent + MS * i) }
            })
            .collect();
        let f = compute(&p, Duration::from_secs(1));
        assert_eq!(f.rtt_min, Some(MS));
        assert_eq!(f.rtt_median, Some(50 * MS + 500 * US));
        assert_eq!(f.rtt_p99, Some(99 * MS));
        assert_eq!(f.rtt_max, Some(100 * MS));
        let odd: Vec<Probe> = p[..3].to_vec();
        assert_eq!(compute(&odd, Duration::from_secs(1)).rtt_median, Some(2 * MS));
    }

    #[test]
    fn several_bursts() {
        let p = run(100, 10 * MS, MS, |t| (200 * MS..230 * MS).contains(&t) || (600 * MS..610 * MS).contains(&t));
        let f = compute(&p, 200 * MS);
        assert_eq!(f.lost, 4);
        assert_eq!((f.lost_bursts, f.longest_lost_burst), (2, 3));
        assert_eq!(f.max_gap, 40 * MS);
    }

    #[test]
    fn empty_run() {
        let f = compute(&[], 200 * MS);
        assert_eq!((f.sent, f.received, f.lost), (0, 0, 0));
        assert_eq!(f.max_gap, Duration::ZERO);
        assert_eq!(f.duration, Duration::ZERO);
    }
}
