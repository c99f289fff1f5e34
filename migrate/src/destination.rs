//! Receiving a VM: authenticate the source, run the preflight, take memory
//! and state, restore paused with disks in standby, and run the VM only
//! after the source's commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::memory::{self, GuestRam};
use vmm::state::VmState;
use vmm::{VmConfig, Vmm};

use crate::auth::{self, Key};
use crate::preflight;
use crate::transport::{Listener, Stream};
use crate::wire::{self, Hello, Kind, Reason, ZeroRange, PROTOCOL_VERSION};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Authentication and the hello must come this quickly.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Auth(#[from] auth::Error),
    #[error("refused the migration: {0}")]
    Refused(String),
    #[error("source aborted: {0}")]
    SourceAborted(String),
    #[error(transparent)]
    Wire(#[from] wire::Error),
    #[error(transparent)]
    Vmm(#[from] vmm::vmm::Error),
    #[error("{0}")]
    State(#[from] vmm::state::Error),
    #[error("{0}")]
    Memory(#[from] vmm::memory::Error),
}

/// What this host is and accepts.
pub struct Host {
    pub key: Key,
    /// Turns the source's config into this host's (taps, console, KVM).
    pub apply: Box<dyn Fn(VmConfig) -> Result<VmConfig, String> + Send + Sync>,
    /// Features to treat as absent here, as if KVM lacked them (testing a
    /// lesser host without one).
    pub hide_cpu_features: Vec<String>,
    /// Offer no more than this profile, as a host whose KVM offered only
    /// that would.
    pub cpu_profile: Option<vmm::arch::x86_64::cpu_profile::CpuProfile>,
}

/// Serves migrations on `listener` until one brings a VM; returns it
/// running. A check-only preflight is answered and the wait goes on, and so
/// does a failed attempt (a peer without the key, garbage, a refused
/// preflight, a source that aborts or vanishes): nothing of it ever ran,
/// and one bad connection must not end the wait for the real one.
pub fn receive(listener: &Listener, host: &Host) -> Result<Arc<Vmm>, Error> {
    loop {
        let mut stream = listener.accept().map_err(wire::Error::Io)?;
        match attempt(&mut stream, host) {
            Ok(Some(vmm)) => return Ok(vmm),
            Ok(None) => {}
            Err(e) => eprintln!("ferry: migration attempt failed, nothing kept: {e}; still waiting"),
        }
    }
}

/// One connection: `Some` VM once it runs here, `None` after a check-only.
fn attempt(stream: &mut Stream, host: &Host) -> Result<Option<Arc<Vmm>>, Error> {
    // A peer that says nothing must not hold the listener for long.
    stream.set_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(wire::Error::Io)?;
    auth::accept(stream, &host.key)?;
    let hello: Hello = wire::read_frame(stream)?.expect(Kind::Hello, "Hello")?.decode()?;
    let config = match check(&hello, host) {
        Ok(c) => c,
        Err(problems) => {
            let reason = problems.join("; ");
            let _ = wire::send(stream, Kind::Refuse, &Reason { reason: reason.clone() });
            return Err(Error::Refused(reason));
        }
    };
    wire::send(stream, Kind::HelloAck, &wire::Ack { host_id: config.host_id.clone() })?;
    if hello.check_only {
        eprintln!("ferry: preflight passed for a {} MiB guest; still waiting", hello.mem_bytes >> 20);
        return Ok(None);
    }
    stream.set_timeout(Some(IO_TIMEOUT)).map_err(wire::Error::Io)?;
    let ram = memory::create(config.mem_mib)?;
    // The KVM VM and its memory slots now, while round 0 is in flight:
    // they cost milliseconds that do not belong in the downtime.
    let vm = Vmm::prepare(&config, &ram)?;
    match receive_vm(stream, config, ram, vm) {
        Ok(vmm) => Ok(Some(vmm)),
        Err(e) => {
            let _ = wire::send(stream, Kind::Abort, &Reason { reason: e.to_string() });
            Err(e)
        }
    }
}

/// The preflight: every reason this host cannot run the guest.
fn check(hello: &Hello, host: &Host) -> Result<VmConfig, Vec<String>> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(vec![format!("protocol version {} (this host speaks {PROTOCOL_VERSION})", hello.protocol_version)]);
    }
    let config: VmConfig =
        serde_json::from_str(&hello.config_json).map_err(|e| vec![format!("unreadable VM config: {e}")])?;
    if config.mem_mib.checked_mul(1 << 20) != Some(hello.mem_bytes) {
        return Err(vec!["memory size and config disagree".into()]);
    }
    let config = (host.apply)(config).map_err(|e| vec![e])?;
    let mut problems = Vec::new();
    if let Err(e) = memory::check_size(config.mem_mib) {
        problems.push(e.to_string());
    }
    match vmm::vstate::vm::open_kvm(&config.kvm_device) {
        Err(e) => problems.push(e.to_string()),
        Ok(kvm) => match vmm::arch::x86_64::cpu_profile::probe_vcpu(&kvm) {
            Ok((mut offered, host_khz)) => {
                if let Err(e) = preflight::mask(&mut offered, &host.hide_cpu_features) {
                    problems.push(e);
                }
                if let Some(profile) = &host.cpu_profile {
                    profile.apply_leaves(&mut offered);
                }
                let (missing, vendor) = preflight::compare_cpuid(&hello.guest_cpuid, &offered);
                if !missing.is_empty() {
                    let names: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
                    problems.push(format!("missing CPU features: {}", names.join(", ")));
                }
                problems.extend(vendor);
                let g = hello.tsc_khz;
                if g != 0 && host_khz.abs_diff(g) > g / 4000 && !kvm.check_extension(kvm_ioctls::Cap::TscControl) {
                    problems.push(format!(
                        "guest TSC runs at {g} kHz, this host at {host_khz} kHz, and KVM here cannot scale it"
                    ));
                }
            }
            Err(e) => problems.push(format!("KVM cannot create a vCPU to check CPU features: {e}")),
        },
    }
    for n in &config.net {
        let exists = std::ffi::CString::new(n.tap.as_str())
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
            .unwrap_or(false);
        if !exists {
            problems.push(format!("tap {} does not exist on this host", n.tap));
        }
    }
    for d in &config.disks {
        match d.image_path() {
            Ok(p) => {
                if let Err(e) = std::fs::metadata(&p) {
                    problems.push(format!("disk image {} is not reachable here: {e}", p.display()));
                }
            }
            Err(e) => problems.push(format!("disk {} is not reachable here: {e}", d.path.display())),
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

fn receive_vm(
    stream: &mut Stream,
    config: VmConfig,
    ram: GuestRam,
    vm: vmm::vstate::vm::Vm,
) -> Result<Arc<Vmm>, Error> {
    let state = loop {
        let frame = wire::read_frame(stream)?;
        match frame.kind {
            Kind::MemZero => {
                let z: ZeroRange = frame.decode()?;
                // A page may have become zero since an earlier round.
                ram.zero_range(z.offset, z.len).map_err(|e| wire::Error::Payload(e.to_string()))?;
            }
            Kind::MemData => {
                let (offset, bytes) = wire::parse_mem_data(&frame.payload)?;
                ram.write_at(offset, bytes).map_err(|e| wire::Error::Payload(e.to_string()))?;
            }
            Kind::State => break VmState::decode(&frame.payload)?,
            Kind::Abort => return Err(Error::SourceAborted(frame.decode::<Reason>()?.reason)),
            other => return Err(wire::Error::Unexpected { expected: "memory or State", got: other }.into()),
        }
    };
    let vmm = Arc::new(Vmm::restore_standby(config, state, ram, Some(vm))?);
    wire::write_frame(stream, Kind::Ready, &[])?;
    let commit = wire::read_frame(stream)?;
    match commit.kind {
        Kind::Commit => {}
        Kind::Abort => return Err(Error::SourceAborted(commit.decode::<Reason>()?.reason)),
        other => return Err(wire::Error::Unexpected { expected: "Commit", got: other }.into()),
    }
    acquire_with_retry(&vmm)?;
    vmm.resume()?;
    // Announce at once: the reply gap a client sees ends here.
    if let Err(e) = vmm.announce() {
        tracing::warn!("announce after migration: {e}");
    }
    wire::write_frame(stream, Kind::Resumed, &[])?;
    announce_again(vmm.clone());
    Ok(vmm)
}

/// Takes the disks the source just released. The source unlocks before it
/// sends Commit, so this rarely waits.
fn acquire_with_retry(vmm: &Vmm) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match vmm.acquire_backends() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Repeats the announcement as QEMU does (50 ms, then 100 ms steps), for
/// switches that missed the first.
pub fn announce_again(vmm: Arc<Vmm>) {
    // A weak handle: announcing must not keep a stopped VM alive.
    let vmm = Arc::downgrade(&vmm);
    std::thread::spawn(move || {
        for delay_ms in [50, 100, 100, 100] {
            std::thread::sleep(Duration::from_millis(delay_ms));
            match vmm.upgrade() {
                Some(vmm) if vmm.announce().is_ok() => {}
                _ => return,
            }
        }
    });
}
