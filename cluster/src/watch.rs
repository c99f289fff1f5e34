//! Watching a prefix: a stream of changes pushed by etcd (no polling),
//! which survives the loss of the member it is attached to.
//!
//! A background task holds the etcd watch and forwards events. When the
//! member fails (connection lost, or it loses its leader: the watch is
//! made with require-leader, so a member cut off from the quorum cancels
//! it), the task re-attaches to the next member from the revision after
//! the last event it delivered, so nothing is missed or repeated. If that
//! revision has been compacted away, the stream ends with
//! [`Error::Compacted`]: list again and watch anew.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::{Error, Failure, Result};
use crate::store::{Kv, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Put,
    Delete,
}

/// One change to one key.
#[derive(Clone, Debug)]
pub struct Change {
    pub kind: ChangeKind,
    /// For a delete: the key with an empty value, `mod_revision` the
    /// deletion's revision.
    pub kv: Kv,
}

/// Changes under a prefix, in revision order. The task behind it ends when
/// this is dropped.
pub struct Watch {
    rx: mpsc::Receiver<Result<Change>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    /// The next change; `Some(Err(..))` reports a period without any
    /// member (the watch keeps trying) or, last, a compaction; None once
    /// the watch has ended.
    pub async fn next(&mut self) -> Option<Result<Change>> {
        self.rx.recv().await
    }

    /// The next change, waiting at most `timeout` (None on timeout).
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Result<Change>> {
        tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Store {
    /// Watches every key under `prefix`, from revision `from` (0: from
    /// now). Use [`Store::list`]'s revision + 1 to see everything after a
    /// listing.
    pub async fn watch_prefix(&self, prefix: &str, from: i64) -> Result<Watch> {
        let (tx, rx) = mpsc::channel(256);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(self.clone(), prefix.to_owned(), from, tx, ready_tx));
        // Wait until the first watch is established (bounded), so changes
        // made after this returns are seen.
        match tokio::time::timeout(self.config().op_timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Watch { rx, task }),
            Ok(Ok(Err(e))) => {
                task.abort();
                Err(e)
            }
            Ok(Err(_)) | Err(_) => {
                task.abort();
                Err(Error::Unavailable {
                    op: "watch",
                    after: self.config().op_timeout,
                    endpoint: self.preferred_endpoint().to_owned(),
                    last: Failure::Timeout(self.config().op_timeout),
                })
            }
        }
    }
}

enum End {
    /// The consumer is gone.
    Closed,
    /// The member failed; re-attach elsewhere.
    Failed(Failure),
    Compacted(i64),
}

async fn run(
    store: Store,
    prefix: String,
    from: i64,
    tx: mpsc::Sender<Result<Change>>,
    ready: tokio::sync::oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut next_rev = from;
    let mut member = store.preferred_index();
    let mut failing_since: Option<Instant> = None;
    let mut reported = false;
    loop {
        let mut established = false;
        let end = attach(&store, member, &prefix, &mut next_rev, &tx, &mut ready, &mut established).await;
        if established {
            failing_since = None;
            reported = false;
        }
        match end {
            End::Closed => return,
            End::Compacted(rev) => {
                let e = Error::Compacted { prefix: prefix.clone(), compacted: rev };
                match ready.take() {
                    Some(r) => {
                        let _ = r.send(Err(e));
                    }
                    None => {
                        let _ = tx.send(Err(e)).await;
                    }
                }
                return;
            }
            End::Failed(f) => {
                let (url, _) = store.member(member);
                tracing::debug!("watch {prefix}: {url} failed ({f}); re-attaching to the next member");
                let since = *failing_since.get_or_insert_with(Instant::now);
                if !reported && since.elapsed() >= store.config().op_timeout && ready.is_none() {
                    reported = true;
                    let e =
                        Error::Unavailable { op: "watch", after: since.elapsed(), endpoint: url.to_owned(), last: f };
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                }
                store.demote(member);
                member = (member + 1) % store.member_count();
                if member == store.preferred_index() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if tx.is_closed() {
                    return;
                }
            }
        }
    }
}

/// Runs one etcd watch on one member until it fails or the consumer goes.
async fn attach(
    store: &Store,
    member: usize,
    prefix: &str,
    next_rev: &mut i64,
    tx: &mpsc::Sender<Result<Change>>,
    ready: &mut Option<tokio::sync::oneshot::Sender<Result<()>>>,
    established: &mut bool,
) -> End {
    let (_, mut client) = store.member(member);
    let timeout = store.config().request_timeout;
    let mut opts = WatchOptions::new().with_prefix();
    if *next_rev > 0 {
        opts = opts.with_start_revision(*next_rev);
    }
    let mut stream = match tokio::time::timeout(timeout, client.watch(prefix, Some(opts))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return End::Failed(Failure::Client(e)),
        Err(_) => return End::Failed(Failure::Timeout(timeout)),
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return End::Closed,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => {
                return End::Failed(Failure::Client(etcd_client::Error::WatchError("the watch stream ended".into())))
            }
            Err(e) => return End::Failed(Failure::Client(e)),
        };
        if resp.compact_revision() > 0 {
            return End::Compacted(resp.compact_revision());
        }
        if resp.canceled() {
            let why = resp.cancel_reason().to_owned();
            return End::Failed(Failure::Client(etcd_client::Error::WatchError(format!("watch canceled: {why}"))));
        }
        if resp.created() {
            if *next_rev == 0 {
                // "From now": pin the start, so a re-attach resumes here.
                *next_rev = resp.header().map_or(0, |h| h.revision()) + 1;
            }
            store.prefer(member);
            *established = true;
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let kind = match ev.event_type() {
                EventType::Put => ChangeKind::Put,
                EventType::Delete => ChangeKind::Delete,
            };
            let kv = Kv::from_etcd(kv);
            *next_rev = kv.mod_revision + 1;
            if tx.send(Ok(Change { kind, kv })).await.is_err() {
                return End::Closed;
            }
        }
    }
}
