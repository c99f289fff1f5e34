//! IPv4 headers and the Internet checksum.

pub const HDR_LEN: usize = 20;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;
const DEFAULT_TTL: u8 = 64;
const FLAG_MF: u16 = 0x2000;
const FRAG_OFFSET: u16 = 0x1fff;

pub struct Packet<'a> {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub payload: &'a [u8],
}

/// A whole, unfragmented datagram with a valid header checksum.
pub fn parse(p: &[u8]) -> Option<Packet<'_>> {
    let first = *p.first()?;
    let ihl = (first & 0x0f) as usize * 4;
    if first >> 4 != 4 || ihl < HDR_LEN {
        return None;
    }
    let hdr = p.get(..ihl)?;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if total < ihl || checksum(hdr) != 0 {
        return None;
    }
    // Fragments are not reassembled: echo traffic fits one frame.
    if u16::from_be_bytes([hdr[6], hdr[7]]) & (FLAG_MF | FRAG_OFFSET) != 0 {
        return None;
    }
    Some(Packet {
        src: hdr[12..16].try_into().ok()?,
        dst: hdr[16..20].try_into().ok()?,
        proto: hdr[9],
        payload: p.get(ihl..total)?,
    })
}

/// Writes a 20-byte header for `payload_len` bytes at the start of `out`.
pub fn write_header(out: &mut [u8], src: [u8; 4], dst: [u8; 4], proto: u8, payload_len: usize, id: u16) -> Option<()> {
    let total = u16::try_from(HDR_LEN + payload_len).ok()?;
    let h = out.get_mut(..HDR_LEN)?;
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    h[8] = DEFAULT_TTL;
    h[9] = proto;
    h[10..12].fill(0);
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let sum = checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    Some(())
}

/// One's-complement sum of 16-bit big-endian words, not yet folded.
pub fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_be_bytes([w[0], w[1]]) as u32;
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = words.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

/// Folds and complements a sum: the value that goes in a checksum field.
pub fn finish(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data` (0 when verifying a correct one).
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(0, data))
}
