//! Forming a cluster (`ferry cluster create`) against real etcd and real
//! lab hosts: three hosts with one etcd member each, the validation's
//! probes run inside each host, the CLI in the lab's client namespace. A
//! cluster whose validation fails is refused and nothing is stored (unless
//! --force); a healthy one stores its record and report once; `ferry
//! cluster validate` replaces the report. Needs root, KVM (a check) and
//! etcd; fails without them unless FERRY_NO_KVM=1.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_e2e::{ferry_bin, kvm_available, run_bounded, Lab, TempDir};
use serde_json::Value;

/// `ferry ARGS --etcd EPS` from the client namespace (the etcd members
/// answer on the lab's addresses only).
fn cli(lab: &Lab, eps: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.netns("client")]).arg(ferry_bin()).args(args).args(["--etcd", eps]);
    run_bounded(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command that must succeed; its stdout as JSON.
fn cli_json(lab: &Lab, eps: &str, args: &[&str]) -> Value {
    let out = cli(lab, eps, args);
    assert!(out.status.success(), "ferry {args:?}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ferry {args:?}: not JSON ({e}): {}", text(&out.stdout)))
}

fn status(lab: &Lab, eps: &str, cluster: &str) -> Value {
    cli_json(lab, eps, &["cluster", "status", "--json", "--cluster", cluster])
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn cluster_create_validates_first_stores_record_and_report_once_and_validate_updates_it() {
    let test = "cluster_create_validates_first_stores_record_and_report_once_and_validate_updates_it";
    if !kvm_available(test) {
        return;
    }
    assert!(Path::new("/usr/bin/etcd").exists(), "etcd is missing: run `make deps` (Debian's etcd-server)");
    let started = Instant::now();
    let lab = Lab { name: ferry_e2e::lab_name("cc1") };
    lab.ok(&["up", "--hosts", "a,b,c", "--etcd"]);
    let eps = lab.ok(&["etcd", "endpoints"]).trim().to_owned();
    eprintln!("{test}: lab with 3 etcd members up in {:?}", started.elapsed());
    let dir = TempDir::new("ccreate");
    let vol = dir.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let vol = vol.to_str().unwrap().to_owned();
    let missing = dir.path().join("no-such-volume").to_str().unwrap().to_owned();
    let create = |name: &str, nodes: &str, volume: &str, extra: &[&str]| {
        let mut args =
            vec!["cluster", "create", "--name", name, "--nodes", nodes, "--volume", volume, "--lab", &lab.name];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let out = cli(&lab, &eps, &args);
        eprintln!(
            "{test}: create {name} {nodes} {volume} {extra:?}: exit {:?} in {:?}",
            out.status.code(),
            t.elapsed()
        );
        out
    };
    let nothing_stored = |name: &str| {
        let s = status(&lab, &eps, name);
        assert!(s["record"].is_null() && s["validation"].is_null(), "nothing may be stored: {s}");
        assert_eq!(s["settings"]["live_migrations_per_node"], 2, "defaults without a record: {s}");
    };

    // A volume that does not exist: validation fails, the failed checks are
    // named with their fixes, and nothing is stored.
    let out = create("ccbad", "a,b,c", &missing, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a cluster failing validation is refused: {err}");
    assert!(err.contains(&format!("FAILED volume a: {missing}")) && err.contains("-> mount"), "{err}");
    assert!(err.contains("cluster ccbad not created") && err.contains("--force"), "{err}");
    nothing_stored("ccbad");

    // A node that is not there: refused too, naming it.
    let out = create("ccbad", "a,b,zz", &vol, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("FAILED reachable zz") && err.contains("start the host"), "{err}");
    nothing_stored("ccbad");

    // With --force it is formed, and the record says so.
    let out = create("ccbad", "a,b,c", &missing, &["--force", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["created"], true, "{made}");
    assert_eq!(made["record"]["forced"], true, "{made}");
    assert_eq!(made["validation"]["ok"], false, "{made}");
    let s = status(&lab, &eps, "ccbad");
    assert_eq!(s["record"]["forced"], true, "{s}");
    assert_eq!(s["validation"]["ok"], false, "{s}");
    let failed: Vec<&str> = s["validation"]["failed"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(failed.iter().any(|f| f.starts_with("volume a:")), "{failed:?}");

    // A healthy cluster: every check passes; record and report stored.
    let before = now_ms();
    let out = create("ccgood", "a,b,c", &vol, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["created"], true, "{made}");
    assert_eq!(made["validation"]["ok"], true, "{made}");
    let checks: Vec<&str> = made["validation"]["report"]["checks"]
        .as_array()
        .expect("the stored report is ferry validate's")
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for c in [
        "reachable",
        "kvm",
        "dirty-logging",
        "memory",
        "clock",
        "cpu-baseline",
        "network",
        "mtu",
        "volume",
        "volume-lock",
    ] {
        assert!(checks.contains(&c), "check {c} ran: {checks:?}");
    }
    let s = status(&lab, &eps, "ccgood");
    let r = &s["record"];
    assert_eq!(r["name"], "ccgood", "{s}");
    assert_eq!(r["nodes"], serde_json::json!(["a", "b", "c"]), "{s}");
    assert_eq!(r["volume"], vol.as_str(), "{s}");
    assert_eq!(r["lab"], lab.name.as_str(), "{s}");
    assert_eq!(r["forced"], false, "{s}");
    assert_eq!(s["settings"]["live_migrations_per_node"], 2, "Hyper-V's default: {s}");
    assert_eq!(s["settings"]["incoming_per_node"], 2, "{s}");
    assert!(s["settings"]["failback_window"].is_null(), "{s}");
    let v = &s["validation"];
    assert_eq!(v["ok"], true, "{s}");
    assert_eq!(v["checks"].as_u64(), Some(checks.len() as u64), "{s}");
    let first_at = v["at_unix_ms"].as_u64().unwrap();
    assert!(first_at >= before && first_at <= now_ms(), "{first_at} within the create");
    let out = cli(&lab, &eps, &["cluster", "status", "--cluster", "ccgood"]);
    let table = text(&out.stdout);
    assert!(table.contains("last validation: passed"), "{table}");
    assert!(table.contains("settings: 2 live migration(s) per node"), "{table}");

    // A second create of the same name: one clear line, nothing changed.
    let out = create("ccgood", "a,b", &vol, &["--live-migrations-per-node", "4"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim(), "ferry: cluster ccgood already exists");
    assert_eq!(status(&lab, &eps, "ccgood")["record"], *r, "the record is unchanged");
    // --name and --cluster name one cluster.
    let out = cli(
        &lab,
        &eps,
        &["cluster", "create", "--name", "x1", "--cluster", "x2", "--nodes", "a", "--volume", &vol, "--lab", &lab.name],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--name x1 and --cluster x2 disagree"), "{}", text(&out.stderr));

    // `cluster validate` runs the checks again on the stored nodes and
    // volume and replaces the report.
    let v = cli_json(&lab, &eps, &["cluster", "validate", "--cluster", "ccgood", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    let second_at = v["at_unix_ms"].as_u64().unwrap();
    assert!(second_at > first_at, "a new report");
    assert_eq!(status(&lab, &eps, "ccgood")["validation"]["at_unix_ms"].as_u64(), Some(second_at));
    // The volume goes away: the next validation fails, says why, and that
    // report is stored.
    std::fs::remove_dir_all(&vol).unwrap();
    let out = cli(&lab, &eps, &["cluster", "validate", "--cluster", "ccgood"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("FAILED volume a: {vol}")), "{err}");
    assert!(err.contains("cluster ccgood: validation FAILED") && err.contains("report stored"), "{err}");
    let s = status(&lab, &eps, "ccgood");
    assert_eq!(s["validation"]["ok"], false, "{s}");
    assert!(s["validation"]["at_unix_ms"].as_u64().unwrap() > second_at, "{s}");
    // A cluster never created has nothing to validate.
    let out = cli(&lab, &eps, &["cluster", "validate", "--cluster", "ccnone"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no cluster named \"ccnone\""), "{}", text(&out.stderr));
    eprintln!("{test}: done in {:?}", started.elapsed());
}
