use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::*;

const TTL: u64 = 1000;

fn step(cur: Option<&LeaseRecord>, op: Op, now: u64) -> Result<LeaseRecord> {
    transition("d", cur, op, TTL, now)
}

fn lease(r: &LeaseRecord) -> Lease {
    Lease::from_record(r)
}

#[test]
fn state_machine() {
    // acquire a free disk: epoch 1
    let r1 = step(None, Op::Acquire { host: "a" }, 100).unwrap();
    assert_eq!((r1.owner.as_deref(), r1.epoch, r1.expires_unix_ms), (Some("a"), 1, 1100));
    let a1 = lease(&r1);
    // held: b is refused, and so is a second acquire by a
    for host in ["b", "a"] {
        let e = step(Some(&r1), Op::Acquire { host }, 200).unwrap_err();
        assert!(matches!(&e, Error::AlreadyLeased { owner, epoch: 1, .. } if owner == "a"), "{e}");
        assert!(e.to_string().contains("host \"a\" at epoch 1"), "{e}");
    }
    // renew pushes the expiry out, same epoch
    let r2 = step(Some(&r1), Op::Renew(&a1), 900).unwrap();
    assert_eq!((r2.epoch, r2.expires_unix_ms), (1, 1900));
    // takeover before expiry is refused; acquire after expiry too (it is deliberate)
    assert!(matches!(step(Some(&r2), Op::Takeover { host: "b" }, 1800), Err(Error::AlreadyLeased { .. })));
    let e = step(Some(&r2), Op::Acquire { host: "b" }, 2000).unwrap_err();
    assert!(e.to_string().contains("takeover"), "{e}");
    // takeover after expiry: epoch 2, and a's epoch is now stale everywhere
    let r3 = step(Some(&r2), Op::Takeover { host: "b" }, 2000).unwrap();
    assert_eq!((r3.owner.as_deref(), r3.epoch, r3.previous_owner.as_deref()), (Some("b"), 2, Some("a")));
    for op in [Op::Renew(&a1), Op::Release(&a1), Op::Handoff { lease: &a1, to: "c" }] {
        let e = step(Some(&r3), op, 2100).unwrap_err();
        assert!(matches!(e, Error::StaleEpoch { presented: 1, current: 2, .. }), "{e}");
    }
    // handoff b -> a: epoch 3, a owns it, b is stale
    let b2 = lease(&r3);
    let r4 = step(Some(&r3), Op::Handoff { lease: &b2, to: "a" }, 2200).unwrap();
    assert_eq!((r4.owner.as_deref(), r4.epoch, r4.expires_unix_ms), (Some("a"), 3, 3200));
    assert!(matches!(step(Some(&r4), Op::Renew(&b2), 2300), Err(Error::StaleEpoch { .. })));
    // a forged lease with the right epoch but the wrong host
    let forged = Lease { host: "z".into(), ..lease(&r4) };
    assert!(matches!(step(Some(&r4), Op::Renew(&forged), 2300), Err(Error::NotOwner { .. })));
    // release: free, epoch kept; the released lease can't be renewed; next acquire is epoch 4
    let a3 = lease(&r4);
    let r5 = step(Some(&r4), Op::Release(&a3), 2400).unwrap();
    assert_eq!((r5.owner.as_deref(), r5.epoch), (None, 3));
    assert!(matches!(step(Some(&r5), Op::Renew(&a3), 2500), Err(Error::NotOwner { .. })));
    let r6 = step(Some(&r5), Op::Acquire { host: "b" }, 2500).unwrap();
    assert_eq!(r6.epoch, 4);
    // renewing after expiry when nobody took over is allowed (epoch unchanged)
    let b4 = lease(&r6);
    assert_eq!(step(Some(&r6), Op::Renew(&b4), 9000).unwrap().expires_unix_ms, 10000);
    // bad host names never reach the record
    assert!(matches!(step(None, Op::Acquire { host: "../x" }, 0), Err(Error::BadName { .. })));
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("csv-fs-lease-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The same life cycle through a real store, including the fence and
/// expiry on the wall clock.
fn life_cycle(store: &dyn LeaseStore) {
    let a = store.acquire("d", "a").unwrap();
    assert_eq!(a.epoch, 1);
    store.check(&a).unwrap();
    assert!(matches!(store.acquire("d", "b"), Err(Error::AlreadyLeased { .. })));
    let a = store.renew(&a).unwrap();
    let b = store.handoff(&a, "b").unwrap();
    assert_eq!((b.host.as_str(), b.epoch), ("b", 2));
    assert!(matches!(store.check(&a), Err(Error::StaleEpoch { .. })), "the source is fenced after handoff");
    let adopted = store.adopt("d", "b").unwrap();
    assert_eq!((adopted.host.as_str(), adopted.epoch), ("b", 2));
    assert!(store.adopt("d", "a").is_err());
    // A destination that waited past the TTL for its commit still adopts
    // (nobody took over: same epoch), with a fresh TTL.
    std::thread::sleep(store.ttl() + Duration::from_millis(20));
    let late = store.adopt("d", "b").unwrap();
    assert_eq!(late.epoch, 2);
    store.check(&late).unwrap();
    let b = late;
    // b stops renewing (crash): after the TTL a takes over with epoch 3
    std::thread::sleep(store.ttl() + Duration::from_millis(20));
    assert!(matches!(store.check(&b), Err(Error::LeaseExpired { .. })));
    let a = store.takeover("d", "a").unwrap();
    assert_eq!(a.epoch, 3);
    let e = store.renew(&b).unwrap_err();
    assert!(matches!(e, Error::StaleEpoch { presented: 2, current: 3, .. }), "{e}");
    assert!(matches!(store.check(&b), Err(Error::StaleEpoch { .. })), "the stale owner is refused by epoch");
    store.release(&a).unwrap();
    assert!(store.check(&a).is_err());
    assert_eq!(store.read("d").unwrap().unwrap().owner, None);
    assert_eq!(store.acquire("d", "b").unwrap().epoch, 4);
}

#[test]
fn memory_store_life_cycle() {
    life_cycle(&MemLeaseStore::new(Duration::from_millis(100)));
}

#[test]
fn file_store_life_cycle() {
    let dir = scratch("life");
    life_cycle(&FileLeaseStore::new(&dir, Duration::from_millis(100)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Threads each with their own store (so their own open file descriptions
/// and OFD locks) race for one disk: exactly one wins.
#[test]
fn racing_acquirers_one_winner() {
    let dir = scratch("race");
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (dir, barrier) = (dir.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let store = FileLeaseStore::new(&dir, Duration::from_secs(10));
                barrier.wait();
                store.acquire("d", &format!("h{i}")).is_ok()
            })
        })
        .collect();
    let wins = handles.into_iter().map(|h| h.join().unwrap()).filter(|&w| w).count();
    assert_eq!(wins, 1);
    assert_eq!(FileLeaseStore::new(&dir, DEFAULT_TTL).read("d").unwrap().unwrap().epoch, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_records_are_named_and_left_alone() {
    let dir = scratch("corrupt");
    let store = FileLeaseStore::new(&dir, Duration::from_secs(10));
    store.acquire("d", "a").unwrap();
    let path = store.record_path("d");
    let good = std::fs::read(&path).unwrap();
    for bad in [&good[..good.len() / 2], b"", b"{\"version\": 9}"] {
        std::fs::write(&path, bad).unwrap();
        let e = store.acquire("d", "b").unwrap_err();
        assert!(matches!(e, Error::CorruptLease { .. }), "{e}");
        assert!(e.to_string().contains("corrupt lease record"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), bad, "a refused update writes nothing");
    }
    let other = String::from_utf8(good).unwrap().replace("\"disk\": \"d\"", "\"disk\": \"e\"");
    std::fs::write(&path, other).unwrap();
    assert!(store.read("d").unwrap_err().to_string().contains("record is for disk \"e\""));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn keeper_renews_and_notices_loss() {
    let store: Arc<dyn LeaseStore> = Arc::new(MemLeaseStore::new(Duration::from_millis(90)));
    let lease = store.acquire("d", "a").unwrap();
    let keeper = LeaseKeeper::start(Arc::clone(&store), lease.clone());
    std::thread::sleep(Duration::from_millis(300));
    let now = keeper.lease().unwrap();
    assert!(now.expires_unix_ms > lease.expires_unix_ms, "renewed");
    store.check(&now).unwrap();
    // Someone forces a handoff away (as a takeover would): the keeper sees it.
    store.handoff(&now, "b").unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert!(keeper.lease().unwrap_err().contains("epoch"));
    assert!(keeper.stop().is_err());
}

/// A lease a keeper renews cannot be released or handed away by hand
/// without `force` (its VMM would go on writing); once the keeper is gone
/// and the lease expired, or after a change of owner, it can.
#[test]
fn a_kept_lease_is_released_by_hand_only_with_force() {
    let store: Arc<dyn LeaseStore> = Arc::new(MemLeaseStore::new(Duration::from_millis(300)));
    let lease = store.acquire("d", "a").unwrap();
    assert!(!store.read("d").unwrap().unwrap().kept, "acquired, not yet kept");
    let keeper = LeaseKeeper::start(Arc::clone(&store), lease);
    std::thread::sleep(Duration::from_millis(50));
    assert!(store.read("d").unwrap().unwrap().kept, "the keeper's first renewal is at once");
    let held = keeper.lease().unwrap();
    // A renewal by hand leaves the mark.
    store.renew(&held).unwrap();
    assert!(store.read("d").unwrap().unwrap().kept);
    for op in [Op::Release(&held), Op::Handoff { lease: &held, to: "b" }] {
        let e = store.apply_by_hand("d", op, false).unwrap_err();
        assert!(matches!(&e, Error::KeptByVmm { owner, epoch: 1, .. } if owner == "a"), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
    }
    assert_eq!(store.read("d").unwrap().unwrap().owner.as_deref(), Some("a"), "refused: nothing changed");
    // --force goes past a live keeper, and the change of owner clears the mark.
    let r = store.apply_by_hand("d", Op::Handoff { lease: &keeper.lease().unwrap(), to: "b" }, true).unwrap();
    assert_eq!((r.owner.as_deref(), r.epoch, r.kept), (Some("b"), 2, false));
    std::thread::sleep(Duration::from_millis(150));
    assert!(keeper.stop().is_err(), "the forced-out keeper sees its lease gone");
    // A keeper that died without releasing (kill -9): refused while its
    // lease lives, no force needed once it expired.
    let keeper = LeaseKeeper::start(Arc::clone(&store), Lease::from_record(&r));
    std::thread::sleep(Duration::from_millis(50));
    let held = keeper.stop().unwrap();
    assert!(store.apply_by_hand("d", Op::Release(&held), false).is_err());
    std::thread::sleep(Duration::from_millis(320));
    store.apply_by_hand("d", Op::Release(&held), false).unwrap();
    assert_eq!(store.read("d").unwrap().unwrap().owner, None);
    let r = store.acquire("d", "b").unwrap();
    let r = store.read(&r.disk).unwrap().unwrap();
    let b = Lease::from_record(&r);
    store.apply_by_hand("d", Op::Release(&b), false).unwrap();
    assert_eq!(store.read("d").unwrap().unwrap().owner, None);
}

#[test]
fn records_without_the_kept_mark_still_load() {
    let old = r#"{"version":1,"disk":"d","owner":"a","epoch":3,"expires_unix_ms":5,"ttl_ms":1000,
                  "updated_unix_ms":4,"previous_owner":null}"#;
    let r: LeaseRecord = serde_json::from_str(old).unwrap();
    assert!(!r.kept);
}
