//! ICMP echo: a request comes back as a reply with the same identifier,
//! sequence number and payload.

const HDR_LEN: usize = 8;
const ECHO_REPLY: u8 = 0;
const ECHO_REQUEST: u8 = 8;

use super::ipv4::checksum;

/// Writes the reply to echo request `req` into `out`; its length, or `None`
/// if `req` is not a valid echo request.
pub fn echo_reply(req: &[u8], out: &mut [u8]) -> Option<usize> {
    if req.len() < HDR_LEN || req[0] != ECHO_REQUEST || req[1] != 0 || checksum(req) != 0 {
        return None;
    }
    let reply = out.get_mut(..req.len())?;
    reply.copy_from_slice(req);
    reply[0] = ECHO_REPLY;
    reply[2..4].fill(0);
    let sum = checksum(reply);
    reply[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(req.len())
}
