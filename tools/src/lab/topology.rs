//! The lab's fixed shape: which namespaces, bridges, veths and addresses it
//! makes. Everything a lab creates is named here, in one place.
//!
//! ```text
//!             NAME-fabric: bridge `fabric`
//!          to-a |        to-b |        | to-client
//!   NAME-a: uplink   NAME-b: uplink   NAME-client: eth0 10.200.77.100/24
//!           br0 10.200.77.1/24 br0 10.200.77.2/24
//!           + VM taps           + VM taps
//! ```
//!
//! A lab made with `--hosts a,b,c` has a third host, NAME-c (port to-c,
//! br0 10.200.77.3/24), built like a and b. With `--etcd`, every host runs
//! one etcd member on its address (clients :2379, peers :2380).
//!
//! The interface names do not contain the lab name: every one lives in a
//! namespace that belongs to one lab, so two labs never collide, and the
//! 15-character interface-name limit only constrains tap names.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The one private /24 every lab uses, inside its own namespaces only.
pub const SUBNET: &str = "10.200.77.0/24";
pub const PREFIX_LEN: u8 = 24;
/// Guests (VMs on the hosts' taps) take addresses in this range.
pub const GUEST_FIRST: Ipv4Addr = Ipv4Addr::new(10, 200, 77, 10);
pub const GUEST_LAST: Ipv4Addr = Ipv4Addr::new(10, 200, 77, 99);

/// Name of the bridge in the fabric namespace.
pub const FABRIC_BRIDGE: &str = "fabric";
/// Name of the bridge in each host namespace; VM taps are attached to it.
pub const HOST_BRIDGE: &str = "br0";

/// One namespace of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Fabric,
    A,
    B,
    C,
    Client,
}

/// A veth pair from the fabric bridge into one namespace.
pub struct Uplink {
    /// The end in the fabric namespace, a port of the `fabric` bridge.
    pub fabric_end: &'static str,
    /// The end in the role's namespace.
    pub local_end: &'static str,
}

impl Role {
    /// Creation order (the fabric first); deletion runs it backwards.
    pub const ALL: [Role; 5] = [Role::Fabric, Role::A, Role::B, Role::C, Role::Client];
    /// The hosts of a lab made without `--hosts`.
    pub const DEFAULT_HOSTS: [Role; 2] = [Role::A, Role::B];

    pub fn suffix(self) -> &'static str {
        match self {
            Role::Fabric => "fabric",
            Role::A => "a",
            Role::B => "b",
            Role::C => "c",
            Role::Client => "client",
        }
    }

    /// The network namespace of this role in lab `lab`.
    pub fn netns(self, lab: &str) -> String {
        format!("{lab}-{}", self.suffix())
    }

    /// True for the VM hosts (they hold a `br0` and VM taps).
    pub fn is_host(self) -> bool {
        matches!(self, Role::A | Role::B | Role::C)
    }

    /// The bridge this namespace holds, if any.
    pub fn bridge(self) -> Option<&'static str> {
        match self {
            Role::Fabric => Some(FABRIC_BRIDGE),
            Role::A | Role::B | Role::C => Some(HOST_BRIDGE),
            Role::Client => None,
        }
    }

    pub fn uplink(self) -> Option<Uplink> {
        match self {
            Role::Fabric => None,
            Role::A => Some(Uplink { fabric_end: "to-a", local_end: "uplink" }),
            Role::B => Some(Uplink { fabric_end: "to-b", local_end: "uplink" }),
            Role::C => Some(Uplink { fabric_end: "to-c", local_end: "uplink" }),
            Role::Client => Some(Uplink { fabric_end: "to-client", local_end: "eth0" }),
        }
    }

    /// The namespace's own IPv4 address (prefix length [`PREFIX_LEN`]).
    pub fn address(self) -> Option<Ipv4Addr> {
        match self {
            Role::Fabric => None,
            Role::A => Some(Ipv4Addr::new(10, 200, 77, 1)),
            Role::B => Some(Ipv4Addr::new(10, 200, 77, 2)),
            Role::C => Some(Ipv4Addr::new(10, 200, 77, 3)),
            Role::Client => Some(Ipv4Addr::new(10, 200, 77, 100)),
        }
    }

    /// The interface that carries [`Role::address`].
    pub fn address_dev(self) -> Option<&'static str> {
        match self {
            Role::Fabric => None,
            Role::A | Role::B | Role::C => Some(HOST_BRIDGE),
            Role::Client => Some("eth0"),
        }
    }

    /// A fixed, locally administered MAC for the bridge or the client's
    /// interface, so a bridge's address does not change as taps come and go
    /// (and neighbours' ARP caches stay right).
    pub fn mac(self) -> &'static str {
        match self {
            Role::Fabric => "02:f0:77:00:00:fe",
            Role::A => "02:f0:77:00:00:01",
            Role::B => "02:f0:77:00:00:02",
            Role::C => "02:f0:77:00:00:03",
            Role::Client => "02:f0:77:00:00:64",
        }
    }

    /// Interface names this role's namespace uses itself (taps may not take them).
    pub fn reserved_ifnames() -> &'static [&'static str] {
        &["lo", FABRIC_BRIDGE, HOST_BRIDGE, "uplink", "eth0", "to-a", "to-b", "to-c", "to-client"]
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL.into_iter().find(|r| r.suffix() == s).ok_or_else(|| {
            format!("unknown lab host {s:?}: expected a, b, client or fabric (or c, in a three-host lab)")
        })
    }
}

/// Parses `--hosts a,b,c`: VM hosts only, each once; returned in order.
pub fn parse_hosts(list: &str) -> Result<Vec<Role>, String> {
    let mut hosts = vec![];
    for h in list.split(',').map(str::trim) {
        let role: Role = h.parse()?;
        if !role.is_host() {
            return Err(format!("{role} is not a VM host: --hosts takes a, b and c"));
        }
        if hosts.contains(&role) {
            return Err(format!("host {role} is listed twice"));
        }
        hosts.push(role);
    }
    if hosts.is_empty() {
        return Err("no hosts given".into());
    }
    hosts.sort();
    Ok(hosts)
}

/// Longest lab name: `NAME-client` must stay a short, readable netns name.
pub const MAX_NAME_LEN: usize = 12;

/// Checks a lab name: 1-12 characters of `a-z0-9_`, starting with a letter
/// or digit (no '-', so `NAME-a` can never be mistaken for another lab's).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("it is longer than {MAX_NAME_LEN} characters"));
    }
    if !name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_') {
        return Err("use only lowercase letters, digits and '_'".into());
    }
    if name.starts_with('_') {
        return Err("it must start with a letter or digit".into());
    }
    Ok(())
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Checks a tap name: 1-15 characters of `A-Za-z0-9_.-`, starting with a
/// letter or digit, and not one of the lab's own interface names.
pub fn validate_tap_name(tap: &str) -> Result<(), String> {
    if tap.is_empty() {
        return Err("it is empty".into());
    }
    if tap.len() > MAX_IFNAME_LEN {
        return Err(format!("interface names are at most {MAX_IFNAME_LEN} characters"));
    }
    if !tap.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-')) {
        return Err("use only letters, digits, '_', '.' and '-'".into());
    }
    if !tap.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("it must start with a letter or digit".into());
    }
    if Role::reserved_ifnames().contains(&tap) {
        return Err("the lab uses that interface name itself".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("ferry").is_ok());
        assert!(validate_name("t1").is_ok());
        assert!(validate_name("abcdefghijkl").is_ok());
        assert!(validate_name("abcdefghijklm").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a-b").is_err());
        assert!(validate_name("A").is_err());
        assert!(validate_name("_x").is_err());
        assert!(validate_name("a/b").is_err());
        assert_eq!(Role::Client.netns("ferry"), "ferry-client");
    }

    #[test]
    fn tap_names() {
        assert!(validate_tap_name("tap0").is_ok());
        assert!(validate_tap_name("vm-1.tap").is_ok());
        assert!(validate_tap_name("0123456789abcde").is_ok());
        assert!(validate_tap_name("0123456789abcdef").is_err());
        assert!(validate_tap_name("-x").is_err());
        assert!(validate_tap_name("br0").is_err());
        assert!(validate_tap_name("a b").is_err());
    }

    #[test]
    fn roles_parse() {
        for r in Role::ALL {
            assert_eq!(r.suffix().parse::<Role>().unwrap(), r);
        }
        assert!("d".parse::<Role>().is_err());
        assert_eq!("c".parse::<Role>().unwrap(), Role::C);
        assert_eq!(Role::C.address().unwrap().to_string(), "10.200.77.3");
        assert!(parse_hosts("a,b,c").is_ok());
        assert_eq!(parse_hosts("c,a").unwrap(), [Role::A, Role::C]);
        assert!(parse_hosts("a,client").is_err());
        assert!(parse_hosts("a,a").is_err());
        assert!(parse_hosts("").is_err());
        let addr = Role::A.address().unwrap();
        assert!(addr < GUEST_FIRST && Role::Client.address().unwrap() > GUEST_LAST);
    }
}
