//! End-to-end tests of the router's client edge with real processes: API keys and tenant isolation
//! over gRPC and HTTP, idempotent writes against real Redis (cut through a proxy, across a router
//! restart), per-tenant rate limits, and a table of bad inputs with their exact statuses and reasons.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pairdb_client::proto::admin::v1 as admin;
use pairdb_client::proto::kv::v1 as pb;
use pairdb_client::proto::kv::v1::kv_service_client::KvServiceClient;
use pairdb_client::{
    ClientError, ClientOptions, Consistency, KvClient, ReadOptions, RetryPolicy, WriteOptions,
};
use pairdb_tests::cluster::{Cluster, ClusterOptions};
use pairdb_tests::{Proxy, http_get, http_request};
use serde_json::{Value, json};
use tonic::Code;

/// One cluster at a time: the rate-limit test measures admission, not CPU contention.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn no_retries(token: &str) -> ClientOptions {
    ClientOptions { token: Some(token.to_owned()), retry: RetryPolicy::never(), ..ClientOptions::default() }
}

/// Creates `tenant` and an API key for it; returns the secret once the router accepts it.
async fn tenant_with_key(cluster: &Cluster, request: admin::CreateTenantRequest) -> String {
    let admin = cluster.admin_client().await.unwrap();
    let tenant = request.tenant_id.clone();
    admin.create_tenant(request).await.unwrap();
    let secret = admin
        .create_api_key(admin::CreateApiKeyRequest { tenant_id: tenant.clone(), description: "test".into() })
        .await
        .unwrap()
        .secret;
    let client =
        KvClient::connect(&cluster.routers[0].addr.to_string(), "", no_retries(&secret)).await.unwrap();
    let started = Instant::now();
    loop {
        match client.get("probe", ReadOptions::default()).await {
            Ok(_) => return secret,
            Err(error) if started.elapsed() < Duration::from_secs(20) => {
                assert!(matches!(error.reason(), "UNAUTHENTICATED" | "TENANT_NOT_FOUND"), "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("router never accepted the key of {tenant}: {error}"),
        }
    }
}

fn tenant(id: &str) -> admin::CreateTenantRequest {
    admin::CreateTenantRequest { tenant_id: id.into(), replication_factor: 3, ..Default::default() }
}

async fn client(cluster: &Cluster, secret: &str, tenant: &str) -> KvClient {
    KvClient::connect(&cluster.routers[0].addr.to_string(), tenant, no_retries(secret)).await.unwrap()
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// (status, parsed JSON body) of an HTTP call to the router.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, Value) {
    let (status, body) = http_request(addr, method, path, headers, body).unwrap();
    let parsed = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("{method} {path}: not JSON ({status}): {body}"));
    (status, parsed)
}

fn reason(body: &Value) -> &str {
    body["error"]["reason"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn api_keys_isolate_tenants_over_grpc_and_http() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster =
        Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await.unwrap();
    let key_a = tenant_with_key(&cluster, tenant("a")).await;
    let key_b = tenant_with_key(&cluster, tenant("b")).await;
    let (a, b) = (client(&cluster, &key_a, "").await, client(&cluster, &key_b, "").await);

    a.put("shared", b"from-a".to_vec(), WriteOptions::default()).await.unwrap();
    b.put("shared", b"from-b".to_vec(), WriteOptions::default()).await.unwrap();
    let all = ReadOptions { consistency: Consistency::All, ..ReadOptions::default() };
    assert_eq!(a.get("shared", all.clone()).await.unwrap().unwrap().single_value(), Some(&b"from-a"[..]));
    assert_eq!(b.get("shared", all.clone()).await.unwrap().unwrap().single_value(), Some(&b"from-b"[..]));
    a.delete("shared", WriteOptions::default()).await.unwrap();
    assert!(a.get("shared", all.clone()).await.unwrap().is_none());
    assert!(b.get("shared", all.clone()).await.unwrap().is_some(), "a's delete left b's key alone");

    // A's key naming tenant b: refused for every operation.
    let a_as_b = client(&cluster, &key_a, "b").await;
    let denied = [
        a_as_b.get("shared", ReadOptions::default()).await.unwrap_err(),
        a_as_b.put("shared", b"x".to_vec(), WriteOptions::default()).await.unwrap_err(),
        a_as_b.delete("shared", WriteOptions::default()).await.unwrap_err(),
    ];
    for error in denied {
        assert_eq!((error.code(), error.reason()), (Code::PermissionDenied, "PERMISSION_DENIED"), "{error}");
    }
    assert_eq!(b.get("shared", all).await.unwrap().unwrap().single_value(), Some(&b"from-b"[..]));

    // The same over HTTP, through both route forms.
    let router = cluster.routers[0].addr;
    let (auth_a, auth_b) = (bearer(&key_a), bearer(&key_b));
    let headers_a: Vec<(&str, &str)> =
        vec![("authorization", auth_a.as_str()), ("content-type", "application/json")];
    let headers_b: Vec<(&str, &str)> =
        vec![("authorization", auth_b.as_str()), ("content-type", "application/json")];
    let body = json!({"key": "h", "value": {"n": 1, "tags": ["x"]}}).to_string();
    let (status, put) = http(router, "POST", "/v1/key-value", &headers_b, Some(body.as_bytes()));
    assert_eq!(status, 200, "{put}");
    assert!(!put["context"].as_str().unwrap().is_empty());
    let (status, missing) = http(router, "GET", "/v1/key-value?key=h", &headers_a, None);
    assert_eq!((status, reason(&missing)), (404, "KEY_NOT_FOUND"), "{missing}");
    let (status, got) = http(router, "GET", "/v1/kv/h", &headers_b, None);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["value"], json!({"n": 1, "tags": ["x"]}), "JSON values come back as stored");
    let (status, denied) = http(router, "DELETE", "/v1/key-value?key=h&tenant_id=b", &headers_a, None);
    assert_eq!((status, reason(&denied)), (403, "PERMISSION_DENIED"), "{denied}");
    let (status, _) = http(router, "GET", "/v1/key-value?key=h", &headers_b, None);
    assert_eq!(status, 200, "b's key survived a's attempt");
    let (status, deleted) = http(router, "DELETE", "/v1/kv/h", &headers_b, None);
    assert_eq!(status, 200, "{deleted}");
    let (status, put) = http(router, "PUT", "/v1/kv/bin", &headers_b, Some(br#"{"value_base64": "AP8="}"#));
    assert_eq!(status, 200, "{put}");
    let (_, got) = http(router, "GET", "/v1/kv/bin", &headers_b, None);
    assert_eq!(got["value_base64"], "AP8=");
    assert_eq!(got["values_base64"], json!(["AP8="]));
}

fn vector_total(entries: &[(u64, u64)]) -> u64 {
    entries.iter().map(|(_, counter)| counter).sum()
}

#[tokio::test]
async fn idempotent_writes_against_redis_survive_restarts_and_fail_closed_when_redis_is_cut() {
    let Ok(redis_url) = std::env::var("PAIRDB_TEST_REDIS_URL") else {
        eprintln!("skipped: PAIRDB_TEST_REDIS_URL not set");
        return;
    };
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let redis_addr: SocketAddr =
        redis_url.trim_start_matches("redis://").trim_end_matches('/').parse().unwrap();
    let proxy = Proxy::start(redis_addr).await.unwrap();
    let mut cluster = Cluster::start_with(ClusterOptions {
        auth: true,
        redis_url: Some(format!("redis://{}", proxy.addr)),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    // Tenant names are unique per run: the Redis records outlive the test.
    let tenant_id = format!("idem{:x}", rand_suffix());
    let secret = tenant_with_key(&cluster, tenant(&tenant_id)).await;
    let kv = client(&cluster, &secret, "").await;
    let keyed = |key: &str| WriteOptions { idempotency_key: Some(key.to_owned()), ..WriteOptions::default() };

    let first = kv.put("k", b"v".to_vec(), keyed("op-1")).await.unwrap();
    let second = kv.put("k", b"v".to_vec(), keyed("op-1")).await.unwrap();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.context, second.context);
    assert_eq!(second.idempotency_key, "op-1");
    let read = kv
        .get("k", ReadOptions { consistency: Consistency::All, ..ReadOptions::default() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(vector_total(&read.version_vector), 1, "one dot: {:?}", read.version_vector);
    let conflict = kv.put("k", b"other".to_vec(), keyed("op-1")).await.unwrap_err();
    assert_eq!((conflict.code(), conflict.reason()), (Code::AlreadyExists, "IDEMPOTENCY_KEY_CONFLICT"));

    // 16 concurrent sends of one keyed put apply once.
    let sends: Vec<_> = (0..16)
        .map(|_| {
            let kv = kv.clone();
            tokio::spawn(async move {
                kv.put(
                    "k16",
                    b"once".to_vec(),
                    WriteOptions { idempotency_key: Some("op-16".into()), ..WriteOptions::default() },
                )
                .await
            })
        })
        .collect();
    let mut applied = 0;
    for send in sends {
        match send.await.unwrap() {
            Ok(ack) if !ack.duplicate => applied += 1,
            Ok(_) => {}
            Err(error) => assert_eq!(error.reason(), "IDEMPOTENCY_IN_FLIGHT", "{error}"),
        }
    }
    assert_eq!(applied, 1);
    let read = kv
        .get("k16", ReadOptions { consistency: Consistency::All, ..ReadOptions::default() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(vector_total(&read.version_vector), 1);

    // Records live in Redis: a restarted router still deduplicates.
    let before = kv.put("r", b"v".to_vec(), keyed("op-restart")).await.unwrap();
    cluster.restart_router(0).unwrap();
    let kv = client(&cluster, &secret, "").await;
    let started = Instant::now();
    let after = loop {
        match kv.put("r", b"v".to_vec(), keyed("op-restart")).await {
            Ok(ack) => break ack,
            Err(error)
                if error.reason() == "UNAUTHENTICATED" && started.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{error}"),
        }
    };
    assert!(after.duplicate);
    assert_eq!(after.context, before.context);

    // Redis cut: keyed writes fail closed (retryable), unkeyed writes go on.
    proxy.cut();
    // The proxy drops open connections on its next poll (every 20 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = kv.put("c", b"v".to_vec(), keyed("op-cut")).await.unwrap_err();
    assert_eq!((cut.code(), cut.reason()), (Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE"), "{cut}");
    kv.put("c", b"unkeyed".to_vec(), WriteOptions::default())
        .await
        .expect("unkeyed writes do not need Redis");
    proxy.restore();
    let started = Instant::now();
    loop {
        match kv.put("c", b"v".to_vec(), keyed("op-cut")).await {
            Ok(ack) => {
                assert!(!ack.duplicate, "the failed attempt did not record anything");
                break;
            }
            Err(error) if started.elapsed() < Duration::from_secs(20) => {
                assert_eq!(error.reason(), "IDEMPOTENCY_STORE_UNAVAILABLE", "{error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("keyed writes did not recover after Redis came back: {error}"),
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

#[tokio::test]
async fn a_tenant_over_its_rate_limit_is_refused_while_another_is_served() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster =
        Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await.unwrap();
    let limited =
        admin::CreateTenantRequest { rate_limit_ops_per_sec: 20, rate_limit_burst: 20, ..tenant("slow") };
    let slow_key = tenant_with_key(&cluster, limited).await;
    let fast_key = tenant_with_key(&cluster, tenant("fast")).await;
    let (slow, fast) = (client(&cluster, &slow_key, "").await, client(&cluster, &fast_key, "").await);
    // Let the bucket refill after the key probe.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Both tenants send 40 ops/s (twice the slow tenant's limit) for 3 s.
    let mut slow_results = Vec::new();
    let mut fast_results = Vec::new();
    let started = tokio::time::Instant::now();
    for i in 0..120u32 {
        tokio::time::sleep_until(started + Duration::from_millis(25 * u64::from(i))).await;
        let key = format!("k{}", i % 10);
        let (slow, fast) = (slow.clone(), fast.clone());
        slow_results
            .push(tokio::spawn(async move { slow.get(&key, ReadOptions::default()).await.map(|_| ()) }));
        let key = format!("k{}", i % 10);
        fast_results
            .push(tokio::spawn(async move { fast.get(&key, ReadOptions::default()).await.map(|_| ()) }));
    }
    let mut refused = 0;
    for result in slow_results {
        if let Err(error) = result.await.unwrap() {
            assert_eq!((error.code(), error.reason()), (Code::ResourceExhausted, "RATE_LIMITED"), "{error}");
            let retry_after: u64 = error.metadata("retry_after_ms").unwrap().parse().unwrap();
            assert!((1..=1000).contains(&retry_after));
            refused += 1;
        }
    }
    // 20 burst + ~60 refilled of 120: about 40 refused.
    assert!((25..=55).contains(&refused), "refused {refused} of 120");
    for result in fast_results {
        result.await.unwrap().expect("the unlimited tenant is never refused");
    }
    // Over HTTP the refusal is a 429 with the reason and a Retry-After header (whole seconds).
    let auth = bearer(&slow_key);
    let request = format!(
        "GET /v1/key-value?key=k1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nauthorization: {auth}\r\n\r\n"
    );
    let responses: Vec<(u16, String, String)> = (0..40)
        .map(|_| pairdb_tests::http_raw(cluster.routers[0].addr, request.as_bytes()).unwrap())
        .collect();
    let refused = responses.iter().find(|(status, _, _)| *status == 429);
    let Some((_, head, body)) = refused else {
        panic!("no 429 in {:?}", responses.iter().map(|r| r.0).collect::<Vec<_>>());
    };
    let parsed: Value = serde_json::from_str(body).unwrap();
    assert_eq!(reason(&parsed), "RATE_LIMITED", "{body}");
    let retry_after = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_owned()));
    let seconds: u64 =
        retry_after.unwrap_or_else(|| panic!("429 without Retry-After: {head}")).parse().unwrap();
    assert!(seconds >= 1, "{head}");
}

#[tokio::test]
async fn bad_input_gets_exact_statuses_and_reasons_over_grpc_and_http() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster =
        Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await.unwrap();
    let secret = tenant_with_key(
        &cluster,
        admin::CreateTenantRequest { max_value_bytes: 1024, max_siblings: 2, ..tenant("strict") },
    )
    .await;
    let router = cluster.routers[0].addr;
    let channel = pairdb_client::connect(&router.to_string()).await.unwrap();
    let mut raw = KvServiceClient::new(channel);
    let with_auth = |message: pb::PutRequest, token: Option<&str>| {
        let mut request = tonic::Request::new(message);
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    let put = |key: &str, value: Vec<u8>| pb::PutRequest { key: key.into(), value, ..Default::default() };
    let long_key = "k".repeat(1025);
    let options = |consistency: i32, w: u32| Some(pb::WriteOptions { consistency, w, ..Default::default() });

    // gRPC: (case, request, token, code, reason)
    let grpc_cases: Vec<(&str, pb::PutRequest, Option<&str>, Code, &str)> = vec![
        ("empty key", put("", b"v".to_vec()), Some(&secret), Code::InvalidArgument, "INVALID_KEY"),
        ("1025-byte key", put(&long_key, b"v".to_vec()), Some(&secret), Code::InvalidArgument, "INVALID_KEY"),
        (
            "value over the limit",
            put("k", vec![7; 2000]),
            Some(&secret),
            Code::ResourceExhausted,
            "VALUE_TOO_LARGE",
        ),
        (
            "unknown consistency",
            pb::PutRequest { options: options(9, 0), ..put("k", b"v".to_vec()) },
            Some(&secret),
            Code::InvalidArgument,
            "INVALID_CONSISTENCY",
        ),
        (
            "W > N",
            pb::PutRequest { options: options(0, 5), ..put("k", b"v".to_vec()) },
            Some(&secret),
            Code::InvalidArgument,
            "INVALID_CONSISTENCY",
        ),
        (
            "bad context",
            pb::PutRequest { context: vec![1, 2, 3], ..put("k", b"v".to_vec()) },
            Some(&secret),
            Code::InvalidArgument,
            "INVALID_CONTEXT",
        ),
        (
            "other tenant",
            pb::PutRequest { tenant_id: "nobody".into(), ..put("k", b"v".to_vec()) },
            Some(&secret),
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        ),
        ("missing token", put("k", b"v".to_vec()), None, Code::Unauthenticated, "UNAUTHENTICATED"),
        ("wrong token", put("k", b"v".to_vec()), Some("not-a-key"), Code::Unauthenticated, "UNAUTHENTICATED"),
    ];
    for (case, request, token, code, reason) in grpc_cases {
        let status = raw.put(with_auth(request, token)).await.expect_err(case);
        let error = ClientError::from(status);
        assert_eq!((error.code(), error.reason()), (code, reason), "gRPC {case}: {error}");
    }
    let read = pb::GetRequest {
        key: "k".into(),
        options: Some(pb::ReadOptions { r: 4, ..Default::default() }),
        ..Default::default()
    };
    let mut request = tonic::Request::new(read);
    request.metadata_mut().insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let error = ClientError::from(raw.get(request).await.unwrap_err());
    assert_eq!(error.reason(), "INVALID_CONSISTENCY", "R > N: {error}");

    // HTTP: (case, method, path, content type, body, status, reason)
    let auth = bearer(&secret);
    let big_value = json!({"key": "k", "value_base64": "A".repeat(1400)}).to_string();
    let oversize = vec![b' '; 5 * 1024 * 1024];
    type HttpCase<'a> = (&'a str, &'a str, String, &'a str, Vec<u8>, Option<&'a str>, u16, &'a str);
    let http_cases: Vec<HttpCase> = vec![
        (
            "empty key",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            br#"{"key": "", "value": 1}"#.to_vec(),
            Some(&auth),
            400,
            "INVALID_KEY",
        ),
        (
            "1025-byte key",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            json!({"key": long_key, "value": 1}).to_string().into_bytes(),
            Some(&auth),
            400,
            "INVALID_KEY",
        ),
        (
            "value over the limit",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            big_value.into_bytes(),
            Some(&auth),
            429,
            "VALUE_TOO_LARGE",
        ),
        (
            "unknown consistency",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            br#"{"key": "k", "value": 1, "consistency": "most"}"#.to_vec(),
            Some(&auth),
            400,
            "INVALID_CONSISTENCY",
        ),
        (
            "R > N",
            "GET",
            "/v1/key-value?key=k&r=4".into(),
            "",
            Vec::new(),
            Some(&auth),
            400,
            "INVALID_CONSISTENCY",
        ),
        (
            "bad context",
            "DELETE",
            "/v1/key-value?key=k&context=AAAA".into(),
            "",
            Vec::new(),
            Some(&auth),
            400,
            "INVALID_CONTEXT",
        ),
        (
            "malformed JSON",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            b"{\"key\": ".to_vec(),
            Some(&auth),
            400,
            "INVALID_JSON",
        ),
        (
            "wrong type",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            br#"{"key": 5, "value": 1}"#.to_vec(),
            Some(&auth),
            400,
            "INVALID_JSON",
        ),
        (
            "unknown field",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            br#"{"key": "k", "value": 1, "colour": "red"}"#.to_vec(),
            Some(&auth),
            400,
            "INVALID_JSON",
        ),
        (
            "wrong content type",
            "POST",
            "/v1/key-value".into(),
            "text/plain",
            br#"{"key": "k", "value": 1}"#.to_vec(),
            Some(&auth),
            400,
            "INVALID_CONTENT_TYPE",
        ),
        (
            "oversize body",
            "POST",
            "/v1/key-value".into(),
            "application/json",
            oversize,
            Some(&auth),
            400,
            "BODY_TOO_LARGE",
        ),
        (
            "invalid UTF-8 key",
            "GET",
            "/v1/key-value?key=%ff%fe".into(),
            "",
            Vec::new(),
            Some(&auth),
            400,
            "INVALID_KEY",
        ),
        (
            "other tenant",
            "GET",
            "/v1/key-value?key=k&tenant_id=nobody".into(),
            "",
            Vec::new(),
            Some(&auth),
            403,
            "PERMISSION_DENIED",
        ),
        ("missing token", "GET", "/v1/key-value?key=k".into(), "", Vec::new(), None, 401, "UNAUTHENTICATED"),
        (
            "wrong token",
            "GET",
            "/v1/key-value?key=k".into(),
            "",
            Vec::new(),
            Some("Bearer nope"),
            401,
            "UNAUTHENTICATED",
        ),
    ];
    for (case, method, path, content_type, body, authorization, status, expected_reason) in http_cases {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(authorization) = authorization {
            headers.push(("authorization", authorization));
        }
        if !content_type.is_empty() {
            headers.push(("content-type", content_type));
        }
        let body = (!body.is_empty()).then_some(body.as_slice());
        let (got_status, got) = http(router, method, &path, &headers, body);
        assert_eq!((got_status, reason(&got)), (status, expected_reason), "HTTP {case}: {got}");
        let error = &got["error"];
        assert!(
            error["code"].is_string() && error["message"].is_string() && error["details"].is_object(),
            "{got}"
        );
    }

    // The sibling cap: a third concurrent (context-free) value is refused, over gRPC and HTTP.
    let kv = client(&cluster, &secret, "").await;
    let all = WriteOptions { consistency: Consistency::All, ..WriteOptions::default() };
    let first = kv.put("crowded", b"1".to_vec(), all.clone()).await.unwrap();
    assert!(first.idempotency_key.starts_with("gen-"), "unkeyed writes get a generated key: {first:?}");
    kv.put("crowded", b"2".to_vec(), all.clone()).await.unwrap();
    let error = kv.put("crowded", b"3".to_vec(), all).await.unwrap_err();
    assert_eq!((error.code(), error.reason()), (Code::ResourceExhausted, "TOO_MANY_SIBLINGS"), "{error}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let (status, body) = http(
        router,
        "POST",
        "/v1/key-value",
        &headers,
        Some(br#"{"key": "crowded", "value": 3, "consistency": "all"}"#),
    );
    assert_eq!((status, reason(&body)), (429, "TOO_MANY_SIBLINGS"), "{body}");
    // A delete through the seed's route with the read's context and an idempotency key clears them.
    let (_, read) = http(router, "GET", "/v1/key-value?key=crowded&consistency=all", &headers, None);
    assert_eq!(read["values"].as_array().unwrap().len(), 2, "{read}");
    let context =
        read["context"].as_str().unwrap().replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
    let delete_headers = [("authorization", auth.as_str()), ("idempotency-key", "del-1")];
    let (status, deleted) = http(
        router,
        "DELETE",
        &format!("/v1/key-value?key=crowded&context={context}"),
        &delete_headers,
        None,
    );
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["idempotency_key"], "del-1");
    let (status, again) = http(
        router,
        "DELETE",
        &format!("/v1/key-value?key=crowded&context={context}"),
        &delete_headers,
        None,
    );
    assert_eq!((status, &again["duplicate"]), (200, &Value::Bool(true)), "{again}");
    let (status, gone) = http(router, "GET", "/v1/key-value?key=crowded&consistency=all", &headers, None);
    assert_eq!((status, reason(&gone)), (404, "KEY_NOT_FOUND"), "{gone}");

    // Unknown tenant: a key whose tenant was deleted.
    let orphan = tenant_with_key(&cluster, tenant("doomed")).await;
    let admin = cluster.admin_client().await.unwrap();
    admin.delete_tenant(admin::DeleteTenantRequest { tenant_id: "doomed".into() }).await.unwrap();
    let gone = client(&cluster, &orphan, "").await;
    let started = Instant::now();
    let error = loop {
        match gone.get("k", ReadOptions::default()).await {
            Ok(_) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("a deleted tenant's key still works"),
            Err(error) => break error,
        }
    };
    assert!(matches!(error.reason(), "TENANT_NOT_FOUND" | "UNAUTHENTICATED"), "{error}");

    // A broken chunked body is malformed input (INVALID_ARGUMENT), not BODY_TOO_LARGE.
    let chunked = format!(
        "POST /v1/key-value HTTP/1.1\r\nHost: x\r\nConnection: close\r\nauthorization: Bearer {secret}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let (status, _, body) = pairdb_tests::http_raw(router, chunked.as_bytes()).unwrap();
    let parsed: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!((status, reason(&parsed)), (400, "INVALID_ARGUMENT"), "{body}");

    // Still serving after all of that.
    let (status, _) = http_get(router, "/health/ready").unwrap();
    assert_eq!(status, 200);
    let kv = client(&cluster, &secret, "").await;
    kv.put("after", b"ok".to_vec(), WriteOptions::default()).await.unwrap();
}
