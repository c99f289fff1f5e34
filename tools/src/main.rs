//! `ferry`: run a VM on KVM and control it.

mod agent;
mod cli;
mod lab;
mod ping;
mod signals;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli::dispatch(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Our errors already name their cause; add only causes not yet said.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !message.contains(&c) {
                    message = format!("{message}: {c}");
                }
            }
            eprintln!("ferry: {message}");
            std::process::exit(1);
        }
    }
}
