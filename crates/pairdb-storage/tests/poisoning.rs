//! A failed journal flush or fsync poisons the write path, driven through the real commit code by
//! `Engine::inject_persist_failure_for_tests`: the write whose commit failed is not acknowledged (nor
//! applied), every later write is refused with WRITE_PATH_POISONED without touching the disk again,
//! reads go on, stats report it, and a restart (a new process) writes again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use pairdb_core::dvv::{Actor, VersionSet, VersionVector};
use pairdb_core::reason::HasReason;
use pairdb_core::ring::NodeId;
use pairdb_core::token::PartitionCount;
use pairdb_storage::engine::{Engine, EngineConfig, EngineError, SyncMode};
use pairdb_storage::keys::RecordKey;

/// Periodic fsyncs are an hour apart, so the maintenance thread never consumes the injected fault.
const PERIODIC: SyncMode = SyncMode::Periodic { interval_ms: 3_600_000 };

fn open(dir: &Path, sync: SyncMode) -> Arc<Engine> {
    Engine::open(&EngineConfig {
        data_dir: dir.to_path_buf(),
        node_id: NodeId(1),
        partitions: PartitionCount::default(),
        sync,
        cache_bytes: 16 * 1024 * 1024,
        record_cache_bytes: 16 * 1024 * 1024,
        disk_reserve_bytes: 0,
    })
    .unwrap()
}

fn key(name: &str) -> RecordKey {
    RecordKey::new(PartitionCount::default(), "tenant-a", name)
}

fn blind(actor: u64, value: &[u8]) -> VersionSet {
    let mut set = VersionSet::new();
    set.update(&VersionVector::new(), Actor(actor), Some(value.to_vec()), 1, None).unwrap();
    set
}

fn write(engine: &Engine, name: &str) -> Result<VersionSet, EngineError> {
    engine.coordinate_write(&key(name), &VersionVector::new(), Some(name.as_bytes().to_vec()), 1, None, false)
}

fn assert_poisoned<T: std::fmt::Debug>(result: Result<T, EngineError>) {
    let error = result.unwrap_err();
    assert!(matches!(error, EngineError::Poisoned(_)), "{error:?}");
    assert_eq!(error.reason(), "WRITE_PATH_POISONED");
    assert!(error.to_string().contains("injected fault"), "{error}");
}

/// Every kind of write is refused once poisoned; reads and scans go on.
fn assert_refuses_writes_and_serves_reads(engine: &Engine) {
    assert_poisoned(write(engine, "after"));
    assert_poisoned(engine.merge(&key("merged"), &blind(9, b"m")));
    assert_poisoned(engine.merge_batch(&[(key("batched"), blind(9, b"b"))]));
    // A batched call answers each item with the refusal.
    for result in engine.merge_many(vec![(key("batched"), blind(9, b"b"))]).unwrap() {
        assert_poisoned(result);
    }
    assert_poisoned(engine.put_hint(NodeId(2), &key("hinted"), &blind(9, b"h")));
    assert_poisoned(engine.delete_hint_if_unchanged(NodeId(2), &key("hinted"), &blind(9, b"h")));
    // A failed fsync is never retried, not even by an explicit sync.
    assert_poisoned(engine.sync_now());

    assert_eq!(engine.get(&key("before")).unwrap().unwrap().siblings().len(), 1);
    for name in ["doomed", "after", "merged", "batched"] {
        assert!(engine.get(&key(name)).unwrap().is_none(), "{name} was written");
    }
    assert!(engine.list_hints(NodeId(2), None, 10).unwrap().is_empty());
    assert!(engine.stats().poisoned);
    let reason = engine.poisoned_reason().expect("a poisoned engine says why");
    assert!(reason.contains("injected fault"), "{reason}");
}

fn failed_commit_poisons_the_write_path(sync: SyncMode) {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), sync);
    write(&engine, "before").unwrap();
    assert!(engine.poisoned_reason().is_none());

    engine.inject_persist_failure_for_tests();
    assert_poisoned(write(&engine, "doomed"));
    assert_refuses_writes_and_serves_reads(&engine);

    // Poisoning lasts for the life of the process; a restart writes again and still has exactly the
    // acknowledged write.
    drop(engine);
    let engine = open(dir.path(), sync);
    assert!(engine.poisoned_reason().is_none());
    assert!(engine.get(&key("before")).unwrap().is_some());
    assert!(engine.get(&key("doomed")).unwrap().is_none());
    write(&engine, "after restart").unwrap();
}

#[test]
fn a_failed_fsync_with_sync_always_fails_the_write_and_poisons_the_write_path() {
    failed_commit_poisons_the_write_path(SyncMode::Always);
}

#[test]
fn a_failed_flush_to_the_os_with_sync_periodic_fails_the_write_and_poisons_the_write_path() {
    failed_commit_poisons_the_write_path(PERIODIC);
}

#[test]
fn a_failed_periodic_fsync_poisons_the_write_path() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), PERIODIC);
    write(&engine, "before").unwrap();

    // `sync_now` is what the maintenance thread runs every interval.
    engine.inject_persist_failure_for_tests();
    assert_poisoned(engine.sync_now());
    assert_refuses_writes_and_serves_reads(&engine);
}

#[test]
fn no_writer_in_a_group_whose_fsync_failed_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), SyncMode::Always);
    engine.inject_persist_failure_for_tests();
    let writers: Vec<_> = (0..32)
        .map(|i| {
            let engine = engine.clone();
            std::thread::spawn(move || write(&engine, &format!("concurrent-{i}")))
        })
        .collect();
    for writer in writers {
        assert_poisoned(writer.join().unwrap());
    }
    for i in 0..32 {
        assert!(engine.get(&key(&format!("concurrent-{i}"))).unwrap().is_none());
    }
    assert!(engine.stats().poisoned);
}

/// A batch whose group commit fails is answered as a whole with the poison (no item is
/// acknowledged), and none of its items is visible.
#[test]
fn a_batch_whose_commit_fails_acknowledges_no_item() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), PERIODIC);
    write(&engine, "before").unwrap();
    engine.inject_persist_failure_for_tests();
    let items = (0..10).map(|i| (key(&format!("batch-{i}")), blind(9, b"b"))).collect();
    assert_poisoned(engine.merge_many(items));
    for i in 0..10 {
        assert!(engine.get(&key(&format!("batch-{i}"))).unwrap().is_none());
    }
    assert_refuses_writes_and_serves_reads(&engine);
}
