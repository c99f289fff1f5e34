//! [`Cluster`]: the typed operations on one cluster's keys. Every write is
//! conditional or idempotent, so that after [`Error::OutcomeUnknown`] the
//! caller can read back (or simply retry) without doing it twice.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse};

use crate::error::{Error, Result};
use crate::keys::{validate_name, Keys};
use crate::lease::Lease;
use crate::records::{self, HistoryEntry, NodeAdmin, NodeRecord, Owner, Record, VmRecord, VmStatus, FORMAT_VERSION};
use crate::records::{ClusterRecord, ClusterSettings, ValidationRecord};
use crate::store::{Kv, Store};
use crate::watch::Watch;

/// One cluster in etcd.
#[derive(Clone)]
pub struct Cluster {
    store: Store,
    keys: Keys,
}

/// A decoded record with the revision it was read at.
#[derive(Clone, Debug)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub lease: i64,
}

/// A node's registration: its key, under its own lease.
pub struct NodeLease {
    pub node: String,
    pub lease: Lease,
}

/// What to do when a node's key already exists under another lease (a
/// previous agent, or another process claiming the same node id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// Refuse with [`Error::NodeHeld`] until the old lease expires.
    Refuse,
    /// Move the key to the new lease in one transaction (it never
    /// disappears, so nobody sees the node go down).
    Replace,
}

pub(crate) fn first_kv(r: Option<&TxnOpResponse>) -> Option<Kv> {
    match r {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(Kv::from_etcd),
        _ => None,
    }
}

pub(crate) fn decode_kv<T: Record>(kv: &Kv) -> Result<Versioned<T>> {
    Ok(Versioned {
        value: records::decode(&kv.key, &kv.value)?,
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
        lease: kv.lease,
    })
}

impl Cluster {
    pub fn new(store: Store, cluster: &str) -> Result<Cluster> {
        Ok(Cluster { store, keys: Keys::new(cluster)? })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) async fn get_record<T: Record>(&self, key: &str) -> Result<Option<Versioned<T>>> {
        self.store.get(key).await?.map(|kv| decode_kv(&kv)).transpose()
    }

    // ---- nodes -----------------------------------------------------------

    /// Grants a lease of `ttl`, kept alive in the background, and puts the
    /// node's record under it. See [`Takeover`] for a key that exists.
    pub async fn register_node(&self, record: &NodeRecord, ttl: Duration, takeover: Takeover) -> Result<NodeLease> {
        validate_name("node id", &record.id)?;
        let key = self.keys.node(&record.id);
        let lease = Lease::grant(&self.store, ttl).await?;
        let value = records::encode(record);
        let put = || TxnOp::put(key.as_str(), value.clone(), Some(PutOptions::new().with_lease(lease.id())));
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.store.txn("register node", txn).await?;
        if r.succeeded() {
            tracing::info!("node {} registered under lease {:x}", record.id, lease.id());
            return Ok(NodeLease { node: record.id.clone(), lease });
        }
        let held = first_kv(r.op_responses().first()).map_or(0, |kv| kv.lease);
        if held == lease.id() {
            // Our own earlier attempt landed (after an unknown outcome).
            return Ok(NodeLease { node: record.id.clone(), lease });
        }
        if takeover == Takeover::Refuse {
            let _ = lease.revoke().await;
            return Err(Error::NodeHeld { node: record.id.clone(), lease: held });
        }
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, held)])
            .and_then([put()])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.store.txn("take over node", txn).await?;
        if r.succeeded() {
            tracing::info!("node {} taken over from lease {held:x} by lease {:x}", record.id, lease.id());
            return Ok(NodeLease { node: record.id.clone(), lease });
        }
        let now = first_kv(r.op_responses().first()).map_or(0, |kv| kv.lease);
        let _ = lease.revoke().await;
        Err(Error::NodeHeld { node: record.id.clone(), lease: now })
    }

    /// Registered nodes (those whose lease is alive), with their leases.
    pub async fn nodes(&self) -> Result<Vec<Versioned<NodeRecord>>> {
        let listing = self.store.list(&self.keys.nodes_prefix()).await?;
        let mut out = vec![];
        for kv in &listing.kvs {
            if let Some(crate::keys::ClusterKey::Node(_)) = self.keys.parse(&kv.key) {
                out.push(decode_kv(kv)?);
            }
        }
        Ok(out)
    }

    pub async fn node(&self, id: &str) -> Result<Option<Versioned<NodeRecord>>> {
        self.get_record(&self.keys.node(id)).await
    }

    /// Rewrites a registered node's record (what it offers), only while
    /// the key is still under `node`'s lease: a record taken over by
    /// another agent is left alone ([`Error::NodeHeld`]).
    pub async fn update_node(&self, node: &NodeLease, record: &NodeRecord) -> Result<()> {
        let key = self.keys.node(&node.node);
        let lease = node.lease.id();
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(key.as_str(), records::encode(record), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.store.txn("update node", txn).await?;
        if r.succeeded() {
            return Ok(());
        }
        let held = first_kv(r.op_responses().first()).map_or(0, |kv| kv.lease);
        Err(Error::NodeHeld { node: node.node.clone(), lease: held })
    }

    /// Every node's operator settings, by node id.
    pub async fn node_admins(&self) -> Result<Vec<(String, NodeAdmin)>> {
        let listing = self.store.list(&self.keys.nodes_prefix()).await?;
        let mut out = vec![];
        for kv in &listing.kvs {
            if let Some(crate::keys::ClusterKey::NodeAdmin(id)) = self.keys.parse(&kv.key) {
                out.push((id, records::decode(&kv.key, &kv.value)?));
            }
        }
        Ok(out)
    }

    /// Sets a node's operator settings (idempotent put).
    pub async fn set_node_admin(&self, id: &str, admin: &NodeAdmin) -> Result<()> {
        validate_name("node id", id)?;
        self.store.put(&self.keys.node_admin(id), records::encode(admin), None).await.map(|_| ())
    }

    pub async fn node_admin(&self, id: &str) -> Result<Option<NodeAdmin>> {
        Ok(self.get_record(&self.keys.node_admin(id)).await?.map(|v| v.value))
    }

    /// The nodes the last leader saw up (None before any leader wrote it).
    pub async fn seen_up(&self) -> Result<Option<records::SeenUp>> {
        Ok(self.get_record(&self.keys.seen_up()).await?.map(|v| v.value))
    }

    pub async fn set_seen_up(&self, seen: &records::SeenUp) -> Result<()> {
        self.store.put(&self.keys.seen_up(), records::encode(seen), None).await.map(|_| ())
    }

    // ---- VMs -------------------------------------------------------------

    /// Creates a VM record, with its owner key `{node: None, epoch: 0}`,
    /// only if no VM of that name exists ([`Error::AlreadyExists`]).
    /// Returns the revision it made.
    pub async fn create_vm(&self, vm: &VmRecord) -> Result<i64> {
        validate_name("VM name", &vm.name)?;
        for n in &vm.preferred_owners {
            validate_name("node id", n)?;
        }
        let key = self.keys.vm(&vm.name);
        let owner = self.keys.vm_owner(&vm.name);
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(owner.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key.as_str(), records::encode(vm), None),
                TxnOp::put(owner.as_str(), records::encode(&Owner::new(None, 0)), None),
            ]);
        let r = self.store.txn("create VM", txn).await?;
        if !r.succeeded() {
            return Err(Error::AlreadyExists { key });
        }
        tracing::info!("VM {} created", vm.name);
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    pub async fn vm(&self, name: &str) -> Result<Option<Versioned<VmRecord>>> {
        self.get_record(&self.keys.vm(name)).await
    }

    /// Every VM record, in name order.
    pub async fn vms(&self) -> Result<Vec<Versioned<VmRecord>>> {
        let listing = self.store.list(&self.keys.vms_prefix()).await?;
        let mut out = vec![];
        for kv in &listing.kvs {
            if let Some(crate::keys::ClusterKey::Vm(_)) = self.keys.parse(&kv.key) {
                out.push(decode_kv(kv)?);
            }
        }
        Ok(out)
    }

    /// The VM's owner; [`Error::NoSuchVm`] if it has none (no such VM).
    pub async fn owner(&self, name: &str) -> Result<Versioned<Owner>> {
        self.get_record(&self.keys.vm_owner(name)).await?.ok_or_else(|| Error::NoSuchVm { name: name.to_owned() })
    }

    /// Changes the VM's owner from `expected` to `to` (None: stopped), by a
    /// transaction that compares the stored owner and epoch, and bumps the
    /// epoch. Refuses with [`Error::StaleOwner`] (naming the current owner)
    /// if they differ. After [`Error::OutcomeUnknown`], read the owner: if
    /// it is `{to, expected.epoch + 1}`, the change was made.
    pub async fn change_owner(&self, name: &str, expected: &Owner, to: Option<&str>) -> Result<Owner> {
        if let Some(n) = to {
            validate_name("node id", n)?;
        }
        let key = self.keys.vm_owner(name);
        let next = Owner::new(to, expected.epoch + 1);
        let attempt = |cmp: Compare| {
            Txn::new()
                .when([cmp])
                .and_then([TxnOp::put(key.as_str(), records::encode(&next), None)])
                .or_else([TxnOp::get(key.as_str(), None)])
        };
        let expected_bytes = records::encode(&Owner { v: FORMAT_VERSION, ..expected.clone() });
        // Twice at most: a stored record with the same owner and epoch but
        // another encoding (another format version) is compared by
        // revision the second time.
        let mut cmp = Compare::value(key.as_str(), CompareOp::Equal, expected_bytes);
        for _ in 0..2 {
            let r = self.store.txn("change owner", attempt(cmp)).await?;
            if r.succeeded() {
                tracing::info!("VM {name}: owner {expected} -> {next}");
                return Ok(next);
            }
            let current = first_kv(r.op_responses().first());
            let Some(kv) = current else { return Err(Error::NoSuchVm { name: name.to_owned() }) };
            let cur: Owner = records::decode(&kv.key, &kv.value)?;
            if !cur.same(expected) {
                return Err(Error::StaleOwner { vm: name.to_owned(), expected: expected.clone(), current: Some(cur) });
            }
            cmp = Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision);
        }
        let current = self.owner(name).await.ok().map(|v| v.value);
        Err(Error::StaleOwner { vm: name.to_owned(), expected: expected.clone(), current })
    }

    /// Appends an entry to the VM's history under the next sequence number
    /// (create-if-absent, so two writers never share one); returns it.
    /// After [`Error::OutcomeUnknown`], look for the entry's `id` in
    /// [`Cluster::history`] before appending again.
    pub async fn append_history(&self, name: &str, entry: &HistoryEntry) -> Result<u64> {
        let prefix = self.keys.vm_history_prefix(name);
        let keys = self.keys.clone();
        let n = name.to_owned();
        self.append_numbered(&prefix, move |seq| keys.vm_history(&n, seq), records::encode(entry)).await.map_err(|e| {
            match e {
                Error::HistoryContended { tries, .. } => Error::HistoryContended { vm: name.to_owned(), tries },
                e => e,
            }
        })
    }

    /// Records a cluster event under the next sequence number.
    pub async fn append_event(&self, event: &crate::records::EventRecord) -> Result<u64> {
        let keys = self.keys.clone();
        self.append_numbered(&self.keys.events_prefix(), move |seq| keys.event(seq), records::encode(event)).await
    }

    /// Every cluster event, oldest first, with sequence numbers.
    pub async fn events(&self) -> Result<Vec<(u64, crate::records::EventRecord)>> {
        let listing = self.store.list(&self.keys.events_prefix()).await?;
        let mut out = vec![];
        for kv in &listing.kvs {
            if let Some(crate::keys::ClusterKey::Event(seq)) = self.keys.parse(&kv.key) {
                out.push((seq, records::decode(&kv.key, &kv.value)?));
            }
        }
        Ok(out)
    }

    /// Puts `value` at `key_of(last sequence under prefix + 1)`, created
    /// only if absent, so two writers never share a number.
    async fn append_numbered(&self, prefix: &str, key_of: impl Fn(u64) -> String, value: Vec<u8>) -> Result<u64> {
        const TRIES: u32 = 8;
        let prefix = prefix.to_owned();
        for _ in 0..TRIES {
            let last = self
                .store
                .call("last history entry", crate::store::Effect::Read, |mut c| {
                    let prefix = prefix.clone();
                    async move {
                        let opts = GetOptions::new()
                            .with_prefix()
                            .with_sort(SortTarget::Key, SortOrder::Descend)
                            .with_limit(1)
                            .with_keys_only();
                        let r = c.get(prefix, Some(opts)).await?;
                        Ok(r.kvs().first().map(Kv::from_etcd))
                    }
                })
                .await?;
            let seq = last
                .as_ref()
                .and_then(|kv| kv.key.rsplit('/').next().and_then(|s| s.parse::<u64>().ok()))
                .map_or(1, |s| s + 1);
            let key = key_of(seq);
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value.clone(), None)]);
            if self.store.txn("append history", txn).await?.succeeded() {
                return Ok(seq);
            }
        }
        Err(Error::HistoryContended { vm: prefix, tries: TRIES })
    }

    /// The VM's history, oldest first, with sequence numbers.
    pub async fn history(&self, name: &str) -> Result<Vec<(u64, HistoryEntry)>> {
        let listing = self.store.list(&self.keys.vm_history_prefix(name)).await?;
        let mut out = vec![];
        for kv in &listing.kvs {
            if let Some(crate::keys::ClusterKey::VmHistory(_, seq)) = self.keys.parse(&kv.key) {
                out.push((seq, records::decode(&kv.key, &kv.value)?));
            }
        }
        Ok(out)
    }

    // ---- what agents report ---------------------------------------------

    /// Publishes what the agent running `name` sees, under its node lease
    /// (idempotent put).
    pub async fn put_vm_status(&self, name: &str, node: &NodeLease, status: &VmStatus) -> Result<()> {
        validate_name("VM name", name)?;
        self.store.put(&self.keys.vm_status(name), records::encode(status), Some(node.lease.id())).await.map(|_| ())
    }

    /// Removes the VM's status if `node`'s lease wrote it (a status written
    /// since by another node stays). Idempotent.
    pub async fn delete_vm_status(&self, name: &str, node: &NodeLease) -> Result<()> {
        let key = self.keys.vm_status(name);
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, node.lease.id())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.store.txn("delete VM status", txn).await.map(|_| ())
    }

    pub async fn vm_status(&self, name: &str) -> Result<Option<Versioned<VmStatus>>> {
        self.get_record(&self.keys.vm_status(name)).await
    }

    /// Says that the leader on `node` restarts VM `name` (idempotent put,
    /// under its node lease). Returns the put's revision.
    pub async fn put_restart(&self, name: &str, node: &NodeLease, r: &records::RestartRecord) -> Result<i64> {
        validate_name("VM name", name)?;
        self.store.put(&self.keys.vm_restart(name), records::encode(r), Some(node.lease.id())).await
    }

    /// Removes the VM's restart record if it is still the one put at
    /// `revision` (a later restart's record stays).
    pub async fn delete_restart(&self, name: &str, revision: i64) -> Result<()> {
        let key = self.keys.vm_restart(name);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.store.txn("delete VM restart", txn).await.map(|_| ())
    }

    /// Every failover under way, by VM name.
    pub async fn restarts(&self) -> Result<std::collections::BTreeMap<String, records::RestartRecord>> {
        let listing = self.store.list(&self.keys.vms_prefix()).await?;
        let mut out = std::collections::BTreeMap::new();
        for kv in &listing.kvs {
            if let Some(crate::keys::ClusterKey::VmRestart(n)) = self.keys.parse(&kv.key) {
                out.insert(n, records::decode(&kv.key, &kv.value)?);
            }
        }
        Ok(out)
    }

    /// Every VM's owner and status (if an agent reports one), by VM name.
    pub async fn vm_owners_and_statuses(
        &self,
    ) -> Result<std::collections::BTreeMap<String, (Option<Owner>, Option<VmStatus>)>> {
        let listing = self.store.list(&self.keys.vms_prefix()).await?;
        let mut out: std::collections::BTreeMap<String, (Option<Owner>, Option<VmStatus>)> = Default::default();
        for kv in &listing.kvs {
            match self.keys.parse(&kv.key) {
                Some(crate::keys::ClusterKey::VmOwner(n)) => {
                    out.entry(n).or_default().0 = Some(records::decode(&kv.key, &kv.value)?)
                }
                Some(crate::keys::ClusterKey::VmStatus(n)) => {
                    out.entry(n).or_default().1 = Some(records::decode(&kv.key, &kv.value)?)
                }
                _ => {}
            }
        }
        Ok(out)
    }

    // ---- watches ---------------------------------------------------------

    /// Changes to VM records, owners and histories, from revision `from`
    /// (0: now). Parse keys with [`Keys::parse`].
    pub async fn watch_vms(&self, from: i64) -> Result<Watch> {
        self.store.watch_prefix(&self.keys.vms_prefix(), from).await
    }

    /// Nodes coming and going (their leases), and admin changes.
    pub async fn watch_nodes(&self, from: i64) -> Result<Watch> {
        self.store.watch_prefix(&self.keys.nodes_prefix(), from).await
    }

    // ---- the cluster's own record and its validation ---------------------

    /// The record `ferry cluster create` stored; None for a cluster never
    /// formed that way (its keys may still be in use).
    pub async fn cluster_record(&self) -> Result<Option<Versioned<ClusterRecord>>> {
        self.get_record(&self.keys.cluster()).await
    }

    /// The cluster's settings: the record's, or the defaults when there is
    /// no record.
    pub async fn settings(&self) -> Result<ClusterSettings> {
        Ok(self.cluster_record().await?.map(|r| r.value.settings).unwrap_or_default())
    }

    /// Forms the cluster: stores its record and the validation that
    /// preceded it in one transaction, only if the cluster has no record
    /// yet ([`Error::AlreadyExists`] otherwise). An unknown outcome is
    /// resolved by reading the record back. Returns the revision it made
    /// (0 when the read-back found it).
    pub async fn create_cluster(&self, record: &ClusterRecord, validation: &ValidationRecord) -> Result<i64> {
        if record.name != self.keys.cluster_name() {
            return Err(Error::BadName {
                what: "cluster name",
                name: record.name.clone(),
                why: "it is not the name of the cluster it is stored in",
            });
        }
        for n in &record.nodes {
            validate_name("node id", n)?;
        }
        let key = self.keys.cluster();
        let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([
            TxnOp::put(key.as_str(), records::encode(record), None),
            TxnOp::put(self.keys.validation().as_str(), records::encode(validation), None),
        ]);
        match self.store.txn("create cluster", txn).await {
            Ok(r) if r.succeeded() => {
                tracing::info!("cluster {} created with nodes {:?}", record.name, record.nodes);
                Ok(r.header().map_or(0, |h| h.revision()))
            }
            Ok(_) => Err(Error::AlreadyExists { key }),
            Err(e) if e.outcome_unknown() => match self.cluster_record().await? {
                Some(v) if v.value == *record => Ok(0),
                Some(_) => Err(Error::AlreadyExists { key }),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Replaces the last validation report, only while the cluster has a
    /// record ([`Error::NoSuchCluster`] otherwise). Idempotent.
    pub async fn put_validation(&self, validation: &ValidationRecord) -> Result<i64> {
        let cluster = self.keys.cluster();
        let txn = Txn::new()
            .when([Compare::create_revision(cluster.as_str(), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(self.keys.validation().as_str(), records::encode(validation), None)]);
        let r = self.store.txn("put validation", txn).await?;
        if !r.succeeded() {
            return Err(Error::NoSuchCluster { name: self.keys.cluster_name().to_owned() });
        }
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// The last validation report stored, if any.
    pub async fn validation(&self) -> Result<Option<Versioned<ValidationRecord>>> {
        self.get_record(&self.keys.validation()).await
    }

    /// Takes the `cluster update` lock under `lease` if nobody holds it.
    /// Ok(None) once ours; Ok(Some(holder)) if another run holds it.
    pub async fn take_update_lock(&self, lease: &Lease, holder: &str) -> Result<Option<String>> {
        let key = self.keys.update_lock();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                holder.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(lease.id())),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let r = self.store.txn("take update lock", txn).await?;
        if r.succeeded() {
            return Ok(None);
        }
        Ok(Some(
            first_kv(r.op_responses().first())
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                .unwrap_or_default(),
        ))
    }
}
