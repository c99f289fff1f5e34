//! Ethernet II framing.

pub const HDR_LEN: usize = 14;
pub const TYPE_IPV4: u16 = 0x0800;
pub const TYPE_ARP: u16 = 0x0806;
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Shortest frame on the wire (without FCS); shorter ones are zero-padded.
pub const MIN_FRAME: usize = 60;

pub struct Frame<'a> {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse(frame: &[u8]) -> Option<Frame<'_>> {
    let hdr = frame.get(..HDR_LEN)?;
    Some(Frame {
        dst: hdr[0..6].try_into().ok()?,
        src: hdr[6..12].try_into().ok()?,
        ethertype: u16::from_be_bytes([hdr[12], hdr[13]]),
        payload: &frame[HDR_LEN..],
    })
}

/// Writes the header at the start of `out`; `None` if it does not fit.
pub fn write_header(out: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Option<()> {
    let hdr = out.get_mut(..HDR_LEN)?;
    hdr[0..6].copy_from_slice(&dst);
    hdr[6..12].copy_from_slice(&src);
    hdr[12..14].copy_from_slice(&ethertype.to_be_bytes());
    Some(())
}

/// Pads a frame of `len` bytes in `out` to the Ethernet minimum.
pub fn pad(out: &mut [u8], len: usize) -> usize {
    if len < MIN_FRAME && MIN_FRAME <= out.len() {
        out[len..MIN_FRAME].fill(0);
        return MIN_FRAME;
    }
    len
}
