use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("csv-fs-img-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

fn file_for(dir: &Path, f: Format) -> PathBuf {
    dir.join(format!("{}.{}", f.name(), f.extension()))
}

/// Writes spanning block and cluster boundaries, unaligned, then reads them
/// back through a fresh open; untouched ranges stay zero.
#[test]
fn every_format_round_trips() {
    let dir = scratch("rt");
    let size = 9 << 20;
    for f in Format::ALL {
        let path = file_for(&dir, f);
        Image::create(&path, f, size).unwrap();
        let mut img = Image::open(&path, OpenMode::ReadWrite).unwrap();
        assert_eq!(img.format(), f);
        assert_eq!(img.len(), size);
        let writes: [(u64, usize, u8); 4] =
            [(0, 4096, 1), ((2 << 20) - 700, 5000, 2), (5 << 20, 1 << 20, 3), (size - 512, 512, 4)];
        for &(off, len, seed) in &writes {
            img.write_at(&pattern(len, seed), off).unwrap();
        }
        // Overwrite inside an allocated block.
        img.write_at(&pattern(100, 9), 10).unwrap();
        img.flush().unwrap();
        drop(img);

        let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
        for &(off, len, seed) in &writes[1..] {
            let mut buf = vec![0; len];
            img.read_at(&mut buf, off).unwrap();
            assert!(buf == pattern(len, seed), "{f} at {off}");
        }
        let mut head = vec![0; 4096];
        img.read_at(&mut head, 0).unwrap();
        let mut want = pattern(4096, 1);
        want[10..110].copy_from_slice(&pattern(100, 9));
        assert!(head == want, "{f} overwrite");
        let mut hole = vec![1; 8192];
        img.read_at(&mut hole, 3 << 20).unwrap();
        assert!(hole.iter().all(|&b| b == 0), "{f} hole reads zero");
        let e = img.read_at(&mut [0; 1024], size - 512).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dynamic_vhd_stays_sparse_and_grows_by_blocks() {
    let dir = scratch("sparse");
    let path = dir.join("d.vhd");
    Image::create(&path, Format::VhdDynamic, 64 << 20).unwrap();
    let empty = std::fs::metadata(&path).unwrap().len();
    let mut img = Image::open(&path, OpenMode::ReadWrite).unwrap();
    img.write_at(&[0; 65536], 0).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), empty, "zeros allocate nothing");
    img.write_at(&[7; 512], 40 << 20).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), empty + 512 + (2 << 20), "one bitmap sector and one block");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn modes_are_enforced() {
    let dir = scratch("modes");
    let path = dir.join("d.vhd");
    Image::create(&path, Format::VhdDynamic, 8 << 20).unwrap();
    let mut ro = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert!(matches!(ro.write_at(&[1; 512], 0), Err(Error::ReadOnly { .. })));
    let mut standby = Image::open(&path, OpenMode::Standby).unwrap();
    assert!(matches!(standby.write_at(&[1; 512], 0), Err(Error::Standby { .. })));
    // The previous owner allocates a block after the standby open...
    let mut owner = Image::open(&path, OpenMode::ReadWrite).unwrap();
    owner.write_at(&[5; 512], 4 << 20).unwrap();
    owner.flush().unwrap();
    drop(owner);
    // ...and activation sees it, and allocates after it, not over it.
    standby.activate().unwrap();
    standby.write_at(&[6; 512], 0).unwrap();
    let mut buf = [0; 512];
    standby.read_at(&mut buf, 4 << 20).unwrap();
    assert_eq!(buf, [5; 512]);
    standby.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [6; 512]);
    assert!(matches!(Image::create(&path, Format::Raw, 512), Err(Error::Io { .. })), "no overwrite");
    assert!(matches!(Image::create(&dir.join("x.raw"), Format::Raw, 1000), Err(Error::BadSize { .. })));
    assert!(matches!(Image::create(&dir.join("x.vhd"), Format::VhdDynamic, 4096 << 30), Err(Error::BadSize { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

fn open_err(path: &Path) -> String {
    match Image::open(path, OpenMode::ReadOnly) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_and_truncated_vhds_are_named() {
    let dir = scratch("badvhd");
    let fresh = |name: &str, f: Format| {
        let p = dir.join(name);
        Image::create(&p, f, 8 << 20).unwrap();
        p
    };
    let p = fresh("cookie.vhd", Format::VhdFixed);
    patch(&p, (8 << 20) + 1, b"X");
    assert!(open_err(&p).contains("no VHD footer"), "{}", open_err(&p));

    let p = fresh("sum.vhd", Format::VhdFixed);
    patch(&p, (8 << 20) + 50, &[0xAB]);
    assert!(open_err(&p).contains("checksum"), "{}", open_err(&p));

    let p = fresh("short.vhd", Format::VhdFixed);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(300).unwrap();
    assert!(open_err(&p).contains("too short"), "{}", open_err(&p));

    let p = fresh("dynsum.vhd", Format::VhdDynamic);
    patch(&p, 512 + 20, &[0x55]); // table offset in the dynamic header
    assert!(open_err(&p).contains("dynamic header has checksum"), "{}", open_err(&p));

    // A block allocated, then the file cut: the BAT points past the end.
    let p = fresh("cut.vhd", Format::VhdDynamic);
    let mut img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    img.write_at(&[1; 512], 0).unwrap();
    drop(img);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 4096).unwrap();
    let e = open_err(&p);
    assert!(e.contains("corrupt vhd image"), "{e}");

    // Differencing disks are refused by name.
    let p = fresh("diff.vhd", Format::VhdDynamic);
    let mut f = [0u8; 512];
    std::fs::File::open(&p).unwrap().read_exact_at(&mut f, 0).unwrap();
    f[60..64].copy_from_slice(&4u32.to_be_bytes());
    let sum = super::vhd_checksum_for_tests(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    patch(&p, 0, &f);
    assert!(open_err(&p).contains("differencing"), "{}", open_err(&p));

    // Random bytes under a .vhd name.
    let p = dir.join("junk.vhd");
    std::fs::write(&p, pattern(4096, 3)).unwrap();
    assert!(open_err(&p).contains("no VHD footer"), "{}", open_err(&p));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_qcow2_is_an_error_not_a_panic() {
    let dir = scratch("badq");
    let make = |name: &str| {
        let p = dir.join(name);
        Image::create(&p, Format::Qcow2, 8 << 20).unwrap();
        p
    };
    let p = make("magic.qcow2");
    patch(&p, 0, b"XXXX");
    let e = open_err(&p);
    assert!(e.contains("qcow2"), "{e}");

    let p = make("short.qcow2");
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(40).unwrap();
    let e = open_err(&p);
    assert!(e.contains("short.qcow2"), "{e}");

    // A cluster size field of 2^63 and an L1 table far past the end.
    let p = make("fields.qcow2");
    patch(&p, 20, &63u32.to_be_bytes());
    let _ = open_err(&p);
    let p = make("l1.qcow2");
    patch(&p, 40, &(1u64 << 60).to_be_bytes());
    let _ = open_err(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn formats_parse_and_probe() {
    assert_eq!("vhd-fixed".parse::<Format>().unwrap(), Format::VhdFixed);
    assert!("vmdk".parse::<Format>().is_err());
    let dir = scratch("probe");
    for f in Format::ALL {
        let p = dir.join(format!("{}.bin", f.name()));
        Image::create(&p, f, 1 << 20).unwrap();
        assert_eq!(probe(&p).unwrap(), f);
        assert_eq!(Image::open(&p, OpenMode::ReadOnly).unwrap().format(), f);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
