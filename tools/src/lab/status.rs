//! `ferry lab status`: what exists now, compared with what the lab should
//! have.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::etcd;
use super::state::{self, State};
use super::topology::{self, Role, PREFIX_LEN};
use super::{Lab, LabError, Link, Presence};

/// An interface the lab expects, and what it found.
#[derive(Debug, Serialize)]
pub struct IfStatus {
    pub name: String,
    pub exists: bool,
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
    /// The kernel's operational state: "UP" once it carries traffic.
    pub operstate: Option<String>,
    pub master: Option<String>,
    /// The bridge it should be a port of, if any.
    pub expected_master: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TapStatus {
    pub name: String,
    pub exists: bool,
    pub up: bool,
    pub master: Option<String>,
    pub vnet_hdr: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct NsStatus {
    pub role: Role,
    pub netns: String,
    pub exists: bool,
    /// Listed in the state file with the identity it has now.
    pub created_by_lab: bool,
    /// Exists but is not the lab's: the lab will not touch it.
    pub foreign: bool,
    /// The namespace's own address and its interface (null for the fabric),
    /// and whether it is configured (null when there is none to configure).
    pub address: Option<String>,
    pub address_dev: Option<&'static str>,
    pub address_present: Option<bool>,
    /// Every IPv4 address found in the namespace ("ADDR/LEN dev IF").
    pub ipv4: Vec<String>,
    pub interfaces: Vec<IfStatus>,
    /// VM taps (hosts only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taps: Option<Vec<TapStatus>>,
    /// Processes running inside the namespace.
    pub pids: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub name: String,
    pub state_file: PathBuf,
    pub state_file_exists: bool,
    pub subnet: &'static str,
    pub guest_range: String,
    /// Everything the lab should have exists, is the lab's, and is up
    /// (a cut link is down, so a lab with a cut host is not complete).
    pub complete: bool,
    /// The VM hosts.
    pub hosts: Vec<Role>,
    /// Hosts whose link to the fabric is cut.
    pub cut: Vec<Role>,
    pub namespaces: Vec<NsStatus>,
    /// The etcd members, if the lab runs etcd.
    pub etcd: Option<EtcdStatus>,
}

#[derive(Debug, Serialize)]
pub struct EtcdStatus {
    /// The client URLs, comma-separated, as `--etcd` takes them.
    pub endpoints: String,
    pub members: Vec<etcd::MemberStatus>,
}

impl Lab {
    /// What exists now, compared with what the lab should have.
    pub fn status(&self) -> Result<Status, LabError> {
        let state = State::load(&self.name)?;
        let mut namespaces = vec![];
        let mut complete = state.is_some();
        let roles = super::lab_roles(state.as_ref());
        for &role in &roles {
            let ns = self.netns(role);
            let presence = self.presence(state.as_ref(), role)?;
            let ours = presence == Presence::Ours;
            let links = if ours { self.links(&ns)? } else { BTreeMap::new() };
            let ipv4 = if ours { self.ipv4(&ns)? } else { vec![] };
            let pids = if ours { self.pids(&ns)? } else { vec![] };

            let mut interfaces = vec![];
            let mut expect = |name: &str, master: Option<&str>| {
                let l = links.get(name);
                interfaces.push(IfStatus {
                    name: name.into(),
                    exists: l.is_some(),
                    kind: l.and_then(|l| l.kind.clone()),
                    up: l.is_some_and(|l| l.up),
                    operstate: l.map(|l| l.operstate.clone()),
                    master: l.and_then(|l| l.master.clone()),
                    expected_master: master.map(str::to_owned),
                });
            };
            if let Some(br) = role.bridge() {
                expect(br, None);
            }
            match role {
                Role::Fabric => {
                    for &r in &roles {
                        if let Some(u) = r.uplink() {
                            expect(u.fabric_end, Some(topology::FABRIC_BRIDGE));
                        }
                    }
                }
                _ => {
                    let u = role.uplink().expect("every non-fabric role has an uplink");
                    expect(u.local_end, role.bridge());
                }
            }
            let address = role.address().map(|a| format!("{a}/{PREFIX_LEN}"));
            let address_present = match (&address, role.address_dev()) {
                (Some(a), Some(dev)) => Some(ipv4.contains(&format!("{a} dev {dev}"))),
                _ => None,
            };
            let taps = role.is_host().then(|| {
                state
                    .as_ref()
                    .and_then(|s| s.taps.get(&role))
                    .map(|t| t.iter().map(|tap| tap_status(tap, links.get(tap))).collect())
                    .unwrap_or_default()
            });

            complete &= ours
                && address_present != Some(false)
                && interfaces
                    .iter()
                    .all(|i| i.exists && i.up && i.operstate.as_deref() == Some("UP") && i.master == i.expected_master)
                && taps.iter().flatten().all(|t: &TapStatus| t.exists && t.up);
            namespaces.push(NsStatus {
                role,
                netns: ns,
                exists: presence != Presence::Absent,
                created_by_lab: ours,
                foreign: presence == Presence::Foreign,
                address,
                address_dev: role.address_dev(),
                address_present,
                ipv4,
                interfaces,
                taps,
                pids,
            });
        }
        let etcd = state.as_ref().filter(|s| s.etcd).map(|s| {
            let members: Vec<etcd::MemberStatus> = s
                .hosts
                .iter()
                .map(|&h| etcd::member_status(&self.name, h, s.pids_started.iter().find(|p| p.role == h)))
                .collect();
            complete &= members.iter().all(|m| m.running);
            EtcdStatus { endpoints: super::etcd_endpoints(&s.hosts), members }
        });
        Ok(Status {
            name: self.name.clone(),
            state_file: state::path(&self.name),
            state_file_exists: state.is_some(),
            subnet: topology::SUBNET,
            guest_range: format!("{}-{}", topology::GUEST_FIRST, topology::GUEST_LAST),
            complete,
            hosts: roles.iter().copied().filter(|r| r.is_host()).collect(),
            cut: state.as_ref().map(|s| s.cut.iter().copied().collect()).unwrap_or_default(),
            namespaces,
            etcd,
        })
    }
}

pub(super) fn tap_status(name: &str, l: Option<&Link>) -> TapStatus {
    TapStatus {
        name: name.into(),
        exists: l.is_some_and(|l| l.tun_type.as_deref() == Some("tap")),
        up: l.is_some_and(|l| l.up),
        master: l.and_then(|l| l.master.clone()),
        vnet_hdr: l.and_then(|l| l.vnet_hdr),
    }
}
