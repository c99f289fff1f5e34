//! `ferry migrate` (source side, through the VMM's API) and `ferry receive`
//! (destination side, a new VMM process).

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use migrate::transport::Listener;
use migrate::Endpoint;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// Pause, move state and memory, resume on the destination.
    Quick,
    /// Pre-copy with dirty logging (not available yet).
    Live,
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    api: super::control::ApiArgs,
    /// Where `ferry receive` listens: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ENDPOINT")]
    to: Endpoint,
    #[arg(long, value_enum, default_value = "quick")]
    mode: ModeArg,
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<i32> {
    let mode = match args.mode {
        ModeArg::Quick => "quick",
        ModeArg::Live => anyhow::bail!("live migration is not available yet; use --mode quick"),
    };
    let body = serde_json::json!({ "mode": mode, "to": args.to.to_string() }).to_string();
    let r =
        vmm::api::client::request(&args.api.api_sock, "PUT", "vm.migrate", body.as_bytes(), Duration::from_secs(3600))?;
    if !r.is_success() {
        anyhow::bail!("migration failed: {}", r.error_message());
    }
    println!("{}", r.body);
    Ok(0)
}

/// The API's `vm.migrate`, running in the source VMM.
pub fn api_handler() -> vmm::api::server::MigrateHandler {
    Box::new(|vmm, body| {
        let to: Endpoint = body.get("to").and_then(|t| t.as_str()).ok_or("vm.migrate needs \"to\"")?.parse()?;
        match body.get("mode").and_then(|m| m.as_str()).unwrap_or("quick") {
            "quick" => {}
            other => return Err(format!("migration mode '{other}' is not available")),
        }
        let figures = migrate::quick::send(vmm, &to).map_err(|e| e.to_string())?;
        eprintln!("ferry: migrated to {to}: {}", serde_json::to_string(&figures).unwrap_or_default());
        serde_json::to_value(figures).map_err(|e| e.to_string())
    })
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Where to listen: tcp:ADDR:PORT or unix:PATH.
    #[arg(long, value_name = "ENDPOINT")]
    listen: Endpoint,
    #[command(flatten)]
    host: super::snapshot::HostArgs,
}

pub fn receive(args: ReceiveArgs) -> anyhow::Result<i32> {
    crate::signals::block();
    let listener = Listener::bind(&args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("ferry: waiting for a migration on {}", listener.local_addr());
    let host = args.host.clone();
    let vmm = migrate::quick::receive(&listener, move |config| host.apply(config).map_err(|e| e.to_string()))?;
    drop(listener);
    eprintln!("ferry: VM received and running");
    super::run::serve(vmm, args.host.api_sock.as_deref())
}
