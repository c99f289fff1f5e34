//! [`Store`]: etcd, reached through a list of member endpoints, every call
//! bounded in time.
//!
//! etcd-client's own balanced channel keeps sending requests to a member
//! that is gone, so the store holds one client per endpoint and picks the
//! member itself: it sticks to the last member that answered, and moves to
//! the next one when a call fails in a way that proves the request was not
//! processed (connection refused, "no leader"). Clients are built with
//! etcd's require-leader flag, so a member cut off from the quorum refuses
//! at once instead of hanging until the deadline.
//!
//! Reads are retried across members until the operation deadline. A write
//! that was sent and then timed out or lost its connection is reported as
//! [`Error::OutcomeUnknown`] and not retried: etcd may still apply it
//! later. Callers make writes conditional (transactions comparing
//! revisions or values) or idempotent, and read back after an unknown
//! outcome.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, Txn, TxnResponse};
use tokio::time::Instant;

use crate::error::{Error, Failure, Result};

/// Timeouts of a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Member client URLs, e.g. `http://10.200.77.1:2379`.
    pub endpoints: Vec<String>,
    /// One attempt on one member.
    pub request_timeout: Duration,
    /// One operation, all attempts on all members together.
    pub op_timeout: Duration,
    /// Establishing a TCP connection to a member.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive: a silent connection (a cut link) is declared dead
    /// after `keepalive_interval + keepalive_timeout`.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl StoreConfig {
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> StoreConfig {
        StoreConfig {
            endpoints: endpoints.iter().map(|e| normalise_endpoint(e.as_ref())).collect(),
            request_timeout: Duration::from_secs(2),
            op_timeout: Duration::from_secs(6),
            connect_timeout: Duration::from_millis(500),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
        }
    }

    /// Parses `URL,URL,...` (a bare `host:port` gets `http://`).
    pub fn parse_list(list: &str) -> StoreConfig {
        let eps: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        StoreConfig::new(&eps)
    }
}

fn normalise_endpoint(e: &str) -> String {
    if e.starts_with("http://") || e.starts_with("https://") {
        e.to_owned()
    } else {
        format!("http://{e}")
    }
}

/// What an operation does if it fails after being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Reads (and lease grants, whose stray result only expires): retried
    /// on another member.
    Read,
    /// Writes: an attempt that may have been applied ends the operation
    /// with [`Error::OutcomeUnknown`].
    Write,
}

/// How one failed attempt is treated.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The member surely did not process it: try the next one.
    NotSent,
    /// It may have been processed.
    Unknown,
    /// etcd refused it; retrying will not help.
    Refused,
}

fn classify(e: &etcd_client::Error) -> Class {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unavailable if s.message().contains("no leader") => Class::NotSent,
            Code::Unavailable | Code::Unknown if is_connect_error(e) => Class::NotSent,
            Code::ResourceExhausted => Class::NotSent,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted => {
                Class::Unknown
            }
            _ => Class::Refused,
        },
        etcd_client::Error::TransportError(_) if is_connect_error(e) => Class::NotSent,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => Class::Unknown,
        _ => Class::Refused,
    }
}

/// True if `e` says the TCP connection could not be made (so nothing was
/// sent): ECONNREFUSED and friends, or the connect timeout.
fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(io.kind(), ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable) {
                return true;
            }
        }
        let text = err.to_string();
        if text.contains("tcp connect error") || text.contains("error trying to connect") {
            return true;
        }
        cur = err.source();
    }
    false
}

struct Member {
    url: String,
    client: Client,
}

struct Inner {
    members: Vec<Member>,
    /// The member tried first: the last one that answered.
    preferred: AtomicUsize,
    cfg: StoreConfig,
}

/// etcd, through all its members. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// A key and its value, with etcd's metadata.
#[derive(Clone, Debug)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

impl Kv {
    pub(crate) fn from_etcd(kv: &etcd_client::KeyValue) -> Kv {
        Kv {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }
}

/// The keys under a prefix, at one revision.
#[derive(Clone, Debug)]
pub struct Listing {
    pub kvs: Vec<Kv>,
    /// The store's revision the listing was taken at: watch from
    /// `revision + 1` to miss nothing.
    pub revision: i64,
}

/// One member's health, as `status` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberStatus {
    pub endpoint: String,
    pub ok: bool,
    pub member_id: Option<String>,
    pub is_leader: bool,
    pub version: Option<String>,
    pub raft_term: Option<u64>,
    pub error: Option<String>,
}

impl Store {
    /// Builds a client per endpoint and waits (at most `op_timeout`) until
    /// one member answers.
    pub async fn connect(cfg: StoreConfig) -> Result<Store> {
        if cfg.endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(cfg.connect_timeout)
            .with_timeout(cfg.request_timeout)
            .with_keep_alive(cfg.keepalive_interval, cfg.keepalive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let mut members = vec![];
        for url in &cfg.endpoints {
            let client = Client::connect([url.as_str()], Some(opts.clone()))
                .await
                .map_err(|source| Error::BadEndpoint { endpoint: url.clone(), source })?;
            members.push(Member { url: url.clone(), client });
        }
        let store = Store { inner: Arc::new(Inner { members, preferred: AtomicUsize::new(0), cfg }) };
        store.call("connect", Effect::Read, |mut c| async move { c.status().await.map(|_| ()) }).await?;
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// The endpoint tried first next time.
    pub fn preferred_endpoint(&self) -> &str {
        let i = self.inner.preferred.load(Ordering::Relaxed) % self.inner.members.len();
        &self.inner.members[i].url
    }

    /// Index of the member to try first, and the member after `i`.
    pub(crate) fn preferred_index(&self) -> usize {
        self.inner.preferred.load(Ordering::Relaxed) % self.inner.members.len()
    }

    pub(crate) fn member_count(&self) -> usize {
        self.inner.members.len()
    }

    pub(crate) fn member(&self, i: usize) -> (&str, Client) {
        let m = &self.inner.members[i % self.inner.members.len()];
        (&m.url, m.client.clone())
    }

    /// Notes that member `i` failed: the next call starts after it.
    pub(crate) fn demote(&self, i: usize) {
        let n = self.inner.members.len();
        let _ = self.inner.preferred.compare_exchange(i % n, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn prefer(&self, i: usize) {
        self.inner.preferred.store(i % self.inner.members.len(), Ordering::Relaxed);
    }

    /// Runs `f` against members in turn until one answers, within the
    /// operation deadline; see the module doc for what is retried.
    pub async fn call<T, F, Fut>(&self, op: &'static str, effect: Effect, mut f: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let cfg = &self.inner.cfg;
        let n = self.inner.members.len();
        let start = Instant::now();
        let deadline = start + cfg.op_timeout;
        let first = self.preferred_index();
        let mut last: Option<(String, Failure)> = None;
        for attempt in 0usize.. {
            let i = (first + attempt) % n;
            if attempt > 0 && attempt % n == 0 {
                // Every member failed once: give an election a moment.
                let nap = Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(nap).await;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let (url, client) = self.member(i);
            let limit = cfg.request_timeout.min(remaining);
            let mut in_flight = InFlight { store: self, member: i, armed: true };
            let outcome = tokio::time::timeout(limit, f(client)).await;
            in_flight.armed = false;
            let failure = match outcome {
                Ok(Ok(v)) => {
                    if attempt > 0 {
                        tracing::debug!("etcd {op}: answered by {url} after {attempt} failed attempts");
                    }
                    self.prefer(i);
                    return Ok(v);
                }
                Ok(Err(e)) => match classify(&e) {
                    Class::Refused => return Err(Error::Etcd { op, endpoint: url.to_owned(), source: e }),
                    Class::NotSent => Failure::Client(e),
                    Class::Unknown => {
                        self.demote(i);
                        if effect == Effect::Write {
                            return Err(Error::OutcomeUnknown {
                                op,
                                endpoint: url.to_owned(),
                                cause: Failure::Client(e),
                            });
                        }
                        Failure::Client(e)
                    }
                },
                Err(_) => {
                    self.demote(i);
                    if effect == Effect::Write {
                        return Err(Error::OutcomeUnknown {
                            op,
                            endpoint: url.to_owned(),
                            cause: Failure::Timeout(limit),
                        });
                    }
                    Failure::Timeout(limit)
                }
            };
            tracing::debug!("etcd {op}: {url} failed: {failure}; trying the next member");
            last = Some((url.to_owned(), failure));
        }
        let (endpoint, last) = last.unwrap_or_else(|| (String::new(), Failure::Timeout(cfg.op_timeout)));
        Err(Error::Unavailable { op, after: start.elapsed(), endpoint, last })
    }

    /// The name of the etcd member that leads the raft group now (what an
    /// etcd leader change costs: it refreshes every lease's TTL), if the
    /// member answering knows one.
    pub async fn etcd_leader(&self) -> Result<Option<String>> {
        self.call("status", Effect::Read, |mut c| async move {
            let leader = c.status().await?.leader();
            let members = c.member_list().await?;
            Ok(members.members().iter().find(|m| m.id() == leader && leader != 0).map(|m| m.name().to_owned()))
        })
        .await
    }

    /// The key's value, or None.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>> {
        self.call("get", Effect::Read, |mut c| async move {
            let r = c.get(key, None).await?;
            Ok(r.kvs().first().map(Kv::from_etcd))
        })
        .await
    }

    /// Every key under `prefix`, in key order, with the revision read at.
    pub async fn list(&self, prefix: &str) -> Result<Listing> {
        self.call("list", Effect::Read, |mut c| async move {
            let r = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
            let revision = r.header().map_or(0, |h| h.revision());
            Ok(Listing { kvs: r.kvs().iter().map(Kv::from_etcd).collect(), revision })
        })
        .await
    }

    /// An unconditional put (idempotent: repeating it changes nothing but
    /// the revision); returns the revision it made.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<i64> {
        self.call("put", Effect::Write, |mut c| {
            let value = value.clone();
            async move {
                let opts = lease.map(|l| PutOptions::new().with_lease(l));
                let r = c.put(key, value, opts).await?;
                Ok(r.header().map_or(0, |h| h.revision()))
            }
        })
        .await
    }

    /// Deletes a key (idempotent); returns how many keys it deleted.
    pub async fn delete(&self, key: &str) -> Result<i64> {
        self.call("delete", Effect::Write, |mut c| async move { Ok(c.delete(key, None).await?.deleted()) }).await
    }

    /// A transaction. Make it conditional: after [`Error::OutcomeUnknown`]
    /// it may have been applied.
    pub async fn txn(&self, op: &'static str, txn: Txn) -> Result<TxnResponse> {
        self.call(op, Effect::Write, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1); returns its id
    /// and the TTL etcd granted. Retried like a read: a grant whose answer
    /// was lost leaves a lease nobody renews, which expires by itself.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration)> {
        let secs = ttl.as_secs().max(1) as i64;
        self.call("lease grant", Effect::Read, |mut c| async move {
            let r = c.lease_grant(secs, None).await?;
            Ok((r.id(), Duration::from_secs(r.ttl().max(0) as u64)))
        })
        .await
    }

    /// Revokes a lease (its keys go at once). A lease already gone is fine.
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        let r =
            self.call("lease revoke", Effect::Write, |mut c| async move { c.lease_revoke(lease).await.map(|_| ()) });
        match r.await {
            Err(Error::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }) if s.code() == tonic::Code::NotFound => {
                Ok(())
            }
            r => r,
        }
    }

    /// The remaining TTL of a lease as etcd sees it; None if it is gone.
    pub async fn lease_ttl(&self, lease: i64) -> Result<Option<Duration>> {
        self.call("lease ttl", Effect::Read, |mut c| async move {
            let r = c.lease_time_to_live(lease, None).await?;
            Ok((r.ttl() > 0).then(|| Duration::from_secs(r.ttl() as u64)))
        })
        .await
    }

    /// Every member's status, each asked directly (bounded by the request
    /// timeout), not through the retry logic.
    pub async fn members(&self) -> Vec<MemberStatus> {
        let mut out = vec![];
        for m in &self.inner.members {
            let mut c = m.client.clone();
            let r = tokio::time::timeout(self.inner.cfg.request_timeout, c.status()).await;
            out.push(match r {
                Ok(Ok(s)) => {
                    let id = s.header().map(|h| h.member_id());
                    MemberStatus {
                        endpoint: m.url.clone(),
                        ok: true,
                        member_id: id.map(|i| format!("{i:x}")),
                        is_leader: id.is_some_and(|i| i == s.leader()),
                        version: Some(s.version().to_owned()),
                        raft_term: Some(s.raft_term()),
                        error: None,
                    }
                }
                Ok(Err(e)) => MemberStatus::failed(&m.url, e.to_string()),
                Err(_) => {
                    MemberStatus::failed(&m.url, format!("no answer within {:?}", self.inner.cfg.request_timeout))
                }
            });
        }
        out
    }
}

impl MemberStatus {
    fn failed(endpoint: &str, error: String) -> MemberStatus {
        MemberStatus {
            endpoint: endpoint.to_owned(),
            ok: false,
            member_id: None,
            is_leader: false,
            version: None,
            raft_term: None,
            error: Some(error),
        }
    }
}

/// Demotes its member if dropped armed: a call cancelled from outside (a
/// caller's own, shorter timeout) must still move the next call off a member
/// that did not answer, or every retry would wait on the same dead member.
struct InFlight<'a> {
    store: &'a Store,
    member: usize,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.store.demote(self.member);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let c = StoreConfig::parse_list("10.0.0.1:2379, http://10.0.0.2:2379,,");
        assert_eq!(c.endpoints, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert!(c.request_timeout < c.op_timeout);
    }

    #[test]
    fn failures_are_classified() {
        let status = |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        assert_eq!(classify(&status(tonic::Code::Unavailable, "etcdserver: no leader")), Class::NotSent);
        assert_eq!(classify(&status(tonic::Code::Unavailable, "etcdserver: request timed out")), Class::Unknown);
        assert_eq!(classify(&status(tonic::Code::Unavailable, "etcdserver: leader changed")), Class::Unknown);
        assert_eq!(
            classify(&status(
                tonic::Code::Unavailable,
                "error trying to connect: tcp connect error: Connection refused"
            )),
            Class::NotSent
        );
        assert_eq!(classify(&status(tonic::Code::Cancelled, "Timeout expired")), Class::Unknown);
        assert_eq!(classify(&status(tonic::Code::InvalidArgument, "etcdserver: key is not provided")), Class::Refused);
        assert_eq!(classify(&status(tonic::Code::NotFound, "etcdserver: requested lease not found")), Class::Refused);
        let io = etcd_client::Error::IoError(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), Class::Unknown);
    }
}
