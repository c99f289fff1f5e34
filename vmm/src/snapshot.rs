//! Snapshots on disk: a directory with `state.bin` (the encoded
//! [`VmState`](crate::state::VmState)) and `memory.bin` (guest RAM as a
//! sparse image: untouched and zero pages are holes). [`save`] writes one
//! from a paused VM, [`load`] reads one back for
//! [`crate::builder::build_from_state`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::api::SnapshotReport;
use crate::lifecycle::Lifecycle;
use crate::memory::{self, GuestRam};
use crate::state::VmState;
use crate::vmm::Vmm;

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read snapshot {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("snapshot {path}: {source}")]
    State { path: PathBuf, source: crate::state::Error },
    #[error("snapshot memory {path}: {source}")]
    Memory { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Ram(#[from] memory::Error),
    #[error("cannot write snapshot into {dir}: {source}")]
    Write { dir: PathBuf, source: std::io::Error },
    #[error("cannot encode the VM state: {0}")]
    Encode(crate::state::Error),
}

/// Writes `vmm`'s snapshot into `dir`, parking the VM first if `before`
/// says it runs (it stays paused). Memory is written first and state last,
/// each fsynced: a state file always has its memory.
pub(crate) fn save(vmm: &Vmm, before: Lifecycle, dir: &Path) -> Result<SnapshotReport, crate::vmm::Error> {
    let t = Instant::now();
    if !before.vcpus_parked() {
        vmm.park();
    }
    let paused_ms = t.elapsed().as_secs_f64() * 1000.0;
    let state = vmm.save_state(before.run_state())?;
    let bytes = state.encode().map_err(Error::Encode)?;
    let io = |source: std::io::Error| Error::Write { dir: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mem_tmp = dir.join(".memory.bin.tmp");
    let state_tmp = dir.join(".state.bin.tmp");
    let mem_file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&mem_tmp).map_err(io)?;
    let stats = vmm.ram.save_to(&mem_file).map_err(io)?;
    mem_file.sync_all().map_err(io)?;
    std::fs::write(&state_tmp, &bytes).map_err(io)?;
    std::fs::File::open(&state_tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&mem_tmp, dir.join(MEMORY_FILE)).map_err(io)?;
    std::fs::rename(&state_tmp, dir.join(STATE_FILE)).map_err(io)?;
    Ok(SnapshotReport {
        dir: dir.to_owned(),
        state_bytes: bytes.len() as u64,
        mem_mib: vmm.ram.size >> 20,
        pages_data: stats.pages_data,
        pages_zero: stats.pages_zero,
        pause_ms: paused_ms,
        total_ms: t.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Reads a snapshot: its state, and guest RAM filled from its memory image.
pub fn load(dir: &Path) -> Result<(VmState, GuestRam), Error> {
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(|source| Error::Read { path: state_path.clone(), source })?;
    let state = VmState::decode(&bytes).map_err(|source| Error::State { path: state_path, source })?;
    let mem_path = dir.join(MEMORY_FILE);
    let file = std::fs::File::open(&mem_path).map_err(|source| Error::Read { path: mem_path.clone(), source })?;
    let ram = memory::create(state.mem_bytes >> 20)?;
    ram.load_from(&file).map_err(|source| Error::Memory { path: mem_path, source })?;
    Ok((state, ram))
}
