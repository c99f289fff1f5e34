//! The node-local side of a VM's NICs: its taps on the node's VM bridge,
//! made with iproute2 before a boot and removed once the VM has left.

use std::process::Command;

use anyhow::{bail, Context};

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn exists(tap: &str) -> bool {
    Command::new("ip").args(["link", "show", "dev", tap]).output().is_ok_and(|o| o.status.success())
}

/// Makes `tap` (a persistent vnet_hdr tap, as the VMM opens it) a port of
/// `bridge`, up. An existing tap (a re-adopted VM's) is reused.
pub fn ensure(tap: &str, bridge: &str) -> anyhow::Result<()> {
    if !exists(bridge) {
        bail!("the VM bridge {bridge} does not exist on this node");
    }
    if !exists(tap) {
        tracing::info!("creating tap {tap} on {bridge}");
        ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])?;
    }
    ip(&["link", "set", tap, "master", bridge, "up"])?;
    Ok(())
}

/// Deletes `tap` if it exists.
pub fn remove(tap: &str) {
    if exists(tap) {
        tracing::info!("deleting tap {tap}");
        if let Err(e) = ip(&["link", "del", "dev", tap]) {
            tracing::warn!("{e}");
        }
    }
}
