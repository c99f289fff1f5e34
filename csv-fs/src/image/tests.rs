use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::error::{Qcow2Problem, VhdProblem};

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
fn formats_come_from_the_name_never_the_content() {
    assert_eq!("vhd-fixed".parse::<Format>().unwrap(), Format::VhdFixed);
    assert!("vmdk".parse::<Format>().is_err());
    let dir = scratch("byname");
    for f in Format::ALL {
        let p = file_for(&dir, f);
        Image::create(&p, f, 1 << 20).unwrap();
        assert_eq!(format_for_path(&p).unwrap(), f);
        assert_eq!(Image::open(&p, OpenMode::ReadOnly).unwrap().format(), f);
        // Under a name without a known extension, any image is raw.
        let other = dir.join(format!("{}.bin", f.name()));
        std::fs::copy(&p, &other).unwrap();
        assert_eq!(Image::open(&other, OpenMode::ReadOnly).unwrap().format(), Format::Raw);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The headers a guest on a raw disk might write into its first sector.
fn hostile_first_sectors(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (tag, f) in [("vhd-dynamic", Format::VhdDynamic), ("qcow2", Format::Qcow2)] {
        let p = dir.join(format!("model.{}", f.extension()));
        Image::create(&p, f, 1 << 20).unwrap();
        let mut head = vec![0u8; 2048];
        std::fs::File::open(&p).unwrap().read_exact_at(&mut head, 0).unwrap();
        out.push((tag, head));
    }
    // A fixed VHD footer is the last sector of the file.
    let p = dir.join("model-fixed.vhd");
    Image::create(&p, Format::VhdFixed, 1 << 20).unwrap();
    let mut foot = vec![0u8; 512];
    std::fs::File::open(&p).unwrap().read_exact_at(&mut foot, 1 << 20).unwrap();
    out.push(("vhd-fixed footer", foot));
    out
}

#[test]
fn a_raw_disk_holding_image_headers_stays_raw() {
    let dir = scratch("hostile");
    let size = 4u64 << 20;
    for (tag, bytes) in hostile_first_sectors(&dir) {
        for name in ["d.raw", "d.img", "d", "d.disk"] {
            let p = dir.join(name);
            let _ = std::fs::remove_file(&p);
            Image::create(&p, Format::Raw, size).unwrap();
            // The guest writes the header at the start and at the end.
            let mut img = Image::open(&p, OpenMode::ReadWrite).unwrap();
            img.write_at(&bytes, 0).unwrap();
            img.write_at(&bytes, size - bytes.len() as u64).unwrap();
            img.flush().unwrap();
            drop(img);
            let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
            assert_eq!(img.format(), Format::Raw, "{tag} in {name}");
            assert_eq!(img.len(), size, "{tag} in {name}");
            let mut back = vec![0u8; bytes.len()];
            img.read_at(&mut back, 0).unwrap();
            assert!(back == bytes, "{tag} in {name}: the guest's bytes read back unchanged");
            img.read_at(&mut back, size - bytes.len() as u64).unwrap();
            assert!(back == bytes, "{tag} in {name}: tail unchanged");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fixed_vhd_whose_guest_wrote_a_dynamic_footer_stays_fixed() {
    let dir = scratch("fixedhostile");
    let hostile = hostile_first_sectors(&dir);
    let (_, dynamic_head) = &hostile[0];
    let p = dir.join("f.vhd");
    Image::create(&p, Format::VhdFixed, 4 << 20).unwrap();
    let mut img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    img.write_at(dynamic_head, 0).unwrap();
    drop(img);
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.format(), Format::VhdFixed);
    let mut back = vec![0u8; dynamic_head.len()];
    img.read_at(&mut back, 0).unwrap();
    assert!(&back == dynamic_head);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh 8 MiB dynamic VHD whose dynamic header gets `edit`, checksum fixed.
fn crafted_vhd(dir: &Path, name: &str, edit: impl FnOnce(&mut [u8; 1024])) -> PathBuf {
    let p = dir.join(name);
    Image::create(&p, Format::VhdDynamic, 8 << 20).unwrap();
    let mut h = [0u8; 1024];
    std::fs::File::open(&p).unwrap().read_exact_at(&mut h, 512).unwrap();
    edit(&mut h);
    let sum = super::vhd_header_checksum_for_tests(&h);
    h[36..40].copy_from_slice(&sum.to_be_bytes());
    patch(&p, 512, &h);
    p
}

fn vhd_problem(path: &Path) -> VhdProblem {
    match Image::open(path, OpenMode::ReadOnly) {
        Err(Error::BadVhd { problem, .. }) => problem,
        Err(e) => panic!("{}: {e}", path.display()),
        Ok(_) => panic!("{} opened", path.display()),
    }
}

/// Rewrites both footers of `p` through `edit`, checksums fixed.
fn edit_footers(p: &Path, edit: impl Fn(&mut [u8; 512])) {
    let len = std::fs::metadata(p).unwrap().len();
    for at in [0, len - 512] {
        let mut f = [0u8; 512];
        std::fs::File::open(p).unwrap().read_exact_at(&mut f, at).unwrap();
        edit(&mut f);
        let sum = super::vhd_checksum_for_tests(&f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        patch(p, at, &f);
    }
}

#[test]
fn crafted_vhd_headers_are_refused_by_name() {
    let dir = scratch("crafted");
    // The attack: a BAT of 2^32 - 1 entries in a sparse 16 GiB file would
    // have us allocate 16 GiB for the table alone. Bounded by the disk size.
    let p = crafted_vhd(&dir, "huge-bat.vhd", |h| h[28..32].copy_from_slice(&u32::MAX.to_be_bytes()));
    let mut foot = [0u8; 512];
    std::fs::File::open(&p).unwrap().read_exact_at(&mut foot, 0).unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(17 << 30).unwrap();
    patch(&p, (17 << 30) - 512, &foot);
    let e = vhd_problem(&p);
    assert!(matches!(e, VhdProblem::BatTooLarge { entries: 0xFFFF_FFFF, max: 4, .. }), "{e:?}");
    assert!(e.to_string().contains("larger than"), "{e}");

    let p = crafted_vhd(&dir, "small-bat.vhd", |h| h[28..32].copy_from_slice(&3u32.to_be_bytes()));
    assert!(matches!(vhd_problem(&p), VhdProblem::BatTooSmall { entries: 3, .. }));

    for bs in [0u32, 512, 3 << 20, 1 << 31] {
        let p = crafted_vhd(&dir, &format!("bs{bs}.vhd"), |h| h[32..36].copy_from_slice(&bs.to_be_bytes()));
        assert!(matches!(vhd_problem(&p), VhdProblem::BlockSize { .. }), "block size {bs}");
    }

    // The BAT on top of the dynamic header, past the end, or wrapping.
    for (tag, off) in [("hdr", 512u64), ("foot", 0), ("end", 1 << 40), ("wrap", u64::MAX - 3)] {
        let p = crafted_vhd(&dir, &format!("bat-{tag}.vhd"), |h| h[16..24].copy_from_slice(&off.to_be_bytes()));
        assert!(matches!(vhd_problem(&p), VhdProblem::BatOutsideFile { .. }), "BAT at {off:#x}");
    }

    // Two BAT entries pointing at one block.
    let p = dir.join("overlap.vhd");
    Image::create(&p, Format::VhdDynamic, 8 << 20).unwrap();
    let mut img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    img.write_at(&[1; 512], 0).unwrap();
    drop(img);
    let mut first = [0u8; 4];
    std::fs::File::open(&p).unwrap().read_exact_at(&mut first, 1536).unwrap();
    patch(&p, 1536 + 4, &first);
    assert!(matches!(vhd_problem(&p), VhdProblem::BlocksOverlap { first: 0, second: 1 }));

    // Footer fields: a header offset outside the file or on the footer copy,
    // a size past the format's limit or not in whole sectors, a wrong type.
    for (tag, off) in [("h0", 0u64), ("hend", 1 << 40), ("hodd", 513)] {
        let p = dir.join(format!("{tag}.vhd"));
        Image::create(&p, Format::VhdDynamic, 8 << 20).unwrap();
        edit_footers(&p, |f| f[16..24].copy_from_slice(&off.to_be_bytes()));
        assert!(matches!(vhd_problem(&p), VhdProblem::HeaderOffset { .. }), "header at {off:#x}");
    }
    let p = dir.join("toolarge.vhd");
    Image::create(&p, Format::VhdDynamic, 8 << 20).unwrap();
    edit_footers(&p, |f| f[48..56].copy_from_slice(&(4096u64 << 30).to_be_bytes()));
    assert!(matches!(vhd_problem(&p), VhdProblem::DiskTooLarge { .. }));
    let p = dir.join("oddsize.vhd");
    Image::create(&p, Format::VhdDynamic, 8 << 20).unwrap();
    edit_footers(&p, |f| f[48..56].copy_from_slice(&((8u64 << 20) - 1).to_be_bytes()));
    assert!(matches!(vhd_problem(&p), VhdProblem::SizeNotSectors { .. }));
    let p = dir.join("type.vhd");
    Image::create(&p, Format::VhdDynamic, 8 << 20).unwrap();
    edit_footers(&p, |f| f[60..64].copy_from_slice(&7u32.to_be_bytes()));
    assert!(matches!(vhd_problem(&p), VhdProblem::DiskType { found: 7, .. }));

    // The two footers of a dynamic VHD disagree.
    let p = dir.join("differ.vhd");
    Image::create(&p, Format::VhdDynamic, 8 << 20).unwrap();
    let mut f = [0u8; 512];
    std::fs::File::open(&p).unwrap().read_exact_at(&mut f, 0).unwrap();
    f[48..56].copy_from_slice(&(4u64 << 20).to_be_bytes());
    let sum = super::vhd_checksum_for_tests(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    patch(&p, 0, &f);
    assert!(matches!(vhd_problem(&p), VhdProblem::FootersDiffer));
    let _ = std::fs::remove_dir_all(&dir);
}

fn qcow2_problem(path: &Path) -> Qcow2Problem {
    match Image::open(path, OpenMode::ReadWrite) {
        Err(Error::BadQcow2 { problem, .. }) => problem,
        Err(e) => panic!("{}: {e}", path.display()),
        Ok(_) => panic!("{} opened", path.display()),
    }
}

/// A fresh 8 MiB qcow2 (64 KiB clusters: header, refcount table at 0x10000,
/// refcount block at 0x20000, L1 at 0x30000) with one cluster written, so it
/// has an L2 table; then `edit` patches it.
fn crafted_qcow2(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let p = dir.join(name);
    Image::create(&p, Format::Qcow2, 8 << 20).unwrap();
    let mut img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    img.write_at(&pattern(4096, 7), 1 << 20).unwrap();
    img.flush().unwrap();
    drop(img);
    edit(&p);
    p
}

fn be_at(p: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(p).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

#[test]
fn crafted_qcow2_headers_are_refused_by_name() {
    use Qcow2Problem as Q;
    let dir = scratch("crafted-qcow2");
    let case = |name: &str, at: u64, bytes: &[u8]| {
        let bytes = bytes.to_vec();
        qcow2_problem(&crafted_qcow2(&dir, name, move |p| patch(p, at, &bytes)))
    };
    // The unpatched image opens, and its layout is what the cases assume.
    let p = crafted_qcow2(&dir, "good.qcow2", |_| {});
    assert_eq!((be_at(&p, 40), be_at(&p, 48), be_at(&p, 0x10000)), (0x30000, 0x10000, 0x20000));
    let l2 = be_at(&p, 0x30000) & !(1 << 63);
    assert!(l2 >= 0x40000, "{l2:#x}");
    let mut buf = vec![0; 4096];
    Image::open(&p, OpenMode::ReadOnly).unwrap().read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf == pattern(4096, 7));

    assert!(matches!(case("magic.qcow2", 0, b"QFI\0"), Q::Magic { found: 0x5146_4900 }));
    assert!(matches!(case("v4.qcow2", 4, &4u32.to_be_bytes()), Q::Version { found: 4 }));
    for bits in [0u32, 8, 22, 63] {
        let e = case(&format!("cb{bits}.qcow2"), 20, &bits.to_be_bytes());
        assert!(matches!(e, Q::ClusterBits { found, min: 9, max: 21 } if found == bits), "{e:?}");
    }
    assert!(matches!(case("huge.qcow2", 24, &(1u64 << 50).to_be_bytes()), Q::DiskTooLarge { .. }));

    // Features Ferry does not support are refused by name.
    let e = case("backing.qcow2", 8, &0x200u64.to_be_bytes());
    assert_eq!(e, Q::BackingFile);
    assert!(e.to_string().contains("Ferry does not support backing files"), "{e}");
    let e = case("aes.qcow2", 32, &1u32.to_be_bytes());
    assert!(matches!(e, Q::Encrypted { method: 1 }) && e.to_string().contains("Ferry does not support"), "{e}");
    let e = case("snap.qcow2", 60, &1u32.to_be_bytes());
    assert!(matches!(e, Q::Snapshots { count: 1 }) && e.to_string().contains("snapshots"), "{e}");
    let e = case("rc8.qcow2", 96, &3u32.to_be_bytes());
    assert!(matches!(e, Q::RefcountOrder { found: 3, bits: 8 }), "{e:?}");
    assert!(matches!(case("rc64.qcow2", 96, &99u32.to_be_bytes()), Q::RefcountOrder { found: 99, bits: 0 }));
    for (bit, name) in
        [(0u32, "dirty"), (1, "corrupt"), (2, "external data file"), (4, "extended L2 entries"), (9, "unknown")]
    {
        let e = case(&format!("feat{bit}.qcow2"), 72, &(1u64 << bit).to_be_bytes());
        assert_eq!(e, Q::IncompatibleFeature { bit, name });
    }
    assert!(matches!(case("hlen.qcow2", 100, &100u32.to_be_bytes()), Q::HeaderLength { found: 100, .. }));
    // Header extensions: an external data file name; one running past the
    // first cluster.
    let hl = be_at(&dir.join("good.qcow2"), 96) & 0xffff_ffff;
    let mut ext = 0x4441_5441u32.to_be_bytes().to_vec();
    ext.extend(4u32.to_be_bytes());
    ext.extend(b"data\0\0\0\0\0\0\0\0\0\0\0\0");
    let e = case("datafile.qcow2", hl, &ext);
    assert!(matches!(e, Q::Extension { kind: 0x4441_5441, name: "external data file" }), "{e:?}");
    let mut ext = 0x1234_5678u32.to_be_bytes().to_vec();
    ext.extend(0x10000u32.to_be_bytes());
    assert!(matches!(case("extlen.qcow2", hl, &ext), Q::ExtensionsOverflow { .. }));

    // The L1 table: unaligned, past the end, smaller than the disk, wrapping.
    let e = case("l1odd.qcow2", 40, &0x30200u64.to_be_bytes());
    assert!(matches!(e, Q::Unaligned { what: "the L1 table", offset: 0x30200 }), "{e:?}");
    let e = case("l1end.qcow2", 40, &(1u64 << 40).to_be_bytes());
    assert!(matches!(e, Q::OutsideFile { what: "the L1 table", .. }), "{e:?}");
    let e = case("l1wrap.qcow2", 40, &(u64::MAX - 0xffff).to_be_bytes());
    assert!(matches!(e, Q::OutsideFile { what: "the L1 table", .. }), "{e:?}");
    let e = case("l1small.qcow2", 36, &0u32.to_be_bytes());
    assert!(matches!(e, Q::L1Size { entries: 0, needed: 1, .. }), "{e:?}");
    let e = case("l1big.qcow2", 36, &u32::MAX.to_be_bytes());
    assert!(matches!(e, Q::L1Size { entries: u32::MAX, .. }), "{e:?}");
    // The refcount table: unaligned, too many clusters, past the end.
    let e = case("rtodd.qcow2", 48, &0x10200u64.to_be_bytes());
    assert!(matches!(e, Q::Unaligned { what: "the refcount table", .. }), "{e:?}");
    assert!(matches!(case("rtbig.qcow2", 56, &u32::MAX.to_be_bytes()), Q::RefcountTableSize { .. }));
    assert!(matches!(case("rtzero.qcow2", 56, &0u32.to_be_bytes()), Q::RefcountTableSize { .. }));
    let e = case("rtend.qcow2", 48, &(1u64 << 40).to_be_bytes());
    assert!(matches!(e, Q::OutsideFile { what: "the refcount table", .. }), "{e:?}");

    // Overlaps: the L1 table on the header or on the refcount table, the
    // refcount table on the L1 table.
    let e = case("l1hdr.qcow2", 40, &0u64.to_be_bytes());
    assert!(matches!(e, Q::Overlap { first: "the header", second: "the L1 table", .. }), "{e:?}");
    let e = case("l1rt.qcow2", 40, &0x10000u64.to_be_bytes());
    assert!(matches!(e, Q::Overlap { .. }), "{e:?}");
    let e = case("rtl1.qcow2", 48, &0x30000u64.to_be_bytes());
    assert!(matches!(e, Q::Overlap { .. }), "{e:?}");

    // Refcount table entries: reserved bits, unaligned, past the end, on
    // the L1 table, on the header.
    let e = case("rbres.qcow2", 0x10000, &0x20100u64.to_be_bytes());
    assert!(matches!(e, Q::ReservedBits { what: "refcount table", index: 0, .. }), "{e:?}");
    let e = case("rbodd.qcow2", 0x10000, &0x20200u64.to_be_bytes());
    assert!(matches!(e, Q::Unaligned { what: "a refcount block", offset: 0x20200 }), "{e:?}");
    let e = case("rbend.qcow2", 0x10008, &(1u64 << 40).to_be_bytes());
    assert!(matches!(e, Q::OutsideFile { what: "a refcount block", .. }), "{e:?}");
    let e = case("rbl1.qcow2", 0x10008, &0x30000u64.to_be_bytes());
    assert!(matches!(e, Q::Overlap { first: "the L1 table", second: "a refcount block", .. }), "{e:?}");
    let e = case("rbrt.qcow2", 0x10008, &0x10000u64.to_be_bytes());
    assert!(matches!(e, Q::Overlap { first: "the refcount table", second: "a refcount block", .. }), "{e:?}");
    let e = case("rbtwice.qcow2", 0x10008, &0x20000u64.to_be_bytes());
    assert!(matches!(e, Q::Overlap { first: "a refcount block", second: "a refcount block", .. }), "{e:?}");
    // L1 entries: on the refcount block, reserved bits, past the end.
    let e = case("l2rb.qcow2", 0x30000, &((1u64 << 63) | 0x20000).to_be_bytes());
    assert!(matches!(e, Q::Overlap { first: "a refcount block", second: "an L2 table", .. }), "{e:?}");
    let e = case("l2res.qcow2", 0x30000, &((1u64 << 62) | l2).to_be_bytes());
    assert!(matches!(e, Q::ReservedBits { what: "L1 table", index: 0, .. }), "{e:?}");
    let e = case("l2end.qcow2", 0x30000, &(1u64 << 40).to_be_bytes());
    assert!(matches!(e, Q::OutsideFile { what: "an L2 table", .. }), "{e:?}");

    // L2 entries (the data cluster of guest offset 1 MiB is entry 16): on
    // the header, past the end, unaligned, with refcount 0.
    let data = be_at(&p, l2 + 16 * 8) & !(1 << 63);
    assert!(data > l2, "{data:#x}");
    let e = case("dhdr.qcow2", l2 + 17 * 8, &((1u64 << 63) | 0x10000).to_be_bytes());
    assert!(matches!(e, Q::Overlap { first: "the refcount table", second: "a data cluster", .. }), "{e:?}");
    let e = case("dend.qcow2", l2 + 17 * 8, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    assert!(matches!(e, Q::OutsideFile { what: "a data cluster", .. }), "{e:?}");
    let e = case("dodd.qcow2", l2 + 17 * 8, &(data + 512).to_be_bytes());
    assert!(matches!(e, Q::Unaligned { what: "a data cluster", .. }), "{e:?}");
    let e = case("dres.qcow2", l2 + 17 * 8, &(data | 0x100).to_be_bytes());
    assert!(matches!(e, Q::ReservedBits { what: "L2 table", index: 17, .. }), "{e:?}");
    let e = case("dz.qcow2", l2 + 17 * 8, &(1u64 << 62).to_be_bytes());
    assert!(matches!(e, Q::Overlap { first: "the header", second: "a compressed cluster", .. }), "{e:?}");
    let e = case("drc0.qcow2", 0x20000 + (data >> 16) * 2, &[0, 0]);
    assert_eq!(e, Q::Unreferenced { what: "a data cluster", offset: data });

    // Refcounts of zero on metadata: imago would allocate over it (the
    // fuzzer's overlap), or, with no refcount block at all for the first
    // clusters, recurse allocating one (the fuzzer's stack overflow).
    let e = case("rc0hdr.qcow2", 0x20000, &[0, 0]);
    assert_eq!(e, Q::Unreferenced { what: "the header", offset: 0 });
    let e = case("rc0l1.qcow2", 0x20006, &[0, 0]);
    assert_eq!(e, Q::Unreferenced { what: "the L1 table", offset: 0x30000 });
    let e = case("rc0l2.qcow2", 0x20000 + (l2 >> 16) * 2, &[0, 0]);
    assert_eq!(e, Q::Unreferenced { what: "an L2 table", offset: l2 });
    let e = case("nork.qcow2", 0x10000, &[0; 8]);
    assert_eq!(e, Q::Unreferenced { what: "the header", offset: 0 });
    let _ = std::fs::remove_dir_all(&dir);
}

/// The two images fuzzing first found imago crashing on
/// (`fuzz/corpus/qcow2_open/crash-*`) are truncated short of their L1
/// table; padded to full length, they are refused for their zero refcounts
/// instead. The third maps guest data (compressed) past the end of the file.
#[test]
fn fuzzer_qcow2_crashes_are_refused_even_untruncated() {
    let dir = scratch("qcow2-crashes");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2_open");
    for name in ["crash-51485d84491b8db08eafcfce74aab5fb9605fa8b", "crash-9874ea43e01ce3fccc60dec64fd21f2067b07211"] {
        let mut data = std::fs::read(corpus.join(name)).unwrap();
        let p = dir.join(format!("{name}.qcow2"));
        std::fs::write(&p, &data).unwrap();
        let e = qcow2_problem(&p);
        assert!(matches!(e, Qcow2Problem::OutsideFile { what: "the L1 table", .. }), "{name}: {e:?}");
        data.resize(0x40000, 0);
        std::fs::write(&p, &data).unwrap();
        let e = qcow2_problem(&p);
        assert!(matches!(e, Qcow2Problem::Unreferenced { offset: 0, .. }), "{name}: {e:?}");
    }
    let p = dir.join("third.qcow2");
    std::fs::copy(corpus.join("crash-f733810fff62fe20f76bb7ac467815caa8914716"), &p).unwrap();
    let e = qcow2_problem(&p);
    assert!(matches!(e, Qcow2Problem::OutsideFile { .. } | Qcow2Problem::Overlap { .. }), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Images qemu-img writes (v2 and v3, every cluster size, preallocated
/// metadata, data written by qemu-io) pass the checks and open read-write;
/// what Ferry writes, `qemu-img check` accepts. Skipped without qemu-img.
#[test]
fn qemu_written_qcow2_images_open() {
    let ok = |c: &mut std::process::Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(std::process::Command::new("qemu-img").arg("--version")) {
        // Never a silent skip: qemu-img comes with `make deps` (qemu-utils).
        assert_eq!(
            std::env::var("FERRY_NO_KVM").as_deref(),
            Ok("1"),
            "qemu-img is needed for this test (make deps installs qemu-utils)"
        );
        eprintln!("qemu_written_qcow2_images_open: not run: FERRY_NO_KVM=1 and no qemu-img");
        return;
    }
    let dir = scratch("qemu-qcow2");
    let opts = [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=2M",
        "preallocation=metadata",
        "lazy_refcounts=on",
    ];
    for (i, o) in opts.iter().enumerate() {
        let p = dir.join(format!("q{i}.qcow2"));
        let size = 24u64 << 20;
        assert!(ok(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", o])
            .arg(&p)
            .arg(size.to_string())));
        let _ =
            std::process::Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 3M 70k"]).arg(&p).output();
        let mut img = Image::open(&p, OpenMode::ReadWrite).unwrap_or_else(|e| panic!("{o}: {e}"));
        img.write_at(&pattern(8192, 3), (20 << 20) - 100).unwrap();
        img.flush().unwrap();
        drop(img);
        let img = Image::open(&p, OpenMode::ReadOnly).unwrap_or_else(|e| panic!("{o}: {e}"));
        let mut buf = vec![0; 8192];
        img.read_at(&mut buf, (20 << 20) - 100).unwrap();
        assert!(buf == pattern(8192, 3), "{o}");
        drop(img);
        assert!(
            ok(std::process::Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&p)),
            "{o}: qemu-img check"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
