//! What the cluster stores for a highly available VM (the `config` of its
//! [`cluster::VmRecord`]), and the node-local names derived from it.
//!
//! ```json
//! {"machine": MachineConfig, "bridges": [null, "br1"]}
//! ```
//!
//! `machine` is the guest-visible machine exactly as `ferry run --machine`
//! boots it; `bridges` names, per NIC, a bridge other than the node's VM
//! bridge (None: the node's).

use serde::{Deserialize, Serialize};
use vmm::config::MachineConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    pub machine: MachineConfig,
    /// One per NIC (missing entries: the node's VM bridge).
    #[serde(default)]
    pub bridges: Vec<Option<String>>,
}

impl VmSpec {
    pub fn from_record(record: &cluster::VmRecord) -> Result<VmSpec, serde_json::Error> {
        serde_json::from_value(record.config.clone())
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a VM spec always serialises")
    }

    /// The bridge NIC `i` goes on, given the node's VM bridge.
    pub fn bridge<'a>(&'a self, i: usize, node_bridge: &'a str) -> &'a str {
        self.bridges.get(i).and_then(|b| b.as_deref()).unwrap_or(node_bridge)
    }
}

/// The tap behind NIC `nic` of VM `vm` on a node: `fy` + 10 hex digits of
/// a hash of the VM's name + the NIC index, within the kernel's
/// 15-character limit and the same on every node (so a restarted agent
/// finds it again).
pub fn tap_name(vm: &str, nic: usize) -> String {
    // FNV-1a, 64 bits: stable across builds (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fy{:010x}n{nic}", h >> 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_differ() {
        let a = tap_name("web", 0);
        assert!(a.len() <= 15, "{a}");
        assert_eq!(a, tap_name("web", 0));
        assert_ne!(a, tap_name("web", 1));
        assert_ne!(a, tap_name("web2", 0));
        assert!(tap_name(&"x".repeat(63), 9).len() <= 15);
    }

    #[test]
    fn spec_round_trips_through_the_record() {
        let spec = VmSpec { machine: MachineConfig::new("/k"), bridges: vec![None, Some("br1".into())] };
        let rec = cluster::VmRecord {
            v: cluster::FORMAT_VERSION,
            name: "v".into(),
            config: spec.to_value(),
            preferred_owners: vec![],
        };
        let back = VmSpec::from_record(&rec).unwrap();
        assert_eq!(back, spec);
        assert_eq!(back.bridge(0, "br0"), "br0");
        assert_eq!(back.bridge(1, "br0"), "br1");
        assert_eq!(back.bridge(2, "br0"), "br0");
    }
}
