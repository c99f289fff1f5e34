use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("ferry-http-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Answers `/echo` with the body it got and the peer's uid.
fn echo() -> Arc<Handler> {
    Arc::new(|r: Request| {
        Response::json(
            200,
            &serde_json::json!({ "url": r.url, "len": r.body.len(), "uid": r.peer.uid, "method": r.method }),
        )
    })
}

fn serve(path: &Path, limits: Limits, policy: PeerPolicy) -> Server {
    let listener = bind(path).unwrap();
    Server::start(path, listener, limits, policy, echo(), || Ok(())).unwrap()
}

fn quick() -> Limits {
    Limits { deadline: Duration::from_millis(400), ..Limits::default() }
}

/// Sends `raw` and returns the status and body of the answer.
fn send(path: &Path, raw: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    read_answer(&mut s)
}

fn read_answer(s: &mut UnixStream) -> (u16, String) {
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn the_socket_is_0600_in_a_0700_directory_whatever_the_umask() {
    let d = Dir::new("mode");
    let path = d.0.join("made/here/api.sock");
    // The most permissive umask: the modes must not come from it.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let listener = bind(&path);
    nix::sys::stat::umask(old);
    let _listener = listener.unwrap();
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&d.0.join("made/here")), 0o700);
    assert_eq!(mode(&d.0.join("made")), 0o700);
}

#[test]
fn an_existing_directory_keeps_its_mode() {
    let d = Dir::new("keepdir");
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _l = bind(&d.0.join("api.sock")).unwrap();
    assert_eq!(mode(&d.0), 0o755);
}

#[test]
fn a_file_that_is_not_a_socket_is_refused_and_left_alone() {
    let d = Dir::new("notsock");
    let path = d.0.join("api.sock");
    std::fs::write(&path, b"precious").unwrap();
    let e = bind(&path).unwrap_err();
    assert!(matches!(e, Error::NotASocket(_)), "{e}");
    assert!(e.to_string().contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // A directory, too.
    let sub = d.0.join("sub.sock");
    std::fs::create_dir(&sub).unwrap();
    assert!(matches!(bind(&sub), Err(Error::NotASocket(_))));
    assert!(sub.is_dir());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let d = Dir::new("stale");
    let path = d.0.join("api.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale socket file stays behind");
    let live = bind(&path).unwrap();
    assert!(matches!(bind(&path), Err(Error::InUse(_))));
    drop(live);
}

#[test]
fn a_request_is_read_whole_and_answered() {
    let d = Dir::new("echo");
    let path = d.0.join("api.sock");
    let _s = serve(&path, quick(), PeerPolicy::root_and_self());
    let (status, body) = send(&path, b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["len"], 5);
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["uid"], nix::unistd::geteuid().as_raw());
    // Our own client speaks to it too.
    let r = crate::api::client::request(&path, "GET", "x", b"", Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn a_peer_whose_uid_is_not_allowed_gets_403() {
    let d = Dir::new("peer");
    let path = d.0.join("api.sock");
    // Only a uid this test does not run as.
    let other = nix::unistd::geteuid().as_raw().wrapping_add(4242);
    let _s = serve(&path, quick(), PeerPolicy { uids: vec![other] });
    let (status, body) = send(&path, b"GET /echo HTTP/1.1\r\n\r\n");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may not use this API"), "{body}");
}

#[test]
fn the_policy_allows_root_and_this_uid_only() {
    let p = PeerPolicy::root_and_self();
    assert!(p.allows(0));
    assert!(p.allows(nix::unistd::geteuid().as_raw()));
    assert!(!p.allows(65534) || nix::unistd::geteuid().as_raw() == 65534);
}

#[test]
fn a_stalled_client_blocks_nobody_and_times_out_with_408() {
    let d = Dir::new("stall");
    let path = d.0.join("api.sock");
    let _s = serve(&path, quick(), PeerPolicy::root_and_self());
    // Promises 2000 bytes, sends 10, stalls.
    let mut stalled = UnixStream::connect(&path).unwrap();
    stalled.write_all(b"PUT /echo HTTP/1.1\r\nContent-Length: 2000\r\n\r\n0123456789").unwrap();
    // And one that never finishes its head.
    let mut slow_head = UnixStream::connect(&path).unwrap();
    slow_head.write_all(b"GET /echo HTTP/1.1\r\nHo").unwrap();
    let t = Instant::now();
    let (status, _) = send(&path, b"GET /echo HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(t.elapsed() < Duration::from_millis(300), "another client waited {:?}", t.elapsed());
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, body) = read_answer(&mut stalled);
    assert_eq!(status, 408, "{body}");
    let (status, _) = read_answer(&mut slow_head);
    assert_eq!(status, 408);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_body_over_the_limit_is_refused_with_413_unread() {
    let d = Dir::new("big");
    let path = d.0.join("api.sock");
    let _s = serve(&path, quick(), PeerPolicy::root_and_self());
    let (status, body) = send(&path, b"PUT /echo HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n");
    assert_eq!(status, 413, "{body}");
    // A client that writes the whole body before reading still sees the 413.
    let big = vec![b'x'; 2 << 20];
    let r = crate::api::client::request(&path, "PUT", "echo", &big, Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 413);
    // Exactly at the limit is fine.
    let at = vec![b'x'; 1 << 20];
    let r = crate::api::client::request(&path, "PUT", "echo", &at, Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn malformed_http_is_answered_400_and_chunked_411() {
    let d = Dir::new("bad");
    let path = d.0.join("api.sock");
    let _s = serve(&path, quick(), PeerPolicy::root_and_self());
    assert_eq!(send(&path, b"\x00\x01garbage\r\n\r\n").0, 400);
    assert_eq!(send(&path, b"PUT /echo HTTP/1.1\r\nContent-Length: lots\r\n\r\n").0, 400);
    assert_eq!(send(&path, b"PUT /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\nabcdef").0, 400);
    assert_eq!(send(&path, b"PUT /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").0, 411);
    let mut huge_head = b"GET /echo HTTP/1.1\r\n".to_vec();
    while huge_head.len() < 20_000 {
        huge_head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(send(&path, &huge_head).0, 431);
    let mut long_header = b"GET /echo HTTP/1.1\r\nX-Long: ".to_vec();
    long_header.resize(20_000, b'a');
    assert_eq!(send(&path, &long_header).0, 431);
}

#[test]
fn too_many_connections_get_503() {
    let d = Dir::new("many");
    let path = d.0.join("api.sock");
    let limits = Limits { max_connections: 2, deadline: Duration::from_secs(2), ..Limits::default() };
    let _s = serve(&path, limits, PeerPolicy::root_and_self());
    let _a = UnixStream::connect(&path).unwrap();
    let _b = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(send(&path, b"GET /echo HTTP/1.1\r\n\r\n").0, 503);
}

#[test]
fn stopping_the_server_removes_its_socket() {
    let d = Dir::new("stop");
    let path = d.0.join("api.sock");
    let s = serve(&path, quick(), PeerPolicy::root_and_self());
    drop(s);
    assert!(!path.exists());
}

#[test]
fn a_failed_thread_init_serves_nothing() {
    let d = Dir::new("init");
    let path = d.0.join("api.sock");
    let listener = bind(&path).unwrap();
    let e = Server::start(&path, listener, quick(), PeerPolicy::root_and_self(), echo(), || Err("no filter".into()))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("no filter"), "{e}");
    assert!(!path.exists());
}

#[test]
fn stopping_the_server_lets_an_answer_in_flight_reach_its_client() {
    let d = Dir::new("linger");
    let path = d.0.join("api.sock");
    let listener = bind(&path).unwrap();
    let slow: Arc<Handler> = Arc::new(|_| {
        std::thread::sleep(Duration::from_millis(200));
        Response::json(200, &serde_json::json!({ "late": true }))
    });
    let server = Server::start(&path, listener, quick(), PeerPolicy::root_and_self(), slow, || Ok(())).unwrap();
    let p = path.clone();
    let client = std::thread::spawn(move || send(&p, b"GET /slow HTTP/1.1\r\n\r\n"));
    std::thread::sleep(Duration::from_millis(50));
    drop(server);
    let (status, body) = client.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("late"), "{body}");
}
