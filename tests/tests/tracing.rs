//! Traces end to end: a real OTLP/gRPC receiver runs in the test, the cluster's processes export to it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`), and one QUORUM put and one get must each be one trace in which
//! the router's request span is the parent of one span per contacted storage node, the storage nodes'
//! spans continue those calls, service names are right, and no key or value appears anywhere.
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
    // Let the storage nodes' spans arrive too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = spans(&receiver);

    let (put_root, put_children) = put;
    let (get_root, get_children) = get;
    assert_ne!(put_root.trace_id, get_root.trace_id, "one trace per request");
    for (root, children, rpcs) in [
        (&put_root, &put_children, &["storage.coordinate_write", "storage.replicate"][..]),
        (&get_root, &get_children, &["storage.get"][..]),
    ] {
        assert_eq!(root.service, "pairdb-router");
        assert_eq!(root.attributes.get("tenant").map(String::as_str), Some("t"));
        assert_eq!(root.attributes.get("consistency").map(String::as_str), Some("quorum"));
        assert_eq!(root.attributes.get("outcome").map(String::as_str), Some("ok"));
        assert!(root.attributes.contains_key("partition"), "{root:?}");
        let nodes: Vec<&String> = children.iter().map(|c| c.attributes.get("node_id").unwrap()).collect();
        let distinct: BTreeSet<&String> = nodes.iter().copied().collect();
        assert_eq!(nodes.len(), distinct.len(), "one span per contacted node: {children:#?}");
        for child in children {
            assert!(rpcs.contains(&child.name.as_str()), "{child:?}");
            assert_eq!(child.trace_id, root.trace_id);
            assert_eq!(child.service, "pairdb-router");
            assert_eq!(child.attributes.get("partition"), root.attributes.get("partition"));
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

    // Never key contents or values, in any attribute of any span or resource.
    for batch in receiver.batches.lock().unwrap().iter() {
        let dump = format!("{batch:?}");
        assert!(
            !dump.contains(secret_key) && !dump.contains(secret_value),
            "key or value leaked into a span"
        );
    }
}

fn tokio_stream_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}
