//! The checks a node's agent runs on its own node when it starts, stored
//! as `health/<node>` ([`cluster::NodeHealth`]). `ferry cluster update`
//! waits for them after restarting an agent: the node is healthy once its
//! new agent has registered and these passed.
//!
//! They are `ferry validate`'s checks of one host's own facts (KVM, dirty
//! logging, free memory: the same code) and what this agent needs to run
//! and receive VMs: its VM bridge, the cluster key, the shared volume
//! writable, and every VM the cluster says this node runs reported by
//! it. The checks between hosts (migration network, the volume's locks
//! shared, CPU compatibility, clock skew) need two hosts and stay with
//! `ferry cluster validate`.

use std::path::PathBuf;

use cluster::{Cluster, HealthCheck, NodeHealth, FORMAT_VERSION};

use crate::cli::validate::{host_checks, host_facts};

/// What the checks look at.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    pub kvm_device: PathBuf,
    pub vm_bridge: String,
    pub key_file: PathBuf,
    /// The shared volume (the agent's witness directory if given).
    pub volume: Option<PathBuf>,
    /// The agent's node record's registration time (names this start).
    pub registered_unix_ms: u64,
}

/// Runs the checks and stores the result; logs (and gives up) if etcd
/// cannot take it.
pub async fn publish(c: Cluster, s: Settings) {
    let volume = match &s.volume {
        Some(v) => Some(v.clone()),
        None => c.cluster_record().await.ok().flatten().map(|r| PathBuf::from(r.value.volume)),
    };
    let local = {
        let s = s.clone();
        tokio::task::spawn_blocking(move || local_checks(&s, volume.as_deref()))
    };
    let mut checks = match local.await {
        Ok(checks) => checks,
        Err(e) => vec![check("checks", false, format!("the checks did not finish: {e}"))],
    };
    checks.push(vms_check(&c, &s.node).await);
    let h = NodeHealth {
        v: FORMAT_VERSION,
        node: s.node.clone(),
        registered_unix_ms: s.registered_unix_ms,
        at_unix_ms: cluster::records::unix_ms(),
        ferry_version: env!("CARGO_PKG_VERSION").to_owned(),
        ok: checks.iter().all(|c| c.ok),
        checks,
    };
    for c in h.checks.iter().filter(|c| !c.ok) {
        eprintln!("ferry node: health check {} FAILED: {}", c.check, c.detail);
    }
    if let Err(e) = c.put_node_health(&h).await {
        tracing::warn!("cannot store node {}'s health: {e}", s.node);
    }
}

fn check(name: &str, ok: bool, detail: String) -> HealthCheck {
    HealthCheck { check: name.to_owned(), ok, detail }
}

fn local_checks(s: &Settings, volume: Option<&std::path::Path>) -> Vec<HealthCheck> {
    let facts = host_facts(&s.kvm_device);
    let mut out: Vec<HealthCheck> = host_checks(&s.node, &facts)
        .into_iter()
        .map(|c| {
            let detail = if c.ok { c.detail } else { format!("{} -> {}", c.detail, c.fix) };
            check(&c.check, c.ok, detail)
        })
        .collect();
    let bridge = std::path::Path::new("/sys/class/net").join(&s.vm_bridge);
    out.push(check(
        "vm-bridge",
        bridge.exists(),
        format!("{} {}", s.vm_bridge, if bridge.exists() { "present" } else { "missing: VMs cannot get a network" }),
    ));
    out.push(match migrate::auth::Key::load(&s.key_file) {
        Ok(_) => check("cluster-key", true, format!("{} loads", s.key_file.display())),
        Err(e) => check("cluster-key", false, format!("{}: {e}: moves cannot be authenticated", s.key_file.display())),
    });
    if let Some(v) = volume {
        // A token written and read back: mounted, writable, not stale.
        let token = format!("{}-{}\n", s.node, cluster::records::unix_ms());
        let file = v.join(format!(".ferry-health-{}", s.node));
        let ok = std::fs::write(&file, &token).is_ok() && std::fs::read_to_string(&file).ok().as_ref() == Some(&token);
        out.push(check(
            "volume",
            ok,
            format!("{}: {}", v.display(), if ok { "writable" } else { "not writable (is the volume mounted?)" }),
        ));
    }
    out
}

/// Every VM whose owner key names this node is reported by it (the agent
/// re-adopted or started it), and none has failed.
async fn vms_check(c: &Cluster, node: &str) -> HealthCheck {
    let all = match c.vm_owners_and_statuses().await {
        Ok(all) => all,
        Err(e) => return check("vms", false, format!("cannot read the VMs: {e}")),
    };
    let mut bad = vec![];
    let mut here = 0;
    for (name, (owner, status)) in all {
        if owner.and_then(|o| o.node).as_deref() != Some(node) {
            continue;
        }
        here += 1;
        match status {
            Some(s) if s.node == node && s.state != "Failed" => {}
            Some(s) => bad.push(format!("{name} {} on {}", s.state.to_lowercase(), s.node)),
            None => bad.push(format!("{name} not reported")),
        }
    }
    if bad.is_empty() {
        check("vms", true, format!("{here} VM(s) owned here, all reported"))
    } else {
        check("vms", false, format!("of {here} VM(s) owned here: {}", bad.join(", ")))
    }
}
