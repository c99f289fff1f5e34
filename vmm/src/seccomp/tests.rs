use std::process::Command;

use super::*;

#[test]
fn every_list_names_real_syscalls_and_compiles() {
    for kind in ThreadKind::ALL {
        let names = kind.syscalls();
        assert!(names.contains(&"write") && names.contains(&"exit_group"), "{kind}: the SIGSYS report needs these");
        for name in &names {
            number(kind, name).unwrap();
        }
        let program = compile(kind).unwrap();
        assert!(!program.is_empty());
    }
    for (kind, syscalls, instructions) in sizes().unwrap() {
        eprintln!("seccomp filter {kind}: {syscalls} syscalls, {instructions} BPF instructions");
    }
}

#[test]
fn a_thread_list_contains_what_the_threads_it_starts_use() {
    // Filters are inherited and stacking only narrows.
    let migration = ThreadKind::Migration.syscalls();
    for child in [ThreadKind::Vcpu, ThreadKind::Devices, ThreadKind::LeaseKeeper] {
        for s in child.syscalls() {
            assert!(migration.contains(&s), "migration starts {child} threads but lacks {s}");
        }
    }
    let api = ThreadKind::Api.syscalls();
    for s in ThreadKind::LeaseKeeper.syscalls() {
        assert!(api.contains(&s), "the API thread may restart a lease keeper but lacks {s}");
    }
    // A thread that starts confined threads runs their naming and their
    // filter's installation under its own filter.
    for parent in [ThreadKind::Migration, ThreadKind::Api] {
        for s in ["clone3", "prctl", "seccomp"] {
            assert!(parent.syscalls().contains(&s), "{parent} starts confined threads but lacks {s}");
        }
    }
}

const PROBE: &str = "FERRY_SECCOMP_PROBE";

/// In a child process (this test binary again, told by PROBE): confine a
/// thread as `kind` and make syscall `name` with zeroed arguments.
fn probe(kind: ThreadKind, name: &'static str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["seccomp::tests::probe_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(PROBE, format!("{}:{name}", kind.name()))
        .output()
        .unwrap()
}

#[test]
fn probe_child() {
    let Ok(spec) = std::env::var(PROBE) else {
        return; // Only meaningful as the child of the tests below.
    };
    // KIND:SYSCALL, or PARENT>KIND:SYSCALL for a KIND thread started by
    // a thread already confined as PARENT.
    let (kinds, name) = spec.split_once(':').unwrap();
    let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    let by_name = |n: &str| ThreadKind::ALL.into_iter().find(|k| k.name() == n).unwrap();
    let (parent, kind) = match kinds.split_once('>') {
        Some((p, k)) => (Some(by_name(p)), by_name(k)),
        None => (None, by_name(kinds)),
    };
    let nr = name.parse::<syscalls::Sysno>().unwrap().id() as libc::c_long;
    enable().unwrap();
    let probe = move || {
        let t = spawn("probe".into(), kind, move || {
            // SAFETY: the probed syscalls take no pointers that zero could
            // make unsound (getppid, socket(0, 0, 0), getpid).
            let rc = unsafe { libc::syscall(nr, 0, 0, 0) };
            println!("probe: {name} returned {rc}");
        })
        .unwrap();
        t.join().unwrap();
    };
    match parent {
        Some(p) => spawn("parent".into(), p, probe).unwrap().join().unwrap(),
        None => probe(),
    }
}

#[test]
fn a_forbidden_syscall_kills_the_process_and_is_named() {
    let out = probe(ThreadKind::Vcpu, "socket");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_BAD_SYSCALL), "stderr: {err}");
    assert!(err.contains("the vcpu thread made syscall socket (41)"), "stderr: {err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("probe: socket returned"));

    let out = probe(ThreadKind::LeaseKeeper, "getppid");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_BAD_SYSCALL), "stderr: {err}");
    assert!(err.contains("the lease-keeper thread made syscall getppid (110)"), "stderr: {err}");
}

#[test]
fn an_allowed_syscall_passes_the_filter() {
    let out = probe(ThreadKind::Vcpu, "getpid");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("probe: getpid returned"), "{stdout}");
}

#[test]
fn confined_threads_start_confined_threads() {
    for parent in ["migration", "api"] {
        let kind = ThreadKind::ALL.into_iter().find(|k| k.name() == parent).unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["seccomp::tests::probe_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(PROBE, format!("{kind}>vcpu:getpid"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{parent}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("probe: getpid returned"), "{stdout}");
    }
}

#[test]
fn unconfined_until_enabled() {
    // This test process never called enable() outside the probe child.
    if std::env::var(PROBE).is_err() {
        assert!(!enabled());
        apply(ThreadKind::Vcpu).unwrap();
    }
}
