//! The API socket of a real VMM, read as a hostile local client would:
//! private modes, peer credentials, bounded requests, a stalled client
//! that blocks nobody, malformed JSON, and what may sit at the path.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::{ferry_bin, guest_elf, kvm_available, TempDir, Vm};
use vmm::api::client;

const T: Duration = Duration::from_secs(20);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn raw(sock: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

fn call(sock: &Path, method: &str, endpoint: &str, body: &[u8]) -> client::Response {
    client::request(sock, method, endpoint, body, T).unwrap()
}

#[test]
fn the_api_is_private_bounded_and_a_stalled_client_blocks_no_one() {
    if !kvm_available("the_api_is_private_bounded_and_a_stalled_client_blocks_no_one") {
        return;
    }
    let mut vm = Vm::guest("heartbeat_ms=100", &["--serial", "stdout"]);
    vm.wait_api(T);
    let sock = vm.api_sock.clone();
    assert_eq!(mode(&sock), 0o600, "the API socket's mode");

    // A client that promises a 2000-byte body and stalls, and one that
    // stalls inside its head: neither holds up anyone else.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"PUT /api/v1/vm.console HTTP/1.1\r\nContent-Length: 2000\r\n\r\nabc").unwrap();
    let mut half_head = UnixStream::connect(&sock).unwrap();
    half_head.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHo").unwrap();
    let t = Instant::now();
    let info = call(&sock, "GET", "vm.info", b"");
    assert_eq!(info.status, 200, "{}", info.body);
    assert!(t.elapsed() < Duration::from_secs(2), "vm.info waited {:?} behind a stalled client", t.elapsed());

    // A body over the limit: 413, unread.
    let (status, out) = raw(&sock, b"PUT /api/v1/vm.console HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n");
    assert_eq!(status, 413, "{out}");

    // Malformed JSON where JSON is expected: 400, naming the problem.
    let r = call(&sock, "PUT", "vm.snapshot", b"{\"dir\": ");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = call(&sock, "PUT", "vm.migrate", b"not json at all");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error_message().contains("vm.migrate"), "{}", r.body);
    let r = call(&sock, "PUT", "vm.snapshot", b"{\"dir\": 7}");
    assert_eq!(r.status, 400, "{}", r.body);

    // Another uid: opened to everyone by mode, still refused by SO_PEERCRED.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(sock.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(ferry_bin())
        .args(["info", "--api-sock"])
        .arg(&sock)
        .output()
        .expect("setpriv (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uid 65534 was served: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("uid 65534 may not use this API"), "{err}");
    vm.wait_stderr(T, "refused a connection from uid 65534");

    // The stalled client is answered 408 once its deadline passes.
    stalled.set_read_timeout(Some(T)).unwrap();
    let mut answer = String::new();
    stalled.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // And a fresh stall does not delay vm.shutdown either.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"PUT /api/v1/vm.console HTTP/1.1\r\nContent-Length: 2000\r\n\r\n").unwrap();
    let t = Instant::now();
    let r = call(&sock, "PUT", "vm.shutdown", b"");
    assert_eq!(r.status, 204, "{}", r.body);
    let status = vm.wait_exit(T);
    assert!(status.success(), "{status:?}: {}", vm.stderr());
    assert!(t.elapsed() < Duration::from_secs(3), "shutdown took {:?}", t.elapsed());
    drop(half_head);
}

/// `ferry run --api-sock PATH` for the test guest, its stderr captured.
fn run_with_sock(sock: &Path) -> std::process::Child {
    Command::new(ferry_bin())
        .args(["run", "--serial", "null", "--kernel"])
        .arg(guest_elf())
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry run")
}

fn wait_for(sock: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + T;
    while client::request(sock, "GET", "vmm.ping", b"", Duration::from_secs(1)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "ferry run exited");
        assert!(Instant::now() < deadline, "the API never came up at {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(sock: &Path, mut child: std::process::Child) {
    let r = call(sock, "PUT", "vm.shutdown", b"");
    assert_eq!(r.status, 204);
    let deadline = Instant::now() + T;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "ferry run did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn what_sits_at_the_api_path_decides_whether_the_vmm_starts() {
    if !kvm_available("what_sits_at_the_api_path_decides_whether_the_vmm_starts") {
        return;
    }
    let dir = TempDir::new("apipath");

    // A regular file: refused with a clear line, the file untouched.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let out = run_with_sock(&file).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a socket: refusing to replace it"), "{err}");
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A missing directory is made 0700 (the umask notwithstanding).
    let nested = dir.path().join("run/ferry/api.sock");
    let mut child = run_with_sock(&nested);
    wait_for(&nested, &mut child);
    assert_eq!(mode(&dir.path().join("run/ferry")), 0o700);
    assert_eq!(mode(&dir.path().join("run")), 0o700);
    assert_eq!(mode(&nested), 0o600);

    // A second VMM on a live socket is refused; the first keeps it.
    let out = run_with_sock(&nested).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by a running VMM"), "{err}");
    assert_eq!(call(&nested, "GET", "vmm.ping", b"").status, 200);
    stop(&nested, child);
    assert!(!nested.exists(), "a clean exit removes the socket");

    // A stale socket (nobody listening) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut child = run_with_sock(&stale);
    wait_for(&stale, &mut child);
    stop(&stale, child);
}
