//! Migration as the VMM's API serves it: the typed `vm.migrate` request
//! (which `ferry migrate` builds and the API parses, checked before
//! anything moves) and the [`ApiMigrator`] that runs it in the source VMM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm::api::server::{ApiError, Migrator};
use vmm::migration::MigratableVm;
use vmm::{Lifecycle, Vmm};

use crate::auth::{Key, DEFAULT_KEY_FILE};
use crate::progress::{self, Progress, Shared};
use crate::source::{self, Options, Policy};
use crate::transport::Endpoint;
use crate::wire::Mode;

/// The body of `PUT vm.migrate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT` or `unix:PATH`, where `ferry receive` listens.
    pub to: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// The cluster key file, read by the VMM.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: f64,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    #[serde(default = "default_policy")]
    pub policy: Policy,
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    #[serde(default)]
    pub check_only: bool,
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<f64>,
    /// A single read or write that takes longer means the peer is gone.
    #[serde(default = "default_io_timeout_s")]
    pub io_timeout_s: f64,
    /// The switchover (pause to commit) must fit this, or the VM resumes.
    #[serde(default = "default_switchover_s")]
    pub switchover_timeout_s: f64,
    /// Ask this Unix socket before committing (see `source::gate`).
    #[serde(default)]
    pub commit_gate: Option<PathBuf>,
    /// Encrypt the stream (the default). `false` sends memory and state in
    /// the clear after an authenticated handshake; the destination must be
    /// started with `--no-encryption` too.
    #[serde(default = "default_true")]
    pub encryption: bool,
    /// To a destination on this host (`unix:`), pass the guest memory's
    /// file instead of copying it (the default; the destination must agree).
    #[serde(default = "default_true")]
    pub share_memory: bool,
    /// Connections memory travels on (see `source::Options::streams`).
    #[serde(default = "default_streams")]
    pub streams: u8,
}

fn default_streams() -> u8 {
    source::DEFAULT_STREAMS
}

fn default_mode() -> Mode {
    Mode::Live
}
fn default_key_file() -> PathBuf {
    PathBuf::from(DEFAULT_KEY_FILE)
}
fn default_downtime_ms() -> f64 {
    20.0
}
fn default_timeout_s() -> f64 {
    60.0
}
fn default_io_timeout_s() -> f64 {
    source::IO_TIMEOUT.as_secs_f64()
}
fn default_switchover_s() -> f64 {
    source::DEFAULT_SWITCHOVER_TIMEOUT.as_secs_f64()
}
fn default_max_rounds() -> u32 {
    30
}
fn default_policy() -> Policy {
    Policy::Cancel
}
fn default_true() -> bool {
    true
}

/// Bounds on the request's numbers: anything outside is refused by name
/// (a 400) before the migration starts.
pub const MAX_DOWNTIME_MS: f64 = 60_000.0;
pub const MAX_TIMEOUT_S: f64 = 24.0 * 3600.0;
pub const MAX_ROUNDS: u32 = 10_000;
/// Below this a cap would stretch even a small guest's move into hours.
pub const MIN_BANDWIDTH_MIB_S: f64 = 1.0;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{name} must be a number in {range}, not {value}")]
    OutOfRange { name: &'static str, range: &'static str, value: String },
    #[error("{0}")]
    Endpoint(String),
    #[error("{0}")]
    Key(#[from] crate::auth::Error),
}

impl MigrateRequest {
    pub fn new(to: &Endpoint) -> MigrateRequest {
        MigrateRequest {
            to: to.to_string(),
            mode: default_mode(),
            key_file: default_key_file(),
            downtime_ms: default_downtime_ms(),
            timeout_s: default_timeout_s(),
            max_rounds: default_max_rounds(),
            policy: default_policy(),
            auto_converge: true,
            check_only: false,
            max_bandwidth_mib_s: None,
            io_timeout_s: default_io_timeout_s(),
            switchover_timeout_s: default_switchover_s(),
            commit_gate: None,
            encryption: true,
            share_memory: true,
            streams: default_streams(),
        }
    }

    /// Checks every field and reads the key: the engine's options.
    pub fn options(&self) -> Result<(Endpoint, Options), RequestError> {
        let range = |name, range, ok: bool, value: String| {
            if ok {
                Ok(())
            } else {
                Err(RequestError::OutOfRange { name, range, value })
            }
        };
        let d = self.downtime_ms;
        range("downtime_ms", "(0, 60000]", d.is_finite() && d > 0.0 && d <= MAX_DOWNTIME_MS, d.to_string())?;
        let t = self.timeout_s;
        range("timeout_s", "(0, 86400]", t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_S, t.to_string())?;
        let sw = self.switchover_timeout_s;
        range("switchover_timeout_s", "[0.1, 600]", sw.is_finite() && (0.1..=600.0).contains(&sw), sw.to_string())?;
        let io = self.io_timeout_s;
        range("io_timeout_s", "[0.1, 600]", io.is_finite() && (0.1..=600.0).contains(&io), io.to_string())?;
        let r = self.max_rounds;
        range("max_rounds", "[1, 10000]", (1..=MAX_ROUNDS).contains(&r), r.to_string())?;
        if let Some(b) = self.max_bandwidth_mib_s {
            range("max_bandwidth_mib_s", "[1, inf) MiB/s", b.is_finite() && b >= MIN_BANDWIDTH_MIB_S, b.to_string())?;
        }
        let n = self.streams;
        range("streams", "[1, 8]", (1..=crate::destination::MAX_STREAMS).contains(&n), n.to_string())?;
        let to: Endpoint = self.to.parse().map_err(RequestError::Endpoint)?;
        let key = Key::load(&self.key_file)?;
        let mut o = Options::new(self.mode, key);
        o.downtime_ms = d;
        o.timeout = Duration::from_secs_f64(t);
        o.max_rounds = r;
        o.policy = self.policy;
        o.auto_converge = self.auto_converge;
        o.check_only = self.check_only;
        o.max_bandwidth_mib_s = self.max_bandwidth_mib_s;
        o.commit_gate = self.commit_gate.clone();
        o.records = if self.encryption { crate::secure::Records::Sealed } else { crate::secure::Records::Plain };
        o.switchover_timeout = Duration::from_secs_f64(sw);
        o.io_timeout = Duration::from_secs_f64(io);
        o.share_memory = self.share_memory;
        o.streams = n;
        Ok((to, o))
    }
}

/// Runs migrations for the API, in the source VMM. The VM's lifecycle
/// decides whether one may start; this only keeps its progress and cancel
/// switch.
#[derive(Default)]
pub struct ApiMigrator {
    progress: Mutex<Shared>,
    cancel: Mutex<Arc<AtomicBool>>,
}

impl ApiMigrator {
    pub fn new() -> Arc<ApiMigrator> {
        Arc::new(ApiMigrator::default())
    }
}

impl Migrator for ApiMigrator {
    fn migrate(&self, vmm: Arc<Vmm>, body: &[u8]) -> Result<serde_json::Value, ApiError> {
        let request: MigrateRequest = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("vm.migrate: bad request body: {e}")))?;
        let (to, opts) = request.options().map_err(|e| ApiError::bad_request(format!("vm.migrate: {e}")))?;
        if matches!(vmm.lifecycle(), Lifecycle::Migrating { .. }) {
            return Err(ApiError::conflict("a migration is already running"));
        }
        let shared: Shared = Arc::new(Mutex::new(Progress::default()));
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = shared.clone();
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = opts.cancel.clone();
        let vm: Arc<dyn MigratableVm> = vmm.clone();
        let result = source::migrate(&vm, &to, &opts, &shared);
        match &result {
            Ok(f) => eprintln!("ferry: migration figures: {}", serde_json::to_string(f).unwrap_or_default()),
            Err(e) => {
                progress::update(&shared, |p| p.phase = "failed".into());
                eprintln!("ferry: migration failed: {e}");
            }
        }
        match result {
            Ok(f) => serde_json::to_value(f).map_err(ApiError::failed),
            Err(e @ source::Error::Uncertain(_)) => {
                // Retired at the commit: this VMM never runs the VM again.
                let _ = vmm.events().send(vmm::VmEvent::Exit(vmm::ExitReason::Error(format!(
                    "migration outcome unknown after commit: {e}; the VM is stopped here"
                ))));
                Err(ApiError::failed(e))
            }
            Err(e @ source::Error::Vm(vmm::vmm::Error::Lifecycle(_))) => Err(ApiError::conflict(e)),
            Err(e) => Err(ApiError::failed(e)),
        }
    }

    fn progress(&self) -> serde_json::Value {
        let shared = self.progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let p = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        serde_json::to_value(p).unwrap_or_default()
    }

    fn cancel(&self) -> Result<(), ApiError> {
        let flag = self.cancel.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let shared = self.progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let phase = shared.lock().unwrap_or_else(|e| e.into_inner()).phase.clone();
        if matches!(phase.as_str(), "" | "done" | "failed") {
            return Err(ApiError::conflict("no migration is running"));
        }
        flag.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_typed_and_bounded() {
        let r: MigrateRequest = serde_json::from_str(r#"{"to":"tcp:10.0.0.2:7000"}"#).unwrap();
        assert_eq!((r.mode, r.policy, r.downtime_ms), (Mode::Live, Policy::Cancel, 20.0));
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"to":"tcp:x:1","speed":3}"#).is_err());
        let bad = |json: &str| {
            let r: MigrateRequest = serde_json::from_str(json).unwrap();
            r.options().err().expect("refused").to_string()
        };
        assert!(bad(r#"{"to":"tcp:a:1","timeout_s":1e20}"#).contains("timeout_s"));
        assert!(bad(r#"{"to":"tcp:a:1","downtime_ms":-1}"#).contains("downtime_ms"));
        assert!(bad(r#"{"to":"tcp:a:1","max_rounds":0}"#).contains("max_rounds"));
        assert!(bad(r#"{"to":"tcp:a:1","streams":0}"#).contains("streams"));
        assert!(bad(r#"{"to":"tcp:a:1","streams":9}"#).contains("streams"));
        assert!(bad(r#"{"to":"tcp:a:1","max_bandwidth_mib_s":0.0001}"#).contains("max_bandwidth_mib_s"));
        assert!(bad(r#"{"to":"http://a","key_file":"/nonexistent"}"#).contains("bad endpoint"));
    }
}
