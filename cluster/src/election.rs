//! Leader election, Patroni style: the leader key is created only if
//! absent, under the candidate's lease. It goes when that lease ends (the
//! leader crashed, was cut off, or stopped renewing), and a waiting
//! candidate, watching the key, tries again.
//!
//! The leader key's create revision is the leadership's term: it grows
//! with every new leader, so a leader's actions can carry it as a fencing
//! token. A leader stops acting when [`Leadership::lost`] resolves: its
//! lease is lost (by its own clock, before etcd can expire it) or the key
//! is no longer its own.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseState};
use crate::ops::{Cluster, Versioned};
use crate::records::{self, unix_ms, LeaderRecord, FORMAT_VERSION};
use crate::store::Kv;
use crate::watch::ChangeKind;

/// Why a leadership ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeadershipLost {
    /// The candidate's lease is lost.
    Lease,
    /// The leader key was deleted or now names another term.
    KeyGone,
    /// Resigned.
    Resigned,
}

/// Being the leader, for one term.
pub struct Leadership {
    node: String,
    term: i64,
    lease_id: i64,
    lost: watch::Receiver<Option<LeadershipLost>>,
    task: tokio::task::JoinHandle<()>,
    cluster: Cluster,
}

impl Leadership {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The leader key's create revision: grows with every leader.
    pub fn term(&self) -> i64 {
        self.term
    }

    pub fn is_leader(&self) -> bool {
        self.lost.borrow().is_none()
    }

    /// Resolves when the leadership is over.
    pub async fn lost(&self) -> LeadershipLost {
        let mut rx = self.lost.clone();
        loop {
            if let Some(why) = *rx.borrow_and_update() {
                return why;
            }
            if rx.changed().await.is_err() {
                return LeadershipLost::Resigned;
            }
        }
    }

    /// Gives the leadership up: deletes the key if it is still this term's.
    pub async fn resign(self) -> Result<()> {
        self.task.abort();
        let key = self.cluster.keys().leader();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, self.term),
                Compare::lease(key.as_str(), CompareOp::Equal, self.lease_id),
            ])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.cluster.store().txn("resign", txn).await.map(|_| ())
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cluster {
    /// The current leader and its term (the key's create revision).
    pub async fn leader(&self) -> Result<Option<Versioned<LeaderRecord>>> {
        let Some(kv) = self.store().get(&self.keys().leader()).await? else { return Ok(None) };
        Ok(Some(Versioned {
            value: records::decode(&kv.key, &kv.value)?,
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
            lease: kv.lease,
        }))
    }

    /// One attempt: becomes leader if there is none. Returns the
    /// leadership, or the key as it stands (another leader).
    pub async fn try_lead(&self, lease: &Lease, node: &str) -> Result<std::result::Result<Leadership, Kv>> {
        lease.check()?;
        let key = self.keys().leader();
        let rec = LeaderRecord { v: FORMAT_VERSION, node: node.to_owned(), since_unix_ms: unix_ms() };
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key.as_str(), records::encode(&rec), Some(PutOptions::new().with_lease(lease.id()))),
                TxnOp::get(key.as_str(), None),
            ])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.store().txn("campaign", txn).await?;
        let responses = r.op_responses();
        let current = responses.iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(Kv::from_etcd),
            _ => None,
        });
        let Some(current) = current else {
            return Err(Error::Protocol { op: "campaign", what: "the leader key vanished inside a transaction" });
        };
        // Ours if we just made it, or an earlier attempt of ours (whose
        // outcome was unknown) did.
        if current.lease != lease.id() {
            return Ok(Err(current));
        }
        Ok(Ok(self.hold(lease, node, current.create_revision, current.mod_revision).await?))
    }

    /// Campaigns for up to `wait`: tries, and while another node leads,
    /// watches the leader key (no polling) and tries again when it goes.
    /// None if still not leader after `wait`.
    pub async fn campaign(&self, lease: &Lease, node: &str, wait: Duration) -> Result<Option<Leadership>> {
        let deadline = Instant::now() + wait;
        loop {
            let current = match self.try_lead(lease, node).await? {
                Ok(l) => return Ok(Some(l)),
                Err(kv) => kv,
            };
            tracing::debug!("{node}: leader key held (term {}), waiting for it to go", current.create_revision);
            let mut w = self.store().watch_prefix(&self.keys().leader(), current.mod_revision + 1).await?;
            let mut lease_state = lease.subscribe();
            lease_state.borrow_and_update();
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Ok(None);
                }
                tokio::select! {
                    ev = w.next_within(remaining) => match ev {
                        Some(Ok(c)) if c.kind == ChangeKind::Delete => break,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e),
                        None => {}
                    },
                    _ = lease_state.changed() => lease.check()?,
                }
            }
        }
    }

    /// Starts watching our own term: the leadership is lost when the key
    /// changes or our lease is lost.
    async fn hold(&self, lease: &Lease, node: &str, term: i64, rev: i64) -> Result<Leadership> {
        let (tx, lost) = watch::channel(None);
        let mut w = self.store().watch_prefix(&self.keys().leader(), rev + 1).await?;
        let mut lease_state = lease.subscribe();
        let task = tokio::spawn(async move {
            let why = loop {
                let valid_until = match *lease_state.borrow_and_update() {
                    LeaseState::Held { valid_until } => valid_until,
                    LeaseState::Lost(_) => break LeadershipLost::Lease,
                };
                tokio::select! {
                    // Our own clock: the lease is surely over at valid_until
                    // unless a renewal extends it.
                    _ = tokio::time::sleep_until(valid_until) => {
                        if matches!(*lease_state.borrow(), LeaseState::Held { valid_until: v } if v <= Instant::now()) {
                            break LeadershipLost::Lease;
                        }
                    }
                    r = lease_state.changed() => if r.is_err() { break LeadershipLost::Lease },
                    ev = w.next() => match ev {
                        Some(Ok(c)) if c.kind == ChangeKind::Delete || c.kv.create_revision != term => {
                            break LeadershipLost::KeyGone
                        }
                        Some(Ok(_)) => {}
                        // Watch failures: keep relying on the lease.
                        Some(Err(e)) => tracing::debug!("leader watch: {e}"),
                        None => break LeadershipLost::KeyGone,
                    },
                }
            };
            tracing::info!("leadership (term {term}) lost: {why:?}");
            let _ = tx.send(Some(why));
        });
        tracing::info!("{node} is the leader (term {term})");
        Ok(Leadership { node: node.to_owned(), term, lease_id: lease.id(), lost, task, cluster: self.clone() })
    }
}
