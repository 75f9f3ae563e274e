//! Engine tests on a real data directory: per-key atomic read-merge-write under concurrency, DVVS
//! merging, partition scans, hints across restarts, identity checks, DISK_FULL, and a 1,000,000-key
//! clean restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use pairdb_core::dvv::{Actor, VersionSet, VersionVector};
use pairdb_core::reason::HasReason;
use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionCount, PartitionId};
use pairdb_storage::engine::{
    ApplyDeadline, CoordinatedWrite, Engine, EngineConfig, EngineError, QuotaGuard, SyncMode,
    TombstonePlacement,
};
use pairdb_storage::keys::RecordKey;

fn config(dir: &std::path::Path, node_id: u32) -> EngineConfig {
    EngineConfig {
        data_dir: dir.to_path_buf(),
        node_id: NodeId(node_id),
        partitions: PartitionCount::default(),
        sync: SyncMode::Always,
        cache_bytes: 16 * 1024 * 1024,
        record_cache_bytes: 16 * 1024 * 1024,
        disk_reserve_bytes: 0,
    }
}

fn key(name: &str) -> RecordKey {
    RecordKey::new(PartitionCount::default(), "tenant-a", name)
}

fn blind(actor: u64, value: &[u8]) -> VersionSet {
    let mut set = VersionSet::new();
    set.update(&VersionVector::new(), Actor(actor), Some(value.to_vec()), 1, None).unwrap();
    set
}

#[test]
fn concurrent_blind_writes_to_one_key_all_become_siblings() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let k = key("hot");
    let threads: Vec<_> = (0..64u8)
        .map(|i| {
            let (engine, k) = (engine.clone(), k.clone());
            std::thread::spawn(move || {
                engine.coordinate_write(&k, &VersionVector::new(), Some(vec![i]), 1, Some(64), false).unwrap()
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let set = engine.get(&k).unwrap().unwrap();
    assert_eq!(set.siblings().len(), 64);
    let values: BTreeSet<_> = set.siblings().iter().map(|s| s.value.clone().unwrap()).collect();
    assert_eq!(values.len(), 64);
    // The 65th blind write would pass the cap.
    let err =
        engine.coordinate_write(&k, &VersionVector::new(), Some(vec![0]), 1, Some(64), false).unwrap_err();
    assert!(matches!(err, EngineError::Update(_)), "{err:?}");
    assert_eq!(err.reason(), "TOO_MANY_SIBLINGS");
}

#[test]
fn concurrent_merges_of_concurrent_sets_keep_every_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let k = key("merged");
    let threads: Vec<_> = (0..64u64)
        .map(|actor| {
            let (engine, k) = (engine.clone(), k.clone());
            std::thread::spawn(move || engine.merge(&k, &blind(100 + actor, &actor.to_be_bytes())).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(engine.get(&k).unwrap().unwrap().siblings().len(), 64);
}

#[test]
fn merge_rules_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let k = key("rules");
    let older = blind(7, b"v1");
    let mut newer = older.clone();
    let ctx = newer.vector().clone();
    newer.update(&ctx, Actor(7), Some(b"v2".to_vec()), 2, None).unwrap();

    // An older set arriving after a newer one changes nothing.
    assert!(engine.merge(&k, &newer).unwrap());
    assert!(!engine.merge(&k, &older).unwrap());
    assert_eq!(engine.get(&k).unwrap().unwrap(), newer);

    // A concurrent set from another actor becomes a sibling.
    assert!(engine.merge(&k, &blind(8, b"other")).unwrap());
    assert_eq!(engine.get(&k).unwrap().unwrap().live_values().len(), 2);

    // A tombstone written with a covering context hides both values.
    let ctx = engine.get(&k).unwrap().unwrap().vector().clone();
    let after = engine.coordinate_write(&k, &ctx, None, 3, None, false).unwrap();
    assert!(after.is_deleted());
    assert!(engine.get(&k).unwrap().unwrap().live_values().is_empty());
}

#[test]
fn partition_scan_returns_exactly_the_partition_and_resumes_from_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let q = PartitionCount::new(16).unwrap();
    let engine = Engine::open(&EngineConfig { partitions: q, ..config(dir.path(), 1) }).unwrap();
    let mut expected: Vec<BTreeSet<(String, String)>> = vec![BTreeSet::new(); 16];
    for tenant in ["alpha", "beta"] {
        for i in 0..600 {
            let k = RecordKey::new(q, tenant, &format!("key-{i}"));
            engine.merge(&k, &blind(1, b"x")).unwrap();
            expected[k.partition.0 as usize].insert((k.tenant.clone(), k.key.clone()));
        }
    }
    for partition in 0..16u32 {
        // Scan in batches of 7, resuming from each cursor as a cut stream would.
        let mut seen = BTreeSet::new();
        let mut cursor = Vec::new();
        loop {
            let batch = engine.scan_partition(PartitionId(partition), &cursor, &BTreeSet::new(), 7).unwrap();
            for (k, _) in &batch.records {
                assert_eq!(k.partition.0, partition, "foreign key in partition {partition}");
                assert!(seen.insert((k.tenant.clone(), k.key.clone())), "duplicate after resume");
            }
            if batch.done {
                break;
            }
            cursor = batch.next_cursor;
        }
        assert_eq!(seen, expected[partition as usize]);
        // Tenant filter.
        let only_beta = engine
            .scan_partition(PartitionId(partition), &[], &BTreeSet::from(["beta".to_owned()]), 100_000)
            .unwrap();
        assert!(only_beta.done);
        let beta: BTreeSet<_> =
            only_beta.records.iter().map(|(k, _)| (k.tenant.clone(), k.key.clone())).collect();
        let expected_beta: BTreeSet<_> =
            expected[partition as usize].iter().filter(|(t, _)| t == "beta").cloned().collect();
        assert_eq!(beta, expected_beta);
    }
}

#[test]
fn hints_survive_restart_and_are_delivered_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let q = PartitionCount::default();
    let keys: Vec<RecordKey> = (0..50).map(|i| RecordKey::new(q, "t", &format!("h{i}"))).collect();
    {
        let engine = Engine::open(&config(dir.path(), 1)).unwrap();
        for k in &keys {
            engine.put_hint(NodeId(9), k, &blind(3, b"hinted")).unwrap();
        }
        engine.put_hint(NodeId(8), &keys[0], &blind(3, b"for another node")).unwrap();
    }
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let hints = engine.list_hints(NodeId(9), None, 1000).unwrap();
    assert_eq!(hints.len(), 50);
    assert_eq!(engine.count_hints(NodeId(9)), 50);
    assert!(hints.iter().all(|h| h.target_node == NodeId(9) && h.set == blind(3, b"hinted")));
    let partition = keys[0].partition;
    let in_partition = engine.list_hints(NodeId(9), Some(partition), 1000).unwrap();
    assert!(!in_partition.is_empty());
    assert!(in_partition.iter().all(|h| h.key.partition == partition));
    assert_eq!(engine.hint_targets().unwrap(), vec![8, 9]);
    // A delivered hint goes only if it did not grow meanwhile.
    let first = &in_partition[0];
    engine.put_hint(NodeId(9), &first.key, &blind(4, b"grew")).unwrap();
    assert!(!engine.delete_hint_if_unchanged(NodeId(9), &first.key, &first.set).unwrap());
    let grown = engine.list_hints(NodeId(9), Some(partition), 1000).unwrap();
    let grown = grown.iter().find(|h| h.key == first.key).unwrap();
    assert!(engine.delete_hint_if_unchanged(NodeId(9), &grown.key, &grown.set).unwrap());
    assert_eq!(engine.count_hints(NodeId(9)), 49);
    assert_eq!(engine.count_hints(NodeId(8)), 1);
}

/// The full-ack GC path: a confirmation is recorded only for the exact tombstone-only set the node
/// holds, survives a restart, purges only after the grace and while the placement holds, and is
/// forgotten (the tombstone kept) once the record or the placement changed.
#[test]
fn confirmed_tombstones_are_purged_only_unchanged_and_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let placement = TombstonePlacement { topology_epoch: 4, replication_factor: 3 };
    let holds = |_: &RecordKey, p: TombstonePlacement| p == placement;
    let never = |_: &RecordKey, _: TombstonePlacement| false;
    let delete = |engine: &Engine, k: &RecordKey, at_ms: u64| {
        engine
            .coordinate_write(k, &VersionVector::new(), Some(b"v".to_vec()), at_ms - 1, None, false)
            .unwrap();
        let context = engine.get(k).unwrap().unwrap().vector().clone();
        engine.coordinate_write(k, &context, None, at_ms, None, false).unwrap()
    };
    let (doomed, revived, moved) = (key("doomed"), key("revived"), key("moved"));
    {
        let engine = Engine::open(&config(dir.path(), 1)).unwrap();
        let tombstone = delete(&engine, &doomed, 1_000);
        // Only the set the node holds, and only tombstones, are confirmed.
        assert!(!engine.confirm_tombstone(&doomed, &blind(9, b"other"), placement).unwrap());
        assert!(!engine.confirm_tombstone(&key("absent"), &tombstone, placement).unwrap());
        assert!(engine.confirm_tombstone(&doomed, &tombstone, placement).unwrap());
        let tombstone = delete(&engine, &revived, 1_000);
        assert!(engine.confirm_tombstone(&revived, &tombstone, placement).unwrap());
        let tombstone = delete(&engine, &moved, 1_000);
        assert!(engine.confirm_tombstone(&moved, &tombstone, placement).unwrap());
        assert_eq!(engine.confirmed_tombstones(), 3);
    }
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    assert_eq!(engine.confirmed_tombstones(), 3, "confirmations are lost on restart");

    // Within the grace: nothing is purged, nothing forgotten.
    assert_eq!(engine.collect_confirmed_tombstones(None, 100, 1_000, &holds).unwrap(), (0, None));
    assert_eq!(engine.confirmed_tombstones(), 3);

    // A concurrent write after the delete: the record is no longer the confirmed set.
    engine.merge(&revived, &blind(9, b"concurrent")).unwrap();
    assert_eq!(engine.collect_confirmed_tombstones(None, 100, 1_000, &holds).unwrap(), (0, None));
    assert_eq!(engine.confirmed_tombstones(), 2);
    assert_eq!(engine.get(&revived).unwrap().unwrap().live_values().len(), 1);

    // The placement changed (a migration since): forgotten, the tombstone stays for anti-entropy.
    let only_moved =
        |k: &RecordKey, p: TombstonePlacement| if *k == moved { never(k, p) } else { holds(k, p) };
    assert_eq!(engine.collect_confirmed_tombstones(None, 100, 1_000, &only_moved).unwrap(), (0, None));
    assert_eq!(engine.confirmed_tombstones(), 1);
    assert!(engine.get(&moved).unwrap().unwrap().is_deleted());

    // Past the grace, unchanged: purged.
    assert_eq!(engine.collect_confirmed_tombstones(None, 100, 1_001, &holds).unwrap(), (1, None));
    assert_eq!(engine.get(&doomed).unwrap(), None);
    assert_eq!(engine.confirmed_tombstones(), 0);
    assert!(engine.get(&moved).unwrap().unwrap().is_deleted());
}

/// Riak's KV679: a key purged here and written again must not mint a dot an old tombstone (still on
/// another replica, or in a client's context) covers, or merging that tombstone drops the new,
/// acknowledged write. Dots are minted under the record's own actor, fresh for each record lifetime.
#[test]
fn a_key_written_again_after_a_purge_never_reuses_a_dot() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let k = key("recycled");
    let first =
        engine.coordinate_write(&k, &VersionVector::new(), Some(b"v1".to_vec()), 1, None, false).unwrap();
    let second = engine.coordinate_write(&k, first.vector(), Some(b"v2".to_vec()), 2, None, false).unwrap();
    let actor = second.siblings()[0].dot.actor;
    assert_eq!(first.siblings()[0].dot.actor, actor, "a living record keeps its minting actor");
    let tombstone = engine.coordinate_write(&k, second.vector(), None, 3, None, false).unwrap();
    assert!(tombstone.is_deleted());

    // Each removal path, then the same blind write again.
    let digest = pairdb_storage::merkle::version_digest(&tombstone);
    assert_eq!(engine.purge_tombstones(&[(k.clone(), digest)], 10).unwrap(), 1);
    assert_eq!(engine.get(&k).unwrap(), None);
    let reborn =
        engine.coordinate_write(&k, &VersionVector::new(), Some(b"new".to_vec()), 11, None, false).unwrap();
    assert_ne!(reborn.siblings()[0].dot.actor, actor, "a purged record's actor is never used again");

    // The old tombstone arrives from a replica that has not purged yet: the new write survives.
    assert!(engine.merge(&k, &tombstone).unwrap());
    let merged = engine.get(&k).unwrap().unwrap();
    assert_eq!(merged.live_values().len(), 1, "the acknowledged write was dropped: {merged:?}");
    // And a write that merely re-creates the record from a merge mints under a fresh actor too.
    let reborn_actor = reborn.siblings()[0].dot.actor;
    let after =
        engine.coordinate_write(&k, merged.vector(), Some(b"newer".to_vec()), 12, None, false).unwrap();
    assert_eq!(after.siblings()[0].dot.actor, reborn_actor, "the record kept its actor through the merge");

    let gone = key("moved-away");
    let set =
        engine.coordinate_write(&gone, &VersionVector::new(), Some(b"x".to_vec()), 1, None, false).unwrap();
    let partition = gone.partition;
    let (deleted, complete) = engine.delete_unowned(partition, &|t| t == "tenant-a", 1000).unwrap();
    assert!(deleted >= 1 && complete);
    // Re-created by a merge first (a peer's copy), then written here: a fresh actor, not the old one.
    assert!(engine.merge(&gone, &blind(9, b"peer")).unwrap());
    let rewritten =
        engine.coordinate_write(&gone, &VersionVector::new(), Some(b"y".to_vec()), 2, None, false).unwrap();
    let minted =
        rewritten.siblings().iter().map(|s| s.dot.actor).filter(|a| *a != Actor(9)).collect::<Vec<_>>();
    assert_eq!(minted.len(), 1);
    assert_ne!(minted[0], set.siblings()[0].dot.actor);
}

/// Confirmations are walked in bounded batches with a cursor.
#[test]
fn confirmed_tombstone_collection_resumes_from_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let placement = TombstonePlacement { topology_epoch: 1, replication_factor: 1 };
    for i in 0..25 {
        let k = key(&format!("k{i}"));
        let tombstone = engine.coordinate_write(&k, &VersionVector::new(), None, 10, None, false).unwrap();
        assert!(engine.confirm_tombstone(&k, &tombstone, placement).unwrap());
    }
    let holds = |_: &RecordKey, _: TombstonePlacement| true;
    let (mut cursor, mut purged, mut calls) = (None, 0, 0);
    loop {
        let (done, next) = engine.collect_confirmed_tombstones(cursor.as_deref(), 10, 11, &holds).unwrap();
        purged += done;
        calls += 1;
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!((purged, calls), (25, 3));
    assert_eq!(engine.confirmed_tombstones(), 0);
}

#[test]
fn data_directory_of_another_node_or_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Engine::open(&config(dir.path(), 1)).unwrap());
    let err = Engine::open(&config(dir.path(), 2)).unwrap_err();
    assert!(err.to_string().contains("belongs to node 1, not node 2"), "{err}");
    let identity = std::fs::read_to_string(dir.path().join("IDENTITY")).unwrap();
    std::fs::write(dir.path().join("IDENTITY"), identity.replace("format_version=1", "format_version=7"))
        .unwrap();
    let err = Engine::open(&config(dir.path(), 1)).unwrap_err();
    assert!(err.to_string().contains("data format version 7"), "{err}");
}

#[test]
fn low_disk_space_refuses_writes_but_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    let k = key("full");
    {
        let engine = Engine::open(&config(dir.path(), 1)).unwrap();
        engine.merge(&k, &blind(1, b"kept")).unwrap();
    }
    let engine =
        Engine::open(&EngineConfig { disk_reserve_bytes: u64::MAX, ..config(dir.path(), 1) }).unwrap();
    let err = engine.merge(&k, &blind(2, b"refused")).unwrap_err();
    assert_eq!(err.reason(), "DISK_FULL");
    assert_eq!(engine.get(&k).unwrap().unwrap(), blind(1, b"kept"));
    assert!(engine.poisoned_reason().is_none());
}

#[test]
fn a_million_keys_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let q = PartitionCount::default();
    let total = 1_000_000u32;
    let value = blind(1, b"v");
    {
        let engine = Engine::open(&EngineConfig {
            sync: SyncMode::Periodic { interval_ms: 100 },
            ..config(dir.path(), 1)
        })
        .unwrap();
        let chunk: Vec<u32> = (0..total).collect();
        let workers: Vec<_> = chunk
            .chunks(total as usize / 2)
            .map(|part| {
                let (engine, part, value) = (engine.clone(), part.to_vec(), value.clone());
                std::thread::spawn(move || {
                    for ids in part.chunks(5000) {
                        let batch: Vec<_> = ids
                            .iter()
                            .map(|i| (RecordKey::new(q, "bulk", &format!("k{i:07}")), value.clone()))
                            .collect();
                        engine.merge_batch(&batch).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        engine.sync_now().unwrap();
    }
    let engine: Arc<Engine> = Engine::open(&config(dir.path(), 1)).unwrap();
    let mut seen = 0u64;
    for partition in q.partitions() {
        let batch = engine.scan_partition(partition, &[], &BTreeSet::new(), usize::MAX / 32).unwrap();
        assert!(batch.done);
        seen += batch.records.len() as u64;
    }
    assert_eq!(seen, u64::from(total));
    for i in [0u32, 1, 499_999, 999_999] {
        assert_eq!(engine.get(&RecordKey::new(q, "bulk", &format!("k{i:07}"))).unwrap().unwrap(), value);
    }
}

#[test]
fn a_directory_in_use_is_refused_and_a_closed_one_reopens_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let periodic = EngineConfig { sync: SyncMode::Periodic { interval_ms: 1 }, ..config(dir.path(), 1) };
    let engine = Engine::open(&periodic).unwrap();
    let error = Engine::open(&periodic).map(|_| ()).expect_err("one engine per directory");
    assert!(error.to_string().contains("cannot open the storage engine"), "{error}");
    // Another thread holds the last reference a moment longer (as the maintenance thread does
    // during an fsync): a reopen waits for that engine to close instead of failing.
    let late = engine.clone();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(late);
    });
    drop(engine);
    let reopened = Engine::open(&periodic).expect("waits for the previous engine to finish closing");
    closer.join().unwrap();
    reopened.merge(&key("after"), &blind(7, b"v")).unwrap();
}

/// A record that does not decode when the engine opens (corruption, or the saturated-counter shape an
/// older release accepted) is quarantined, not fatal: the engine opens, counts it, reads the key as
/// absent and takes new writes for it; healthy records are untouched and the count survives a reopen.
#[test]
fn undecodable_records_are_quarantined_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let healthy = blind(1, b"healthy");
    {
        let engine = Engine::open(&config(dir.path(), 1)).unwrap();
        engine.merge(&key("healthy"), &healthy).unwrap();
        engine.insert_raw_record_for_tests(&key("garbage"), b"\x01\xff not a set").unwrap();
        let mut saturated = vec![1u8, 1];
        saturated.extend_from_slice(&7u64.to_le_bytes());
        saturated.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0]);
        engine.insert_raw_record_for_tests(&key("saturated"), &saturated).unwrap();
    }
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    assert_eq!(engine.stats().quarantined_records, 2);
    assert_eq!(engine.stats().keys, 1);
    assert_eq!(engine.get(&key("healthy")).unwrap(), Some(healthy));
    assert_eq!(engine.get(&key("garbage")).unwrap(), None);
    // The key is writable again (anti-entropy restores it this way).
    engine.merge(&key("garbage"), &blind(2, b"restored")).unwrap();
    drop(engine);
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    assert_eq!(engine.stats().quarantined_records, 2, "nothing new to quarantine, nothing forgotten");
    assert_eq!(engine.get(&key("garbage")).unwrap(), Some(blind(2, b"restored")));
}

/// An expiring value is stored with its expiry (digest included), is a GC candidate only once every
/// value of the record expired and the grace passed, and is purged like a tombstone; a record that
/// also holds a value without expiry never is.
#[test]
fn expired_records_are_gc_candidates_after_expiry_and_grace_only() {
    use pairdb_core::dvv::NewVersion;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let expiring = |name: &str, expires_at_ms: u64| {
        let mut set = VersionSet::new();
        let new =
            NewVersion { value: Some(b"v".to_vec()), timestamp_ms: 10, expires_at_ms: Some(expires_at_ms) };
        set.update_with(&VersionVector::new(), Actor(7), new, None).unwrap();
        assert!(engine.merge(&key(name), &set).unwrap());
        set
    };
    let session = expiring("session", 1_000);
    let mut mixed = expiring("mixed", 1_000);
    mixed.update(&VersionVector::new(), Actor(8), Some(b"forever".to_vec()), 11, None).unwrap();
    assert!(engine.merge(&key("mixed"), &mixed).unwrap());
    assert_eq!(engine.get(&key("session")).unwrap().unwrap(), session, "the expiry is stored");
    let same_value_no_expiry = blind(7, b"v");
    assert_ne!(
        pairdb_storage::merkle::version_digest(&session),
        pairdb_storage::merkle::version_digest(&same_value_no_expiry),
        "replicas that disagree on an expiry have different digests"
    );

    let partition = key("session").partition;
    let candidates = |written_before_ms| -> Vec<String> {
        let mut names: Vec<String> = [key("session").partition, key("mixed").partition]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .flat_map(|p| engine.old_tombstones(p, written_before_ms, 100).unwrap())
            .map(|d| d.key.key)
            .collect();
        names.sort();
        names
    };
    assert!(engine.partition_tombstones(partition) >= 1, "the expiring record is counted for GC");
    // GC cutoffs (now - grace) at or before the expiry: nothing; after it: only the all-expiring one.
    assert!(candidates(1_000).is_empty());
    assert_eq!(candidates(1_001), vec!["session".to_owned()]);
    let digest = pairdb_storage::merkle::version_digest(&session);
    assert_eq!(engine.purge_tombstones(&[(key("session"), digest)], 1_000).unwrap(), 0, "not before expiry");
    assert_eq!(engine.purge_tombstones(&[(key("session"), digest)], 1_001).unwrap(), 1);
    assert_eq!(engine.get(&key("session")).unwrap(), None);
    assert!(engine.get(&key("mixed")).unwrap().is_some());
}

fn blind_write(value: &[u8]) -> CoordinatedWrite {
    CoordinatedWrite {
        context: VersionVector::new(),
        value: Some(value.to_vec()),
        timestamp_ms: 1,
        max_siblings: None,
        supersede_local: false,
        quota: QuotaGuard::default(),
        condition: None,
        expires_at_ms: None,
        touch_over: None,
    }
}

fn values(set: &VersionSet) -> BTreeSet<Vec<u8>> {
    set.siblings().iter().filter_map(|s| s.value.clone()).collect()
}

/// A batch answers each item on its own: a refused item fails alone, and a key that occurs twice
/// is decided twice (the second decision sees the first), as two single writes would be.
#[test]
fn a_coordinated_batch_answers_each_item_and_decides_a_repeated_key_again() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let passed = ApplyDeadline {
        monotonic: Some(std::time::Instant::now() - std::time::Duration::from_millis(1)),
        unix_ms: None,
    };
    let results = engine
        .coordinate_writes(vec![
            (key("twice"), blind_write(b"first"), ApplyDeadline::NONE),
            (key("late"), blind_write(b"late"), passed),
            (key("once"), blind_write(b"once"), ApplyDeadline::NONE),
            (key("twice"), blind_write(b"second"), ApplyDeadline::NONE),
        ])
        .unwrap();
    assert_eq!(results.len(), 4);
    assert!(matches!(results[1], Err(EngineError::DeadlinePassed)), "{:?}", results[1]);
    assert!(engine.get(&key("late")).unwrap().is_none(), "a refused item is not applied");
    let first = results[0].as_ref().unwrap();
    let second = results[3].as_ref().unwrap();
    assert_eq!(values(first), BTreeSet::from([b"first".to_vec()]));
    // Decided on the record the first write left: both blind writes are kept, as siblings, under one
    // minting actor (the second dot follows the first).
    assert_eq!(values(second), BTreeSet::from([b"first".to_vec(), b"second".to_vec()]));
    assert_eq!(second.vector().len(), 1, "{:?}", second.vector());
    assert_eq!(engine.get(&key("twice")).unwrap().as_ref(), Some(second));
    assert_eq!(values(&engine.get(&key("once")).unwrap().unwrap()), BTreeSet::from([b"once".to_vec()]));
}

/// A batch of merges leaves what the same merges one by one leave: records, Merkle trees, usage.
#[test]
fn a_merged_batch_leaves_what_single_merges_leave() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let batched = Engine::open(&config(dir_a.path(), 1)).unwrap();
    let single = Engine::open(&config(dir_b.path(), 1)).unwrap();
    let items: Vec<(RecordKey, VersionSet)> = (0..200u64)
        .map(|i| (key(&format!("k{}", i % 150)), blind(i + 1, format!("v{i}").as_bytes())))
        .collect();
    let results = batched.merge_many(items.clone()).unwrap();
    assert!(results.iter().all(|r| matches!(r, Ok(true))), "{results:?}");
    for (key, set) in &items {
        assert!(single.merge(key, set).unwrap());
    }
    // Merging the same sets again changes nothing.
    assert!(batched.merge_many(items.clone()).unwrap().iter().all(|r| matches!(r, Ok(false))));
    let partitions: BTreeSet<PartitionId> = items.iter().map(|(key, _)| key.partition).collect();
    for partition in partitions {
        for level in 0..3 {
            assert_eq!(batched.merkle_level(partition, level), single.merkle_level(partition, level));
        }
    }
    assert_eq!(batched.tenant_usage(|_| true), single.tenant_usage(|_| true));
    for (key, _) in &items {
        assert_eq!(batched.get(key).unwrap(), single.get(key).unwrap());
    }
}

/// Batches take their keys' locks in one order, so batches over the same keys in opposite orders
/// and single writes beside them never deadlock, and every write is kept (blind writes: siblings).
#[test]
fn concurrent_batches_over_shared_keys_and_single_writes_keep_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let names: Vec<String> = (0..64).map(|i| format!("shared-{i}")).collect();
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let (engine, mut names) = (engine.clone(), names.clone());
            if thread % 2 == 1 {
                names.reverse();
            }
            std::thread::spawn(move || {
                for round in 0..10 {
                    if thread == 0 {
                        for name in &names {
                            let value = format!("t{thread}-r{round}");
                            engine
                                .coordinate_write_before(
                                    &key(name),
                                    blind_write(value.as_bytes()),
                                    ApplyDeadline::NONE,
                                )
                                .unwrap();
                        }
                        continue;
                    }
                    let batch = names
                        .iter()
                        .map(|name| {
                            (
                                key(name),
                                blind_write(format!("t{thread}-r{round}").as_bytes()),
                                ApplyDeadline::NONE,
                            )
                        })
                        .collect();
                    for result in engine.coordinate_writes(batch).unwrap() {
                        result.unwrap();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for name in &names {
        let set = engine.get(&key(name)).unwrap().unwrap();
        assert_eq!(set.siblings().len(), 8 * 10, "{name}");
    }
}

/// Readers beside a writer (through the record cache) never see a record go back to an older
/// version, and once the writer is done every reader sees its last write.
#[test]
fn reads_beside_writes_never_go_back_and_end_on_the_last_write() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(&config(dir.path(), 1)).unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("counted-{i}")).collect();
    const WRITES: u64 = 300;
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (engine, names, writing) = (engine.clone(), names.clone(), writing.clone());
        std::thread::spawn(move || {
            let mut contexts = vec![VersionVector::new(); names.len()];
            for round in 1..=WRITES {
                for (name, context) in names.iter().zip(contexts.iter_mut()) {
                    let value = round.to_be_bytes().to_vec();
                    let write = CoordinatedWrite { context: context.clone(), ..blind_write(&value) };
                    let set = engine.coordinate_write_before(&key(name), write, ApplyDeadline::NONE).unwrap();
                    assert_eq!(set.siblings().len(), 1);
                    *context = set.vector().clone();
                }
            }
            writing.store(false, std::sync::atomic::Ordering::Release);
        })
    };
    let round_of = |set: &VersionSet| {
        let value = set.siblings()[0].value.clone().unwrap();
        u64::from_be_bytes(value.try_into().unwrap())
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (engine, names, writing) = (engine.clone(), names.clone(), writing.clone());
            std::thread::spawn(move || {
                let mut last = vec![0u64; names.len()];
                while writing.load(std::sync::atomic::Ordering::Acquire) {
                    for (name, last) in names.iter().zip(last.iter_mut()) {
                        let Some(set) = engine.get(&key(name)).unwrap() else { continue };
                        let round = round_of(&set);
                        assert!(round >= *last, "{name} went back from {last} to {round}");
                        *last = round;
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for reader in readers {
        reader.join().unwrap();
    }
    for name in &names {
        assert_eq!(round_of(&engine.get(&key(name)).unwrap().unwrap()), WRITES);
    }
}
