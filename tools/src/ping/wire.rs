//! Probe formats. Every probe carries the same 16-byte tag at the start of
//! its payload, so a reply is matched by run token and full sequence number
//! whatever the transport:
//!
//! ```text
//! 0      4        8                16
//! "FRRY" token:u32 seq:u64 (BE)     padding ...
//! ```
//!
//! ICMP probes are echo requests whose identifier is the low 16 bits of the
//! token and whose sequence is the low 16 bits of `seq`; UDP probes are the
//! tagged payload alone (the guest's echo service on port 7 sends it back).

use std::net::Ipv4Addr;

pub const MAGIC: [u8; 4] = *b"FRRY";
/// Bytes of payload the tag needs.
pub const TAG_LEN: usize = 16;
pub const ICMP_HEADER_LEN: usize = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The tagged payload of probe `seq`, `len` bytes long (at least [`TAG_LEN`]).
pub fn payload(token: u32, seq: u64, len: usize) -> Vec<u8> {
    assert!(len >= TAG_LEN, "payload shorter than its tag");
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&token.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend((TAG_LEN..len).map(|i| i as u8));
    p
}

/// The (token, seq) tag at the start of a payload, if it has one.
pub fn parse_tag(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < TAG_LEN || p[..4] != MAGIC {
        return None;
    }
    let token = u32::from_be_bytes(p[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(p[8..16].try_into().ok()?);
    Some((token, seq))
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request carrying the tagged payload.
pub fn icmp_echo_request(token: u32, seq: u64, payload_len: usize) -> Vec<u8> {
    let mut pkt = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    pkt.extend_from_slice(&(token as u16).to_be_bytes());
    pkt.extend_from_slice(&(seq as u16).to_be_bytes());
    pkt.extend_from_slice(&payload(token, seq, payload_len));
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    pkt
}

/// Matches an IPv4 packet (as a raw ICMP socket returns it, header
/// included) as an echo reply from `from` to a probe of run `token`;
/// returns its sequence number.
pub fn parse_icmp_echo_reply(pkt: &[u8], from: Ipv4Addr, token: u32) -> Option<u64> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]) != from || pkt[9] != 1 {
        return None;
    }
    let icmp = pkt.get(ihl..)?;
    if icmp.len() < ICMP_HEADER_LEN + TAG_LEN || icmp[0] != ICMP_ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    if u16::from_be_bytes([icmp[4], icmp[5]]) != token as u16 {
        return None;
    }
    let (t, seq) = parse_tag(&icmp[ICMP_HEADER_LEN..])?;
    (t == token && seq as u16 == u16::from_be_bytes([icmp[6], icmp[7]])).then_some(seq)
}

/// Matches a UDP echo of a probe of run `token`; returns its sequence.
pub fn parse_udp_echo(p: &[u8], token: u32) -> Option<u64> {
    parse_tag(p).filter(|&(t, _)| t == token).map(|(_, seq)| seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wraps an ICMP message into an IPv4 header from `src`, as the kernel
    /// hands a raw socket the reply.
    fn ipv4(src: Ipv4Addr, icmp: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&[10, 200, 77, 100]);
        h.extend_from_slice(icmp);
        h
    }

    /// Turns an echo request into the reply a host would send.
    fn reply_to(req: &[u8]) -> Vec<u8> {
        let mut r = req.to_vec();
        r[0] = ICMP_ECHO_REPLY;
        r[2..4].fill(0);
        let sum = checksum(&r);
        r[2..4].copy_from_slice(&sum.to_be_bytes());
        r
    }

    #[test]
    fn checksum_of_a_known_packet() {
        // RFC 1071's example words, summed: 0x0001 + 0xf203 + 0xf4f5 + 0xf6f7 -> ~0xddf2.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        // A packet with its checksum in place sums to zero.
        let req = icmp_echo_request(0x1234_5678, 7, 56);
        assert_eq!(checksum(&req), 0);
        assert_eq!(checksum(&icmp_echo_request(1, 2, 17)), 0, "odd length");
    }

    #[test]
    fn echo_request_layout() {
        let req = icmp_echo_request(0xdead_beef, 0x1_0002, 56);
        assert_eq!(req.len(), 64);
        assert_eq!(req[0], 8);
        assert_eq!(&req[4..6], &[0xbe, 0xef]);
        assert_eq!(&req[6..8], &[0x00, 0x02]);
        assert_eq!(parse_tag(&req[8..]), Some((0xdead_beef, 0x1_0002)));
    }

    #[test]
    fn replies_are_matched_by_source_token_and_sequence() {
        let target = Ipv4Addr::new(10, 200, 77, 1);
        let req = icmp_echo_request(42, 70_000, 56);
        let good = ipv4(target, &reply_to(&req));
        assert_eq!(parse_icmp_echo_reply(&good, target, 42), Some(70_000));
        assert_eq!(parse_icmp_echo_reply(&good, target, 43), None, "another run");
        assert_eq!(parse_icmp_echo_reply(&good, Ipv4Addr::new(10, 200, 77, 2), 42), None, "another host");
        let echo_of_request = ipv4(target, &req);
        assert_eq!(parse_icmp_echo_reply(&echo_of_request, target, 42), None, "not a reply");
        assert_eq!(parse_icmp_echo_reply(&good[..30], target, 42), None, "truncated");
        let mut bad_seq = reply_to(&req);
        bad_seq[7] ^= 1;
        assert_eq!(parse_icmp_echo_reply(&ipv4(target, &bad_seq), target, 42), None);
    }

    #[test]
    fn udp_tags() {
        let p = payload(9, 123, 16);
        assert_eq!(p.len(), 16);
        assert_eq!(parse_udp_echo(&p, 9), Some(123));
        assert_eq!(parse_udp_echo(&p, 8), None);
        assert_eq!(parse_udp_echo(&p[..15], 9), None);
        assert_eq!(parse_udp_echo(b"hello, world, hi", 9), None);
    }
}
