//! Criterion benchmarks of the core's hot paths: token + preference-list lookup (every request does
//! one), and version-set merge / encode / decode (every replica answer and every write does some).
//!
//! `cargo bench -p pairdb-core --bench core`; numbers are recorded in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pairdb_core::context::{ContextBinding, ContextKey, ContextKeyRing, open_context, seal_context};
use pairdb_core::dvv::{Actor, VersionSet, VersionVector};
use pairdb_core::encoding::{decode_version_set, encode_vector, encode_version_set};
use pairdb_core::ring::{Assignment, NodeId, NodeSpec};
use pairdb_core::token::{PartitionCount, token_for};

fn ring_lookup(c: &mut Criterion) {
    let nodes: Vec<NodeSpec> =
        (1..=10).map(|id| NodeSpec { id: NodeId(id), weight: 1, zone: None }).collect();
    let partitions = PartitionCount::new(4096).unwrap();
    let assignment = Assignment::compute(None, &nodes, partitions).unwrap();
    let keys: Vec<String> = (0..1024).map(|i| format!("user:{i:08}")).collect();

    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("token_and_preference_list_n3", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let token = token_for("tenant-a", keys[i].as_bytes());
            let partition = partitions.partition_of(token);
            black_box(assignment.preference_list(partition, 3).len())
        })
    });
    group.bench_function("preference_list_n3_only", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let partition = pairdb_core::token::PartitionId(i as u32);
            black_box(assignment.preference_list(partition, 3).len())
        })
    });
    group.finish();

    let mut group = c.benchmark_group("ring_compute");
    group.sample_size(10);
    group.bench_function("assign_10_nodes_q4096", |b| {
        b.iter(|| Assignment::compute(None, black_box(&nodes), partitions).unwrap())
    });
    group.finish();
}

/// A set with `siblings` concurrent 1 KiB values from distinct actors.
fn set_with_siblings(siblings: u64, first_actor: u64) -> VersionSet {
    let mut set = VersionSet::new();
    for actor in first_actor..first_actor + siblings {
        set.update(&VersionVector::new(), Actor(actor), Some(vec![7u8; 1024]), actor, None).unwrap();
    }
    set
}

fn version_sets(c: &mut Criterion) {
    let mut group = c.benchmark_group("dvvs");
    for siblings in [1u64, 3] {
        let left = set_with_siblings(siblings, 1);
        let right = set_with_siblings(siblings, 100);
        group.bench_function(format!("merge_{siblings}x{siblings}_siblings_1k"), |b| {
            b.iter(|| black_box(left.merge(black_box(&right))))
        });
        let encoded = encode_version_set(&left);
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_function(format!("encode_{siblings}_siblings_1k"), |b| {
            b.iter(|| black_box(encode_version_set(black_box(&left))))
        });
        group.bench_function(format!("decode_{siblings}_siblings_1k"), |b| {
            b.iter(|| black_box(decode_version_set(black_box(&encoded)).unwrap()))
        });
    }
    let set = set_with_siblings(3, 1);
    group.throughput(Throughput::Elements(1));
    group.bench_function("update_with_context", |b| {
        b.iter(|| {
            let mut copy = set.clone();
            let context = copy.vector().clone();
            black_box(copy.update(&context, Actor(1), Some(vec![1u8; 1024]), 5, Some(64)).unwrap())
        })
    });
    group.bench_function("encode_vector", |b| b.iter(|| black_box(encode_vector(set.vector()))));
    group.finish();
}

/// The per-request cost of sealed contexts (issue 15): one seal per read or write reply, one open
/// per write that carries a context. Three actors: a key written through three coordinators.
fn sealed_contexts(c: &mut Criterion) {
    let mut group = c.benchmark_group("context");
    group.throughput(Throughput::Elements(1));
    let vector = set_with_siblings(3, 1).vector().clone();
    let key = ContextKey::new(1, &[7u8; 32]).unwrap();
    let ring = ContextKeyRing::new(key.clone(), None);
    let binding = ContextBinding { tenant: "tenant-a", key: "user:1234567890" };
    group.bench_function("seal_3_actors", |b| {
        b.iter(|| black_box(seal_context(black_box(&vector), binding, &key)))
    });
    let sealed = seal_context(&vector, binding, &key);
    group.bench_function("open_3_actors", |b| {
        b.iter(|| black_box(open_context(black_box(&sealed), binding, &ring).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, ring_lookup, version_sets, sealed_contexts);
criterion_main!(benches);
