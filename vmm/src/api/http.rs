//! HTTP/1.1 on the API's Unix socket, one request per connection, written
//! for a hostile local client:
//!
//! - the socket is created mode 0600 before it listens (never the umask's
//!   choice), and a directory made for it is 0700;
//! - every connection's peer is checked with SO_PEERCRED: root or this
//!   process's own uid, anyone else gets 403 (and a log line);
//! - each connection has its own thread and one deadline for the whole
//!   request (head and body), so a client that promises a body and stalls
//!   gets 408 and never holds up another client;
//! - a body above the limit is refused with 413 before it is read, a head
//!   above its limit with 431, and too many open connections with 503.
//!
//! `httparse` parses the head; everything else here is the policy above.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API socket {0} is in use by a running VMM")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it (remove it, or choose another --api-sock)")]
    NotASocket(PathBuf),
    #[error("cannot create the API socket's directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on API socket {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
}

/// What one connection may send, and how long it may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request body (`Content-Length`): above it, 413.
    pub max_body: usize,
    /// Largest request head (request line and headers): above it, 431.
    pub max_head: usize,
    /// The whole request must have arrived within this: else 408.
    pub deadline: Duration,
    /// Connections served at once: more are answered 503.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_body: 1 << 20, max_head: 16 << 10, deadline: Duration::from_secs(5), max_connections: 64 }
    }
}

/// Who may talk to the API: peers whose uid is in the list.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    pub uids: Vec<u32>,
}

impl PeerPolicy {
    /// Root and the uid this process runs as.
    pub fn root_and_self() -> PeerPolicy {
        let me = nix::unistd::geteuid().as_raw();
        PeerPolicy { uids: if me == 0 { vec![0] } else { vec![0, me] } }
    }

    pub fn allows(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }
}

/// The connecting process, from SO_PEERCRED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
}

/// One request, read whole.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path, no normalisation).
    pub url: String,
    pub body: Vec<u8>,
    pub peer: Peer,
}

/// The answer; `after` runs once it has been written (a shutdown that must
/// not race its own 204).
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub after: Option<Box<dyn FnOnce() + Send>>,
}

impl Response {
    pub fn json(status: u16, body: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: body.to_string().into_bytes(),
            after: None,
        }
    }

    pub fn error(status: u16, message: impl std::fmt::Display) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    pub fn empty(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new(), after: None }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    pub fn then(mut self, f: impl FnOnce() + Send + 'static) -> Response {
        self.after = Some(Box::new(f));
        self
    }
}

pub type Handler = dyn Fn(Request) -> Response + Send + Sync;

/// Binds `path` for the API: refuses a path held by a running VMM or by
/// anything but a socket, replaces a stale socket (nobody listening),
/// creates a missing directory 0700, and makes the socket 0600 before it
/// listens, whatever the umask.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    let listen_err = |reason: String| Error::Listen { path: path.to_owned(), reason };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|e| listen_err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => return Err(Error::NotASocket(path.to_owned())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e.to_string())),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        make_private_dir(dir)?;
    }
    let fd: OwnedFd = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| listen_err(e.to_string()))?;
    let addr = UnixAddr::new(path).map_err(|e| listen_err(e.to_string()))?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| listen_err(e.to_string()))?;
    // Nobody can connect before listen(), so the mode is right before the
    // first peer can try.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(listen_err(format!("cannot make the socket 0600: {e}")));
    }
    socket::listen(&fd, socket::Backlog::new(64).expect("64 is a valid backlog")).map_err(|e| {
        let _ = std::fs::remove_file(path);
        listen_err(e.to_string())
    })?;
    Ok(UnixListener::from(fd))
}

/// Creates the missing directories of `dir`; the ones created here are
/// 0700 (set explicitly: mkdir's mode is filtered by the umask). An
/// existing directory is left as it is.
fn make_private_dir(dir: &Path) -> Result<(), Error> {
    if dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
        make_private_dir(parent)?;
    }
    let err = |source| Error::Dir { path: dir.to_owned(), source };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// A running server: the accept thread and one thread per connection.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Connections being served.
    open: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` (bound at `path`) with `handler`. `init` runs
    /// first on the accept thread (the API's seccomp filter: the
    /// connection threads inherit it); if it fails, nothing is served.
    pub fn start(
        path: &Path,
        listener: UnixListener,
        limits: Limits,
        policy: PeerPolicy,
        handler: Arc<Handler>,
        init: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<Server, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let (s, o) = (stop.clone(), open.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let ok = init();
                let go = ok.is_ok();
                let _ = ready_tx.send(ok);
                if go {
                    accept_loop(listener, limits, policy, handler, s, o);
                }
            })
            .map_err(|e| Error::Listen { path: path.to_owned(), reason: e.to_string() })?;
        match ready_rx.recv().unwrap_or_else(|_| Err("the API thread died".into())) {
            Ok(()) => Ok(Server { path: path.to_owned(), stop, open, thread: Some(thread) }),
            Err(reason) => {
                let _ = thread.join();
                let _ = std::fs::remove_file(path);
                Err(Error::Listen { path: path.to_owned(), reason })
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept thread, which then sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        // Lets answers in flight reach their clients (a vm.migrate whose
        // outcome ends this VMM answers just as the process stops), within
        // a bound: a stalled client does not hold up the exit.
        let until = Instant::now() + LINGER;
        while self.open.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// How long stopping the server waits for connections still being served.
const LINGER: Duration = Duration::from_secs(1);

fn accept_loop(
    listener: UnixListener,
    limits: Limits,
    policy: PeerPolicy,
    handler: Arc<Handler>,
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("API: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("API: {} connections open; refusing another", limits.max_connections);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            write_response(&mut stream, Response::error(503, "too many API connections"));
            continue;
        }
        let (policy, handler, open) = (policy.clone(), handler.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
            serve_connection(stream, &limits, &policy, handler.as_ref());
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::error!("API: cannot start a connection thread: {e}");
        }
    }
}

/// Reads one request from `stream`, checks it, answers it, closes.
pub fn serve_connection(mut stream: UnixStream, limits: &Limits, policy: &PeerPolicy, handler: &Handler) {
    let _ = stream.set_write_timeout(Some(limits.deadline));
    let peer = match socket::getsockopt(&stream.as_fd(), sockopt::PeerCredentials) {
        Ok(c) => Peer { pid: c.pid(), uid: c.uid() },
        Err(e) => {
            tracing::warn!("API: cannot read the peer's credentials ({e}); refused");
            return write_response(&mut stream, Response::error(403, "peer credentials unavailable"));
        }
    };
    if !policy.allows(peer.uid) {
        tracing::warn!(
            "API: refused a connection from uid {} (pid {}): only uids {:?} may use it",
            peer.uid,
            peer.pid,
            policy.uids
        );
        return write_response(&mut stream, Response::error(403, format!("uid {} may not use this API", peer.uid)));
    }
    let response = match read_request(&mut stream, limits, peer) {
        Ok(request) => handler(request),
        Err(response) => response,
    };
    write_response(&mut stream, response);
}

/// The request, or the error response to send instead.
fn read_request(stream: &mut UnixStream, limits: &Limits, peer: Peer) -> Result<Request, Response> {
    let deadline = Instant::now() + limits.deadline;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, url, content_length) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let method = parsed.method.unwrap_or_default().to_owned();
                let url = parsed.path.unwrap_or_default().to_owned();
                let mut length = 0usize;
                for h in parsed.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(Response::error(411, "send the body with a Content-Length"));
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| Response::error(400, "malformed Content-Length"))?;
                    }
                }
                break (n, method, url, length);
            }
            Ok(httparse::Status::Partial) if buf.len() > limits.max_head => {
                return Err(Response::error(431, format!("request head over {} bytes", limits.max_head)));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(Response::error(431, "too many request headers")),
            Err(e) => return Err(Response::error(400, format!("malformed HTTP request: {e}"))),
        }
        match read_some(stream, &mut chunk, deadline) {
            Ok(0) => return Err(Response::error(400, "connection closed before the request was complete")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(r) => return Err(r),
        }
    };
    if content_length > limits.max_body {
        return Err(Response::error(413, format!("request body over {} bytes", limits.max_body)));
    }
    let mut body = buf.split_off(head_len);
    if body.len() > content_length {
        return Err(Response::error(400, "more bytes than Content-Length (one request per connection)"));
    }
    while body.len() < content_length {
        let want = (content_length - body.len()).min(chunk.len());
        match read_some(stream, &mut chunk[..want], deadline) {
            Ok(0) => return Err(Response::error(400, "connection closed before the body was complete")),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(r) => return Err(r),
        }
    }
    Ok(Request { method, url, body, peer })
}

/// One read, bounded by `deadline`; a timeout is answered 408.
fn read_some(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> Result<usize, Response> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Response::error(408, "the request did not arrive in time"));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(Response::error(400, format!("cannot read the request: {e}"))),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_response(stream: &mut UnixStream, mut response: Response) {
    let mut out = format!("HTTP/1.1 {} {}\r\nConnection: close\r\n", response.status, reason(response.status));
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", response.body.len()));
    // One write: an answer cut between its head and its body would read
    // as an empty error.
    let mut out = out.into_bytes();
    out.extend_from_slice(&response.body);
    let _ = stream.write_all(&out).and_then(|()| stream.flush());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    drain(stream);
    if let Some(after) = response.after.take() {
        after();
    }
}

/// Reads what the client still sends (a refused body), briefly and up to
/// a bound, so that closing does not reset a connection whose client is
/// still writing before it has read the answer.
fn drain(stream: &mut UnixStream) {
    let until = Instant::now() + Duration::from_millis(500);
    let mut left: usize = 8 << 20;
    let mut sink = [0u8; 16 << 10];
    while left > 0 {
        let wait = until.saturating_duration_since(Instant::now());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests;
