//! Native time of the worst requests of the per-request budget (README "Per-request budget";
//! the same shapes as host-harness/tests/budget.rs): entity-acl's decision and
//! device-ownership's classification + evaluation, with no Wasm in between.
//!
//! `cargo run --release -p policy --example budget` — prints the median of 21 runs per
//! request. A measurement for BENCHMARKS.md, not a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Instant;

use policy::entity_acl::EntityAcl;
use policy::identity::{Identity, IdentityKind};
use policy::ngsi::{classify, NgsiRequest};
use policy::ownership::{Eval, Ownership, OwnershipConfig};

const ENTITY_ACL: &str = r#"{"acl": {"rules": [
  {"name": "rooms-read", "effect": "allow", "subjects": ["role:operator"], "actions": ["read"],
   "ngsi": {"service": "city", "service_path": "/#", "entity_type": "Room"}},
  {"name": "own-devices", "effect": "allow", "subjects": ["authenticated"], "actions": ["read", "write"],
   "ngsi": {"service": "city", "service_path": "/devices/%u/#"}},
  {"name": "device-writes-itself", "effect": "allow", "subjects": ["role:device"], "actions": ["write"],
   "ngsi": {"service": "*", "service_path": "/#", "entity_id": "%u"}},
  {"name": "public-read", "effect": "allow", "subjects": ["anyone"], "actions": ["read"],
   "ngsi": {"service": "city", "service_path": "/public/#", "attributes": ["temperature", "humidity"]}},
  {"name": "no-vault", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
   "ngsi": {"service": "*", "service_path": "/#", "entity_id": "urn:ngsi-ld:Room:vault*"}},
  {"name": "no-secrets", "effect": "deny", "subjects": ["anyone"], "actions": ["read"],
   "ngsi": {"service": "*", "service_path": "/#", "attributes": ["secret", "password"]}},
  {"name": "admins", "effect": "allow", "subjects": ["role:admin"], "actions": ["*"],
   "ngsi": {"service": "*", "service_path": "/#"}}
]}}"#;

const DEVICE_OWNERSHIP: &str = r#"{
  "admin_roles": ["platform-admin"],
  "sources": [{"kind": "static", "entities": [{"id": "Lamp1", "service": "city", "owner": "alice"}]}]
}"#;

fn list(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix}{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn median_us(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// One timed request: its name, method, path, caller, headers and body.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a Identity,
    &'a [(String, String)],
    &'a [u8],
);

fn main() {
    let acl = EntityAcl::from_json(ENTITY_ACL.as_bytes()).expect("entity-acl config");
    let config: OwnershipConfig =
        serde_json::from_str(DEVICE_OWNERSHIP).expect("device-ownership config");
    let own = Ownership::new(config).expect("device-ownership config");
    let alice = Identity::new(IdentityKind::Jwt, "alice");
    let mut olga = Identity::new(IdentityKind::Jwt, "olga");
    olga.roles = vec!["operator".into()];
    let headers = vec![
        ("fiware-service".to_string(), "city".to_string()),
        ("fiware-servicepath".to_string(), list("/rooms/floor", 10)),
    ];
    let attack = format!(
        "/v2/entities?id={}&type=Room&attrs={}",
        list("urn:ngsi-ld:Room:", 1000),
        list("attr", 1000)
    );
    let at_caps = format!(
        "/v2/entities?id={}&type=Room&attrs={}",
        list("urn:ngsi-ld:Room:", 1000),
        list("attr", 100)
    );
    let entities: Vec<String> = (0..440)
        .map(|i| {
            let a: Vec<String> = (0..100)
                .map(|j| format!(r#""attr{j}":{{"value":{j}}}"#))
                .collect();
            format!(
                r#"{{"id":"urn:ngsi-ld:Room:{i}","type":"Room",{}}}"#,
                a.join(",")
            )
        })
        .collect();
    let batch = format!(
        r#"{{"actionType":"append","entities":[{}]}}"#,
        entities.join(",")
    );
    let one_path = vec![
        ("fiware-service".to_string(), "city".to_string()),
        ("fiware-servicepath".to_string(), "/rooms".to_string()),
    ];
    // 99 ids × (1 attr + a q on 1000 attributes): the most names a filter may add.
    let q: Vec<String> = (0..1000).map(|i| format!("a{i}%3E1")).collect();
    let filter_caps = format!(
        "/v2/entities?id={}&type=Room&attrs=temperature&q={}",
        list("urn:ngsi-ld:Room:", 99),
        q.join(";")
    );
    let cases: [Case; 6] = [
        ("attack (400)", "GET", &attack, &alice, &headers, b""),
        (
            "at the caps, no grant (403)",
            "GET",
            &at_caps,
            &alice,
            &headers,
            b"",
        ),
        (
            "at the caps, granted (200)",
            "GET",
            &at_caps,
            &olga,
            &headers,
            b"",
        ),
        (
            "filters at the caps, no grant (403)",
            "GET",
            &filter_caps,
            &alice,
            &headers,
            b"",
        ),
        (
            "filters at the caps, granted (200)",
            "GET",
            &filter_caps,
            &olga,
            &headers,
            b"",
        ),
        (
            "batch append 440 x 100, ~1 MiB (403)",
            "POST",
            "/v2/op/update",
            &alice,
            &one_path,
            batch.as_bytes(),
        ),
    ];
    println!("| request | entity-acl decide (µs) | device-ownership classify + evaluate (µs) |");
    println!("|---|---|---|");
    for (name, method, path, who, headers, body) in cases {
        let acl_us = median_us(|| {
            let v = acl.decide(Some(who), method, path, headers, body);
            std::hint::black_box(v);
        });
        let own_us = median_us(|| {
            let req = NgsiRequest {
                broker: own.config().broker,
                method,
                path,
                headers,
                body,
            };
            if let Ok(r) = classify(&req) {
                let e: Eval = own.evaluate(Some(who), &r, false, &HashMap::new());
                std::hint::black_box(e);
            }
        });
        println!("| {name} | {acl_us:.0} | {own_us:.0} |");
    }
}
