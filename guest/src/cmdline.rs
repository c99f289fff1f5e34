//! The guest's command line: Linux-style `key=value` words.

/// One `virtio_mmio.device=<size>@<base>:<irq>` entry.
#[derive(Clone, Copy, Default)]
pub struct VirtioMmioDevice {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

pub const MAX_VIRTIO_DEVICES: usize = 8;

/// The disk stamps' region by default: 4 MiB from 8 MiB, clear of the
/// `disk-write` patterns tests put at the start of a 16 MiB disk.
pub const DEFAULT_STAMP_AT: u64 = 16384;
pub const DEFAULT_STAMP_SECTORS: u64 = 8192;
/// The `disk-stamp` command's interval when the command line gave none.
pub const DEFAULT_STAMP_MS: u64 = 20;

pub struct Config {
    /// Working set stamped by the memory workload, MiB.
    pub wss_mib: u64,
    /// Rate at which the workload rewrites the working set, MiB/s (0: idle).
    pub dirty_mib_s: u64,
    /// TSC frequency override, kHz (0: ask CPUID).
    pub tsc_khz: u64,
    pub heartbeat_ms: u64,
    /// How long to hand the CPU back when idle, microseconds (0: spin).
    pub idle_us: u64,
    /// The guest's IPv4 address; without it the network stack stays silent.
    pub ip: Option<[u8; 4]>,
    /// Overrides the MAC the net device reports.
    pub mac: Option<[u8; 6]>,
    pub udp_echo_port: u16,
    /// Send a gratuitous ARP after the guest was stopped this long, ms (0: never).
    pub announce_stall_ms: u64,
    /// Disk stamps (see `stamp.rs`): one record every `stamp_ms` from boot
    /// (0: only when the `disk-stamp` command asks), in `stamp_sectors`
    /// sectors from `stamp_at`.
    pub stamp_ms: u64,
    pub stamp_at: u64,
    pub stamp_sectors: u64,
    pub virtio: [VirtioMmioDevice; MAX_VIRTIO_DEVICES],
    pub virtio_count: usize,
    pub unknown: usize,
}

impl Config {
    pub fn parse(cmdline: &str) -> Config {
        let mut c = Config {
            wss_mib: 16,
            dirty_mib_s: 0,
            tsc_khz: 0,
            heartbeat_ms: 1000,
            idle_us: 200,
            ip: None,
            mac: None,
            udp_echo_port: 7,
            announce_stall_ms: 0,
            stamp_ms: 0,
            stamp_at: DEFAULT_STAMP_AT,
            stamp_sectors: DEFAULT_STAMP_SECTORS,
            virtio: [VirtioMmioDevice::default(); MAX_VIRTIO_DEVICES],
            virtio_count: 0,
            unknown: 0,
        };
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "wss_mib" => c.wss_mib = parse_u64(value).unwrap_or(c.wss_mib),
                "dirty_mib_s" => c.dirty_mib_s = parse_u64(value).unwrap_or(c.dirty_mib_s),
                "tsc_khz" => c.tsc_khz = parse_u64(value).unwrap_or(0),
                "heartbeat_ms" => c.heartbeat_ms = parse_u64(value).unwrap_or(1000).max(10),
                "idle_us" => c.idle_us = parse_u64(value).unwrap_or(c.idle_us).min(10_000),
                // A malformed value counts as an ignored word (see the banner).
                "ip" => match parse_ipv4(value) {
                    Some(ip) => c.ip = Some(ip),
                    None => c.unknown += 1,
                },
                "mac" => match parse_mac(value) {
                    Some(mac) => c.mac = Some(mac),
                    None => c.unknown += 1,
                },
                "udp_echo_port" => match value.parse() {
                    Ok(port) => c.udp_echo_port = port,
                    Err(_) => c.unknown += 1,
                },
                "announce_stall_ms" => c.announce_stall_ms = parse_u64(value).unwrap_or(0),
                "stamp_ms" => c.stamp_ms = parse_u64(value).unwrap_or(0),
                "stamp_at" => c.stamp_at = parse_u64(value).unwrap_or(c.stamp_at),
                "stamp_sectors" => c.stamp_sectors = parse_u64(value).unwrap_or(c.stamp_sectors),
                "virtio_mmio.device" => {
                    if let Some(dev) = parse_virtio_mmio(value) {
                        if c.virtio_count < MAX_VIRTIO_DEVICES {
                            c.virtio[c.virtio_count] = dev;
                            c.virtio_count += 1;
                        }
                    }
                }
                _ => c.unknown += 1,
            }
        }
        c
    }

    pub fn virtio_devices(&self) -> &[VirtioMmioDevice] {
        &self.virtio[..self.virtio_count]
    }
}

/// Decimal or 0x-hex, with an optional K/M/G suffix (as Linux's memparse).
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let value = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    value.checked_mul(1 << shift)
}

fn parse_virtio_mmio(s: &str) -> Option<VirtioMmioDevice> {
    let (size, rest) = s.split_once('@')?;
    let (base, irq) = rest.split_once(':')?;
    Some(VirtioMmioDevice { size: parse_u64(size)?, base: parse_u64(base)?, irq: irq.parse().ok()? })
}

/// `A.B.C.D`.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in ip.iter_mut() {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}
