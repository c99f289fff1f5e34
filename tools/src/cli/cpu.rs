//! `ferry cpu-profile`: export this host's CPU features, compute a cluster
//! baseline, compare two profiles.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use vmm::arch::x86_64::cpu_profile::CpuProfile;

#[derive(Args)]
pub struct CpuProfileArgs {
    #[command(subcommand)]
    command: CpuCommand,
}

#[derive(Subcommand)]
enum CpuCommand {
    /// Write the CPU features this host's KVM offers a guest (JSON).
    Export {
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The KVM device to ask.
        #[arg(long, value_name = "PATH", default_value = vmm::vstate::vm::DEFAULT_KVM_DEVICE)]
        kvm_device: PathBuf,
    },
    /// Write the features every given profile has: the cluster baseline to
    /// start guests on (`ferry run --cpu-profile`).
    Common {
        #[arg(required = true, value_name = "PROFILE")]
        profiles: Vec<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List the features one profile has and the other lacks, by name.
    /// Exits 1 if they differ.
    Diff { a: PathBuf, b: PathBuf },
}

fn emit(profile: &CpuProfile, out: Option<PathBuf>) -> anyhow::Result<()> {
    match out {
        Some(p) => {
            std::fs::write(&p, profile.to_json() + "\n").with_context(|| format!("cannot write {}", p.display()))?
        }
        None => println!("{}", profile.to_json()),
    }
    Ok(())
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "host".into())
}

pub fn cpu_profile(args: CpuProfileArgs) -> anyhow::Result<i32> {
    match args.command {
        CpuCommand::Export { out, kvm_device } => {
            let kvm = vmm::vstate::vm::open_kvm(&kvm_device)?;
            emit(&CpuProfile::of_host(&kvm, &host_name())?, out)?;
            Ok(0)
        }
        CpuCommand::Common { profiles, out } => {
            let loaded = profiles.iter().map(|p| CpuProfile::load(p)).collect::<Result<Vec<_>, _>>()?;
            emit(&CpuProfile::common(&loaded)?, out)?;
            Ok(0)
        }
        CpuCommand::Diff { a, b } => {
            let (pa, pb) = (CpuProfile::load(&a)?, CpuProfile::load(&b)?);
            let (only_a, only_b) = pa.diff(&pb);
            if pa.vendor != pb.vendor {
                println!("vendor: {} has {}, {} has {}", a.display(), pa.vendor, b.display(), pb.vendor);
            }
            for f in &only_a {
                println!("only in {}: {f}", a.display());
            }
            for f in &only_b {
                println!("only in {}: {f}", b.display());
            }
            let same = only_a.is_empty() && only_b.is_empty() && pa.vendor == pb.vendor;
            if same {
                println!("same CPU features");
            }
            Ok(if same { 0 } else { 1 })
        }
    }
}
