//! The tenant key index on a real data directory: listings in order per tenant (never another
//! tenant's keys), bounds, reverse, paging, key groups, usage counters, and the index kept equal to
//! the records by every path that writes them (writes, merges, tombstone purges, unowned-data
//! deletion, tenant purges) and built when a directory without one opens.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use pairdb_core::dvv::{Actor, VersionSet, VersionVector};
use pairdb_core::ring::NodeId;
use pairdb_core::tenant::KeyGroups;
use pairdb_core::token::{PartitionCount, placement_token};
use pairdb_core::usage::Usage;
use pairdb_storage::engine::{Engine, EngineConfig, ListQuery, SyncMode};
use pairdb_storage::keys::RecordKey;

fn q() -> PartitionCount {
    PartitionCount::new(64).unwrap()
}

fn open(dir: &std::path::Path) -> std::sync::Arc<Engine> {
    Engine::open(&EngineConfig {
        data_dir: dir.to_path_buf(),
        node_id: NodeId(1),
        partitions: q(),
        sync: SyncMode::Periodic { interval_ms: 100 },
        cache_bytes: 8 << 20,
        record_cache_bytes: 16 * 1024 * 1024,
        disk_reserve_bytes: 0,
    })
    .unwrap()
}

fn put(engine: &Engine, key: &RecordKey, value: &[u8]) -> VersionSet {
    engine.coordinate_write(key, &VersionVector::new(), Some(value.to_vec()), 1, None, false).unwrap()
}

fn delete(engine: &Engine, key: &RecordKey) {
    let seen = engine.get(key).unwrap().unwrap().vector().clone();
    engine.coordinate_write(key, &seen, None, 2, None, false).unwrap();
}

fn all(tenant: &str) -> ListQuery {
    ListQuery {
        tenant: tenant.into(),
        partitions: vec![true; q().get() as usize],
        prefix: String::new(),
        start_after: None,
        end_before: None,
        group: None,
        reverse: false,
        limit: 1000,
        max_bytes: 4 << 20,
        skip_tombstones: false,
        max_examined: 100_000,
        deadline: Instant::now() + Duration::from_secs(10),
    }
}

fn keys(engine: &Engine, query: &ListQuery) -> Vec<String> {
    engine.list_records(query).unwrap().records.into_iter().map(|(k, _)| k.key).collect()
}

/// Every key of `tenant`, page by page (as a router resumes), in order.
fn list_paged(engine: &Engine, tenant: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut query = ListQuery { limit, ..all(tenant) };
    loop {
        let page = engine.list_records(&query).unwrap();
        out.extend(page.records.into_iter().map(|(k, _)| k.key));
        if page.complete {
            return out;
        }
        query.start_after = page.resume_after;
    }
}

#[test]
fn a_listing_is_one_tenants_keys_in_order_within_its_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    for i in 0..300 {
        for tenant in ["a", "b", "ab"] {
            put(&engine, &RecordKey::new(q(), tenant, &format!("k{i:03}")), tenant.as_bytes());
        }
    }
    let expected: Vec<String> = (0..300).map(|i| format!("k{i:03}")).collect();
    assert_eq!(keys(&engine, &all("a")), expected);
    assert_eq!(list_paged(&engine, "a", 7), expected, "paging resumes exactly after the last key");
    let listed = engine.list_records(&all("ab")).unwrap();
    assert!(
        listed.complete
            && listed.records.iter().all(|(k, set)| {
                k.tenant == "ab"
                    && pairdb_core::encoding::decode_version_set(set).unwrap().siblings()[0].value.as_deref()
                        == Some(b"ab".as_slice())
            })
    );
    let bounded = ListQuery {
        prefix: "k1".into(),
        start_after: Some("k105".into()),
        end_before: Some("k110".into()),
        ..all("a")
    };
    assert_eq!(keys(&engine, &bounded), ["k106", "k107", "k108", "k109"]);
    assert_eq!(
        keys(&engine, &ListQuery { reverse: true, ..bounded.clone() }),
        ["k109", "k108", "k107", "k106"]
    );
    let some_partitions: Vec<bool> = (0..q().get()).map(|p| p % 2 == 0).collect();
    let partial = keys(&engine, &ListQuery { partitions: some_partitions.clone(), ..all("a") });
    let expected_partial: Vec<String> = expected
        .iter()
        .filter(|k| some_partitions[RecordKey::new(q(), "a", k).partition.0 as usize])
        .cloned()
        .collect();
    assert_eq!(partial, expected_partial);
    let limited = engine.list_records(&ListQuery { limit: 10, ..all("a") }).unwrap();
    assert!(!limited.complete);
    assert_eq!(limited.resume_after.as_deref(), Some("k009"));
    let examined = engine.list_records(&ListQuery { max_examined: 25, ..all("a") }).unwrap();
    assert_eq!((examined.records.len(), examined.resume_after.as_deref()), (25, Some("k024")));
    assert!(keys(&engine, &all("nobody")).is_empty());
}

#[test]
fn deleted_keys_are_tombstones_until_purged_and_the_index_follows_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    for i in 0..100 {
        put(&engine, &RecordKey::new(q(), "t", &format!("k{i:03}")), b"v");
    }
    for i in (0..100).step_by(3) {
        delete(&engine, &RecordKey::new(q(), "t", &format!("k{i:03}")));
    }
    assert_eq!(keys(&engine, &all("t")).len(), 100, "tombstones are listed unless skipped");
    let live = keys(&engine, &ListQuery { skip_tombstones: true, ..all("t") });
    assert_eq!(live.len(), 66);
    assert!(live.iter().all(|k| k[1..].parse::<u32>().unwrap() % 3 != 0));
    assert_eq!(
        engine.tenant_usage(|_| true),
        vec![("t".into(), Usage { keys: 66, value_bytes: 66, siblings: 66, tombstones: 34 })]
    );

    // Tombstone GC removes records and their entries together.
    let digests: Vec<(RecordKey, u64)> = (0..100)
        .step_by(3)
        .map(|i| {
            let key = RecordKey::new(q(), "t", &format!("k{i:03}"));
            let set = engine.get(&key).unwrap().unwrap();
            (key, pairdb_storage::merkle::version_digest(&set))
        })
        .collect();
    assert_eq!(engine.purge_tombstones(&digests, u64::MAX).unwrap(), 34);
    // Each was just read (so in the record cache): a purged record is gone from every read path.
    for (key, _) in &digests {
        assert!(engine.get(key).unwrap().is_none() && engine.get_encoded(key).unwrap().is_none());
    }
    assert_eq!(keys(&engine, &all("t")), live);
    assert!(engine.verify_key_index().unwrap().consistent());
    assert_eq!(engine.tenant_usage(|_| true)[0].1.tombstones, 0);

    // Merges (replication, hints, anti-entropy, migrations) add entries for new records.
    let incoming: Vec<(RecordKey, VersionSet)> = (0..50)
        .map(|i| {
            let mut set = VersionSet::new();
            set.update(&VersionVector::new(), Actor(9), Some(b"m".to_vec()), 1, None).unwrap();
            (RecordKey::new(q(), "u", &format!("m{i:02}")), set)
        })
        .collect();
    engine.merge_batch(&incoming).unwrap();
    assert_eq!(keys(&engine, &all("u")).len(), 50);

    // Unowned-data deletion.
    let mut deleted = 0;
    for partition in engine.partitions_with_data() {
        deleted += engine.delete_unowned(partition, &|tenant| tenant == "u", 1000).unwrap().0;
    }
    assert_eq!(deleted, 50);
    assert!(keys(&engine, &all("u")).is_empty());
    assert!(incoming.iter().all(|(key, _)| engine.get(key).unwrap().is_none()));

    // A tenant purge.
    let live_keys: Vec<RecordKey> = live.iter().map(|k| RecordKey::new(q(), "t", k)).collect();
    assert!(live_keys.iter().all(|key| engine.get(key).unwrap().is_some()));
    engine.begin_tenant_purge("t", 1, 0).unwrap();
    for space in pairdb_storage::engine::PurgeSpace::ALL {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let step = engine.purge_tenant_step("t", space, after.as_deref(), 16).unwrap();
            match step.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    assert!(keys(&engine, &all("t")).is_empty());
    assert!(
        live_keys.iter().all(|key| engine.get(key).unwrap().is_none()),
        "a purged tenant's record is read"
    );
    assert!(engine.tenant_usage(|_| true).is_empty());
    let check = engine.verify_key_index().unwrap();
    assert!(check.consistent() && check.records == 0, "{check:?}");
}

#[test]
fn a_key_group_is_listed_from_its_one_range() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    for i in 0..200 {
        let key = format!("orders:{{c{}}}:{i:03}", i % 4);
        put(&engine, &RecordKey::placed(q(), "t", &key, KeyGroups::HashTag), b"v");
    }
    let token = placement_token("t", "{c1}", KeyGroups::HashTag);
    let group = ListQuery { group: Some(token), ..all("t") };
    let listed = keys(&engine, &group);
    assert_eq!(listed.len(), 50);
    assert!(listed.windows(2).all(|w| w[0] < w[1]) && listed.iter().all(|k| k.contains("{c1}")));
    let mut reversed = keys(&engine, &ListQuery { reverse: true, ..group.clone() });
    reversed.reverse();
    assert_eq!(reversed, listed);
    let bounded = keys(
        &engine,
        &ListQuery {
            start_after: Some(listed[9].clone()),
            end_before: Some(listed[13].clone()),
            ..group.clone()
        },
    );
    assert_eq!(bounded, listed[10..13]);
    // The whole tenant, through the index, holds every group.
    assert_eq!(keys(&engine, &all("t")).len(), 200);
    let examined = engine.list_records(&group).unwrap().examined;
    assert_eq!(examined, 50, "a group listing reads only the group's records");
}

#[test]
fn a_directory_without_an_index_gets_one_built_when_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path());
        for i in 0..500 {
            put(&engine, &RecordKey::new(q(), "t", &format!("k{i:04}")), b"value");
        }
        engine.forget_key_index_for_tests().unwrap();
        assert!(keys(&engine, &all("t")).is_empty());
        let check = engine.verify_key_index().unwrap();
        assert_eq!((check.records, check.missing), (500, 500));
    }
    let engine = open(dir.path());
    assert_eq!(list_paged(&engine, "t", 100).len(), 500);
    assert!(engine.verify_key_index().unwrap().consistent());
    assert_eq!(
        engine.tenant_usage(|_| true),
        vec![("t".into(), Usage { keys: 500, value_bytes: 2500, siblings: 500, tombstones: 0 })]
    );
    drop(engine);
    // Opening again does not rebuild (or duplicate) anything.
    let engine = open(dir.path());
    assert!(engine.verify_key_index().unwrap().consistent());
}

#[test]
fn a_reached_quota_refuses_only_writes_that_grow_what_it_counts() {
    use pairdb_storage::engine::{ApplyDeadline, CoordinatedWrite, EngineError, QuotaGuard};
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let key = |name: &str| RecordKey::new(q(), "t", name);
    put(&engine, &key("a"), b"12345");
    let write = |name: &str, value: Option<&[u8]>, quota: QuotaGuard| {
        let seen = engine.get(&key(name)).unwrap().map(|s| s.vector().clone()).unwrap_or_default();
        let write = CoordinatedWrite {
            context: seen,
            value: value.map(<[u8]>::to_vec),
            timestamp_ms: 5,
            max_siblings: None,
            supersede_local: false,
            quota,
            condition: None,
            expires_at_ms: None,
            touch_over: None,
        };
        engine.coordinate_write_before(&key(name), write, ApplyDeadline::NONE)
    };
    let keys = QuotaGuard { keys_reached: true, bytes_reached: false };
    assert!(matches!(write("b", Some(b"x"), keys), Err(EngineError::QuotaExceeded("keys"))));
    assert!(engine.get(&key("b")).unwrap().is_none(), "nothing applied");
    write("a", Some(b"123456789"), keys).unwrap();
    let bytes = QuotaGuard { keys_reached: false, bytes_reached: true };
    assert!(matches!(write("a", Some(b"1234567890"), bytes), Err(EngineError::QuotaExceeded("value bytes"))));
    write("a", Some(b"1"), bytes).unwrap();
    let both = QuotaGuard { keys_reached: true, bytes_reached: true };
    write("a", None, both).unwrap();
    assert_eq!(
        engine.tenant_usage(|_| true)[0].1,
        Usage { keys: 0, value_bytes: 0, siblings: 0, tombstones: 1 }
    );
    // The deleted key coming back adds a key again.
    assert!(matches!(write("a", Some(b"1"), both), Err(EngineError::QuotaExceeded("keys"))));
}

/// Tenant `t` with 600 keys (1 in 3 deleted, 4 key groups) and `u` with the same names.
fn sliced_fixture(engine: &Engine) {
    for i in 0..600 {
        let key = format!("k:{{g{}}}:{i:04}", i % 4);
        for tenant in ["t", "u"] {
            let record = RecordKey::placed(q(), tenant, &key, KeyGroups::HashTag);
            put(engine, &record, &[b'v'; 100]);
            if i % 3 == 0 {
                delete(engine, &record);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_run_in_slices_answers_what_one_call_would() {
    use pairdb_storage::listing::{ListingPacer, run};
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    sliced_fixture(&engine);
    // A zero slice stops after every entry: the most resumptions a listing can go through.
    let pacer = ListingPacer::new(100, Duration::ZERO);
    let group = placement_token("t", "{g2}", KeyGroups::HashTag);
    let queries = [
        all("t"),
        ListQuery { reverse: true, ..all("t") },
        ListQuery { limit: 77, skip_tombstones: true, ..all("t") },
        ListQuery { max_bytes: 1_000, reverse: true, ..all("t") },
        ListQuery { max_examined: 150, ..all("t") },
        ListQuery { prefix: "k:{g1}:00".into(), start_after: Some("k:{g1}:0005".into()), ..all("t") },
        ListQuery { end_before: Some("k:{g3}:0400".into()), reverse: true, limit: 50, ..all("t") },
        ListQuery { group: Some(group), ..all("t") },
        ListQuery { group: Some(group), reverse: true, limit: 20, ..all("t") },
        ListQuery { partitions: (0..q().get()).map(|p| p % 3 == 0).collect(), ..all("t") },
    ];
    for query in queries {
        let whole = engine.list_records(&query).unwrap();
        let sliced = run(engine.clone(), query.clone(), &pacer).await.unwrap();
        assert!(!whole.records.is_empty(), "{query:?}");
        assert_eq!(sliced, whole, "{query:?}");
    }
    assert_eq!(pacer.totals().paused_us, 0, "nothing else ran: no pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_pause_for_point_requests_in_flight_and_only_then() {
    use pairdb_storage::listing::{ListingPacer, run};
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    sliced_fixture(&engine);
    let pacer = ListingPacer::new(10, Duration::from_micros(200));
    let query = all("t");
    let alone = run(engine.clone(), query.clone(), &pacer).await.unwrap();
    assert_eq!(pacer.totals().paused_us, 0);
    let before = pacer.totals();
    let in_flight = pacer.foreground.begin();
    let contended = run(engine.clone(), query.clone(), &pacer).await.unwrap();
    drop(in_flight);
    assert_eq!(contended, alone, "pauses change when, not what");
    let busy = pacer.totals().busy_us - before.busy_us;
    let paused = pacer.totals().paused_us - before.paused_us;
    // Every slice but the last is followed by a pause of 9x its work (10 % share); slices of 200 us
    // over 400 live keys are several, so the pauses add up to well over 4x the work.
    assert!(paused >= 4 * busy, "busy {busy} us, paused {paused} us");
    // The point request finished: the next listing runs unpaced, its debt forgiven.
    let after = pacer.totals();
    run(engine.clone(), query, &pacer).await.unwrap();
    assert_eq!(pacer.totals().paused_us, after.paused_us);
}
