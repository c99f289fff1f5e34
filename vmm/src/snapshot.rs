//! Snapshots on disk: a directory with `state.bin` (the encoded
//! [`VmState`](crate::state::VmState)) and `memory.bin` (guest RAM as a
//! sparse image: untouched and zero pages are holes).

use std::path::{Path, PathBuf};

use crate::memory::{self, GuestRam};
use crate::state::VmState;

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
