//! Serves the API on a Unix socket ([`super::http`]: one thread per
//! connection, peer credentials checked, bounded requests). Requests are
//! answered from a route table, so one slow client (or a migration, which
//! answers only when it ends) never holds up another. The lifecycle lock
//! orders whatever they ask of the VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::http::{self, Limits, PeerPolicy, Request, Response};
use super::API_PREFIX;
use crate::vmm::{self, Vmm};
use crate::vstate::{ExitReason, VmEvent};

pub use super::http::Error;

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
            vmm::Error::Lifecycle(_) | vmm::Error::Held(_) => ApiError::conflict(e),
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

type Handler = fn(Request, &Ctx) -> Response;

struct Route {
    endpoint: &'static str,
    method: &'static str,
    handler: Handler,
}

/// Every endpoint: anything else is 404, a known endpoint with another
/// method 405.
fn routes() -> [Route; 11] {
    [
        Route { endpoint: "vmm.ping", method: "GET", handler: ping },
        Route { endpoint: "vm.info", method: "GET", handler: info },
        Route { endpoint: "vm.pause", method: "PUT", handler: pause },
        Route { endpoint: "vm.resume", method: "PUT", handler: resume },
        Route { endpoint: "vm.shutdown", method: "PUT", handler: shutdown },
        Route { endpoint: "vm.console", method: "PUT", handler: console },
        Route { endpoint: "vm.announce", method: "PUT", handler: announce },
        Route { endpoint: "vm.snapshot", method: "PUT", handler: snapshot },
        Route { endpoint: "vm.migrate", method: "PUT", handler: migrate },
        Route { endpoint: "vm.migration", method: "GET", handler: migration },
        Route { endpoint: "vm.migration-cancel", method: "PUT", handler: migration_cancel },
    ]
}

pub struct ApiServer {
    _server: http::Server,
}

impl ApiServer {
    /// Binds `path` (see [`http::bind`]: a stale socket is replaced,
    /// anything else at the path refused) and serves `vmm` to root and
    /// this process's uid.
    pub fn start(path: &Path, vmm: Arc<Vmm>, migrator: Option<Arc<dyn Migrator>>) -> Result<ApiServer, Error> {
        let listener = http::bind(path)?;
        let ctx = Ctx { vmm, migrator };
        let handler: Arc<http::Handler> = Arc::new(move |request| {
            // A connection thread: started by the API thread, under its filter.
            crate::seccomp::inherited(crate::seccomp::ThreadKind::Api);
            dispatch(request, &ctx)
        });
        let confine = || crate::seccomp::apply(crate::seccomp::ThreadKind::Api).map_err(|e| e.to_string());
        let server =
            http::Server::start(path, listener, Limits::default(), PeerPolicy::root_and_self(), handler, confine)?;
        Ok(ApiServer { _server: server })
    }
}

fn dispatch(request: Request, ctx: &Ctx) -> Response {
    let url = request.url.clone();
    let endpoint = url.strip_prefix(API_PREFIX).and_then(|p| p.strip_prefix('/')).unwrap_or("");
    let routes = routes();
    if let Some(route) = routes.iter().find(|r| r.endpoint == endpoint && r.method == request.method) {
        return (route.handler)(request, ctx);
    }
    let allowed: Vec<&str> = routes.iter().filter(|r| r.endpoint == endpoint).map(|r| r.method).collect();
    if allowed.is_empty() {
        Response::error(404, format!("no such endpoint {url}"))
    } else {
        let message = format!("{} not allowed on {url} (use {})", request.method, allowed.join(", "));
        Response::error(405, message).with_header("Allow", allowed.join(", "))
    }
}

fn error(e: ApiError) -> Response {
    Response::error(e.status, e.message)
}

fn respond(result: Result<serde_json::Value, ApiError>) -> Response {
    match result {
        Ok(v) => Response::json(200, &v),
        Err(e) => error(e),
    }
}

fn ping(_: Request, _: &Ctx) -> Response {
    Response::json(200, &serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() }))
}

fn info(_: Request, ctx: &Ctx) -> Response {
    respond(serde_json::to_value(ctx.vmm.info()).map_err(ApiError::failed))
}

fn pause(_: Request, ctx: &Ctx) -> Response {
    match ctx.vmm.pause() {
        Ok(()) => Response::empty(204),
        Err(e) => error(e.into()),
    }
}

fn resume(_: Request, ctx: &Ctx) -> Response {
    match ctx.vmm.resume() {
        Ok(()) => Response::empty(204),
        Err(e) => error(e.into()),
    }
}

fn shutdown(_: Request, ctx: &Ctx) -> Response {
    match ctx.vmm.request_shutdown() {
        Ok(()) => {
            // Answer first: the main loop's stop ends the process.
            let events = ctx.vmm.events();
            Response::empty(204).then(move || {
                let _ = events.send(VmEvent::Exit(ExitReason::Api));
            })
        }
        Err(e) => error(e.into()),
    }
}

fn console(request: Request, ctx: &Ctx) -> Response {
    let queued = ctx.vmm.console_input(&request.body);
    Response::json(200, &serde_json::json!({ "queued": queued, "dropped": request.body.len() - queued }))
}

fn announce(_: Request, ctx: &Ctx) -> Response {
    respond(ctx.vmm.announce().map(|n| serde_json::json!({ "announced_on": n })).map_err(ApiError::from))
}

fn snapshot(request: Request, ctx: &Ctx) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        dir: PathBuf,
    }
    let body = serde_json::from_slice::<Body>(&request.body)
        .map_err(|e| ApiError::bad_request(format!("vm.snapshot needs a JSON body {{\"dir\": \"/path\"}}: {e}")));
    respond(body.and_then(|b| {
        let report = ctx.vmm.snapshot(&b.dir)?;
        serde_json::to_value(report).map_err(ApiError::failed)
    }))
}

fn migrate(request: Request, ctx: &Ctx) -> Response {
    let Some(migrator) = ctx.migrator.clone() else {
        return error(ApiError { status: 501, message: "this VMM cannot migrate".into() });
    };
    // This request's thread waits for the whole migration; progress and
    // other requests are served meanwhile on theirs.
    let result = migrator.migrate(ctx.vmm.clone(), &request.body);
    let moved = result.as_ref().is_ok_and(|f| f.get("mode").and_then(|m| m.as_str()) != Some("check-only"));
    let to = result.as_ref().ok().and_then(|f| f.get("destination")?.as_str().map(str::to_owned));
    let response = respond(result);
    if moved {
        let events = ctx.vmm.events();
        response.then(move || {
            let _ = events.send(VmEvent::Exit(ExitReason::Migrated(to.unwrap_or_else(|| "?".into()))));
        })
    } else {
        response
    }
}

fn migration(_: Request, ctx: &Ctx) -> Response {
    match &ctx.migrator {
        Some(m) => Response::json(200, &m.progress()),
        None => error(ApiError { status: 501, message: "this VMM cannot migrate".into() }),
    }
}

fn migration_cancel(_: Request, ctx: &Ctx) -> Response {
    match ctx.migrator.as_ref().map(|m| m.cancel()) {
        Some(Ok(())) => Response::empty(204),
        Some(Err(e)) => error(e),
        None => error(ApiError { status: 501, message: "this VMM cannot migrate".into() }),
    }
}
