//! The guest's command line: Linux-style `key=value` words.

/// One `virtio_mmio.device=<size>@<base>:<irq>` entry.
#[derive(Clone, Copy, Default)]
pub struct VirtioMmioDevice {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

pub const MAX_VIRTIO_DEVICES: usize = 8;

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
