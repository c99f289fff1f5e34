//! UDP echo: a datagram to the echo port goes back to where it came from.

use super::ipv4::{finish, sum, PROTO_UDP};

const HDR_LEN: usize = 8;

pub struct Datagram<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

/// `seg` is the IP payload. The checksum is not verified (0 means none in
/// IPv4, and an echo that returns corrupt data shows the corruption).
pub fn parse(seg: &[u8]) -> Option<Datagram<'_>> {
    let h = seg.get(..HDR_LEN)?;
    let len = u16::from_be_bytes([h[4], h[5]]) as usize;
    Some(Datagram {
        src_port: u16::from_be_bytes([h[0], h[1]]),
        dst_port: u16::from_be_bytes([h[2], h[3]]),
        payload: seg.get(HDR_LEN..len)?,
    })
}

/// Writes a datagram with a full checksum into `out`; returns its length.
pub fn write(out: &mut [u8], src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Option<usize> {
    let len = HDR_LEN + payload.len();
    let len16 = u16::try_from(len).ok()?;
    let seg = out.get_mut(..len)?;
    seg[0..2].copy_from_slice(&src.1.to_be_bytes());
    seg[2..4].copy_from_slice(&dst.1.to_be_bytes());
    seg[4..6].copy_from_slice(&len16.to_be_bytes());
    seg[6..8].fill(0);
    seg[HDR_LEN..].copy_from_slice(payload);
    // Pseudo-header: source, destination, protocol, UDP length.
    let mut acc = sum(0, &src.0);
    acc = sum(acc, &dst.0);
    acc += PROTO_UDP as u32 + len as u32;
    let csum = match finish(sum(acc, seg)) {
        0 => 0xffff,
        c => c,
    };
    seg[6..8].copy_from_slice(&csum.to_be_bytes());
    Some(len)
}
