//! The test guest's ruler on real KVM: the TSC frequency it paces itself by
//! and measures stalls with, and the CPU count it reports, must be what the
//! VMM gave it. On a PVM host CPUID at CPL3 returns the host's values, so the
//! guest reads them (and kvmclock) at CPL0 before it drops to CPL3.

use std::time::{Duration, Instant};

use ferry_e2e::{field, heartbeat_number, kvm_available, Vm};

const T: Duration = Duration::from_secs(20);
/// How close the guest's TSC frequency must be to the host's.
const CLOCK_TOLERANCE: f64 = 0.005;

fn is_banner(l: &str) -> bool {
    l.starts_with("ferry-guest ") && l.contains(" booted: ")
}

fn is_heartbeat(l: &str) -> bool {
    heartbeat_number(l).is_some()
}

/// The host's TSC frequency in kHz, measured in this process: `rdtsc`
/// against CLOCK_MONOTONIC_RAW over 100 ms, median of three.
///
/// Why this reference: the guest's TSC is the host's (PVM forces the TSC
/// offset to 0 and Ferry asks for no TSC scaling), so the rate `rdtsc` runs
/// at here is exactly what the guest must find, and CLOCK_MONOTONIC_RAW is
/// the host's own time base, the one every test measures pauses with. (When
/// the host's clocksource is the TSC this is the host kernel's calibrated
/// figure; else it is an independent measure.) Not `/proc/cpuinfo`: its
/// "cpu MHz" is the current core clock on many hosts, not the TSC rate;
/// and `ferry info` does not report a frequency.
fn host_tsc_khz() -> f64 {
    fn raw_ns() -> u128 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec we own.
        assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) }, 0);
        ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
    }
    fn rdtsc() -> u64 {
        // SAFETY: rdtsc has no preconditions on x86_64 Linux (CR4.TSD clear).
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    let mut samples: Vec<f64> = (0..3)
        .map(|_| {
            let (n0, t0) = (raw_ns(), rdtsc());
            std::thread::sleep(Duration::from_millis(100));
            let (n1, t1) = (raw_ns(), rdtsc());
            (t1 - t0) as f64 * 1e6 / (n1 - n0) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[1]
}

#[test]
fn banner_tsc_khz_is_the_host_tsc_frequency_from_kvmclock() {
    if !kvm_available("banner_tsc_khz_is_the_host_tsc_frequency_from_kvmclock") {
        return;
    }
    let vm = Vm::guest("heartbeat_ms=100 wss_mib=8", &["--mem-mib", "64"]);
    let banner = vm.wait_line(T, is_banner);
    let host = host_tsc_khz();
    let khz = field(&banner, "tsc_khz").expect("banner has tsc_khz");
    assert!(
        banner.contains(&format!("tsc_khz={khz} (kvmclock)")),
        "the guest calibrated from kvmclock at CPL0 and says so: {banner}"
    );
    let off = (khz as f64 - host).abs() / host;
    eprintln!("guest tsc_khz={khz} host measured {host:.0} kHz: off by {:.4}%", off * 100.0);
    assert!(off < CLOCK_TOLERANCE, "guest tsc_khz={khz}, host TSC {host:.0} kHz: off by {:.3}%", off * 100.0);
    drop(vm);

    // An explicit figure on the command line still wins.
    let vm = Vm::guest("heartbeat_ms=100 wss_mib=8 tsc_khz=1234567", &["--mem-mib", "64"]);
    let banner = vm.wait_line(T, is_banner);
    assert!(banner.contains("tsc_khz=1234567 (cmdline)"), "{banner}");
}

#[test]
fn guest_reports_as_many_cpus_as_vcpus_asked() {
    if !kvm_available("guest_reports_as_many_cpus_as_vcpus_asked") {
        return;
    }
    for n in [1u64, 2, 3] {
        let vm = Vm::guest("heartbeat_ms=100 wss_mib=8", &["--mem-mib", "64", "--vcpus", &n.to_string()]);
        let banner = vm.wait_line(T, is_banner);
        assert_eq!(field(&banner, "cpus"), Some(n), "--vcpus {n}: {banner}");
    }
}

/// Pauses a running guest for about 500 ms, three times, and checks the
/// guest's own stall measure against the host's view of the pause.
///
/// Bounds, with `inner` = from `ferry pause` returning to `ferry resume`
/// being started (the guest was certainly stopped all that time) and `outer`
/// = from `ferry pause` being started to `ferry resume` returning (it cannot
/// have been stopped longer, bar the vCPU being scheduled again):
/// - lower: stall >= inner, less the clock tolerance;
/// - upper: stall <= inner + 5% (the `ferry resume` start-up and API call
///   before the VMM lets the vCPU go, and the tail of `ferry pause` after it
///   stopped it, are a few ms), and stall <= outer + the clock tolerance +
///   20 ms (the vCPU thread getting a host CPU again; a line being printed).
#[test]
fn guest_measures_a_pause_within_five_percent() {
    if !kvm_available("guest_measures_a_pause_within_five_percent") {
        return;
    }
    const PAUSE: Duration = Duration::from_millis(500);
    const WAKE_SLACK: Duration = Duration::from_millis(20);
    let vm = Vm::guest("heartbeat_ms=100 wss_mib=8", &["--mem-mib", "64"]);
    let (i, _) = vm.wait_line_from(0, T, is_heartbeat);
    vm.wait_line_from(i + 1, T, is_heartbeat);
    for round in 1..=3 {
        let asked = Instant::now();
        vm.control(&["pause"]);
        let paused = Instant::now();
        std::thread::sleep(PAUSE);
        // Read the console only now: the reader thread has long caught up
        // with everything the guest printed before it stopped.
        let lines = vm.lines();
        let last = lines.iter().rev().find_map(|l| heartbeat_number(l)).unwrap();
        let resume_asked = Instant::now();
        vm.control(&["resume"]);
        let resumed = Instant::now();
        let inner = resume_asked - paused;
        let outer = resumed - asked;

        // A heartbeat line cut by the pause completes after resume but
        // carries the stall measured before it; the pause then shows in
        // the next one. So: the larger of the next two.
        let (j, a) = vm.wait_line_from(lines.len(), T, |l| heartbeat_number(l) == Some(last + 1));
        let (_, b) = vm.wait_line_from(j + 1, T, |l| heartbeat_number(l) == Some(last + 2));
        let stall_us = field(&a, "max_stall_us").unwrap().max(field(&b, "max_stall_us").unwrap());
        let stall = Duration::from_micros(stall_us);
        eprintln!(
            "round {round}: guest stall {stall:?}, host inner {inner:?}, outer {outer:?} ({:+.2}% of inner)",
            (stall.as_secs_f64() / inner.as_secs_f64() - 1.0) * 100.0
        );
        assert!(
            stall.as_secs_f64() >= inner.as_secs_f64() * (1.0 - CLOCK_TOLERANCE),
            "round {round}: the guest measured {stall:?} for a pause of at least {inner:?}\n{a}\n{b}"
        );
        assert!(
            stall.as_secs_f64() <= inner.as_secs_f64() * 1.05,
            "round {round}: the guest measured {stall:?}, more than 5% over the {inner:?} pause\n{a}\n{b}"
        );
        assert!(
            stall.as_secs_f64() <= outer.as_secs_f64() * (1.0 + CLOCK_TOLERANCE) + WAKE_SLACK.as_secs_f64(),
            "round {round}: the guest measured {stall:?}, longer than it can have been stopped ({outer:?})\n{a}\n{b}"
        );
    }
}
