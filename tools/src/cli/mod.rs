//! The command line: one module per command family.

mod control;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Ferry: a KVM micro-VMM built to move running VMs between hosts.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel (the bundled test guest, or Linux) and run it until it
    /// shuts down, the API asks, or the process gets SIGTERM/SIGINT.
    Run(run::RunArgs),
    /// Show a running VM's state and configuration (JSON).
    Info(control::ApiArgs),
    /// Pause a running VM; returns once no vCPU is in the guest.
    Pause(control::ApiArgs),
    /// Resume a paused VM.
    Resume(control::ApiArgs),
    /// Stop a VM and let its VMM exit.
    Shutdown(control::ApiArgs),
    /// Type a line on a VM's serial console (a newline is added).
    Console {
        #[command(flatten)]
        api: control::ApiArgs,
        /// The text to send, e.g. `verify` for the test guest.
        text: String,
    },
}

pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Info(api) => control::info(&api.api_sock),
        Command::Pause(api) => control::put(&api.api_sock, "vm.pause"),
        Command::Resume(api) => control::put(&api.api_sock, "vm.resume"),
        Command::Shutdown(api) => control::put(&api.api_sock, "vm.shutdown"),
        Command::Console { api, text } => control::console(&api.api_sock, &text),
    }
}

/// Shared by the commands that talk to a running VMM.
fn default_api_sock() -> PathBuf {
    PathBuf::from("/run/ferry/ferry.sock")
}
