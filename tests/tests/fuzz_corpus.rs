//! Replays every file of `fuzz/corpus/<target>/` through the same entry
//! point the cargo-fuzz target calls (crate `ferry-fuzz`), on stable: the
//! seeds, what the fuzzer found interesting, and every crash it ever found.
//! `make fuzz` grows the corpus; this keeps it passing.

use std::path::Path;

#[test]
fn every_fuzz_corpus_file_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut total = 0;
    for (target, run) in ferry_fuzz::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{target}: no corpus in {}", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap();
            eprintln!("{target}: {}", f.file_name().unwrap().to_string_lossy());
            run(&data);
        }
        total += files.len();
        eprintln!("{target}: {} inputs replayed", files.len());
    }
    eprintln!("{total} corpus inputs replayed");
}

/// Seeds are valid inputs: each decodes or opens (so the corpus starts
/// past the parsers' front doors).
#[test]
fn seeds_are_valid_inputs() {
    for (target, name, bytes) in ferry_fuzz::seeds::all() {
        match target {
            "vm_state" => {
                vmm::state::VmState::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            "wire_frames" => {
                let mut r = &bytes[..];
                let mut n = 0;
                while migrate::wire::read_frame(&mut r).is_ok() {
                    n += 1;
                }
                assert_eq!(n, 5, "{name}");
            }
            _ => {}
        }
    }
}

/// Crashes found in code Ferry does not own yet, kept as inputs until fixed
/// (then they move into `fuzz/corpus/<target>/`): `fuzz/crashes/qcow2_open/`
/// holds images on which imago 0.2.6 recurses without bound allocating
/// refcount blocks (stack overflow: `Allocator::allocate_cluster_at` ->
/// `ensure_rb` -> `allocate_clusters` -> ...), and one whose first write
/// does not read back (clusters overlapping metadata). Run with
/// `cargo test --release -p ferry-e2e --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "open: imago crashes on these crafted qcow2 images (issue 16)"]
fn known_crashes_replay_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/crashes");
    for (target, run) in ferry_fuzz::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else { continue };
        for f in dir {
            let f = f.unwrap().path();
            eprintln!("{target}: {}", f.display());
            run(&std::fs::read(&f).unwrap());
        }
    }
}
