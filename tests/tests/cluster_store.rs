//! The cluster's etcd side against real etcd: three lab hosts, one etcd
//! member in each (`ferry lab up --hosts a,b,c --etcd`), the client in the
//! lab's client namespace (a tokio runtime on a thread that entered it), so
//! a host's member failing or being cut off never takes the client with it.
//! Needs root and etcd (make deps); fails without them unless
//! FERRY_NO_KVM=1.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use cluster::{
    ChangeKind, Cluster, ClusterKey, Error, HistoryEntry, HistoryKind, LeadershipLost, Lease, LostReason, NodeRecord,
    Owner, Store, StoreConfig, Takeover, VmRecord, FORMAT_VERSION,
};
use ferry_e2e::{root_available, Lab};

/// A three-host lab with etcd; `ferry lab down` on drop.
fn etcd_lab(name: &str) -> Lab {
    assert!(std::path::Path::new("/usr/bin/etcd").exists(), "etcd is missing: run `make deps` (Debian's etcd-server)");
    let lab = Lab { name: ferry_e2e::lab_name(name) };
    let t = Instant::now();
    lab.ok(&["up", "--hosts", "a,b,c", "--etcd"]);
    eprintln!("{name}: lab with 3 etcd members up in {:?}", t.elapsed());
    lab
}

fn endpoints(lab: &Lab) -> String {
    lab.ok(&["etcd", "endpoints"]).trim().to_owned()
}

/// Runs `f` on a tokio runtime whose threads live in namespace `netns`
/// (the thread enters it first; threads it starts inherit it), at most
/// `limit`.
fn in_netns<T: Send, Fut: Future<Output = T>>(netns: &str, limit: Duration, f: impl FnOnce() -> Fut + Send) -> T {
    let path = std::path::Path::new("/run/netns").join(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd; only this thread (and
            // the runtime threads it then starts) move.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {}", path.display());
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async { tokio::time::timeout(limit, f()).await.expect("the test ran past its limit") })
        })
        .join()
        .expect("the test thread")
    })
}

async fn connect(eps: &str) -> Store {
    Store::connect(StoreConfig::parse_list(eps)).await.expect("connect to the lab's etcd")
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        v: FORMAT_VERSION,
        id: id.into(),
        address: None,
        ferry_version: "test".into(),
        offers: serde_json::json!({}),
        registered_unix_ms: cluster::records::unix_ms(),
    }
}

fn vm(name: &str) -> VmRecord {
    VmRecord {
        v: FORMAT_VERSION,
        name: name.into(),
        config: serde_json::json!({"mem_mib": 64, "cmdline": "hello"}),
        preferred_owners: vec!["a".into(), "b".into()],
    }
}

#[test]
fn vm_records_are_created_once_and_owner_changes_compare_owner_and_epoch() {
    if !root_available("vm_records_are_created_once_and_owner_changes_compare_owner_and_epoch") {
        return;
    }
    let lab = etcd_lab("ce1");
    let eps = endpoints(&lab);
    in_netns(&lab.netns("client"), Duration::from_secs(30), || async move {
        let c = Cluster::new(connect(&eps).await, "t1").unwrap();
        let mut w = c.watch_vms(0).await.unwrap();

        let rev = c.create_vm(&vm("web")).await.unwrap();
        assert!(rev > 0);
        match c.create_vm(&vm("web")).await {
            Err(Error::AlreadyExists { key }) => assert_eq!(key, "/ferry/t1/vms/web"),
            other => panic!("a second create must be refused: {other:?}"),
        }
        assert_eq!(c.vm("web").await.unwrap().unwrap().value, vm("web"));
        assert_eq!(c.vms().await.unwrap().len(), 1, "owner and history keys are not VMs");

        let none = c.owner("web").await.unwrap().value;
        assert!(none.same(&Owner::new(None, 0)), "{none}");
        let a1 = c.change_owner("web", &none, Some("a")).await.unwrap();
        assert!(a1.same(&Owner::new(Some("a"), 1)));
        // A node still believing the VM is unowned at epoch 0 is refused.
        match c.change_owner("web", &none, Some("b")).await {
            Err(Error::StaleOwner { current: Some(cur), .. }) => assert!(cur.same(&a1), "{cur}"),
            other => panic!("a stale owner must be refused: {other:?}"),
        }
        // So is the right node with a stale epoch.
        match c.change_owner("web", &Owner::new(Some("a"), 0), Some("b")).await {
            Err(Error::StaleOwner { .. }) => {}
            other => panic!("a stale epoch must be refused: {other:?}"),
        }
        let b2 = c.change_owner("web", &a1, Some("b")).await.unwrap();
        assert!(b2.same(&Owner::new(Some("b"), 2)));
        assert!(c.owner("web").await.unwrap().value.same(&b2));
        assert!(matches!(c.owner("nope").await, Err(Error::NoSuchVm { .. })));

        let entry = |id: &str| HistoryEntry {
            v: FORMAT_VERSION,
            id: id.into(),
            kind: HistoryKind::LiveMove,
            at_unix_ms: cluster::records::unix_ms(),
            from: Some("a".into()),
            to: Some("b".into()),
            epoch: Some(2),
            figures: serde_json::json!({"downtime_ms": 4.2}),
        };
        assert_eq!(c.append_history("web", &entry("m1")).await.unwrap(), 1);
        assert_eq!(c.append_history("web", &entry("m2")).await.unwrap(), 2);
        let h = c.history("web").await.unwrap();
        assert_eq!(h.iter().map(|(s, e)| (*s, e.id.as_str())).collect::<Vec<_>>(), [(1, "m1"), (2, "m2")]);

        // The watch saw every change, in order: the record, the owner at
        // epochs 0, 1, 2 (never the refused ones), then the history.
        let mut seen = vec![];
        while seen.len() < 6 {
            let ch = w.next_within(Duration::from_secs(5)).await.expect("a change within 5 s").unwrap();
            assert_eq!(ch.kind, ChangeKind::Put);
            let key = c.keys().parse(&ch.kv.key).expect("a schema key");
            let epoch = match &key {
                ClusterKey::VmOwner(_) => {
                    Some(cluster::records::decode::<Owner>(&ch.kv.key, &ch.kv.value).unwrap().epoch)
                }
                _ => None,
            };
            seen.push((key, epoch));
        }
        use ClusterKey::*;
        let web = || "web".to_string();
        assert_eq!(
            seen,
            [
                (Vm(web()), None),
                (VmOwner(web()), Some(0)),
                (VmOwner(web()), Some(1)),
                (VmOwner(web()), Some(2)),
                (VmHistory(web(), 1), None),
                (VmHistory(web(), 2), None)
            ]
        );
        assert!(w.next_within(Duration::from_millis(300)).await.is_none(), "nothing more");
    });
}

#[test]
fn node_keys_expire_with_their_lease_and_a_leader_is_elected_once() {
    if !root_available("node_keys_expire_with_their_lease_and_a_leader_is_elected_once") {
        return;
    }
    let lab = etcd_lab("ce2");
    let eps = endpoints(&lab);
    in_netns(&lab.netns("client"), Duration::from_secs(40), || async move {
        let c = Cluster::new(connect(&eps).await, "t2").unwrap();
        let ttl = Duration::from_secs(2);
        let a = c.register_node(&node("a"), ttl, Takeover::Refuse).await.unwrap();
        let b = c.register_node(&node("b"), ttl, Takeover::Refuse).await.unwrap();
        // A second agent for node a is refused while a's lease lives.
        match c.register_node(&node("a"), ttl, Takeover::Refuse).await {
            Err(Error::NodeHeld { node, lease }) => assert_eq!((node.as_str(), lease), ("a", a.lease.id())),
            other => panic!("{:?}", other.map(|n| n.node)),
        }
        let listing = c.store().list(&c.keys().nodes_prefix()).await.unwrap();
        assert_eq!(c.nodes().await.unwrap().len(), 2);

        // Leader: a first; b waits while a's lease lives.
        let a_lead = c.try_lead(&a.lease, "a").await.unwrap().expect("a leads");
        assert!(c.try_lead(&b.lease, "b").await.unwrap().is_err(), "only one leader");
        assert!(c.campaign(&b.lease, "b", Duration::from_millis(500)).await.unwrap().is_none());
        assert_eq!(c.leader().await.unwrap().unwrap().value.node, "a");

        // a stops renewing (a crash, as far as etcd can tell).
        let mut w = c.watch_nodes(listing.revision + 1).await.unwrap();
        let stopped = Instant::now();
        a.lease.stop_keepalive();
        let b_campaign = c.campaign(&b.lease, "b", Duration::from_secs(10));
        let a_lost = async {
            let why = a_lead.lost().await;
            (why, stopped.elapsed())
        };
        let (b_lead, (why, a_lost_after)) = tokio::join!(b_campaign, a_lost);
        let b_lead = b_lead.unwrap().expect("b leads once a's lease is gone");
        let b_after = stopped.elapsed();
        eprintln!("a's leadership lost after {a_lost_after:?} ({why:?}); b leader after {b_after:?}");
        assert_eq!(why, LeadershipLost::Lease);
        assert!(a_lost_after <= b_after, "a stops leading before b starts");
        // a's last renewal was at most TTL/3 before it stopped.
        assert!(b_after >= ttl - ttl / 3 - Duration::from_millis(50), "b waited for a's lease: {b_after:?}");
        assert!(b_lead.term() > a_lead.term(), "terms grow");
        assert_eq!(a.lease.lost().await, LostReason::Abandoned);

        // Node a's key went with its lease; b's, renewed, stayed.
        let deleted = loop {
            let ch = w.next_within(Duration::from_secs(5)).await.expect("a's key goes").unwrap();
            if ch.kind == ChangeKind::Delete {
                break ch;
            }
        };
        assert_eq!(deleted.kv.key, "/ferry/t2/nodes/a");
        eprintln!("node a's key deleted {:?} after its keepalive stopped (TTL {ttl:?})", stopped.elapsed());
        let ids: Vec<String> = c.nodes().await.unwrap().into_iter().map(|n| n.value.id).collect();
        assert_eq!(ids, ["b"]);
        assert!(b.lease.is_held());
        assert_eq!(c.leader().await.unwrap().unwrap().value.node, "b");

        // Once a's key is gone, a new agent for a registers.
        let a2 = c.register_node(&node("a"), ttl, Takeover::Refuse).await.unwrap();
        b_lead.resign().await.unwrap();
        assert!(c.leader().await.unwrap().is_none(), "resigned");
        let lease = Lease::grant(c.store(), ttl).await.unwrap();
        assert!(c.try_lead(&lease, "c").await.unwrap().is_ok());
        a2.lease.revoke().await.unwrap();
        assert!(c.node("a").await.unwrap().is_none(), "revoked: gone at once");
    });
}

#[test]
fn the_store_keeps_working_with_a_member_killed_and_fails_fast_without_quorum() {
    if !root_available("the_store_keeps_working_with_a_member_killed_and_fails_fast_without_quorum") {
        return;
    }
    let lab = etcd_lab("ce3");
    let eps = endpoints(&lab);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (step_tx, step_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    std::thread::scope(|s| {
        let client = s.spawn(|| {
            let mut step_rx = step_rx;
            in_netns(&lab.netns("client"), Duration::from_secs(50), || async move {
                // Shorter deadlines than the defaults, to keep the test short.
                let mut cfg = StoreConfig::parse_list(&eps);
                cfg.request_timeout = Duration::from_secs(1);
                cfg.op_timeout = Duration::from_secs(3);
                let c = Cluster::new(Store::connect(cfg).await.unwrap(), "t3").unwrap();
                // The first endpoint (a) is preferred: make sure of it.
                c.store().put("/ferry/t3/probe", b"1".to_vec(), None).await.unwrap();
                assert_eq!(c.store().preferred_endpoint(), "http://10.200.77.1:2379");
                let mut w = c.watch_vms(0).await.unwrap();
                c.create_vm(&vm("v0")).await.unwrap();

                ready_tx.send(()).unwrap();
                assert_eq!(step_rx.recv().await, Some("a killed"));
                // Reads are retried across members: the first one waits
                // out the election if a's member was the etcd leader.
                let t = Instant::now();
                assert!(c.store().get("/ferry/t3/vms/v0").await.expect("reads go on without member a").is_some());
                let first_read = t.elapsed();
                assert_ne!(c.store().preferred_endpoint(), "http://10.200.77.1:2379");
                // Writes too. One sent into the election gap may come back
                // "outcome unknown"; being conditional, it is simply
                // repeated, and the repeat says whether the first landed.
                let t = Instant::now();
                let mut unknown = 0;
                loop {
                    match c.create_vm(&vm("v1")).await {
                        Ok(_) => break,
                        Err(Error::AlreadyExists { .. }) if unknown > 0 => break,
                        Err(e) if e.outcome_unknown() && unknown < 3 => unknown += 1,
                        Err(e) => panic!("writes go on without member a: {e}"),
                    }
                }
                let owner = c.owner("v1").await.unwrap().value;
                c.change_owner("v1", &owner, Some("b")).await.unwrap();
                eprintln!(
                    "after a's member was killed: first read {first_read:?}, first write {:?} \
                     ({unknown} outcome-unknown attempts)",
                    t.elapsed()
                );
                // The watch, attached to a, moved to another member and
                // missed nothing.
                let mut keys = vec![];
                while keys.len() < 5 {
                    let ch = w.next_within(Duration::from_secs(8)).await.expect("the watch goes on").unwrap();
                    keys.push(ch.kv.key);
                }
                assert_eq!(
                    keys,
                    [
                        "/ferry/t3/vms/v0",
                        "/ferry/t3/vms/v0/owner",
                        "/ferry/t3/vms/v1",
                        "/ferry/t3/vms/v1/owner",
                        "/ferry/t3/vms/v1/owner"
                    ]
                );

                ready_tx.send(()).unwrap();
                assert_eq!(step_rx.recv().await, Some("b cut"));
                // No quorum (a dead, b cut off): calls fail within the
                // operation deadline instead of hanging; a write is never
                // reported as done.
                let t = Instant::now();
                let r = c.store().get("/ferry/t3/vms/v1").await;
                assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
                let r = c.create_vm(&vm("v2")).await;
                assert!(matches!(r, Err(Error::Unavailable { .. } | Error::OutcomeUnknown { .. })), "{r:?}");
                let took = t.elapsed();
                eprintln!("without quorum: a read and a write failed in {took:?}");
                assert!(took < 2 * c.store().config().op_timeout + Duration::from_secs(1));

                ready_tx.send(()).unwrap();
                assert_eq!(step_rx.recv().await, Some("healed"));
                let t = Instant::now();
                // v2's create may or may not have landed: it is conditional,
                // so repeating it is safe and says which. The healed member
                // may still be catching up (an election on a loaded
                // machine can outlast one call's deadline): repeat an
                // unanswered call, as a caller would after reading back.
                loop {
                    match c.create_vm(&vm("v2")).await {
                        Ok(_) | Err(Error::AlreadyExists { .. }) => break,
                        Err(e @ (Error::OutcomeUnknown { .. } | Error::Unavailable { .. }))
                            if t.elapsed() < Duration::from_secs(10) =>
                        {
                            eprintln!("after healing, not yet: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("after healing: {e}"),
                    }
                }
                assert_eq!(c.vms().await.unwrap().len(), 3);
                eprintln!("quorum back: first write {:?} after healing", t.elapsed());
            })
        });
        let wait =
            |what| ready_rx.recv_timeout(Duration::from_secs(40)).unwrap_or_else(|_| panic!("client ready for {what}"));
        wait("the kill");
        lab.ok(&["etcd", "kill", "a"]);
        step_tx.send("a killed").unwrap();
        wait("the cut");
        lab.ok(&["cut", "b"]);
        step_tx.send("b cut").unwrap();
        wait("the heal");
        lab.ok(&["heal", "b"]);
        lab.ok(&["etcd", "start", "a"]);
        step_tx.send("healed").unwrap();
        client.join().expect("the client thread");
    });
    let s = lab.status();
    assert!(s["etcd"]["members"].as_array().unwrap().iter().all(|m| m["running"] == true), "{s:#}");
}
