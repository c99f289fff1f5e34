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
            "destination_stream" => {
                let outcome = ferry_fuzz::destination_outcome(&bytes);
                match name.as_str() {
                    "check-only" => assert_eq!(outcome, Ok(false), "{name}"),
                    "commit" => assert_eq!(outcome, Ok(true), "{name}: a VM committed"),
                    _ => assert!(outcome.as_ref().is_err_and(|e| e.contains("source aborted")), "{name}: {outcome:?}"),
                }
            }
            "virtio_queue_restore" => {
                let (restored, used) = ferry_fuzz::queue_restore_outcome(&bytes);
                assert!(restored, "{name}: the saved transport is taken");
                let served = if name == "blk-read" { 1 } else { 0 };
                assert_eq!(used, served, "{name}: requests served after the restore");
            }
            _ => {}
        }
    }
}

/// The crafted qcow2 images fuzzing found in imago 0.2.6 (issue 16), now in
/// `fuzz/corpus/qcow2_open/`: on one imago recursed without bound
/// allocating refcount blocks (stack overflow: `Allocator::allocate_cluster_at`
/// -> `ensure_rb` -> `allocate_clusters` -> ...), on the other its first
/// write did not read back (clusters allocated over metadata). Both are
/// truncated short of their L1 table and have refcount 0 on metadata. A
/// third and fourth (writes that did not read back) map compressed guest
/// data past the end of the file and onto the header. csv-fs refuses all three by name before imago sees
/// them. Any new crash kept in
/// `fuzz/crashes/<target>/` replays here too.
#[test]
fn known_crashes_replay_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2_open");
    let scratch = std::env::temp_dir().join(format!("ferry-known-crashes-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    for name in [
        "crash-51485d84491b8db08eafcfce74aab5fb9605fa8b",
        "crash-9874ea43e01ce3fccc60dec64fd21f2067b07211",
        "crash-f733810fff62fe20f76bb7ac467815caa8914716",
        "crash-0233e814f790cef0886353b31a6ffb83d9942223",
    ] {
        let data = std::fs::read(corpus.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        ferry_fuzz::fuzz_qcow2_open(&data);
        let p = scratch.join(format!("{name}.qcow2"));
        std::fs::write(&p, &data).unwrap();
        match csv_fs::Image::open(&p, csv_fs::OpenMode::ReadWrite) {
            Err(csv_fs::Error::BadQcow2 { problem, .. }) => eprintln!("{name}: refused: {problem}"),
            Err(e) => panic!("{name}: refused, but not by the qcow2 checks: {e}"),
            Ok(_) => panic!("{name}: opened"),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/crashes");
    for (target, run) in ferry_fuzz::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else { continue };
        for f in dir {
            let f = f.unwrap().path();
            eprintln!("{target}: {}", f.display());
            run(&std::fs::read(&f).unwrap());
        }
    }
    // A restored queue whose used ring lies over its own avail index
    // (found as a fuzzing timeout): each completion made another request
    // "available" and the notify never returned. One ring's worth is served.
    let refill = root.join("virtio_queue_restore/timeout-86bde4e54c3c9aad81c13b95ddf0312a4e080f5e");
    let (restored, _) = ferry_fuzz::queue_restore_outcome(&std::fs::read(refill).unwrap());
    assert!(restored, "the tampered queue is in range, so it is taken; the device bounds the work");
}
