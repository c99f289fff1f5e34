//! [`Lease`]: an etcd lease kept alive by a background task, which knows
//! until when the lease is surely still valid.
//!
//! `valid_until` is measured from the moment a renewal was *sent* (plus the
//! TTL etcd answered with), so it is never later than etcd's own expiry:
//! a holder that stops acting before `valid_until` (minus its margin) has
//! stopped before anyone else can see the lease gone. (etcd may keep a
//! lease longer than that: a new etcd leader refreshes every TTL.)
//!
//! The lease counts as lost when etcd says it is gone (a renewal answered
//! with TTL 0), or when `valid_until` passes without a renewal (no member
//! reachable: it must be assumed gone). Lost is final.

use std::fmt;
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::store::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// etcd answered that the lease no longer exists.
    Expired,
    /// No renewal succeeded before the lease's time ran out.
    Unrenewed,
    /// Revoked by its holder.
    Revoked,
    /// Renewals were stopped on purpose ([`Lease::stop_keepalive`]) and
    /// the TTL has run out.
    Abandoned,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "etcd says it expired",
            LostReason::Unrenewed => "no renewal reached etcd before its TTL ran out",
            LostReason::Revoked => "revoked",
            LostReason::Abandoned => "renewals were stopped and its TTL ran out",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Surely valid until then.
    Held {
        valid_until: Instant,
    },
    Lost(LostReason),
}

/// A lease with its keepalive task. Dropping it stops renewals (the lease
/// then expires after its TTL); [`Lease::revoke`] ends it at once.
pub struct Lease {
    id: i64,
    ttl: Duration,
    state: watch::Receiver<LeaseState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    store: Store,
}

impl Lease {
    /// Grants a lease of `ttl` and starts renewing it every `ttl / 3`.
    pub async fn grant(store: &Store, ttl: Duration) -> Result<Lease> {
        let sent = Instant::now();
        let (id, granted) = store.grant(ttl).await?;
        let valid_until = sent + granted;
        let (state_tx, state) = watch::channel(LeaseState::Held { valid_until });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(keepalive(store.clone(), id, granted, valid_until, state_tx, stop_rx));
        tracing::debug!("lease {id:x} granted, TTL {granted:?}");
        Ok(Lease { id, ttl: granted, state, stop, task, store: store.clone() })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Until when the lease is surely valid; None once lost.
    pub fn valid_until(&self) -> Option<Instant> {
        match self.state() {
            LeaseState::Held { valid_until } => Some(valid_until),
            LeaseState::Lost(_) => None,
        }
    }

    pub fn is_held(&self) -> bool {
        self.valid_until().is_some_and(|t| t > Instant::now())
    }

    /// Fails with [`Error::LeaseLost`] unless the lease is held.
    pub fn check(&self) -> Result<()> {
        match self.state() {
            LeaseState::Held { valid_until } if valid_until > Instant::now() => Ok(()),
            LeaseState::Held { .. } => Err(Error::LeaseLost { lease: self.id, reason: LostReason::Unrenewed }),
            LeaseState::Lost(reason) => Err(Error::LeaseLost { lease: self.id, reason }),
        }
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.state.clone();
        loop {
            if let LeaseState::Lost(r) = *rx.borrow_and_update() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The task ended without saying: it was stopped.
                return LostReason::Abandoned;
            }
        }
    }

    /// A receiver of the lease's state, for `select!` loops.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Stops renewing without revoking: the lease expires after its TTL,
    /// as if its holder had crashed. (Tests and fencing drills.)
    pub fn stop_keepalive(&self) {
        let _ = self.stop.send(true);
    }

    /// Revokes the lease: its keys disappear now.
    pub async fn revoke(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.store.revoke(self.id).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One keepalive stream, on one member.
struct Stream {
    member: usize,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

async fn keepalive(
    store: Store,
    id: i64,
    ttl: Duration,
    mut valid_until: Instant,
    state: watch::Sender<LeaseState>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = (ttl / 3).max(Duration::from_millis(100));
    let request_timeout = store.config().request_timeout;
    let mut stream: Option<Stream> = None;
    let mut next = Instant::now() + interval;
    let mut failures = 0usize;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next.min(valid_until)) => {}
            _ = stop.changed() => {
                // Keep reporting the time left, then the loss, truthfully.
                tokio::time::sleep_until(valid_until).await;
                let _ = state.send(LeaseState::Lost(LostReason::Abandoned));
                return;
            }
        }
        if *stop.borrow() {
            tokio::time::sleep_until(valid_until).await;
            let _ = state.send(LeaseState::Lost(LostReason::Abandoned));
            return;
        }
        let now = Instant::now();
        if now >= valid_until {
            tracing::warn!("lease {id:x} lost: no renewal within its TTL");
            let _ = state.send(LeaseState::Lost(LostReason::Unrenewed));
            return;
        }
        let limit = request_timeout.min(valid_until - now);
        let sent = Instant::now();
        match tokio::time::timeout(limit, renew(&store, id, &mut stream, failures)).await {
            Ok(Ok(Some(granted))) => {
                valid_until = sent + granted;
                failures = 0;
                let _ = state.send(LeaseState::Held { valid_until });
                next = sent + interval;
            }
            Ok(Ok(None)) => {
                tracing::warn!("lease {id:x} lost: etcd says it expired");
                let _ = state.send(LeaseState::Lost(LostReason::Expired));
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!("lease {id:x}: renewal failed: {e}");
                failures += 1;
                drop_stream(&store, &mut stream);
                next = Instant::now() + Duration::from_millis(100);
            }
            Err(_) => {
                tracing::debug!("lease {id:x}: renewal timed out after {limit:?}");
                failures += 1;
                drop_stream(&store, &mut stream);
                next = Instant::now();
            }
        }
    }
}

fn drop_stream(store: &Store, stream: &mut Option<Stream>) {
    if let Some(s) = stream.take() {
        store.demote(s.member);
    }
}

/// Sends one renewal; Some(TTL) if renewed, None if etcd says the lease is
/// gone.
async fn renew(
    store: &Store,
    id: i64,
    stream: &mut Option<Stream>,
    failures: usize,
) -> Result<Option<Duration>, etcd_client::Error> {
    if stream.is_none() {
        let member = (store.preferred_index() + failures) % store.member_count();
        let (_, mut client) = store.member(member);
        let (keeper, responses) = client.lease_keep_alive(id).await?;
        *stream = Some(Stream { member, keeper, responses });
    }
    let s = stream.as_mut().expect("just opened");
    s.keeper.keep_alive().await?;
    match s.responses.message().await? {
        Some(r) if r.ttl() > 0 => {
            store.prefer(s.member);
            Ok(Some(Duration::from_secs(r.ttl() as u64)))
        }
        Some(_) => Ok(None),
        None => Err(etcd_client::Error::LeaseKeepAliveError("the keepalive stream ended".into())),
    }
}
