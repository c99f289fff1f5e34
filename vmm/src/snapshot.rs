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
/// says it runs (it stays paused). Disks are flushed once the vCPUs are
/// parked, so what the guest wrote before the snapshot is on them. If
/// anything fails, a VM that ran runs again and the error says why.
///
/// Files: both are written aside and fsynced; then the old `state.bin`
/// goes, then `memory.bin` and `state.bin` are renamed into place, with
/// the directory fsynced between. A crash anywhere leaves the old pair,
/// the new pair, or no `state.bin` (a load then says so): never new memory
/// beside old state.
pub(crate) fn save(vmm: &Vmm, before: Lifecycle, dir: &Path) -> Result<SnapshotReport, crate::vmm::Error> {
    let t = Instant::now();
    let parked_here = !before.vcpus_parked();
    if parked_here {
        vmm.park();
    }
    let paused_ms = t.elapsed().as_secs_f64() * 1000.0;
    let written = write(vmm, before, dir);
    if written.is_err() && parked_here {
        vmm.unpark();
    }
    let (state_bytes, stats) = written?;
    Ok(SnapshotReport {
        dir: dir.to_owned(),
        state_bytes,
        mem_mib: vmm.ram.size >> 20,
        pages_data: stats.pages_data,
        pages_zero: stats.pages_zero,
        pause_ms: paused_ms,
        total_ms: t.elapsed().as_secs_f64() * 1000.0,
    })
}

fn write(vmm: &Vmm, before: Lifecycle, dir: &Path) -> Result<(u64, memory::ScanStats), crate::vmm::Error> {
    vmm.flush_backends()?;
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
    match std::fs::remove_file(dir.join(STATE_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e).into()),
        _ => {}
    }
    sync_dir(dir).map_err(io)?;
    std::fs::rename(&mem_tmp, dir.join(MEMORY_FILE)).map_err(io)?;
    sync_dir(dir).map_err(io)?;
    std::fs::rename(&state_tmp, dir.join(STATE_FILE)).map_err(io)?;
    sync_dir(dir).map_err(io)?;
    Ok((bytes.len() as u64, stats))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Reads a snapshot: its state, and guest RAM filled from its memory image.
pub fn load(dir: &Path) -> Result<(VmState, GuestRam), Error> {
    let state_path = dir.join(STATE_FILE);
    let bytes = read_state(&state_path).map_err(|source| Error::Read { path: state_path.clone(), source })?;
    let state = VmState::decode(&bytes).map_err(|source| Error::State { path: state_path, source })?;
    let mem_path = dir.join(MEMORY_FILE);
    let file = std::fs::File::open(&mem_path).map_err(|source| Error::Read { path: mem_path.clone(), source })?;
    let ram = memory::create(state.mem_bytes >> 20)?;
    ram.load_from(&file).map_err(|source| Error::Memory { path: mem_path, source })?;
    Ok((state, ram))
}

/// Reads `state.bin`, refusing one larger than any VM state before reading
/// it (a huge or endless file must not be read into memory first).
fn read_state(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(e.kind(), "no state.bin: not a snapshot, or one whose writing did not finish")
        } else {
            e
        }
    })?;
    let limit = crate::state::MAX_STATE_BYTES + crate::state::HEADER_LEN as u64;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than any VM state ({limit} bytes at most)"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_state_file_is_refused_before_it_is_read() {
        let dir = std::env::temp_dir().join(format!("ferry-snap-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Sparse: 1 GiB that costs nothing to make and must not be read.
        let f = std::fs::File::create(dir.join(STATE_FILE)).unwrap();
        f.set_len(1 << 30).unwrap();
        let e = load(&dir).err().expect("refused");
        assert!(e.to_string().contains("larger than any VM state"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_snapshot_without_state_is_named_unfinished() {
        let dir = std::env::temp_dir().join(format!("ferry-snap-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), b"").unwrap();
        let e = load(&dir).err().expect("refused");
        assert!(e.to_string().contains("did not finish"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
