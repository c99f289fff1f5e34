//! Ferry's bundled test guest.
//!
//! A freestanding program that boots through PVH, does its privileged setup
//! at CPL0 (see `boot.rs`) and spends its life at CPL3 in one polling loop:
//! a heartbeat on COM1, a memory workload, commands read from COM1, and
//! polled virtio-net (ARP, ICMP echo, UDP echo) and virtio-blk devices.
//! It never enables interrupts and never takes an exception, because on a PVM
//! host neither is delivered.
//!
//! Console protocol (one line each, for tests and people alike):
//!   out: `ferry-guest ... booted: ...`   banner
//!        `workload ready: ...`           working set filled (generation 1)
//!        `heartbeat N max_stall_us=U generation=G dirtied_pages=P`
//!        `virtio-net: mac=M ip=A queues=2`, `virtio-blk: capacity_sectors=N flush=yes|no`
//!        `verify ok ...` | `verify FAILED ...`
//!   in:  `verify`, `status`, `dirty MIB_S`, `exit [CODE]`, `reset`,
//!        `net-status`, `net-announce`, `disk-id`, `disk-write START COUNT SEED`,
//!        `disk-verify START COUNT SEED`, `disk-bad oob|loop|huge|sector`,
//!        `disk-stamp [TAG|off]` (start stamping, or retag; alone: status)

#![no_std]
#![no_main]

mod boot;
mod clock;
mod cmdline;
mod disktest;
mod dma;
mod io;
mod mem;
mod net;
mod ports;
mod probe;
mod serial;
mod stamp;
mod start_info;
mod virtio;
mod workload;

use cmdline::Config;
use io::{outl, rdtsc};
use net::Interface;
use stamp::Stamper;
use virtio::blk::{BadKind, BlkDevice};
use workload::WorkingSet;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Pages stamped per loop iteration at most, so the loop stays responsive.
const DIRTY_BATCH: u64 = 32;
const INPUT_POLL_MS: u64 = 5;
/// Host-side overshoot tolerated on an idle request before it counts as a
/// stall (timer slack and wake-up latency).
const IDLE_SLACK_US: u64 = 200;
/// Longest a line of our own output (a port exit per byte, about 20 us each)
/// or one input poll can take: a longer gap around one was the guest stopped.
const PRINT_MAX_MS: u64 = 20;

extern "C" {
    static __image_end: u8;
}

/// Tracks the longest gap between two points where the guest was running:
/// the guest's own measure of how long it was stopped.
struct Stopwatch {
    last: u64,
    max_ticks: u64,
    /// Longest stall since `take_recent`, for the re-announce check.
    recent_max: u64,
}

impl Stopwatch {
    fn tick(&mut self, now: u64) {
        self.record(now.saturating_sub(self.last));
        self.last = now;
    }
    /// Like `tick`, for a gap that was meant to last `allowed` ticks (an
    /// idle request): only the excess counts as a stall.
    fn tick_allowing(&mut self, now: u64, allowed: u64) {
        self.record(now.saturating_sub(self.last).saturating_sub(allowed));
        self.last = now;
    }
    fn record(&mut self, stall: u64) {
        self.max_ticks = self.max_ticks.max(stall);
        self.recent_max = self.recent_max.max(stall);
    }
    fn take_recent(&mut self) -> u64 {
        core::mem::take(&mut self.recent_max)
    }
    /// Skips the time spent in rare, slow work of our own (running a
    /// command): a few milliseconds a second at most.
    fn restart(&mut self) {
        self.last = rdtsc();
    }
    /// Skips the time spent printing a line or polling the console, unless
    /// it took longer than `bound` ticks: then the guest was stopped in the
    /// middle of it, and the whole gap counts (over by the print's own few
    /// milliseconds at most), so a pause landing on a print is not lost.
    fn skip(&mut self, bound: u64) {
        let now = rdtsc();
        let gap = now.saturating_sub(self.last);
        if gap > bound {
            self.record(gap);
        }
        self.last = now;
    }
}

struct Guest {
    cfg: Config,
    tsc_khz: u64,
    ws: WorkingSet,
    dirty_mib_s: u64,
    dirty_origin: u64,
    dirtied_since_origin: u64,
    dirtied_total: u64,
    stall: Stopwatch,
    max_stall_ever_us: u64,
    heartbeats: u64,
    booted_at: u64,
    net: Option<Interface>,
    blk: Option<BlkDevice>,
    stamper: Option<Stamper>,
}

#[no_mangle]
pub extern "C" fn guest_main(start_info_paddr: u64) -> ! {
    let booted_at = rdtsc();
    let Some(si) = start_info::read(start_info_paddr) else {
        println!("ferry-guest: no PVH start info at {:#x}", start_info_paddr);
        ports::debug_exit(2)
    };
    let cfg = Config::parse(si.cmdline);
    // What the VMM told us at CPL0 (CPUID at CPL3 is the host's on PVM).
    let probe = probe::get();
    let (tsc_khz, tsc_source) = clock::tsc_khz(cfg.tsc_khz, &probe);
    let ram: u64 = si.memmap.iter().filter(|e| e.kind == start_info::E820_RAM).map(|e| e.size).sum();
    let cpus = probe.cpus();
    println!(
        "ferry-guest {} booted: ram_mib={} cpus={} tsc_khz={} ({}) wss_mib={} dirty_mib_s={} heartbeat_ms={} virtio_devices={}",
        VERSION,
        ram >> 20,
        cpus,
        tsc_khz,
        tsc_source.name(),
        cfg.wss_mib,
        cfg.dirty_mib_s,
        cfg.heartbeat_ms,
        cfg.virtio_count
    );
    for d in cfg.virtio_devices() {
        println!("virtio-mmio device: base={:#x} size={:#x} irq={}", d.base, d.size, d.irq);
    }
    if cfg.unknown > 0 {
        println!("cmdline: {} word(s) not for this guest ignored", cfg.unknown);
    }
    // SAFETY: the only call: the arena is handed out once, here.
    let mut arena = unsafe { dma::DmaArena::take() };
    let devs = virtio::probe_all(&cfg, &mut arena, tsc_khz);
    let net = devs.net.map(|dev| {
        let iface = Interface::up(dev, cfg.ip, cfg.udp_echo_port);
        println!(
            "virtio-net: mac={} ip={} queues={}",
            net::Mac(iface.stack.mac),
            net::Ip(iface.stack.ip),
            iface.dev.queues()
        );
        iface
    });
    if let Some(b) = &devs.blk {
        println!("virtio-blk: capacity_sectors={} flush={}", b.capacity, if b.flush { "yes" } else { "no" });
    }

    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let want_pages = cfg.wss_mib * (1 << 20) / workload::PAGE;
    let mut ws = WorkingSet::new(si.memmap, image_end.next_multiple_of(2 << 20), want_pages);
    if ws.pages < want_pages {
        println!("workload: only {} MiB of RAM free for the working set", (ws.pages * workload::PAGE) >> 20);
    }
    let fill_start = rdtsc();
    ws.fill();
    let now = rdtsc();
    println!(
        "workload ready: wss_mib={} pages={} fill_ms={}",
        (ws.pages * workload::PAGE) >> 20,
        ws.pages,
        (now - fill_start) / tsc_khz
    );

    let mut g = Guest {
        dirty_mib_s: cfg.dirty_mib_s,
        cfg,
        tsc_khz,
        ws,
        dirty_origin: now,
        dirtied_since_origin: 0,
        dirtied_total: 0,
        stall: Stopwatch { last: now, max_ticks: 0, recent_max: 0 },
        max_stall_ever_us: 0,
        heartbeats: 0,
        booted_at,
        net,
        blk: devs.blk,
        stamper: None,
    };
    if g.cfg.stamp_ms > 0 {
        g.start_stamping(stamp::tag_from("-"), g.cfg.stamp_ms);
    }
    g.run()
}

impl Guest {
    fn ticks(&self, ms: u64) -> u64 {
        ms * self.tsc_khz
    }

    fn ticks_us(&self, us: u64) -> u64 {
        us * self.tsc_khz / 1000
    }

    fn run(&mut self) -> ! {
        let mut input = serial::LineReader::new();
        let start = rdtsc();
        let mut next_heartbeat = start + self.ticks(self.cfg.heartbeat_ms);
        let mut next_input = start;
        let print_max = self.ticks(PRINT_MAX_MS);
        loop {
            let now = rdtsc();
            self.stall.tick(now);
            let mut busy = self.dirty_due(now);
            let gap = self.stall.take_recent();
            if let Some(net) = &mut self.net {
                // A long stall means the VM was stopped, maybe moved to another
                // host: re-announce so the fabric learns where the MAC is now.
                let ms = self.cfg.announce_stall_ms;
                if ms > 0 && gap >= ms.saturating_mul(self.tsc_khz) {
                    let sent = net.announce();
                    println!("announce: stall_ms={} sent={}", gap / self.tsc_khz, if sent { "yes" } else { "no" });
                    self.stall.restart();
                }
                // One memory read when nothing arrived.
                busy |= net.poll();
            }

            if let (Some(s), Some(blk)) = (&mut self.stamper, &mut self.blk) {
                if s.due(now, blk) {
                    busy = true;
                    // A write takes a few hundred microseconds; only a
                    // write the guest was stopped in counts as a stall.
                    self.stall.skip(print_max);
                }
            }

            if now >= next_input {
                let ran = match input.poll() {
                    Some(line) => {
                        self.command(line);
                        true
                    }
                    None => false,
                };
                next_input = rdtsc() + self.ticks(INPUT_POLL_MS);
                if ran {
                    self.stall.restart();
                } else {
                    self.stall.skip(print_max);
                }
            }
            if now >= next_heartbeat {
                self.heartbeat();
                next_heartbeat += self.ticks(self.cfg.heartbeat_ms);
                if next_heartbeat <= now {
                    next_heartbeat = now + self.ticks(self.cfg.heartbeat_ms);
                }
                self.stall.skip(print_max);
            }
            if !busy && self.cfg.idle_us > 0 {
                self.stall.tick(rdtsc());
                outl(ports::IDLE, self.cfg.idle_us as u32);
                // The idle request plus its exit (about 20 us, more on a busy
                // host) is expected; anything beyond is the guest stopped.
                self.stall.tick_allowing(rdtsc(), self.ticks_us(self.cfg.idle_us + IDLE_SLACK_US));
            }
        }
    }

    /// Stamps the pages the dirty rate says are due; true if it did any.
    fn dirty_due(&mut self, now: u64) -> bool {
        if self.dirty_mib_s == 0 || self.ws.pages == 0 {
            return false;
        }
        let pages_per_s = self.dirty_mib_s * (1 << 20) / workload::PAGE;
        let elapsed = (now - self.dirty_origin) as u128;
        let due = (elapsed * pages_per_s as u128 / (self.tsc_khz as u128 * 1000)) as u64;
        let behind = due.saturating_sub(self.dirtied_since_origin);
        if behind == 0 {
            return false;
        }
        if behind > (pages_per_s / 100).max(DIRTY_BATCH) {
            // More than 10 ms behind (we were stopped or throttled): drop the
            // backlog rather than burst, as a CPU-bound workload loses the
            // time it did not run. This is what makes throttling slow us.
            self.dirty_origin = now;
            self.dirtied_since_origin = 0;
            return false;
        }
        for _ in 0..behind.min(DIRTY_BATCH) {
            self.ws.dirty(1);
            self.stall.tick(rdtsc());
        }
        let n = behind.min(DIRTY_BATCH);
        self.dirtied_since_origin += n;
        self.dirtied_total += n;
        true
    }

    fn take_max_stall_us(&mut self) -> u64 {
        let us = self.stall.max_ticks * 1000 / self.tsc_khz;
        self.stall.max_ticks = 0;
        self.max_stall_ever_us = self.max_stall_ever_us.max(us);
        us
    }

    fn heartbeat(&mut self) {
        self.heartbeats += 1;
        let stall_us = self.take_max_stall_us();
        println!(
            "heartbeat {} max_stall_us={} generation={} dirtied_pages={}",
            self.heartbeats, stall_us, self.ws.generation, self.dirtied_total
        );
    }

    fn command(&mut self, line: &str) {
        let mut words = line.split_ascii_whitespace();
        match words.next().unwrap_or("") {
            "verify" => {
                let t = rdtsc();
                let v = self.ws.verify();
                let ms = (rdtsc() - t) / self.tsc_khz;
                match v.first_bad {
                    None => println!(
                        "verify ok pages={} generation={} checksum={:#018x} ms={}",
                        v.pages, self.ws.generation, v.checksum, ms
                    ),
                    Some((page, addr)) => println!(
                        "verify FAILED bad_pages={} of {} first_bad_page={} addr={:#x}",
                        v.bad_pages, v.pages, page, addr
                    ),
                }
            }
            "status" => {
                let stall_us = self.take_max_stall_us();
                println!(
                    "status heartbeats={} uptime_ms={} dirty_mib_s={} generation={} cursor={} max_stall_us={} max_stall_ever_us={}",
                    self.heartbeats,
                    (rdtsc() - self.booted_at) / self.tsc_khz,
                    self.dirty_mib_s,
                    self.ws.generation,
                    self.ws.cursor,
                    stall_us,
                    self.max_stall_ever_us
                );
            }
            "dirty" => match words.next().and_then(cmdline::parse_u64) {
                Some(rate) => {
                    self.dirty_mib_s = rate;
                    self.dirty_origin = rdtsc();
                    self.dirtied_since_origin = 0;
                    println!("dirty rate set: dirty_mib_s={}", rate);
                }
                None => println!("usage: dirty MIB_PER_S"),
            },
            "exit" => {
                let code = words.next().and_then(|w| w.parse::<u8>().ok()).unwrap_or(0);
                println!("exit {}", code);
                ports::debug_exit(code)
            }
            "reset" => {
                println!("reset");
                ports::i8042_reset()
            }
            "net-status" => self.net_status(),
            "net-announce" => match &mut self.net {
                Some(n) => println!("net-announce sent={}", if n.announce() { "yes" } else { "no" }),
                None => println!("net-announce FAILED reason=no-device"),
            },
            "disk-id" => self.disk_id(),
            name @ ("disk-write" | "disk-verify") => {
                let args = (
                    words.next().and_then(cmdline::parse_u64),
                    words.next().and_then(cmdline::parse_u64),
                    words.next().and_then(cmdline::parse_u64),
                );
                match args {
                    (Some(start), Some(count), Some(seed)) => self.disk_pattern(name, start, count, seed),
                    _ => println!("usage: {} START COUNT SEED", name),
                }
            }
            "disk-stamp" => match (words.next(), &mut self.stamper) {
                (None, Some(s)) => s.print_status(),
                (None, None) => println!("disk-stamp off"),
                (Some("off"), _) => {
                    self.stamper = None;
                    println!("disk-stamp off");
                }
                (Some(tag), Some(s)) => {
                    s.set_tag(stamp::tag_from(tag));
                    s.print_status();
                }
                (Some(tag), None) => {
                    let every = if self.cfg.stamp_ms > 0 { self.cfg.stamp_ms } else { cmdline::DEFAULT_STAMP_MS };
                    self.start_stamping(stamp::tag_from(tag), every);
                }
            },
            "disk-bad" => match words.next().and_then(BadKind::parse) {
                Some(kind) => self.disk_bad(kind),
                None => println!("usage: disk-bad oob|loop|huge|sector"),
            },
            other => println!("unknown command: {}", other),
        }
    }

    fn net_status(&self) {
        let Some(n) = &self.net else {
            println!("net-status FAILED reason=no-device");
            return;
        };
        let c = &n.stack.counters;
        println!(
            "net-status ip={} mac={} rx_frames={} tx_frames={} icmp_echoes={} udp_echoes={} arp_replies={} tx_dropped={} device={}",
            net::Ip(n.stack.ip),
            net::Mac(n.stack.mac),
            c.rx_frames,
            c.tx_frames,
            c.icmp_echoes,
            c.udp_echoes,
            c.arp_replies,
            c.tx_dropped,
            if n.dev.failed() { "failed" } else { "ok" }
        );
    }

    fn disk_id(&mut self) {
        let Some(b) = &mut self.blk else {
            println!("disk-id FAILED reason=no-disk");
            return;
        };
        match b.get_id() {
            Ok(id) => {
                // Up to 20 bytes, NUL-terminated when shorter; shown as ASCII.
                let mut text = [b'?'; 20];
                let len = id.iter().position(|&c| c == 0).unwrap_or(id.len());
                for (t, &c) in text.iter_mut().zip(&id[..len]) {
                    if c.is_ascii_graphic() || c == b' ' {
                        *t = c;
                    }
                }
                println!("disk-id {}", core::str::from_utf8(&text[..len]).unwrap_or(""));
            }
            Err(e) => println!("disk-id FAILED {}", e),
        }
    }

    fn disk_pattern(&mut self, name: &str, start: u64, count: u64, seed: u64) {
        let Some(b) = &mut self.blk else {
            println!("{} FAILED reason=no-disk start={} count={} seed={}", name, start, count, seed);
            return;
        };
        let r = if name == "disk-write" {
            disktest::write(b, start, count, seed)
        } else {
            disktest::verify(b, start, count, seed)
        };
        match r {
            Ok(()) => println!("{} ok start={} count={} seed={}", name, start, count, seed),
            Err(f) => println!("{} FAILED {} start={} count={} seed={}", name, f, start, count, seed),
        }
    }

    /// Starts the disk stamps (see `stamp.rs`): reads the region first.
    fn start_stamping(&mut self, tag: [u8; stamp::TAG_BYTES], every_ms: u64) {
        let Some(b) = &mut self.blk else {
            println!("disk-stamp FAILED reason=no-disk");
            return;
        };
        let region = stamp::Region { at: self.cfg.stamp_at, sectors: self.cfg.stamp_sectors, every_ms };
        match Stamper::start(b, region, tag, self.tsc_khz) {
            Ok(s) => {
                s.print_started();
                self.stamper = Some(s);
            }
            Err(e) => println!("disk-stamp FAILED {}", e),
        }
        self.stall.restart();
    }

    fn disk_bad(&mut self, kind: BadKind) {
        let word = kind.name();
        let Some(b) = &mut self.blk else {
            println!("disk-bad {} FAILED reason=no-disk", word);
            return;
        };
        match b.bad(kind) {
            Ok(status) => println!("disk-bad {} status={}", word, status),
            Err(virtio::blk::BlkError::Timeout) => println!("disk-bad {} no-completion", word),
            Err(e) => println!("disk-bad {} FAILED {}", word, e),
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("ferry-guest panic: {}", info);
    ports::debug_exit(1)
}
