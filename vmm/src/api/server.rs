//! Serves the API on a Unix socket (tiny_http). Requests are answered from
//! a route table; each request gets its own thread, so one slow client (or
//! a migration, which answers only when it ends) never holds up another.
//! The lifecycle lock orders whatever they ask of the VM.

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

/// An API failure with its HTTP status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl std::fmt::Display) -> ApiError {
        ApiError { status: 400, message: message.to_string() }
    }
    pub fn conflict(message: impl std::fmt::Display) -> ApiError {
        ApiError { status: 409, message: message.to_string() }
    }
    pub fn failed(message: impl std::fmt::Display) -> ApiError {
        ApiError { status: 500, message: message.to_string() }
    }
}

impl From<vmm::Error> for ApiError {
    fn from(e: vmm::Error) -> ApiError {
        match e {
            vmm::Error::Lifecycle(_) => ApiError::conflict(e),
            other => ApiError::failed(other),
        }
    }
}

/// Migration, supplied by the binary (it lives in a crate above this one).
pub trait Migrator: Send + Sync {
    /// Runs the migration the request body describes; returns its figures.
    fn migrate(&self, vmm: Arc<Vmm>, body: &[u8]) -> Result<serde_json::Value, ApiError>;
    /// The running (or last) migration's progress.
    fn progress(&self) -> serde_json::Value;
    /// Asks the running migration to give up before its commit.
    fn cancel(&self) -> Result<(), ApiError>;
}

struct Ctx {
    vmm: Arc<Vmm>,
    migrator: Option<Arc<dyn Migrator>>,
}

type Handler = fn(Request, &Ctx);

struct Route {
    endpoint: &'static str,
    method: Method,
    handler: Handler,
}

/// Every endpoint: anything else is 404, a known endpoint with another
/// method 405.
fn routes() -> [Route; 11] {
    [
        Route { endpoint: "vmm.ping", method: Method::Get, handler: ping },
        Route { endpoint: "vm.info", method: Method::Get, handler: info },
        Route { endpoint: "vm.pause", method: Method::Put, handler: pause },
        Route { endpoint: "vm.resume", method: Method::Put, handler: resume },
        Route { endpoint: "vm.shutdown", method: Method::Put, handler: shutdown },
        Route { endpoint: "vm.console", method: Method::Put, handler: console },
        Route { endpoint: "vm.announce", method: Method::Put, handler: announce },
        Route { endpoint: "vm.snapshot", method: Method::Put, handler: snapshot },
        Route { endpoint: "vm.migrate", method: Method::Put, handler: migrate },
        Route { endpoint: "vm.migration", method: Method::Get, handler: migration },
        Route { endpoint: "vm.migration-cancel", method: Method::Put, handler: migration_cancel },
    ]
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
        let ctx = Arc::new(Ctx { vmm, migrator });
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for request in s.incoming_requests() {
                    let ctx = ctx.clone();
                    let spawned = std::thread::Builder::new().name("api-request".into()).spawn(move || {
                        dispatch(request, &ctx);
                    });
                    if let Err(e) = spawned {
                        tracing::error!("API: cannot start a request thread: {e}");
                    }
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

fn dispatch(request: Request, ctx: &Ctx) {
    let url = request.url().to_owned();
    let endpoint = url.strip_prefix(API_PREFIX).and_then(|p| p.strip_prefix('/')).unwrap_or("");
    let routes = routes();
    let method = request.method().clone();
    if let Some(route) = routes.iter().find(|r| r.endpoint == endpoint && r.method == method) {
        return (route.handler)(request, ctx);
    }
    let allowed: Vec<String> = routes.iter().filter(|r| r.endpoint == endpoint).map(|r| r.method.to_string()).collect();
    if allowed.is_empty() {
        error(request, ApiError { status: 404, message: format!("no such endpoint {url}") });
    } else {
        let message = format!("{method} not allowed on {url} (use {})", allowed.join(", "));
        let body = serde_json::json!({ "error": message }).to_string();
        let allow = Header::from_bytes("Allow", allowed.join(", ")).expect("method names are header-safe");
        let _ = request
            .respond(Response::from_string(body).with_status_code(405).with_header(json_header()).with_header(allow));
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

fn error(request: Request, e: ApiError) {
    reply(request, e.status, serde_json::json!({ "error": e.message }));
}

fn respond(request: Request, result: Result<serde_json::Value, ApiError>) {
    match result {
        Ok(v) => reply(request, 200, v),
        Err(e) => error(request, e),
    }
}

fn read_body(request: &mut Request) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
    Ok(body)
}

fn ping(request: Request, _: &Ctx) {
    reply(request, 200, serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() }))
}

fn info(request: Request, ctx: &Ctx) {
    respond(request, serde_json::to_value(ctx.vmm.info()).map_err(ApiError::failed))
}

fn pause(request: Request, ctx: &Ctx) {
    match ctx.vmm.pause() {
        Ok(()) => no_content(request),
        Err(e) => error(request, e.into()),
    }
}

fn resume(request: Request, ctx: &Ctx) {
    match ctx.vmm.resume() {
        Ok(()) => no_content(request),
        Err(e) => error(request, e.into()),
    }
}

fn shutdown(request: Request, ctx: &Ctx) {
    match ctx.vmm.request_shutdown() {
        Ok(()) => {
            // Answer first: the main loop's stop ends the process.
            no_content(request);
            let _ = ctx.vmm.events().send(VmEvent::Exit(ExitReason::Api));
        }
        Err(e) => error(request, e.into()),
    }
}

fn console(mut request: Request, ctx: &Ctx) {
    let body = match read_body(&mut request) {
        Ok(b) => b,
        Err(e) => return error(request, e),
    };
    let queued = ctx.vmm.console_input(&body);
    reply(request, 200, serde_json::json!({ "queued": queued, "dropped": body.len() - queued }))
}

fn announce(request: Request, ctx: &Ctx) {
    respond(request, ctx.vmm.announce().map(|n| serde_json::json!({ "announced_on": n })).map_err(ApiError::from))
}

fn snapshot(mut request: Request, ctx: &Ctx) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        dir: PathBuf,
    }
    let body = read_body(&mut request).and_then(|b| {
        serde_json::from_slice::<Body>(&b)
            .map_err(|e| ApiError::bad_request(format!("vm.snapshot needs a JSON body {{\"dir\": \"/path\"}}: {e}")))
    });
    let result = body.and_then(|b| {
        let report = ctx.vmm.snapshot(&b.dir)?;
        serde_json::to_value(report).map_err(ApiError::failed)
    });
    respond(request, result)
}

fn migrate(mut request: Request, ctx: &Ctx) {
    let Some(migrator) = ctx.migrator.clone() else {
        return error(request, ApiError { status: 501, message: "this VMM cannot migrate".into() });
    };
    let body = match read_body(&mut request) {
        Ok(b) => b,
        Err(e) => return error(request, e),
    };
    // This request's thread waits for the whole migration; progress and
    // other requests are served meanwhile on theirs.
    let result = migrator.migrate(ctx.vmm.clone(), &body);
    let moved = result.as_ref().is_ok_and(|f| f.get("mode").and_then(|m| m.as_str()) != Some("check-only"));
    let to = result.as_ref().ok().and_then(|f| f.get("destination")?.as_str().map(str::to_owned));
    respond(request, result);
    if moved {
        let _ = ctx.vmm.events().send(VmEvent::Exit(ExitReason::Migrated(to.unwrap_or_else(|| "?".into()))));
    }
}

fn migration(request: Request, ctx: &Ctx) {
    match &ctx.migrator {
        Some(m) => reply(request, 200, m.progress()),
        None => error(request, ApiError { status: 501, message: "this VMM cannot migrate".into() }),
    }
}

fn migration_cancel(request: Request, ctx: &Ctx) {
    match ctx.migrator.as_ref().map(|m| m.cancel()) {
        Some(Ok(())) => no_content(request),
        Some(Err(e)) => error(request, e),
        None => error(request, ApiError { status: 501, message: "this VMM cannot migrate".into() }),
    }
}
