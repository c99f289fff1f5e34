//! MAC addresses: a leaf module, so config, devices and saved state can
//! all name one without importing each other.

use serde::{Deserialize, Serialize};

/// A MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<_> = s.split(':').collect();
        let bad = || format!("bad MAC address '{s}' (expected six hex bytes like 52:54:00:12:34:56)");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("MAC address '{s}' is multicast; a NIC needs a unicast address"));
        }
        Ok(MacAddr(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl MacAddr {
    /// A stable locally administered address derived from `seed` (the tap
    /// name), so a VM keeps its MAC across restarts and moves.
    pub fn derived_from(seed: &str) -> MacAddr {
        let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let b = h.to_le_bytes();
        MacAddr([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_prints_and_refuses_multicast() {
        let m: MacAddr = "52:54:00:ab:CD:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err().contains("multicast"));
        assert_eq!(MacAddr::derived_from("vm0"), MacAddr::derived_from("vm0"));
        assert_ne!(MacAddr::derived_from("vm0"), MacAddr::derived_from("vm1"));
    }
}
