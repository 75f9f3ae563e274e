//! PutMany / DeleteMany end to end (issue 19), with real processes (meta, three storage nodes, a
//! router): a 1,000-item batch with invalid items answers per item and stores every valid one;
//! oversized batches get BATCH_TOO_LARGE and store nothing; an idempotency key applies to the whole
//! batch; HTTP `POST /v1/kv:batch` mixes puts and deletes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pairdb_client::{Consistency, DeleteManyItem, PutManyItem, ReadOptions, WriteCondition, WriteOptions};
use pairdb_tests::cluster::Cluster;
use pairdb_tests::http_request;
use serde_json::Value;

fn quorum() -> WriteOptions {
    WriteOptions { consistency: Consistency::Quorum, ..WriteOptions::default() }
}

fn item(key: &str, value: &[u8]) -> PutManyItem {
    PutManyItem { key: key.to_owned(), value: value.to_vec(), ..PutManyItem::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_answer_per_item_and_oversized_ones_are_refused() {
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    let client = cluster.client(0).await.unwrap();
    client.put("taken", b"first".to_vec(), quorum()).await.unwrap();

    // 1,000 items, five of them invalid in different ways.
    let mut items: Vec<PutManyItem> =
        (0..995).map(|i| item(&format!("k{i:04}"), format!("v{i}").as_bytes())).collect();
    items.push(item("", b"no key"));
    items.push(item("huge", &vec![0; 1024 * 1024 + 1]));
    items.push(PutManyItem { context: vec![1, 2, 3], ..item("forged", b"x") });
    items.push(PutManyItem { condition: Some(WriteCondition::IfAbsent), ..item("taken", b"second") });
    items.push(PutManyItem { ttl: Some(std::time::Duration::from_secs(60)), ..item("expiring", b"e") });
    let reply = client.put_many(items, quorum()).await.unwrap();
    assert_eq!(reply.results.len(), 1000);
    let reasons: Vec<String> = reply
        .results
        .iter()
        .map(|r| r.as_ref().map_or_else(|e| e.reason().to_owned(), |_| "OK".to_owned()))
        .collect();
    assert!(
        reasons[..995].iter().all(|r| r == "OK"),
        "{:?}",
        &reasons[..995].iter().filter(|r| *r != "OK").collect::<Vec<_>>()
    );
    assert_eq!(
        reasons[995..],
        ["INVALID_KEY", "VALUE_TOO_LARGE", "INVALID_CONTEXT", "PRECONDITION_FAILED", "OK"]
    );
    let all = ReadOptions { consistency: Consistency::All, ..ReadOptions::default() };
    for i in [0, 499, 994] {
        let read = client.get(&format!("k{i:04}"), all.clone()).await.unwrap().expect("stored");
        assert_eq!(read.single_value(), Some(format!("v{i}").as_bytes()));
    }
    assert_eq!(client.get("taken", all.clone()).await.unwrap().unwrap().single_value(), Some(&b"first"[..]));
    assert!(client.get("expiring", all.clone()).await.unwrap().unwrap().siblings[0].expires_at_ms.is_some());

    // Oversized: too many items, too many bytes. Nothing of them is stored.
    let too_many: Vec<PutManyItem> = (0..1001).map(|i| item(&format!("over-{i}"), b"x")).collect();
    let error = client.put_many(too_many, quorum()).await.unwrap_err();
    assert_eq!(error.reason(), "BATCH_TOO_LARGE", "{error}");
    let too_big: Vec<PutManyItem> =
        (0..5).map(|i| item(&format!("over-{i}"), &vec![7; 1024 * 1024])).collect();
    assert_eq!(client.put_many(too_big, quorum()).await.unwrap_err().reason(), "BATCH_TOO_LARGE");
    assert!(client.get("over-0", all.clone()).await.unwrap().is_none());

    // An idempotency key covers the whole batch: the retry replays the stored results.
    let keyed = WriteOptions { idempotency_key: Some("batch-1".into()), ..quorum() };
    let batch = vec![item("once-a", b"1"), item("once-b", b"2")];
    let first = client.put_many(batch.clone(), keyed.clone()).await.unwrap();
    let again = client.put_many(batch, keyed).await.unwrap();
    assert!(again.duplicate && !first.duplicate);
    assert_eq!(again.results[0].as_ref().unwrap().context, first.results[0].as_ref().unwrap().context);
    assert_eq!(client.get("once-a", all.clone()).await.unwrap().unwrap().siblings.len(), 1, "applied once");

    // DeleteMany with and without contexts.
    let read = client.get("k0001", all.clone()).await.unwrap().unwrap();
    let deletes = vec![
        DeleteManyItem { key: "k0001".into(), context: read.context, ..DeleteManyItem::default() },
        DeleteManyItem { key: "k0002".into(), ..DeleteManyItem::default() },
    ];
    let deleted = client.delete_many(deletes, quorum()).await.unwrap();
    assert!(deleted.results.iter().all(Result::is_ok));
    assert!(client.get("k0001", all.clone()).await.unwrap().is_none());
    assert!(client.get("k0002", all.clone()).await.unwrap().is_none());

    // HTTP: puts and deletes in one JSON body, one result each.
    let body = r#"{"tenant_id": "t", "consistency": "quorum", "items": [
        {"key": "h1", "value": {"n": 1}},
        {"key": "h2", "value_base64": "AAE=", "ttl_ms": 60000},
        {"op": "delete", "key": "k0003"},
        {"key": "", "value": 1}
    ]}"#;
    let headers = [("content-type", "application/json")];
    let (status, reply) =
        http_request(cluster.routers[0].addr, "POST", "/v1/kv:batch", &headers, Some(body.as_bytes()))
            .unwrap();
    assert_eq!(status, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    let results = reply["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[0]["context"].is_string() && results[2]["context"].is_string());
    assert_eq!(results[3]["error"]["reason"], "INVALID_KEY");
    assert!(client.get("k0003", all.clone()).await.unwrap().is_none());
    assert_eq!(client.get("h1", all).await.unwrap().unwrap().single_value(), Some(&br#"{"n":1}"#[..]));
}
