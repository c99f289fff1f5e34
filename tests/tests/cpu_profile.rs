//! CPU profiles, baselines and cluster validation: a guest started on the
//! cluster baseline moves to a lesser host; a full-CPU guest is refused by
//! name; `ferry validate` passes a healthy lab and names what is wrong.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_e2e::{cluster_key, command, heartbeat_number, kvm_available, run_ferry, s, Lab, TempDir, Vm};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn export(dir: &Path) -> PathBuf {
    let p = dir.join("host.json");
    let out = run_ferry(&["cpu-profile", "export", "--out", p.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p
}

/// A copy of `profile` without avx2, avx512f and sse4_1: a lesser host
/// (sse4_1 is on every x86-64 host KVM runs on, so the diff always shows it).
fn lesser(profile: &Path, out: &Path) -> PathBuf {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(profile).unwrap()).unwrap();
    v["source"] = "lesser".into();
    for l in v["leaves"].as_array_mut().unwrap() {
        if l["function"] == "0x7" && l["index"] == 0 {
            let ebx = u32::from_str_radix(l["ebx"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            l["ebx"] = format!("{:#010x}", ebx & !((1 << 5) | (1 << 16))).into();
        }
        if l["function"] == "0x1" {
            let ecx = u32::from_str_radix(l["ecx"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            l["ecx"] = format!("{:#010x}", ecx & !(1 << 19)).into();
        }
    }
    std::fs::write(out, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    out.to_owned()
}

#[test]
fn profiles_export_common_and_diff_by_name() {
    if !kvm_available("profiles_export_common_and_diff_by_name") {
        return;
    }
    let dir = TempDir::new("prof");
    let host = export(dir.path());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&host).unwrap()).unwrap();
    assert_eq!(v["format"], "ferry-cpu-profile");
    assert!(v["features"].as_array().unwrap().iter().any(|f| f == "sse2"), "{v}");
    let small = lesser(&host, &dir.path().join("small.json"));

    let common = dir.path().join("common.json");
    let out = run_ferry(&[
        "cpu-profile",
        "common",
        host.to_str().unwrap(),
        small.to_str().unwrap(),
        "--out",
        common.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: Value = serde_json::from_str(&std::fs::read_to_string(&common).unwrap()).unwrap();
    let names: Vec<&str> = c["features"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
    assert!(!names.contains(&"sse4_1") && names.contains(&"sse2"), "{names:?}");

    let out = run_ferry(&["cpu-profile", "diff", host.to_str().unwrap(), small.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "profiles differ");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sse4_1: CPUID.(EAX=0x1,ECX=0):ECX[19]"), "{text}");
    let out = run_ferry(&["cpu-profile", "diff", host.to_str().unwrap(), host.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));

    std::fs::write(dir.path().join("bad.json"), "{\"format\":\"ferry-cpu-profile\",\"version\":99}").unwrap();
    let out =
        run_ferry(&["cpu-profile", "diff", dir.path().join("bad.json").to_str().unwrap(), host.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has version 99"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.path().join("junk.json"), "[1,2").unwrap();
    let out =
        run_ferry(&["run", "--kernel", "/dev/null", "--cpu-profile", dir.path().join("junk.json").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a Ferry CPU profile"));
}

fn boot(lab: &Lab, extra: &[String]) -> Vm {
    let guest = ferry_e2e::guest_elf();
    let mut args = vec![
        s("--kernel"),
        guest.display().to_string(),
        s("--mem-mib"),
        s("128"),
        s("--cmdline"),
        s("heartbeat_ms=200 wss_mib=16 dirty_mib_s=16 ip=10.200.77.10"),
        s("--net"),
        s("tap=vm0,mac=52:54:00:c0:ff:ee"),
    ];
    args.extend_from_slice(extra);
    let vm = Vm::launch(Some(&lab.netns("a")), "run", &args);
    vm.wait_line(T, |l| heartbeat_number(l).is_some());
    vm
}

fn receiver(lab: &Lab, port: u16, profile: &Path) -> Vm {
    let vm = Vm::launch(
        Some(&lab.netns("b")),
        "receive",
        &[
            s("--listen"),
            format!("tcp:10.200.77.2:{port}"),
            s("--key-file"),
            cluster_key().display().to_string(),
            s("--cpu-profile"),
            profile.display().to_string(),
            s("--net"),
            s("tap=vm0"),
        ],
    );
    vm.wait_stderr(T, "waiting for a migration");
    vm
}

fn migrate(lab: &Lab, vm: &Vm, port: u16) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.netns("a")])
        .arg(ferry_e2e::ferry_bin())
        .args([
            "migrate",
            "--json",
            "--key-file",
            cluster_key().to_str().unwrap(),
            "--to",
            &format!("tcp:10.200.77.2:{port}"),
        ])
        .arg("--api-sock")
        .arg(&vm.api_sock)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn baseline_guests_move_to_a_lesser_host_and_full_cpu_guests_are_refused_by_name() {
    if !kvm_available("baseline_guests_move_to_a_lesser_host_and_full_cpu_guests_are_refused_by_name") {
        return;
    }
    let dir = TempDir::new("base");
    let host = export(dir.path());
    let small = lesser(&host, &dir.path().join("small.json"));
    let baseline = dir.path().join("baseline.json");
    let out = run_ferry(&[
        "cpu-profile",
        "common",
        host.to_str().unwrap(),
        small.to_str().unwrap(),
        "--out",
        baseline.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let lab = Lab::up("p1");
    lab.ok(&["tap", "add", "a", "vm0"]);
    lab.ok(&["tap", "add", "b", "vm0"]);

    // Full host CPU: the lesser host refuses, naming what it lacks.
    let full = boot(&lab, &[]);
    let dest = receiver(&lab, 7720, &small);
    let (ok, err) = migrate(&lab, &full, 7720);
    assert!(!ok, "a lesser host must refuse a full-CPU guest");
    assert!(err.contains("missing CPU features"), "{err}");
    assert!(err.contains("sse4_1: CPUID.(EAX=0x1,ECX=0):ECX[19]"), "{err}");
    assert_eq!(full.info()["state"], "Running", "the VM stays running on the source");
    let v = command(&full, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
    drop(dest);
    drop(full);

    // Started on the baseline: it moves.
    let mut based = boot(&lab, &[s("--cpu-profile"), baseline.display().to_string()]);
    assert!(based.info()["config"]["machine"]["cpu_profile"]["source"].as_str().unwrap().starts_with("common("));
    let mut dest = receiver(&lab, 7721, &small);
    let (ok, err) = migrate(&lab, &based, 7721);
    assert!(ok, "{err}");
    based.wait_exit(T);
    std::mem::swap(&mut based, &mut dest);
    based.wait_api(T);
    let v = command(&based, "verify", "verify", T);
    assert!(v.starts_with("verify ok"), "{v}");
}

#[test]
fn validate_passes_a_healthy_lab_and_names_an_unreachable_host_and_unshared_locks() {
    if !kvm_available("validate_passes_a_healthy_lab_and_names_an_unreachable_host_and_unshared_locks") {
        return;
    }
    let lab = Lab::up("v1");
    let dir = TempDir::new("val");
    let (vol, other) = (dir.path().join("vol"), dir.path().join("other"));
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let (json, html) = (dir.path().join("r.json"), dir.path().join("r.html"));
    let run = |hosts: &str, volume: &str| {
        run_ferry(&[
            "validate",
            "--lab",
            &lab.name,
            "--hosts",
            hosts,
            "--volume",
            volume,
            "--json",
            json.to_str().unwrap(),
            "--html",
            html.to_str().unwrap(),
        ])
    };
    let out = run("a,b", vol.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["ok"], true);
    let checks: Vec<String> =
        r["checks"].as_array().unwrap().iter().map(|c| c["check"].as_str().unwrap().to_owned()).collect();
    for c in ["kvm", "dirty-logging", "memory", "clock", "cpu-baseline", "network", "mtu", "volume", "volume-lock"] {
        assert!(checks.iter().any(|x| x == c), "check {c} present: {checks:?}");
    }
    assert!(r["cluster_baseline"]["features"].as_array().unwrap().len() > 10);
    assert!(std::fs::read_to_string(&html).unwrap().contains("Ferry cluster validation: passed"));

    let out = run("a,b,zz", &format!("a={},b={}", vol.display(), other.display()));
    assert_eq!(out.status.code(), Some(1), "any failure makes validate fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FAILED reachable zz"), "{err}");
    assert!(err.contains("FAILED volume-lock a/b") && err.contains("locks are not shared"), "{err}");
    assert!(std::fs::read_to_string(&html).unwrap().contains("FAILED"));
}
