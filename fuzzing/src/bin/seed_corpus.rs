//! Writes the valid seed inputs of every fuzz target into
//! `fuzz/corpus/<target>/seed-*` (run from the repository root:
//! `cargo run -p ferry-fuzz --bin seed-corpus`). The fuzzer grows the
//! corpus from them; the stable tests replay whatever is there.

use std::path::Path;

fn main() {
    let root = Path::new("fuzz/corpus");
    let mut n = 0;
    for (target, name, bytes) in ferry_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), &bytes).expect("seed");
        n += 1;
    }
    println!("{n} seeds written under {}", root.display());
}
