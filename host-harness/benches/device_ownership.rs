//! device-ownership through the harness, in one run: a cached decision with the static map
//! (no callouts), a cached broker-source record (one callout to warm up, then none), a write
//! decided on its body, and a list response filtered (10 entities, owners embedded), beside
//! the no-filter baseline.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use host_harness::chain::{CalloutAnswer, CalloutResolver};
use host_harness::host::{CallResponse, PendingCall};
use host_harness::{Chain, HttpRequest, Runtime, Shared, UpstreamResponse};
use serde_json::json;

fn request(method: &str, path: &str, subject: &str, body: Option<&str>) -> HttpRequest {
    let headers = [
        (":method", method),
        (":path", path),
        (":authority", "orion:1026"),
        (":scheme", "http"),
        ("fiware-service", "openiot"),
        ("fiware-servicepath", "/"),
        ("content-type", "application/json"),
        ("x-auth-subject", subject),
        ("x-auth-kind", "jwt"),
    ];
    HttpRequest {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body
            .map(|b| vec![b.as_bytes().to_vec()])
            .unwrap_or_default(),
        ..Default::default()
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Answers every broker lookup with an entity alice owns.
struct Broker;

impl CalloutResolver for Broker {
    fn resolve(&mut self, _: &PendingCall, _: &Shared) -> CalloutAnswer {
        CalloutAnswer::Response(CallResponse {
            headers: vec![(":status".into(), b"200".to_vec())],
            body: br#"{"id": "Lamp1", "type": "Lamp", "owner": "alice"}"#.to_vec(),
            trailers: Vec::new(),
        })
    }
}

fn broker_chain(runtime: &Arc<Runtime>, config: &str) -> Chain {
    common::chain_with_clusters(
        runtime,
        &[("device_ownership.wasm", config)],
        true,
        now_nanos(),
        &["orion"],
        Box::new(Broker),
    )
}

fn bench(c: &mut Criterion) {
    let runtime = Arc::new(Runtime::new().expect("runtime"));
    let upstream = UpstreamResponse::default();
    let mut group = c.benchmark_group("device_ownership");

    let read = || request("GET", "/v2/entities/Lamp1", "alice", None);
    let mut baseline = common::chain(&runtime, None, now_nanos());
    group.bench_function("no_filter_baseline", |b| {
        b.iter(|| baseline.http(read(), &upstream))
    });

    let entities: Vec<_> = (0..100)
        .map(|i| {
            json!({"id": format!("Lamp{i}"), "service": "openiot", "owner": "alice",
                         "delegations": [{"user": "bob", "access": "read"}]})
        })
        .collect();
    let static_config = json!({"sources": [{"kind": "static", "entities": entities}]}).to_string();
    let mut fixed = common::chain_of(
        &runtime,
        &[("device_ownership.wasm", static_config.as_str())],
        true,
        now_nanos(),
    );
    assert_eq!(fixed.http(read(), &upstream).status, 200);
    assert_eq!(
        fixed
            .http(
                request("GET", "/v2/entities/Lamp1", "mallory", None),
                &upstream
            )
            .status,
        403
    );
    group.bench_function("static_map_read_allowed", |b| {
        b.iter(|| fixed.http(read(), &upstream))
    });
    let patch = || {
        request(
            "PATCH",
            "/v2/entities/Lamp1/attrs",
            "alice",
            Some(r#"{"temperature": {"value": 21.5, "type": "Number"}}"#),
        )
    };
    assert_eq!(fixed.http(patch(), &upstream).status, 200);
    group.bench_function("static_map_write_on_body", |b| {
        b.iter(|| fixed.http(patch(), &upstream))
    });

    let broker_config = json!({"sources": [{"kind": "broker", "cluster": "orion"}]}).to_string();
    let mut broker = broker_chain(&runtime, &broker_config);
    let first = broker.http(read(), &upstream);
    assert_eq!(
        first.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&first.body)
    );
    group.bench_function("broker_source_cached_read", |b| {
        b.iter(|| broker.http(read(), &upstream))
    });

    let listed: Vec<_> = (0..10)
        .map(|i| json!({"id": format!("Lamp{i}"), "type": "Lamp",
                         "owner": {"type": "Text", "value": if i % 2 == 0 { "alice" } else { "carol" }},
                         "temperature": {"type": "Number", "value": 20 + i}}))
        .collect();
    let list_upstream = UpstreamResponse {
        body: serde_json::to_vec(&listed).unwrap(),
        ..Default::default()
    };
    let list = || request("GET", "/v2/entities?type=Lamp", "alice", None);
    let out = broker.http(list(), &list_upstream);
    let kept: Vec<serde_json::Value> = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(kept.len(), 5);
    group.bench_function("list_of_10_filtered", |b| {
        b.iter(|| broker.http(list(), &list_upstream))
    });
    let mut baseline_list = common::chain(&runtime, None, now_nanos());
    group.bench_function("list_of_10_no_filter_baseline", |b| {
        b.iter(|| baseline_list.http(list(), &list_upstream))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
