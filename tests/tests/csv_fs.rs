//! The cluster shared volume end to end: separate `ferry` processes racing
//! for and taking over disk leases on real files with real OFD locks, a
//! full volume, and every image format against `qemu-img` both ways.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use csv_fs::{BlockBackend, Format, Image, OpenMode};
use ferry_e2e::{ferry_bin, TempDir};

fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin()).args(args).env("FERRY_LOG", "warn").output().expect("run ferry")
}

/// Runs ferry and insists it succeeded; returns stdout.
fn ferry_ok(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(out.status.success(), "ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs ferry and insists it failed cleanly (exit 1, not a crash); returns stderr.
fn ferry_err(args: &[&str]) -> String {
    let out = ferry(args);
    assert_eq!(out.status.code(), Some(1), "ferry {args:?} should fail with 1: {out:?}");
    String::from_utf8(out.stderr).unwrap()
}

fn volume(tag: &str) -> (TempDir, String) {
    let dir = TempDir::new(tag);
    let vol = dir.path().join("vol").display().to_string();
    ferry_ok(&["volume", "create", &vol]);
    (dir, vol)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.lines().next().unwrap_or("")).or_else(|_| serde_json::from_str(s)).unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn eight_processes_race_for_one_lease_and_exactly_one_wins() {
    let (_dir, vol) = volume("race");
    ferry_ok(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "1M", "d"]);
    for round in 1..=3u64 {
        // Every contender sleeps until the same instant, then acquires.
        let start = (now_ms() + 400).to_string();
        let children: Vec<_> = (0..8)
            .map(|i| {
                Command::new(env!("CARGO_BIN_EXE_lease-race"))
                    .args([&vol, "d", &format!("h{i}"), &start])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let winners: Vec<usize> = (0..8).filter(|&i| outs[i].status.success()).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one winner: {outs:?}");
        let w = winners[0];
        assert_eq!(String::from_utf8_lossy(&outs[w].stdout).trim(), format!("won {round}"));
        for (i, o) in outs.iter().enumerate().filter(|(i, _)| *i != w) {
            assert_eq!(o.status.code(), Some(1), "contender {i}: {o:?}");
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains(&format!("is leased by host \"h{w}\" at epoch {round}")), "{text}");
        }
        let record = json(&ferry_ok(&["disk", "lease", "show", "--volume", &vol, "d"]));
        assert_eq!(record["owner"], format!("h{w}"));
        assert_eq!(record["epoch"], round);
        let epoch = round.to_string();
        ferry_ok(&["disk", "lease", "release", "--volume", &vol, "--host", &format!("h{w}"), "--epoch", &epoch, "d"]);
    }
}

#[test]
fn a_killed_owner_is_taken_over_after_its_ttl_and_then_fenced() {
    let (_dir, vol) = volume("takeover");
    ferry_ok(&["disk", "create", "--volume", &vol, "--format", "qcow2", "--size", "4M", "d"]);
    let ttl = 800u64;
    let ttl_s = ttl.to_string();
    let mut owner = Command::new(ferry_bin())
        .args(["disk", "lease", "acquire", "--volume", &vol, "--host", "a", "--ttl-ms", &ttl_s, "--hold", "d"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(owner.stdout.take().unwrap()), &mut line).unwrap();
    let lease = json(&line);
    assert_eq!((lease["host"].as_str(), lease["epoch"].as_u64()), (Some("a"), Some(1)), "{line}");

    // Two TTLs later the holder has renewed: its epoch still passes the fence.
    std::thread::sleep(Duration::from_millis(2 * ttl));
    ferry_ok(&["disk", "lease", "check", "--volume", &vol, "--host", "a", "--epoch", "1", "d"]);
    let e = ferry_err(&["disk", "lease", "takeover", "--volume", &vol, "--host", "b", "--ttl-ms", &ttl_s, "d"]);
    assert!(e.contains("leased by host \"a\" at epoch 1") && e.contains("expires in"), "{e}");

    owner.kill().unwrap(); // SIGKILL: no release, no more renewals
    let killed = Instant::now();
    owner.wait().unwrap();
    let e = ferry_err(&["disk", "lease", "acquire", "--volume", &vol, "--host", "b", "d"]);
    assert!(e.contains("host \"a\""), "acquire does not take a held lease: {e}");

    let taken = loop {
        let out = ferry(&["disk", "lease", "takeover", "--volume", &vol, "--host", "b", "--ttl-ms", "5000", "d"]);
        if out.status.success() {
            break json(&String::from_utf8(out.stdout).unwrap());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("leased by host \"a\""), "{err}");
        assert!(killed.elapsed() < Duration::from_millis(ttl + 3000), "no takeover after the TTL: {err}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = killed.elapsed();
    assert!(waited >= Duration::from_millis(ttl / 2), "taken over only after expiry (waited {waited:?})");
    assert_eq!((taken["host"].as_str(), taken["epoch"].as_u64()), (Some("b"), Some(2)), "{taken}");

    // The old owner comes back with epoch 1: refused, by epoch.
    let e = ferry_err(&["disk", "lease", "check", "--volume", &vol, "--host", "a", "--epoch", "1", "d"]);
    assert!(e.contains("presented epoch 1, but the lease is at epoch 2"), "{e}");
    let e = ferry_err(&["disk", "lease", "renew", "--volume", &vol, "--host", "a", "--epoch", "1", "d"]);
    assert!(e.contains("epoch 2"), "{e}");
    ferry_ok(&["disk", "lease", "check", "--volume", &vol, "--host", "b", "--epoch", "2", "d"]);
    let info = ferry_ok(&["disk", "info", "--volume", &vol, "d"]);
    assert!(info.contains("host b, epoch 2"), "{info}");

    // Handoff b -> a (a migration back): epoch 3, b fenced.
    let a = json(&ferry_ok(&[
        "disk", "lease", "handoff", "--volume", &vol, "--host", "b", "--epoch", "2", "--to", "a", "d",
    ]));
    assert_eq!((a["host"].as_str(), a["epoch"].as_u64()), (Some("a"), Some(3)));
    ferry_err(&["disk", "lease", "check", "--volume", &vol, "--host", "b", "--epoch", "2", "d"]);
}

/// A holder stopped by SIGTERM releases its lease.
#[test]
fn a_stopped_holder_releases() {
    let (_dir, vol) = volume("hold");
    ferry_ok(&["disk", "create", "--volume", &vol, "--format", "vhd-dynamic", "--size", "4M", "d"]);
    let mut owner = Command::new(ferry_bin())
        .args(["disk", "lease", "acquire", "--volume", &vol, "--host", "a", "--ttl-ms", "500", "--hold", "d"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(owner.stdout.take().unwrap()), &mut line).unwrap();
    // SAFETY: kill on a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(owner.id() as i32, libc::SIGTERM) }, 0);
    assert!(owner.wait().unwrap().success());
    let record = json(&ferry_ok(&["disk", "lease", "show", "--volume", &vol, "d"]));
    assert_eq!(record["owner"], serde_json::Value::Null);
    assert_eq!(json(&ferry_ok(&["disk", "lease", "acquire", "--volume", &vol, "--host", "b", "d"]))["epoch"], 2);
}

#[test]
fn volume_disk_and_lease_errors_are_clear() {
    let (dir, vol) = volume("errors");
    ferry_ok(&["disk", "create", "--volume", &vol, "--format", "vhd-fixed", "--size", "2M", "v"]);
    let e = ferry_err(&["volume", "create", &vol]);
    assert!(e.contains("already a Ferry volume"), "{e}");
    let e = ferry_err(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "1M", "v"]);
    assert!(e.contains("already exists"), "{e}");
    let e = ferry_err(&["disk", "info", "--volume", &vol, "nope"]);
    assert!(e.contains("disk \"nope\" not found"), "{e}");
    let e = ferry_err(&["disk", "list", "--volume", dir.path().to_str().unwrap()]);
    assert!(e.contains("not a Ferry volume"), "{e}");

    // A corrupt image: named, exit 1, no crash.
    let img = Path::new(&vol).join("disks/v.vhd");
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(len - 100).unwrap();
    let e = ferry_err(&["disk", "info", "--volume", &vol, "v"]);
    assert!(e.contains("corrupt vhd image"), "{e}");
    let list = ferry_ok(&["disk", "list", "--volume", &vol]);
    assert!(list.contains("error: ") && list.contains("corrupt vhd image"), "{list}");

    // A corrupt lease record.
    ferry_ok(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "1M", "r"]);
    ferry_ok(&["disk", "lease", "acquire", "--volume", &vol, "--host", "a", "r"]);
    std::fs::write(Path::new(&vol).join("leases/r.json"), "{ \"version\": 1, \"disk\": ").unwrap();
    let e = ferry_err(&["disk", "lease", "acquire", "--volume", &vol, "--host", "b", "r"]);
    assert!(e.contains("corrupt lease record"), "{e}");

    // A volume from a future format version.
    let header = Path::new(&vol).join("volume.json");
    let text = std::fs::read_to_string(&header).unwrap();
    std::fs::write(&header, text.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let e = ferry_err(&["volume", "status", &vol]);
    assert!(e.contains("volume format version 2 is not supported"), "{e}");
}

/// A tmpfs of 1 MiB mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_volume_keeps_the_previous_lease_record() {
    if std::env::var("FERRY_NO_KVM").as_deref() == Ok("1") {
        eprintln!("a_full_volume_keeps_the_previous_lease_record: not run: FERRY_NO_KVM=1");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "mounting a small tmpfs needs root (or set FERRY_NO_KVM=1)");
    let dir = TempDir::new("full");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1M", "ferry-csv-test"]).arg(&mnt).status().unwrap();
    assert!(st.success(), "mount tmpfs");
    let _mount = Tmpfs(mnt.clone());
    let vol = mnt.join("vol").display().to_string();
    ferry_ok(&["volume", "create", &vol]);
    ferry_ok(&["disk", "create", "--volume", &vol, "--format", "raw", "--size", "64M", "d"]);
    ferry_ok(&["disk", "lease", "acquire", "--volume", &vol, "--host", "a", "--ttl-ms", "60000", "d"]);
    let before = std::fs::read(mnt.join("vol/leases/d.json")).unwrap();

    // Fill every free byte.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0xaa; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);

    let e = ferry_err(&["disk", "lease", "renew", "--volume", &vol, "--host", "a", "--epoch", "1", "d"]);
    assert!(e.contains("volume is full") && e.contains("previous version is intact"), "{e}");
    let e = ferry_err(&["disk", "create", "--volume", &vol, "--format", "vhd-dynamic", "--size", "64M", "e"]);
    assert!(e.contains("volume is full"), "{e}");
    assert_eq!(std::fs::read(mnt.join("vol/leases/d.json")).unwrap(), before, "the record is untouched");
    let leftovers: Vec<_> =
        std::fs::read_dir(mnt.join("vol/leases")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "{leftovers:?}");
    ferry_ok(&["disk", "lease", "check", "--volume", &vol, "--host", "a", "--epoch", "1", "d"]);

    std::fs::remove_file(&filler).unwrap();
    ferry_ok(&["disk", "lease", "renew", "--volume", &vol, "--host", "a", "--epoch", "1", "d"]);
}

// ---- qemu-img interoperability ----

/// True if qemu-img is there. Fails the test if it is missing, unless
/// FERRY_NO_KVM=1 (a machine set up without the test dependencies).
fn qemu_img_available(test: &str) -> bool {
    let found = Command::new("qemu-img").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !found && std::env::var("FERRY_NO_KVM").as_deref() == Ok("1") {
        eprintln!("{test}: not run: qemu-img missing and FERRY_NO_KVM=1");
        return false;
    }
    assert!(found, "{test} needs qemu-img (Debian qemu-utils; scripts/install-deps.sh installs it)");
    true
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0; img.len() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// Writes that cross VHD blocks (2 MiB) and qcow2 clusters (64 KiB).
const WRITES: [(u64, usize, u64); 4] =
    [(0, 4096, 1), ((2 << 20) - 1536, 8192, 2), (5 << 20, (1 << 20) + 512, 3), ((12 << 20) - 512, 512, 4)];
const SIZE: u64 = 12 << 20;

fn check_with_qemu(path: &str, f: Format) {
    let info = qemu_img(&["info", "--output=json", "-f", f.qemu_name(), path]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(SIZE), "{path}: {info}");
    if f == Format::Qcow2 {
        let check = qemu_img(&["check", "-f", "qcow2", path]);
        assert!(check.contains("No errors were found"), "{check}");
    }
}

#[test]
fn images_ferry_writes_read_the_same_in_qemu_img() {
    if !qemu_img_available("images_ferry_writes_read_the_same_in_qemu_img") {
        return;
    }
    let (dir, vol) = volume("qemu-out");
    let volume = csv_fs::Volume::open(Path::new(&vol)).unwrap();
    for f in Format::ALL {
        let name = f.name().replace('-', "_");
        ferry_ok(&["disk", "create", "--volume", &vol, "--format", f.name(), "--size", "12M", &name]);
        let mut img = volume.open_disk(&name, OpenMode::ReadWrite).unwrap();
        for (off, len, seed) in WRITES {
            img.write_at(&pattern(len, seed), off).unwrap();
        }
        img.flush().unwrap();
        let ours = read_all(&img);
        drop(img);
        let path = volume.disk_path(&name).unwrap().display().to_string();
        check_with_qemu(&path, f);
        // Theirs, as raw bytes, equal ours.
        let raw = dir.path().join(format!("{name}.out.raw"));
        qemu_img(&["convert", "-f", f.qemu_name(), "-O", "raw", &path, raw.to_str().unwrap()]);
        assert!(std::fs::read(&raw).unwrap() == ours, "{f}: qemu-img reads what ferry wrote");
        let mine = dir.path().join(format!("{name}.mine.raw"));
        std::fs::write(&mine, &ours).unwrap();
        let cmp = qemu_img(&["compare", "-f", f.qemu_name(), "-F", "raw", &path, mine.to_str().unwrap()]);
        assert!(cmp.contains("Images are identical"), "{f}: {cmp}");
    }
}

#[test]
fn images_qemu_img_writes_read_the_same_in_ferry_and_back() {
    if !qemu_img_available("images_qemu_img_writes_read_the_same_in_ferry_and_back") {
        return;
    }
    let dir = TempDir::new("qemu-in");
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; SIZE as usize];
    for (off, len, seed) in WRITES {
        data[off as usize..off as usize + len].copy_from_slice(&pattern(len, seed + 10));
    }
    std::fs::write(&src, &data).unwrap();
    // (file, qemu-img -O format, -o options, the format ferry should see)
    let cases: [(&str, &str, &str, Format); 5] = [
        ("q.qcow2", "qcow2", "", Format::Qcow2),
        ("q.raw", "raw", "", Format::Raw),
        ("fixed.vhd", "vpc", "subformat=fixed,force_size=on", Format::VhdFixed),
        ("dyn.vhd", "vpc", "subformat=dynamic,force_size=on", Format::VhdDynamic),
        // Without force_size QEMU writes creator "qemu" and rounds the size
        // up to a CHS geometry; both sides must agree on that size.
        ("chs.vhd", "vpc", "subformat=dynamic", Format::VhdDynamic),
    ];
    for (file, qfmt, opts, want) in cases {
        let path = dir.path().join(file);
        let p = path.to_str().unwrap();
        let mut args = vec!["convert", "-f", "raw", "-O", qfmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([src.to_str().unwrap(), p]);
        qemu_img(&args);
        let qinfo: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", "-f", qfmt, p])).unwrap();
        let qsize = qinfo["virtual-size"].as_u64().unwrap();

        let mut img = Image::open(&path, OpenMode::ReadWrite).unwrap();
        assert_eq!(img.format(), want, "{file}");
        // For VHD fixed, qemu-img info counts the footer in; the data ends before it.
        let expect_size = if want == Format::VhdFixed { SIZE } else { qsize };
        assert_eq!(img.len(), expect_size, "{file}: the size qemu-img reports");
        let got = read_all(&img);
        assert!(got[..SIZE as usize] == data[..], "{file}: ferry reads what qemu-img wrote");
        assert!(got[SIZE as usize..].iter().all(|&b| b == 0), "{file}: the CHS tail is zero");

        // Now ferry writes into qemu's image, including a fresh block.
        let extra = pattern(70_000, 99);
        img.write_at(&extra, (9 << 20) + 123).unwrap();
        img.flush().unwrap();
        let expected = read_all(&img);
        drop(img);
        let back = dir.path().join(format!("{file}.back.raw"));
        qemu_img(&["convert", "-f", qfmt, "-O", "raw", p, back.to_str().unwrap()]);
        let theirs = std::fs::read(&back).unwrap();
        assert!(theirs[..expected.len()] == expected[..], "{file}: qemu-img reads ferry's writes");
        if qfmt == "qcow2" {
            assert!(qemu_img(&["check", "-f", "qcow2", p]).contains("No errors were found"));
        }
    }
}
