//! Traces end to end: a real OTLP/gRPC receiver runs in the test, the cluster's processes export to it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`), and one QUORUM put and one get must each be one trace in which
//! the router's request span is the parent of one span per contacted storage node, the storage nodes'
//! spans continue those calls, service names are right, and no key or value appears anywhere. Every
//! gRPC span carries the RPC semantic conventions; an HTTP put continues the caller's `traceparent`;
//! a request that fails with QUORUM_NOT_REACHED has status ERROR on the router's spans and on the
//! failed replica calls; health probes make no spans.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use pairdb_client::{Consistency, ReadOptions, WriteOptions};
use pairdb_tests::cluster::{Cluster, ClusterOptions};

#[derive(Debug, Clone, Default)]
struct Receiver {
    batches: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.batches.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// One received span with its service name.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    status: i32,
    status_message: String,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn spans(receiver: &Receiver) -> Vec<Span> {
    let mut out = Vec::new();
    for batch in receiver.batches.lock().unwrap().iter() {
        for resource_spans in &batch.resource_spans {
            let resource =
                resource_spans.resource.as_ref().map(|r| attributes(&r.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent_span_id: span.parent_span_id.clone(),
                        attributes: attributes(&span.attributes),
                        status: span.status.as_ref().map_or(0, |s| s.code),
                        status_message: span.status.as_ref().map(|s| s.message.clone()).unwrap_or_default(),
                    });
                }
            }
        }
    }
    out
}

/// The router span named `name` and its direct children, once all expected children arrived.
fn request_trace(all: &[Span], name: &str, min_children: usize) -> Option<(Span, Vec<Span>)> {
    let root = all.iter().find(|s| s.name == name)?.clone();
    let children: Vec<Span> = all.iter().filter(|s| s.parent_span_id == root.span_id).cloned().collect();
    (children.len() >= min_children).then_some((root, children))
}

#[tokio::test]
async fn one_trace_per_request_with_one_child_span_per_storage_node() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream_incoming(listener))
            .await
    });

    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), format!("http://{otlp}")),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let cluster = Cluster::start_with(ClusterOptions { env, ..ClusterOptions::default() }).await.unwrap();
    let kv = cluster.client(0).await.unwrap();
    let (secret_key, secret_value) = ("k-3f9a1c-secret", "v-7d2e4b-secret");
    let quorum = WriteOptions { consistency: Consistency::Quorum, ..WriteOptions::default() };
    kv.put(secret_key, secret_value.as_bytes().to_vec(), quorum).await.unwrap();
    let read =
        kv.get(secret_key, ReadOptions { consistency: Consistency::Quorum, ..ReadOptions::default() }).await;
    assert!(read.unwrap().is_some());

    // QUORUM put with RF 3: a coordinated write plus two replicates; get: at least R = 2 reads.
    let started = Instant::now();
    let (put, get) = loop {
        let all = spans(&receiver);
        if let (Some(put), Some(get)) =
            (request_trace(&all, "router.put", 3), request_trace(&all, "router.get", 2))
        {
            break (put, get);
        }
        assert!(started.elapsed() < Duration::from_secs(30), "spans never arrived: {:#?}", spans(&receiver));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Wait for the storage nodes' spans continuing every replica call.
    let all = wait_for(&receiver, "the storage nodes' spans", |all| {
        let continued = |child: &Span| all.iter().any(|s| s.parent_span_id == child.span_id);
        put.1.iter().chain(&get.1).all(continued).then(|| all.to_vec())
    })
    .await;

    let (put_root, put_children) = put;
    let (get_root, get_children) = get;
    assert_ne!(put_root.trace_id, get_root.trace_id, "one trace per request");
    for (root, children, rpcs) in [
        (
            &put_root,
            &put_children,
            &[
                "pairdb.storage.v1.StorageService/CoordinateWrite",
                "pairdb.storage.v1.StorageService/Replicate",
            ][..],
        ),
        (&get_root, &get_children, &["pairdb.storage.v1.StorageService/Get"][..]),
    ] {
        assert_eq!(root.service, "pairdb-router");
        assert_eq!(root.attributes.get("pairdb.tenant").map(String::as_str), Some("t"));
        assert_eq!(root.attributes.get("pairdb.consistency").map(String::as_str), Some("quorum"));
        assert_eq!(root.attributes.get("pairdb.outcome").map(String::as_str), Some("ok"));
        assert!(root.attributes.contains_key("pairdb.partition"), "{root:?}");
        let nodes: Vec<&String> =
            children.iter().map(|c| c.attributes.get("pairdb.node_id").unwrap()).collect();
        let distinct: BTreeSet<&String> = nodes.iter().copied().collect();
        assert_eq!(nodes.len(), distinct.len(), "one span per contacted node: {children:#?}");
        for child in children {
            assert!(rpcs.contains(&child.name.as_str()), "{child:?}");
            assert_eq!(child.trace_id, root.trace_id);
            assert_eq!(child.service, "pairdb-router");
            assert_eq!(child.attributes.get("pairdb.partition"), root.attributes.get("pairdb.partition"));
            // The storage node continued this call in the same trace.
            let continued = all
                .iter()
                .filter(|s| s.parent_span_id == child.span_id && s.trace_id == root.trace_id)
                .collect::<Vec<_>>();
            assert_eq!(continued.len(), 1, "storage span under {child:?}: {continued:#?}");
            assert_eq!(continued[0].service, "pairdb-storage");
        }
    }
    let trace_ids: BTreeSet<&Vec<u8>> =
        all.iter().filter(|s| s.name.starts_with("router.")).map(|s| &s.trace_id).collect();
    assert_eq!(trace_ids.len(), 2, "exactly the two client requests started traces");
    assert_rpc_conventions(&all);

    // Never key contents or values, in any attribute of any span or resource.
    for batch in receiver.batches.lock().unwrap().iter() {
        let dump = format!("{batch:?}");
        assert!(
            !dump.contains(secret_key) && !dump.contains(secret_value),
            "key or value leaked into a span"
        );
    }
}

/// Every gRPC span (server or client) names its method without a leading `/` and carries the RPC
/// semantic conventions.
fn assert_rpc_conventions(all: &[Span]) {
    let grpc: Vec<&Span> = all.iter().filter(|s| s.attributes.contains_key("rpc.system")).collect();
    assert!(grpc.len() >= 10, "gRPC spans: {all:#?}");
    for span in grpc {
        assert!(!span.name.starts_with('/'), "{span:?}");
        assert_eq!(span.attributes.get("rpc.system").map(String::as_str), Some("grpc"), "{span:?}");
        let service = span.attributes.get("rpc.service").expect("rpc.service");
        let method = span.attributes.get("rpc.method").expect("rpc.method");
        assert!(service.starts_with("pairdb.") && !method.is_empty(), "{span:?}");
        assert!(span.name.starts_with(&format!("{service}/{method}")), "{span:?}");
        assert!(span.attributes.contains_key("rpc.grpc.status_code"), "{span:?}");
        assert!(span.attributes.contains_key("server.address"), "{span:?}");
    }
    // No un-namespaced custom attributes.
    for span in all {
        for key in ["tenant", "partition", "node_id", "outcome", "consistency"] {
            assert!(!span.attributes.contains_key(key), "{key} without the pairdb. namespace: {span:?}");
        }
    }
}

async fn start_receiver() -> (Receiver, std::net::SocketAddr) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream_incoming(listener))
            .await
    });
    (receiver, otlp)
}

fn exporting_to(otlp: std::net::SocketAddr) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), format!("http://{otlp}")),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ]
}

/// Waits until `found` finds what it looks for in the received spans.
async fn wait_for<T>(receiver: &Receiver, what: &str, found: impl Fn(&[Span]) -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = found(&spans(receiver)) {
            return found;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what} never arrived: {:#?}", spans(receiver));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn http_requests_continue_traceparent_and_probes_make_no_spans() {
    let (receiver, otlp) = start_receiver().await;
    let options = ClusterOptions { env: exporting_to(otlp), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(options).await.unwrap();
    let router = cluster.routers[0].addr;
    for process in std::iter::once(&cluster.meta).chain(&cluster.storage).chain(&cluster.routers) {
        for path in ["/health/ready", "/health/live", "/metrics"] {
            pairdb_tests::http_get(process.addr, path).unwrap();
        }
    }
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{parent_id}-01");
    let headers = [("content-type", "application/json"), ("traceparent", traceparent.as_str())];
    let body = r#"{"tenant_id":"t","value":"v-http","consistency":"quorum"}"#;
    let (status, answer) =
        pairdb_tests::http_request(router, "PUT", "/v1/kv/k-http-secret", &headers, Some(body.as_bytes()))
            .unwrap();
    assert_eq!(status, 200, "{answer}");

    let server = wait_for(&receiver, "the HTTP server span", |all| {
        all.iter().find(|s| s.name == "PUT /v1/kv/{key}").cloned()
    })
    .await;
    assert_eq!(hex(&server.trace_id), trace_id, "continues the caller's trace");
    assert_eq!(hex(&server.parent_span_id), parent_id);
    assert_eq!(server.service, "pairdb-router");
    assert_eq!(server.attributes.get("http.route").map(String::as_str), Some("/v1/kv/{key}"));
    assert_eq!(server.attributes.get("http.response.status_code").map(String::as_str), Some("200"));
    assert_eq!(server.attributes.get("http.request.method").map(String::as_str), Some("PUT"));
    let put = wait_for(&receiver, "the router.put span", |all| {
        all.iter().find(|s| s.name == "router.put" && s.parent_span_id == server.span_id).cloned()
    })
    .await;
    assert_eq!(put.trace_id, server.trace_id);
    // Markers made after the probes: each process exports its spans in the order they end, so once
    // a process's marker arrived, a span of its probes would have too. Router: the put above;
    // storage nodes: their spans in the put's trace (RF 3: all three); meta: a traced admin call.
    let meta_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let meta_parent = format!("00-{meta_trace}-00f067aa0ba902b8-01");
    let (status, _) = pairdb_tests::http_request(
        cluster.meta.addr,
        "GET",
        "/v1/admin/migrations",
        &[("traceparent", meta_parent.as_str())],
        None,
    )
    .unwrap();
    assert_eq!(status, 200);
    let all = wait_for(&receiver, "every process's marker", |all| {
        let in_trace = |service: &str, trace: &str| {
            all.iter().filter(|s| s.service == service && hex(&s.trace_id) == trace).count()
        };
        let storage_nodes: BTreeSet<&str> = all
            .iter()
            .filter(|s| s.service == "pairdb-storage" && hex(&s.trace_id) == trace_id)
            .filter_map(|s| s.attributes.get("server.port").map(String::as_str))
            .collect();
        (in_trace("pairdb-meta", meta_trace) >= 1 && storage_nodes.len() == 3).then(|| all.to_vec())
    })
    .await;
    assert!(
        all.iter()
            .all(|s| !s.name.contains("health") && !s.name.contains("metrics") && !s.name.contains("Health")),
        "probes and scrapes made spans: {all:#?}"
    );
    assert!(!format!("{all:?}").contains("k-http-secret"), "the key leaked into a span");
}

#[tokio::test]
async fn a_quorum_failure_is_an_error_on_the_router_span_and_on_the_failed_replica_calls() {
    let (receiver, otlp) = start_receiver().await;
    let options = ClusterOptions { env: exporting_to(otlp), ..ClusterOptions::default() };
    let mut cluster = Cluster::start_with(options).await.unwrap();
    let kv = cluster.client(0).await.unwrap();
    let quorum = WriteOptions { consistency: Consistency::Quorum, ..WriteOptions::default() };
    kv.put("warm", b"up".to_vec(), quorum.clone()).await.unwrap();
    cluster.kill_storage(1);
    cluster.kill_storage(2);
    // Several failed puts: once meta or a probe has marked the killed nodes down, a put is planned
    // without them and fails with no replica call at all; the first ones still call them.
    for key in ["after-kill-1", "after-kill-2", "after-kill-3"] {
        let error = kv.put(key, b"v".to_vec(), quorum.clone()).await.unwrap_err();
        assert_eq!(error.reason(), "QUORUM_NOT_REACHED", "{error:?}");
    }

    // The failed replica calls are those of whichever put first called the killed owners (later
    // ones may be planned around them once the router suspects them): every storage call that
    // failed after the kill is an ERROR span, and the failed put's router span is ERROR.
    let root = wait_for(&receiver, "a failed put", |all| {
        all.iter()
            .find(|s| {
                s.name == "router.put"
                    && s.attributes.get("pairdb.outcome").map(String::as_str) == Some("QUORUM_NOT_REACHED")
            })
            .cloned()
    })
    .await;
    let failed = wait_for(&receiver, "failed replica calls", |all| {
        let failed: Vec<Span> = all
            .iter()
            .filter(|s| {
                s.name.starts_with("pairdb.storage.v1.StorageService/")
                    && s.attributes.get("pairdb.outcome").is_some_and(|o| o != "ok")
            })
            .cloned()
            .collect();
        (!failed.is_empty()).then_some(failed)
    })
    .await;
    assert_eq!(root.status, 2, "router span status ERROR: {root:?}");
    assert!(root.status_message.contains("QUORUM_NOT_REACHED"), "{root:?}");
    for span in &failed {
        assert_eq!(span.status, 2, "failed replica call has status ERROR: {span:?}");
        assert!(!span.status_message.is_empty(), "{span:?}");
    }
    let server = wait_for(&receiver, "the KV server span", |all| {
        all.iter().find(|s| s.span_id == root.parent_span_id).cloned()
    })
    .await;
    assert_eq!(server.name, "pairdb.kv.v1.KvService/Put");
    assert_eq!(server.status, 2, "{server:?}");
    assert_eq!(server.attributes.get("rpc.grpc.status_code").map(String::as_str), Some("14"));
    assert_eq!(server.attributes.get("pairdb.reason").map(String::as_str), Some("QUORUM_NOT_REACHED"));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tokio_stream_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}
