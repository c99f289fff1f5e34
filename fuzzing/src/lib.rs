//! Fuzz entry points: one `fuzz_*` function per cargo-fuzz target in
//! `fuzz/fuzz_targets/`. The same functions replay every file of
//! `fuzz/corpus/<target>/` as an ordinary test on stable
//! (`tests/tests/fuzz_corpus.rs`), so a crash the fuzzer found stays
//! fixed.
//!
//! Each entry point takes arbitrary bytes and must never panic, abort or
//! allocate without bound; errors are the expected outcome. Where a
//! checksum would stop the fuzzer at the door, the entry point also feeds
//! the bytes behind a valid checksum so the parser beyond is reached.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use csv_fs::{BlockBackend, Image, OpenMode};
use migrate::wire::{self, Ack, Hello, Kind, Reason, ZeroRange};
use vmm::state::VmState;

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// The targets, by name: what `make fuzz` runs and the corpus replays.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_frames", fuzz_wire_frames),
    ("vm_state", fuzz_vm_state),
    ("snapshot_load", fuzz_snapshot_load),
    ("vhd_open", fuzz_vhd_open),
    ("qcow2_open", fuzz_qcow2_open),
    ("virtio_blk_chain", fuzz_virtio_blk_chain),
    ("api_request", fuzz_api_request),
    ("destination_stream", fuzz_destination_stream),
    ("virtio_queue_restore", fuzz_virtio_queue_restore),
];

/// A scratch directory for this process (on tmpfs when there is one).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("ferry-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// The API socket's request reading (`vmm::api::http::serve_connection`:
/// head and body limits, Content-Length, one request per connection) fed
/// over a real socket pair, and a body decoded and validated as
/// `vm.migrate` would (`MigrateRequest::options`: timeouts, bandwidth).
pub fn fuzz_api_request(data: &[u8]) {
    use std::os::unix::net::UnixStream;
    use vmm::api::http::{serve_connection, Limits, PeerPolicy, Response};
    // What fits in the socket's buffer, so one thread can write it all
    // before serving (a thread per input trips libFuzzer's leak check on
    // thread-local destructors); far above the head limit.
    const MAX_INPUT: usize = 64 << 10;
    let Ok((mut client, server)) = UnixStream::pair() else { return };
    if client.write_all(&data[..data.len().min(MAX_INPUT)]).is_err() {
        return;
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    let limits = Limits { deadline: std::time::Duration::from_millis(500), ..Limits::default() };
    let handler = |request: vmm::api::http::Request| {
        if let Ok(m) = serde_json::from_slice::<migrate::api::MigrateRequest>(&request.body) {
            let _ = m.options();
        }
        let _ = serde_json::from_slice::<serde_json::Value>(&request.body);
        Response::empty(204)
    };
    // The response goes into the client's receive buffer, unread.
    serve_connection(server, &limits, &PeerPolicy::root_and_self(), &handler);
}

/// `migrate::wire::read_frame` over a stream, then every frame decoded as
/// each message it could carry.
pub fn fuzz_wire_frames(data: &[u8]) {
    decode_frames(data);
    // The same bytes as payloads of well-formed frames (split at 0xFF), so
    // the decoders see more than the frame reader lets through.
    let mut stream = Vec::new();
    for (i, payload) in data.split(|&b| b == 0xff).enumerate().take(16) {
        let kind = [Kind::Hello, Kind::HelloAck, Kind::Refuse, Kind::MemZero, Kind::MemData][i % 5];
        let _ = wire::write_frame(&mut stream, kind, payload);
    }
    decode_frames(&stream);
}

fn decode_frames(mut r: &[u8]) {
    for _ in 0..64 {
        let Ok(frame) = wire::read_frame(&mut r) else { return };
        let _ = frame.decode::<Hello>();
        let _ = frame.decode::<ZeroRange>();
        let _ = frame.decode::<Reason>();
        let _ = frame.decode::<Ack>();
        if let Ok((offset, bytes)) = wire::parse_mem_data(&frame.payload) {
            assert_eq!(bytes.len() + 8, frame.payload.len(), "offset {offset}");
        }
    }
}

/// Wraps `payload` in a valid VM state header (magic, version, length, CRC).
pub fn state_with_header(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + payload.len());
    out.extend_from_slice(vmm::state::MAGIC);
    out.extend_from_slice(&vmm::state::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// `VmState::decode` on the bytes as they are and, if they carry a header,
/// on their payload behind a valid checksum. What decodes re-encodes to
/// something that decodes again.
pub fn fuzz_vm_state(data: &[u8]) {
    let _ = VmState::decode(data);
    let payload = data.get(24..).unwrap_or(data);
    if let Ok(state) = VmState::decode(&state_with_header(payload)) {
        let again = state.encode().expect("a decoded state encodes");
        VmState::decode(&again).expect("an encoded state decodes");
    }
}

/// `vmm::snapshot::load` on a directory holding the bytes as `state.bin`
/// (checksum fixed up when they carry a header) and a small `memory.bin`.
pub fn fuzz_snapshot_load(data: &[u8]) {
    let dir = scratch().join("snapshot");
    std::fs::create_dir_all(&dir).expect("snapshot dir");
    let mem = dir.join(vmm::snapshot::MEMORY_FILE);
    if !mem.exists() {
        let mut f = std::fs::File::create(&mem).expect("memory.bin");
        f.write_all(&[0x5a; 8192]).expect("memory.bin");
    }
    let state = dir.join(vmm::snapshot::STATE_FILE);
    for bytes in [data.to_vec(), state_with_header(data.get(24..).unwrap_or(data))] {
        std::fs::write(&state, &bytes).expect("state.bin");
        let _ = vmm::snapshot::load(&dir);
    }
}

/// Opens the bytes as an image file named `name`, then reads and writes a
/// few sectors; what is written reads back.
fn image_io(data: &[u8], name: &str) {
    let path = scratch().join(name);
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, data).expect("image file");
    let Ok(mut img) = Image::open(&path, OpenMode::ReadWrite) else { return };
    let len = img.len();
    let sectors = len / 512;
    let pick = |i: usize| -> u64 {
        let b = data.get(i).copied().unwrap_or(0) as u64;
        if sectors == 0 {
            0
        } else {
            (b * sectors / 256).min(sectors - 1) * 512
        }
    };
    let mut buf = vec![0u8; 1024];
    for (i, off) in [0, pick(0), pick(1), len.saturating_sub(512)].into_iter().enumerate() {
        let n = if off + 1024 <= len { 1024 } else { 512 };
        if off + n as u64 > len {
            continue;
        }
        let _ = img.read_at(&mut buf[..n], off);
        let pattern: Vec<u8> = (0..n).map(|j| (j as u8) ^ (i as u8 + 1)).collect();
        if img.write_at(&pattern, off).is_ok() {
            let mut back = vec![0u8; n];
            if img.read_at(&mut back, off).is_ok() {
                assert!(back == pattern, "{name}: {n} bytes written at {off} read back differently");
            }
        }
    }
    let _ = img.flush();
    drop(img);
    // Whatever we wrote must open again.
    let _ = Image::open(&path, OpenMode::ReadOnly);
    let _ = std::fs::remove_file(&path);
}

/// A VHD, fixed or dynamic by its footer, opened and used.
pub fn fuzz_vhd_open(data: &[u8]) {
    image_io(data, "fuzz.vhd");
}

/// A qcow2 image, opened (through `imago`) and used.
pub fn fuzz_qcow2_open(data: &[u8]) {
    image_io(data, "fuzz.qcow2");
}

pub use blk::fuzz_virtio_blk_chain;
pub use dest::{destination_outcome, fuzz_destination_stream};
pub use queue::{fuzz_virtio_queue_restore, queue_restore_outcome};

mod blk;
mod dest;
mod queue;
pub mod seeds;
