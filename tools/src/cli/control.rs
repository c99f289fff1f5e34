//! Commands that talk to a running VMM over its API socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use vmm::api::client;

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct ApiArgs {
    /// The VMM's API socket (as given to `ferry run --api-sock`).
    #[arg(long, value_name = "PATH", default_value_os_t = super::default_api_sock())]
    pub api_sock: PathBuf,
}

pub fn call(sock: &Path, method: &str, endpoint: &str, body: &[u8]) -> anyhow::Result<client::Response> {
    let r = client::request(sock, method, endpoint, body, TIMEOUT)?;
    if !r.is_success() {
        bail!("{endpoint}: {}", r.error_message());
    }
    Ok(r)
}

pub fn info(sock: &Path) -> anyhow::Result<i32> {
    let r = call(sock, "GET", "vm.info", b"")?;
    let v: serde_json::Value = serde_json::from_str(&r.body).context("VMM sent malformed JSON")?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

pub fn put(sock: &Path, endpoint: &str) -> anyhow::Result<i32> {
    call(sock, "PUT", endpoint, b"")?;
    Ok(0)
}

pub fn console(sock: &Path, text: &str) -> anyhow::Result<i32> {
    let line = format!("{text}\n");
    let r = call(sock, "PUT", "vm.console", line.as_bytes())?;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    if v.get("dropped").and_then(|d| d.as_u64()).unwrap_or(0) > 0 {
        bail!("the guest's UART input buffer was full; part of the line was dropped");
    }
    Ok(0)
}

pub fn announce(sock: &Path) -> anyhow::Result<i32> {
    let r = call(sock, "PUT", "vm.announce", b"")?;
    println!("{}", r.body);
    Ok(0)
}
