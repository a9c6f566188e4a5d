//! The decision engines natively, without a wasm VM or a host: what one decision costs in
//! the policy core. The policies are the host-harness bench's (`host-harness/benches/entity_acl.rs`):
//! 100 rules, 99 for other users and the one that grants alice her rooms last, so every rule
//! a linear scan looks at is looked at.
//!
//! Cases: a v2 GET of one entity, a v2 list by ids (10 ids), an NGSI-LD GET of one entity, an
//! MQTT publish checked against 100 topic rules; the v2 GET answered from the decision
//! cache; and a device key checked against configured digests and against a device registry's
//! cached answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion};
use policy::acl::{Acl, TopicAccess};
use policy::decision_cache::{DecisionCache, DecisionInputs};
use policy::entity_acl::EntityAcl;
use policy::identity::{Identity, IdentityKind};
use serde_json::{json, Value};
use std::hint::black_box;

/// Seconds since the epoch, before the caller's token expires.
const NOW: u64 = 1_800_000_000;

/// `n` NGSI rules: n-1 for other users, then the one that grants alice her rooms.
fn ngsi_rules(n: usize, service_path: &str, entity_type: &str) -> Vec<Value> {
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
        "ngsi": {"service": "smartcity", "service_path": service_path,
                 "entity_id": "urn:ngsi-ld:Room:*", "entity_type": entity_type}}),
    );
    rules
}

fn entity_acl(broker: &str, rules: Vec<Value>) -> EntityAcl {
    let config = json!({"broker": broker, "acl": {"rules": rules}}).to_string();
    EntityAcl::from_json(config.as_bytes()).unwrap()
}

fn alice() -> Identity {
    let mut alice = Identity::new(IdentityKind::Jwt, "alice");
    alice.roles = vec!["operator".into()];
    alice.expires_at = Some(1_900_000_000);
    alice
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One NGSI request, decided.
struct Case {
    name: &'static str,
    acl: EntityAcl,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
}

fn cases() -> Vec<Case> {
    let v2 = entity_acl("orion", ngsi_rules(100, "/rooms/#", "Room"));
    let ld = entity_acl("ngsi-ld", ngsi_rules(100, "/#", "*"));
    let v2_headers = headers(&[
        ("fiware-service", "smartcity"),
        ("fiware-servicepath", "/rooms"),
    ]);
    let ids: Vec<String> = (1..=10).map(|i| format!("urn:ngsi-ld:Room:{i}")).collect();
    vec![
        Case {
            name: "v2_get_entity_100_rules",
            acl: v2.clone(),
            method: "GET",
            path: "/v2/entities/urn:ngsi-ld:Room:1?type=Room".into(),
            headers: v2_headers.clone(),
        },
        Case {
            name: "v2_list_10_ids_100_rules",
            acl: v2,
            method: "GET",
            path: format!(
                "/v2/entities?id={}&type=Room&attrs=temperature,humidity&limit=100",
                ids.join(",")
            ),
            headers: v2_headers,
        },
        Case {
            name: "ld_get_entity_100_rules",
            acl: ld,
            method: "GET",
            path: "/ngsi-ld/v1/entities/urn:ngsi-ld:Room:1".into(),
            headers: headers(&[("ngsild-tenant", "smartcity")]),
        },
    ]
}

fn ngsi(c: &mut Criterion) {
    let alice = alice();
    let mut group = c.benchmark_group("engines");
    for case in cases() {
        let verdict = case
            .acl
            .decide(Some(&alice), case.method, &case.path, &case.headers, b"");
        assert!(verdict.decision.is_allowed(), "{}: {verdict:?}", case.name);
        group.bench_function(case.name, |b| {
            b.iter(|| {
                case.acl.decide(
                    black_box(Some(&alice)),
                    black_box(case.method),
                    black_box(&case.path),
                    black_box(&case.headers),
                    b"",
                )
            })
        });
    }
    // The v2 GET again, answered from the decision cache (the same caller asks again).
    let case = cases().swap_remove(0);
    let mut cache = DecisionCache::default();
    let inputs = DecisionInputs {
        identity: Some(&alice),
        method: case.method,
        path: &case.path,
        headers: &case.headers,
    };
    group.bench_function("v2_get_entity_100_rules_cached", |b| {
        b.iter(|| {
            let verdict = case
                .acl
                .decide_cached(&mut cache, NOW, black_box(inputs), b"");
            verdict.decision.is_allowed()
        })
    });
    group.finish();
}

/// 100 MQTT rules: 99 for other users' devices, then alice's own subtree by placeholder.
fn mqtt(c: &mut Criterion) {
    let mut rules: Vec<Value> = (1..100)
        .map(|i| {
            json!({"name": format!("user{i}"), "effect": "allow", "subjects": [format!("user:user{i}")],
                   "actions": ["read", "write"], "mqtt": {"topic": format!("devices/user{i}/+/telemetry")}})
        })
        .collect();
    rules.push(
        json!({"name": "own", "effect": "allow", "subjects": ["authenticated"],
        "actions": ["read", "write"], "mqtt": {"topic": "devices/%u/#"}}),
    );
    let acl = Acl::from_json(&json!({ "rules": rules }).to_string()).unwrap();
    let alice = alice();
    let topic = "devices/alice/lamp-7/telemetry";
    let d = acl.check_topic(Some(&alice), "lamp-7", topic, TopicAccess::Write);
    assert!(d.is_allowed(), "{d:?}");
    let mut group = c.benchmark_group("engines");
    group.bench_function("mqtt_publish_100_rules", |b| {
        b.iter(|| {
            acl.check_topic(
                black_box(Some(&alice)),
                black_box("lamp-7"),
                black_box(topic),
                TopicAccess::Write,
            )
        })
    });
    group.finish();
}

/// A device key pair: checked against `device_keys.devices` (1000 devices) and against the
/// registry's cached record (the per-request cost once a device has been looked up).
fn device_keys(c: &mut Criterion) {
    use policy::device_keys::{DeviceKeys, KeyCheck};
    use sha2::{Digest, Sha256};
    let hex = |key: &str| -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let devices: serde_json::Map<String, Value> = (0..1000)
        .map(|i| {
            (
                format!("lamp-{i}"),
                json!({"key_sha256": [hex(&format!("K1-lamp-{i}"))]}),
            )
        })
        .collect();
    let config = json!({"devices": devices,
        "registry": {"cluster": "iot-directory", "authority": "iotdirectory", "path": "/keys"}});
    let keys = DeviceKeys::new(&serde_json::from_value(config).unwrap()).unwrap();
    let answer = json!({"id": "lamp-new", "key_sha256": [hex("K1-lamp-new"), hex("K2-lamp-new")]});
    keys.finish_lookup("lamp-new", 200, answer.to_string().as_bytes(), NOW);
    assert!(matches!(
        keys.check("lamp-500", "K1-lamp-500", NOW),
        KeyCheck::Verified(_)
    ));
    assert!(matches!(
        keys.check("lamp-new", "K2-lamp-new", NOW),
        KeyCheck::Verified(_)
    ));
    let mut group = c.benchmark_group("engines");
    group.bench_function("device_key_configured", |b| {
        b.iter(|| keys.check(black_box("lamp-500"), black_box("K1-lamp-500"), NOW))
    });
    group.bench_function("device_key_registry_cached", |b| {
        b.iter(|| keys.check(black_box("lamp-new"), black_box("K2-lamp-new"), NOW))
    });
    group.finish();
}

criterion_group!(benches, ngsi, mqtt, device_keys);
criterion_main!(benches);
