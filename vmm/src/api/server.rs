//! Serves the API on a Unix socket from one thread (tiny_http).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tiny_http::{Header, Method, Request, Response, Server};

use super::API_PREFIX;
use crate::vmm::{self, Vmm};
use crate::vstate::{ExitReason, VmEvent};

/// Largest request body accepted (console input is small).
const MAX_BODY: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API socket {0} is in use by a running VMM")]
    InUse(PathBuf),
    #[error("cannot listen on API socket {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
}

/// Migration, supplied by the binary (it lives in a crate above this one).
pub trait Migrator: Send + Sync {
    /// Runs a migration described by the request body; returns the figures.
    fn migrate(&self, vmm: &Arc<Vmm>, body: &serde_json::Value) -> Result<serde_json::Value, String>;
    /// The running (or last) migration's progress.
    fn progress(&self) -> serde_json::Value;
}

pub struct ApiServer {
    server: Arc<Server>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file) and serves `vmm`.
    pub fn start(path: &Path, vmm: Arc<Vmm>, migrator: Option<Arc<dyn Migrator>>) -> Result<ApiServer, Error> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let server =
            Server::http_unix(path).map_err(|e| Error::Listen { path: path.to_owned(), reason: e.to_string() })?;
        let server = Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for request in s.incoming_requests() {
                    handle(request, &vmm, migrator.as_ref());
                }
            })
            .map_err(|e| Error::Listen { path: path.to_owned(), reason: e.to_string() })?;
        Ok(ApiServer { server, path: path.to_owned(), thread: Some(thread) })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn json_header() -> Header {
    Header::from_bytes("Content-Type", "application/json").expect("static header")
}

fn reply(request: Request, status: u16, body: serde_json::Value) {
    let response = Response::from_string(body.to_string()).with_status_code(status).with_header(json_header());
    let _ = request.respond(response);
}

fn no_content(request: Request) {
    let _ = request.respond(Response::empty(204));
}

fn error(request: Request, status: u16, message: impl std::fmt::Display) {
    reply(request, status, serde_json::json!({ "error": message.to_string() }));
}

fn read_json(request: &mut Request) -> Result<serde_json::Value, String> {
    let mut body = Vec::new();
    request.as_reader().take(MAX_BODY).read_to_end(&mut body).map_err(|e| format!("cannot read request body: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("request body is not JSON: {e}"))
}

fn handle(mut request: Request, vmm: &Arc<Vmm>, migrator: Option<&Arc<dyn Migrator>>) {
    let url = request.url().to_owned();
    let Some(endpoint) = url.strip_prefix(API_PREFIX).and_then(|p| p.strip_prefix('/')) else {
        return error(request, 404, format!("no such endpoint {url}"));
    };
    let method = request.method().clone();
    match (endpoint, method) {
        ("vmm.ping", Method::Get) => {
            reply(request, 200, serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() }))
        }
        ("vm.info", Method::Get) => match serde_json::to_value(vmm.info()) {
            Ok(v) => reply(request, 200, v),
            Err(e) => error(request, 500, e),
        },
        ("vm.pause", Method::Put) => match vmm.check_api_control().and_then(|()| vmm.pause()) {
            Ok(()) => no_content(request),
            Err(e @ (vmm::Error::State(_) | vmm::Error::NotPaused | vmm::Error::Migrating | vmm::Error::Retired)) => {
                error(request, 409, e)
            }
            Err(e) => error(request, 500, e),
        },
        ("vm.resume", Method::Put) => match vmm.check_api_control().and_then(|()| vmm.resume()) {
            Ok(()) => no_content(request),
            Err(e @ (vmm::Error::State(_) | vmm::Error::NotPaused | vmm::Error::Migrating | vmm::Error::Retired)) => {
                error(request, 409, e)
            }
            Err(e) => error(request, 500, e),
        },
        ("vm.shutdown", Method::Put) => {
            no_content(request);
            let _ = vmm.events().send(VmEvent::Exit(ExitReason::Api));
        }
        ("vm.console", Method::Put) => {
            let mut body = Vec::new();
            if let Err(e) = request.as_reader().take(MAX_BODY).read_to_end(&mut body) {
                return error(request, 400, format!("cannot read request body: {e}"));
            }
            let queued = vmm.console_input(&body);
            reply(request, 200, serde_json::json!({ "queued": queued, "dropped": body.len() - queued }))
        }
        ("vm.migrate", Method::Put) => {
            let body = match read_json(&mut request) {
                Ok(b) => b,
                Err(e) => return error(request, 400, e),
            };
            let Some(migrator) = migrator.cloned() else { return error(request, 501, "this VMM cannot migrate") };
            // Its own thread: the server keeps answering (progress) meanwhile.
            let vmm = vmm.clone();
            std::thread::spawn(move || match migrator.migrate(&vmm, &body) {
                Ok(figures) => {
                    let moved = figures.get("mode").and_then(|m| m.as_str()) != Some("check-only");
                    let to = body.get("to").and_then(|t| t.as_str()).unwrap_or("?").to_owned();
                    reply(request, 200, figures);
                    if moved {
                        let _ = vmm.events().send(VmEvent::Exit(ExitReason::Migrated(to)));
                    }
                }
                Err(e) => error(request, 500, e),
            });
        }
        ("vm.migration", Method::Get) => match migrator {
            Some(m) => reply(request, 200, m.progress()),
            None => error(request, 501, "this VMM cannot migrate"),
        },
        ("vm.snapshot", Method::Put) => {
            let dir =
                read_json(&mut request).ok().and_then(|v| v.get("dir").and_then(|d| d.as_str()).map(PathBuf::from));
            let Some(dir) = dir else {
                return error(request, 400, "vm.snapshot needs a JSON body {\"dir\": \"/path\"}");
            };
            match vmm.check_api_control().and_then(|()| vmm.snapshot(&dir)) {
                Ok(report) => reply(request, 200, serde_json::to_value(report).unwrap_or_default()),
                Err(e) => error(request, 500, e),
            }
        }
        ("vm.announce", Method::Put) => match vmm.announce() {
            Ok(n) => reply(request, 200, serde_json::json!({ "announced_on": n })),
            Err(e) => error(request, 500, e),
        },
        (
            "vmm.ping" | "vm.info" | "vm.pause" | "vm.resume" | "vm.shutdown" | "vm.console" | "vm.announce"
            | "vm.snapshot" | "vm.migrate",
            m,
        ) => error(request, 405, format!("{m} not allowed on {url}")),
        _ => error(request, 404, format!("no such endpoint {url}")),
    }
}
