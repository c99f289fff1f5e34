//! A minimal IPv4 host: answers ARP for its address, ICMP echo, and echoes
//! UDP on one port. Everything else is counted and dropped. Replies are built
//! from the request alone, so there is no ARP cache and no state to migrate.

pub mod arp;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod udp;

use crate::virtio::net::NetDevice;

/// Frames handled per `poll`, so the main loop stays responsive.
const RX_BATCH: usize = 64;
const MAX_FRAME: usize = 2048;

#[derive(Default)]
pub struct Counters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub arp_replies: u64,
    pub icmp_echoes: u64,
    pub udp_echoes: u64,
}

pub struct Stack {
    pub mac: [u8; 6],
    /// `None`: the interface receives but never answers.
    pub ip: Option<[u8; 4]>,
    pub udp_echo_port: u16,
    pub counters: Counters,
    ip_id: u16,
}

impl Stack {
    pub fn new(mac: [u8; 6], ip: Option<[u8; 4]>, udp_echo_port: u16) -> Stack {
        Stack { mac, ip, udp_echo_port, counters: Counters::default(), ip_id: 0 }
    }

    /// Handles one received frame; returns the length of the reply written
    /// to `out`, if there is one.
    pub fn handle(&mut self, frame: &[u8], out: &mut [u8]) -> Option<usize> {
        let ip = self.ip?;
        let eth = ethernet::parse(frame)?;
        if eth.dst != self.mac && eth.dst != ethernet::BROADCAST {
            return None;
        }
        let body = out.get_mut(ethernet::HDR_LEN..)?;
        let (ethertype, len) = match eth.ethertype {
            ethernet::TYPE_ARP => (ethernet::TYPE_ARP, self.arp(ip, eth.payload, body)?),
            ethernet::TYPE_IPV4 if eth.dst == self.mac => (ethernet::TYPE_IPV4, self.ipv4(ip, eth.payload, body)?),
            _ => return None,
        };
        ethernet::write_header(out, eth.src, self.mac, ethertype)?;
        Some(ethernet::pad(out, ethernet::HDR_LEN + len))
    }

    fn arp(&mut self, ip: [u8; 4], payload: &[u8], out: &mut [u8]) -> Option<usize> {
        let req = arp::parse(payload)?;
        if req.op != arp::OP_REQUEST || req.target_ip != ip {
            return None;
        }
        let reply = arp::Packet {
            op: arp::OP_REPLY,
            sender_mac: self.mac,
            sender_ip: ip,
            target_mac: req.sender_mac,
            target_ip: req.sender_ip,
        };
        let len = arp::write(out, &reply)?;
        self.counters.arp_replies += 1;
        Some(len)
    }

    fn ipv4(&mut self, ip: [u8; 4], payload: &[u8], out: &mut [u8]) -> Option<usize> {
        let pkt = ipv4::parse(payload)?;
        if pkt.dst != ip {
            return None;
        }
        let body = out.get_mut(ipv4::HDR_LEN..)?;
        let len = match pkt.proto {
            ipv4::PROTO_ICMP => {
                let len = icmp::echo_reply(pkt.payload, body)?;
                self.counters.icmp_echoes += 1;
                len
            }
            ipv4::PROTO_UDP => {
                let d = udp::parse(pkt.payload)?;
                if d.dst_port != self.udp_echo_port {
                    return None;
                }
                let len = udp::write(body, (ip, d.dst_port), (pkt.src, d.src_port), d.payload)?;
                self.counters.udp_echoes += 1;
                len
            }
            _ => return None,
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        ipv4::write_header(out, ip, pkt.src, pkt.proto, len, self.ip_id)?;
        Some(ipv4::HDR_LEN + len)
    }

    /// A gratuitous ARP request announcing our address, so switches and
    /// neighbours learn where it lives (at boot, and after a move).
    pub fn announcement(&self, out: &mut [u8]) -> Option<usize> {
        let ip = self.ip?;
        let pkt =
            arp::Packet { op: arp::OP_REQUEST, sender_mac: self.mac, sender_ip: ip, target_mac: [0; 6], target_ip: ip };
        let len = arp::write(out.get_mut(ethernet::HDR_LEN..)?, &pkt)?;
        ethernet::write_header(out, ethernet::BROADCAST, self.mac, ethernet::TYPE_ARP)?;
        Some(ethernet::pad(out, ethernet::HDR_LEN + len))
    }
}

/// Shows a MAC as `aa:bb:cc:dd:ee:ff`.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Shows an optional IPv4 address: `none` when not configured.
pub struct Ip(pub Option<[u8; 4]>);

impl core::fmt::Display for Ip {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{}.{}.{}.{}", a[0], a[1], a[2], a[3]),
            None => write!(f, "none"),
        }
    }
}

/// The net device and the stack on top of it.
pub struct Interface {
    pub dev: NetDevice,
    pub stack: Stack,
    scratch: [u8; MAX_FRAME],
}

impl Interface {
    /// Brings the interface up and announces its address once.
    pub fn up(dev: NetDevice, ip: Option<[u8; 4]>, udp_echo_port: u16) -> Interface {
        let stack = Stack::new(dev.mac, ip, udp_echo_port);
        let mut iface = Interface { dev, stack, scratch: [0; MAX_FRAME] };
        iface.announce();
        iface
    }

    /// Sends a gratuitous ARP; false if there is no address or it was dropped.
    pub fn announce(&mut self) -> bool {
        let Some(len) = self.stack.announcement(&mut self.scratch) else {
            return false;
        };
        let sent = self.transmit(len);
        self.dev.flush();
        sent
    }

    fn transmit(&mut self, len: usize) -> bool {
        let sent = self.scratch.get(..len).is_some_and(|f| self.dev.send(f));
        if sent {
            self.stack.counters.tx_frames += 1;
        } else {
            self.stack.counters.tx_dropped += 1;
        }
        sent
    }

    /// Handles what arrived since the last call: one memory read when
    /// nothing did. True if there was work (the loop should not idle).
    pub fn poll(&mut self) -> bool {
        if self.dev.failed() {
            return false;
        }
        self.dev.reclaim_tx();
        let mut n = 0;
        while n < RX_BATCH {
            let Some(f) = self.dev.rx_next() else { break };
            n += 1;
            self.stack.counters.rx_frames += 1;
            if let Some(len) = self.stack.handle(f.data.bytes(), &mut self.scratch) {
                self.transmit(len);
            }
            self.dev.rx_recycle(f);
        }
        self.dev.flush();
        n > 0
    }
}
