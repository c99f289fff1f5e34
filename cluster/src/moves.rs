//! A VM's move from one node to another, as the cluster records it.
//!
//! 1. Someone asks: [`Cluster::request_move`] puts `vms/<name>/move` only
//!    if the owner is still `from@epoch` and no other move is asked for.
//! 2. The destination's agent starts `ferry receive` and says where it
//!    listens ([`Cluster::put_incoming`], under its node lease).
//! 3. The source's agent migrates; at the switchover its VMM asks the
//!    agent's commit gate, which runs [`Cluster::commit_move`]: one
//!    transaction that checks the owner and the move record, makes `to`
//!    the owner at `epoch + 1` and deletes the move. That transaction is
//!    the move's commit point; the Commit frame follows it.
//! 4. Anyone unsure how a move ended ([`Error::OutcomeUnknown`], a lost
//!    Commit frame) calls [`Cluster::resolve_move`]: it aborts the move if
//!    it is still asked for (so it can no longer commit) or else reads the
//!    owner. Its answer is final.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::error::{Error, Result};
use crate::ops::{first_kv, Cluster, NodeLease, Versioned};
use crate::records::{self, IncomingRecord, MoveRecord, Owner, FORMAT_VERSION};

/// How a move ended, for certain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveOutcome {
    /// The destination owns the VM (this owner).
    Committed(Owner),
    /// It did not happen and can no longer happen.
    Aborted,
}

impl Cluster {
    fn owner_bytes(node: &str, epoch: u64) -> Vec<u8> {
        records::encode(&Owner { v: FORMAT_VERSION, ..Owner::new(Some(node), epoch) })
    }

    /// Asks for a move: only while the owner is `mv.from@mv.epoch` and no
    /// other move is pending ([`Error::MoveInFlight`], [`Error::StaleOwner`]).
    /// Conditional: after [`Error::OutcomeUnknown`], read [`Cluster::pending_move`].
    pub async fn request_move(&self, name: &str, mv: &MoveRecord) -> Result<()> {
        let (owner, key) = (self.keys().vm_owner(name), self.keys().vm_move(name));
        let txn = Txn::new()
            .when([
                Compare::value(owner.as_str(), CompareOp::Equal, Self::owner_bytes(&mv.from, mv.epoch)),
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key.as_str(), records::encode(mv), None)])
            .or_else([TxnOp::get(key.as_str(), None), TxnOp::get(owner.as_str(), None)]);
        let r = self.store().txn("request move", txn).await?;
        if r.succeeded() {
            tracing::info!("VM {name}: move {} asked: {} -> {}", mv.id, mv.from, mv.to);
            return Ok(());
        }
        if let Some(kv) = first_kv(r.op_responses().first()) {
            let other: MoveRecord = records::decode(&kv.key, &kv.value)?;
            return Err(Error::MoveInFlight { vm: name.to_owned(), id: other.id, from: other.from, to: other.to });
        }
        let current = match first_kv(r.op_responses().get(1)) {
            Some(kv) => Some(records::decode::<Owner>(&kv.key, &kv.value)?),
            None => return Err(Error::NoSuchVm { name: name.to_owned() }),
        };
        Err(Error::StaleOwner { vm: name.to_owned(), expected: Owner::new(Some(&mv.from), mv.epoch), current })
    }

    /// The move asked for, if any.
    pub async fn pending_move(&self, name: &str) -> Result<Option<Versioned<MoveRecord>>> {
        self.get_record(&self.keys().vm_move(name)).await
    }

    /// The commit point: owner `from@epoch` -> `to@epoch+1` and the move
    /// record deleted, in one transaction, only if both are as `mv` says.
    /// [`Error::MoveGone`] if the move was aborted; [`Error::StaleOwner`]
    /// if the owner changed. After [`Error::OutcomeUnknown`], call
    /// [`Cluster::resolve_move`].
    pub async fn commit_move(&self, name: &str, mv: &MoveRecord) -> Result<Owner> {
        let (owner, key, incoming) =
            (self.keys().vm_owner(name), self.keys().vm_move(name), self.keys().vm_incoming(name));
        let next = Owner::new(Some(&mv.to), mv.epoch + 1);
        let txn = Txn::new()
            .when([
                Compare::value(owner.as_str(), CompareOp::Equal, Self::owner_bytes(&mv.from, mv.epoch)),
                Compare::value(key.as_str(), CompareOp::Equal, records::encode(mv)),
            ])
            .and_then([
                TxnOp::put(owner.as_str(), records::encode(&next), None),
                TxnOp::delete(key.as_str(), None),
                TxnOp::delete(incoming.as_str(), None),
            ])
            .or_else([TxnOp::get(key.as_str(), None), TxnOp::get(owner.as_str(), None)]);
        let r = self.store().txn("commit move", txn).await?;
        if r.succeeded() {
            tracing::info!("VM {name}: move {} committed: owner {}@{} -> {next}", mv.id, mv.from, mv.epoch);
            return Ok(next);
        }
        let same_move = first_kv(r.op_responses().first())
            .and_then(|kv| records::decode::<MoveRecord>(&kv.key, &kv.value).ok())
            .is_some_and(|m| &m == mv);
        if !same_move {
            return Err(Error::MoveGone { vm: name.to_owned(), id: mv.id.clone() });
        }
        let current =
            first_kv(r.op_responses().get(1)).and_then(|kv| records::decode::<Owner>(&kv.key, &kv.value).ok());
        Err(Error::StaleOwner { vm: name.to_owned(), expected: Owner::new(Some(&mv.from), mv.epoch), current })
    }

    /// Withdraws the move if it is still asked for; true if this call did.
    pub async fn abort_move(&self, name: &str, mv: &MoveRecord) -> Result<bool> {
        let (key, incoming) = (self.keys().vm_move(name), self.keys().vm_incoming(name));
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, records::encode(mv))])
            .and_then([TxnOp::delete(key.as_str(), None), TxnOp::delete(incoming.as_str(), None)]);
        let r = self.store().txn("abort move", txn).await?;
        if r.succeeded() {
            tracing::info!("VM {name}: move {} aborted", mv.id);
        }
        Ok(r.succeeded())
    }

    /// How the move ended, for certain: aborts it if it is still asked
    /// for, else reads the owner. Retries an unknown outcome a few times
    /// (the abort is conditional, so a retry is safe).
    pub async fn resolve_move(&self, name: &str, mv: &MoveRecord) -> Result<MoveOutcome> {
        let mut last = None;
        for _ in 0..3 {
            match self.abort_move(name, mv).await {
                Ok(true) => return Ok(MoveOutcome::Aborted),
                Ok(false) => {
                    let now = self.owner(name).await?.value;
                    return Ok(if now.same(&Owner::new(Some(&mv.to), mv.epoch + 1)) {
                        MoveOutcome::Committed(now)
                    } else {
                        MoveOutcome::Aborted
                    });
                }
                Err(e) if e.outcome_unknown() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("three attempts"))
    }

    /// The destination of a move says where it listens (idempotent put,
    /// under its node lease: it goes if the node does).
    pub async fn put_incoming(&self, name: &str, node: &NodeLease, r: &IncomingRecord) -> Result<()> {
        self.store().put(&self.keys().vm_incoming(name), records::encode(r), Some(node.lease.id())).await.map(|_| ())
    }

    pub async fn incoming(&self, name: &str) -> Result<Option<Versioned<IncomingRecord>>> {
        self.get_record(&self.keys().vm_incoming(name)).await
    }

    /// Removes the incoming record if this node wrote it.
    pub async fn delete_incoming(&self, name: &str, node: &NodeLease) -> Result<()> {
        let key = self.keys().vm_incoming(name);
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, node.lease.id())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.store().txn("delete incoming", txn).await.map(|_| ())
    }
}
