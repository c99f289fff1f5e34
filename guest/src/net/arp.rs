//! ARP for IPv4 over Ethernet: answering requests for our address and
//! announcing it (gratuitous ARP).

pub const LEN: usize = 28;
const HTYPE_ETHERNET: u16 = 1;
const PTYPE_IPV4: u16 = 0x0800;
pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;

pub struct Packet {
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub target_mac: [u8; 6],
    pub target_ip: [u8; 4],
}

pub fn parse(p: &[u8]) -> Option<Packet> {
    let p = p.get(..LEN)?;
    let be16 = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
    if be16(0) != HTYPE_ETHERNET || be16(2) != PTYPE_IPV4 || p[4] != 6 || p[5] != 4 {
        return None;
    }
    Some(Packet {
        op: be16(6),
        sender_mac: p[8..14].try_into().ok()?,
        sender_ip: p[14..18].try_into().ok()?,
        target_mac: p[18..24].try_into().ok()?,
        target_ip: p[24..28].try_into().ok()?,
    })
}

/// Writes `pkt` at the start of `out`; returns its length.
pub fn write(out: &mut [u8], pkt: &Packet) -> Option<usize> {
    let p = out.get_mut(..LEN)?;
    p[0..2].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    p[2..4].copy_from_slice(&PTYPE_IPV4.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&pkt.op.to_be_bytes());
    p[8..14].copy_from_slice(&pkt.sender_mac);
    p[14..18].copy_from_slice(&pkt.sender_ip);
    p[18..24].copy_from_slice(&pkt.target_mac);
    p[24..28].copy_from_slice(&pkt.target_ip);
    Some(LEN)
}
