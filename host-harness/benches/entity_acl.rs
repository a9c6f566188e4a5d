//! entity-acl through the harness, in one run: its decision cost beside the no-filter
//! baseline, for a small policy, a 100-rule policy (the granting rule is the last one, every
//! other rule is looked at), and a 100-entity batch body decided against the 100-rule policy.

mod common;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use host_harness::{HttpRequest, Runtime, UpstreamResponse};
use serde_json::{json, Value};

const START: u64 = 1_767_225_600_000_000_000;

/// `n` rules: n-1 for other users, then the one that grants alice her rooms.
fn policy(n: usize) -> String {
    let mut rules: Vec<Value> = (1..n)
        .map(|i| {
            json!({"name": format!("user{i}"), "effect": "allow", "subjects": [format!("user:user{i}")],
                   "actions": ["read", "write", "create"],
                   "ngsi": {"service": "smartcity", "service_path": format!("/district{i}/#"),
                            "entity_id": format!("urn:ngsi-ld:Room:{i}-*"), "entity_type": "Room"}})
        })
        .collect();
    rules.push(
        json!({"name": "alice", "effect": "allow", "subjects": ["user:alice"],
        "actions": ["read", "write", "create"],
        "ngsi": {"service": "smartcity", "service_path": "/rooms/#",
                 "entity_id": "urn:ngsi-ld:Room:*", "entity_type": "Room"}}),
    );
    json!({"acl": {"rules": rules}}).to_string()
}

fn with_identity(mut request: HttpRequest) -> HttpRequest {
    for (k, v) in [
        ("x-auth-subject", "alice"),
        ("x-auth-kind", "jwt"),
        ("fiware-service", "smartcity"),
        ("fiware-servicepath", "/rooms"),
    ] {
        request.headers.retain(|(name, _)| name != k);
        request.headers.push((k.to_string(), v.as_bytes().to_vec()));
    }
    request
}

fn read_one() -> HttpRequest {
    let mut r = with_identity(common::request(&[]));
    r.headers.retain(|(k, _)| k != ":path");
    r.headers.push((
        ":path".into(),
        b"/v2/entities/urn:ngsi-ld:Room:1?type=Room".to_vec(),
    ));
    r
}

fn batch(n: usize) -> HttpRequest {
    let entities: Vec<Value> = (0..n)
        .map(|i| {
            json!({"id": format!("urn:ngsi-ld:Room:{i}"), "type": "Room",
                        "temperature": {"value": 21.5, "type": "Number"}})
        })
        .collect();
    let body = json!({"actionType": "append", "entities": entities}).to_string();
    let mut r = with_identity(common::request(&[("content-type", "application/json")]));
    r.headers.retain(|(k, _)| k != ":path" && k != ":method");
    r.headers.push((":path".into(), b"/v2/op/update".to_vec()));
    r.headers.push((":method".into(), b"POST".to_vec()));
    r.body = vec![body.into_bytes()];
    r
}

/// A bench case: its name, entity-acl's configuration (None: no filter), the request.
type Case<'a> = (&'a str, Option<&'a str>, fn() -> HttpRequest);

fn bench(c: &mut Criterion) {
    let runtime = Arc::new(Runtime::new().expect("runtime"));
    let upstream = UpstreamResponse::default();
    let small = policy(3);
    let large = policy(100);
    let cases: [Case; 5] = [
        ("no_filter", None, read_one),
        ("read_3_rules", Some(&small), read_one),
        ("read_100_rules", Some(&large), read_one),
        ("no_filter_batch_100", None, || batch(100)),
        ("batch_100_entities_100_rules", Some(&large), || batch(100)),
    ];
    let mut group = c.benchmark_group("entity_acl");
    for (name, config, request) in cases {
        let filters: Vec<(&str, &str)> =
            config.map(|c| ("entity_acl.wasm", c)).into_iter().collect();
        let mut chain = common::chain_of(&runtime, &filters, true, START);
        let outcome = chain.http(request(), &upstream);
        assert_eq!(
            outcome.status,
            200,
            "{name}: {:?}",
            String::from_utf8_lossy(&outcome.body)
        );
        group.bench_function(name, |b| b.iter(|| chain.http(request(), &upstream)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
