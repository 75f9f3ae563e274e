//! Conditional writes end to end (issue 19), with real processes: meta, three storage nodes and two
//! routers.
//!
//! - 32 clients race IF_ABSENT on the same keys through both routers: every key has a winner, every
//!   winner's value is stored, every loser gets PRECONDITION_FAILED with the current state; how often
//!   two writers both won one key is printed (docs/api.md records it).
//! - A counter kept with IF_CONTEXT_MATCHES by 16 clients, with the counter's coordinating replica
//!   SIGKILLed mid-run and started again: it ends equal to the acknowledged increments (plus, at
//!   most, increments whose outcome the client was told is unknown).
//! - HTTP: the condition field and `If-None-Match: *` answer 412 with the details in the JSON body.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pairdb_client::{Consistency, KvClient, ReadOptions, WriteCondition, WriteOptions};
use pairdb_tests::cluster::{Cluster, ClusterOptions};
use pairdb_tests::http_request;
use serde_json::Value;

/// Each test runs a whole cluster; one at a time keeps two clusters off the same two cores.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn conditional(condition: WriteCondition, context: Vec<u8>) -> WriteOptions {
    WriteOptions {
        consistency: Consistency::Quorum,
        context,
        condition: Some(condition),
        ..WriteOptions::default()
    }
}

fn quorum_read() -> ReadOptions {
    ReadOptions { consistency: Consistency::Quorum, ..ReadOptions::default() }
}

async fn two_router_cluster() -> Cluster {
    Cluster::start_with(ClusterOptions { routers: 2, ..ClusterOptions::default() }).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_if_absent_through_two_routers_has_a_winner_per_key_and_loses_no_winner() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = two_router_cluster().await;
    let clients = [cluster.client(0).await.unwrap(), cluster.client(1).await.unwrap()];
    let keys: Vec<String> = (0..40).map(|i| format!("lock-{i}")).collect();
    let mut writers = Vec::new();
    for writer in 0..32usize {
        let (client, keys) = (clients[writer % 2].clone(), keys.clone());
        writers.push(tokio::spawn(async move {
            let (mut won, mut unknown, mut lost) = (Vec::new(), Vec::new(), 0usize);
            for key in &keys {
                let value = format!("writer-{writer}").into_bytes();
                match client.put(key, value.clone(), conditional(WriteCondition::IfAbsent, Vec::new())).await
                {
                    Ok(_) => won.push((key.clone(), value)),
                    Err(error) if error.reason() == "PRECONDITION_FAILED" => {
                        let current = error.current_state().expect("a refusal carries the current state");
                        assert!(current.found, "{key}: a loser sees the value that beat it");
                        assert!(!current.context.is_empty());
                        let values = current.values.expect("small values travel in the details");
                        assert!(!values.is_empty());
                        lost += 1;
                    }
                    // Two cores running six processes: a replica may miss the storage timeout. The
                    // write may or may not be stored; it is neither a winner nor a loser.
                    Err(error) => {
                        assert_eq!(error.reason(), "QUORUM_NOT_REACHED", "{key}: {error}");
                        unknown.push((key.clone(), value));
                    }
                }
            }
            (won, unknown, lost)
        }));
    }
    let mut winners: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut unknown: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut losses = 0;
    for writer in writers {
        let (won, maybe, lost) = writer.await.unwrap();
        losses += lost;
        for (key, value) in won {
            winners.entry(key).or_default().push(value);
        }
        for (key, value) in maybe {
            unknown.entry(key).or_default().push(value);
        }
    }
    let all = ReadOptions { consistency: Consistency::All, ..ReadOptions::default() };
    let (mut double, mut unacknowledged_winner) = (0, 0);
    for key in &keys {
        let won = winners.get(key).cloned().unwrap_or_default();
        let maybe = unknown.get(key).cloned().unwrap_or_default();
        let stored = clients[0].get(key, all.clone()).await.unwrap().expect("every key is stored");
        let stored: BTreeSet<Vec<u8>> = stored.siblings.into_iter().map(|s| s.value).collect();
        for value in &won {
            assert!(stored.contains(value), "{key}: the acknowledged {value:?} is stored");
        }
        for value in &stored {
            assert!(won.contains(value) || maybe.contains(value), "{key}: {value:?} was refused, yet stored");
        }
        // A key whose winner's reply was lost (applied, quorum not confirmed) has no acknowledged
        // winner: every later writer was refused because of it.
        if won.is_empty() {
            assert!(!maybe.is_empty(), "{key} has a winner");
            unacknowledged_winner += 1;
        }
        double += usize::from(stored.len() > 1);
    }
    let attempts = losses
        + winners.values().map(Vec::len).sum::<usize>()
        + unknown.values().map(Vec::len).sum::<usize>();
    assert_eq!(attempts, 32 * keys.len());
    assert!(losses > 0);
    println!(
        "IF_ABSENT race: {} keys x 32 writers through 2 routers: {double} keys with two or more \
         values stored ({:.2} %), {losses} refusals, {} outcomes unknown, {unacknowledged_winner} keys \
         won by a write whose outcome was unknown",
        keys.len(),
        100.0 * double as f64 / keys.len() as f64,
        unknown.values().map(Vec::len).sum::<usize>()
    );
}

/// One increment's identity: the counter's value is the set of increments applied (one per line),
/// so concurrent versions (a double success) merge without losing either, and the count is exact.
fn increments(value: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(value).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// What one counter client did.
#[derive(Debug, Default)]
struct CounterRun {
    acked: BTreeSet<String>,
    /// Increments whose outcome is unknown (quorum not reached, a node died mid-call).
    unknown: BTreeSet<String>,
    /// Times the client found concurrent versions (two conditional writes both succeeded).
    siblings_seen: usize,
    refusals: usize,
}

/// The counter's state: (merged increments, context, sibling count), read at QUORUM.
async fn read_counter(client: &KvClient) -> Option<(BTreeSet<String>, Vec<u8>, usize)> {
    for _ in 0..50 {
        match client.get("counter", quorum_read()).await {
            Ok(Some(read)) => {
                let merged = read.siblings.iter().flat_map(|s| increments(&s.value)).collect();
                return Some((merged, read.context, read.siblings.len()));
            }
            Ok(None) => return None,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("the counter could not be read for 5 s");
}

async fn count(client: KvClient, id: usize, rounds: usize) -> CounterRun {
    let mut run = CounterRun::default();
    let mut state = read_counter(&client).await;
    for round in 0..rounds {
        let op = format!("c{id}-{round}");
        loop {
            let (mut ops, context, siblings) = state.clone().unwrap_or_default();
            run.siblings_seen += usize::from(siblings > 1);
            ops.insert(op.clone());
            let value: Vec<u8> = ops.iter().flat_map(|o| format!("{o}\n").into_bytes()).collect();
            let condition =
                if context.is_empty() { WriteCondition::IfAbsent } else { WriteCondition::IfContextMatches };
            match client.put("counter", value, conditional(condition, context)).await {
                Ok(ack) => {
                    run.acked.insert(op);
                    state = Some((ops, ack.context, 1));
                    break;
                }
                Err(error) if error.reason() == "PRECONDITION_FAILED" => {
                    run.refusals += 1;
                    state = match error.current_state() {
                        Some(current) if current.values.is_some() => {
                            let values = current.values.unwrap_or_default();
                            let merged = values.iter().flat_map(|v| increments(v)).collect();
                            Some((merged, current.context, values.len()))
                        }
                        _ => read_counter(&client).await,
                    };
                }
                Err(_) => {
                    // Outcome unknown (or nothing applied; the client cannot tell): not retried, as a
                    // retry could count it twice. Read again and go on.
                    run.unknown.insert(op);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    state = read_counter(&client).await;
                    break;
                }
            }
        }
    }
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_context_matches_counter_equals_acknowledged_increments_across_a_sigkill() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = two_router_cluster().await;
    let clients = [cluster.client(0).await.unwrap(), cluster.client(1).await.unwrap()];
    let topology = cluster.topology().await.unwrap();
    let coordinator = topology.preference_list("t", "counter", 3).unwrap()[0];
    let coordinator_index = (coordinator - 1) as usize;

    const ROUNDS: usize = 25;
    let counters: Vec<_> =
        (0..16).map(|id| tokio::spawn(count(clients[id % 2].clone(), id, ROUNDS))).collect();
    // Kill the counter's coordinator once increments flow, keep it down a while, start it again.
    let mut progressed = false;
    for _ in 0..600 {
        if read_counter(&clients[0]).await.is_some_and(|(ops, _, _)| ops.len() >= 40) {
            progressed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(progressed, "increments were acknowledged before the kill");
    cluster.kill_storage(coordinator_index);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_storage_again(coordinator_index).unwrap();

    let mut runs = Vec::new();
    for counter in counters {
        runs.push(counter.await.unwrap());
    }
    let acked: BTreeSet<String> = runs.iter().flat_map(|r| r.acked.iter().cloned()).collect();
    let unknown: BTreeSet<String> = runs.iter().flat_map(|r| r.unknown.iter().cloned()).collect();
    let all = ReadOptions { consistency: Consistency::All, ..ReadOptions::default() };
    let mut final_read = None;
    for _ in 0..100 {
        if let Ok(read) = clients[0].get("counter", all.clone()).await {
            final_read = read;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let final_read = final_read.expect("the counter exists");
    let counted: BTreeSet<String> = final_read.siblings.iter().flat_map(|s| increments(&s.value)).collect();
    let missing: Vec<&String> = acked.difference(&counted).collect();
    assert!(missing.is_empty(), "acknowledged increments missing from the counter: {missing:?}");
    let extra: Vec<&String> = counted.difference(&acked).filter(|op| !unknown.contains(*op)).collect();
    assert!(extra.is_empty(), "increments counted that were refused: {extra:?}");
    let siblings_seen: usize = runs.iter().map(|r| r.siblings_seen).sum();
    let refusals: usize = runs.iter().map(|r| r.refusals).sum();
    assert!(refusals > 0, "16 clients on one key contend");
    assert!(acked.len() >= 16 * ROUNDS - unknown.len());
    println!(
        "IF_CONTEXT_MATCHES counter: {} acknowledged, {} unknown ({} of them applied), counter = {}, \
         {refusals} refusals retried, concurrent versions seen {siblings_seen} times",
        acked.len(),
        unknown.len(),
        counted.intersection(&unknown).count(),
        counted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_conditions_answer_412_with_the_current_state() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    let router = cluster.routers[0].addr;
    let put = |key: &str, body: &str, headers: &[(&str, &str)]| {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        http_request(router, "PUT", &format!("/v1/kv/{key}"), &all, Some(body.as_bytes())).unwrap()
    };
    let body = |value: &str, condition: &str| {
        format!(r#"{{"tenant_id":"t","value":{value:?},"consistency":"quorum","condition":"{condition}"}}"#)
    };
    let (status, _) = put("h", &body("one", "if_absent"), &[]);
    assert_eq!(status, 200);
    let (status, reply) = put("h", &body("two", "if_absent"), &[]);
    assert_eq!(status, 412, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["error"]["reason"], "PRECONDITION_FAILED");
    let details = &reply["error"]["details"];
    assert_eq!(details["found"], "true");
    assert_eq!(details["condition"], "if_absent");
    assert!(!details["context"].as_str().unwrap().is_empty());
    assert_eq!(details["values_base64"], "Im9uZSI=", "the stored JSON text \"one\"");
    // The HTTP precondition header means the same; an unknown condition is a 400.
    let plain = r#"{"tenant_id":"t","value":"three"}"#;
    assert_eq!(put("h", plain, &[("if-none-match", "*")]).0, 412);
    assert_eq!(put("h", plain, &[("if-match", "*")]).0, 200);
    assert_eq!(put("new", plain, &[("if-match", "*")]).0, 412);
    assert_eq!(put("h", &body("x", "if_sunny"), &[]).0, 400);
    assert_eq!(put("h", &body("x", "if_absent"), &[("if-match", "*")]).0, 400, "conflicting forms");
}
