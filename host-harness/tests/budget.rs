//! The per-request budget of entity-acl and device-ownership (README "Per-request budget"):
//! the worst requests we can construct, through the real release `.wasm` files, each get their
//! own status (400, 403, 413, or an allow; never a 503 or a trap), no callback burns more
//! than [`FUEL_PER_CALLBACK`], and linear memory stays under [`MEMORY_BYTES`] after all of
//! them, several times over. Fuel and memory are deterministic: these are not timed tests.
//!
//! Needs the filters built (`cargo wasm`). `HOST_HARNESS_WASM_DIR` points it at other builds
//! (to show what an older filter does with the same requests).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use host_harness::chain::{Chain, HttpRequest, NoCallouts, UpstreamResponse};
use host_harness::{FailurePolicy, Limits, PluginSpec, Shared};

/// The most fuel (about one per wasm instruction) one callback of entity-acl or
/// device-ownership may burn on any single request.
const FUEL_PER_CALLBACK: u64 = 600_000_000;
/// The most linear memory either VM may reach, after every request below, several times.
const MEMORY_BYTES: usize = 64 << 20;
/// Every request is sent this many times: memory must not creep.
const ROUNDS: usize = 3;

fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("HOST_HARNESS_WASM_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/release"),
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the filters first with `cargo wasm`",
        path.display()
    );
    path
}

fn spec(name: &str, file: &str, config: &str) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        root_id: name.into(),
        vm_id: format!("{name}-vm"),
        wasm: wasm(file),
        configuration: config.as_bytes().to_vec(),
        vm_configuration: Vec::new(),
        // The harness defaults (2e9 fuel per callback, 256 MiB): what a trap looks like is
        // what today's filters hit; the budget asserted below is far tighter.
        limits: Limits::default(),
        allow_on_headers_stop_iteration: true,
        // A trap is a finding here: keep the failed VM rather than reload it.
        failure_policy: FailurePolicy::FailClosed,
        vm_env: Vec::new(),
    }
}

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

/// entity-acl's rules for FogFlow, which has no tenants, service paths or types: the same
/// grants where they can be written.
const ENTITY_ACL_FOGFLOW: &str = r#"{"acl": {"rules": [
  {"name": "own-devices", "effect": "allow", "subjects": ["authenticated"], "actions": ["read", "write"],
   "ngsi": {"service": "", "service_path": "/#", "entity_id": "%u"}},
  {"name": "public-read", "effect": "allow", "subjects": ["anyone"], "actions": ["read"],
   "ngsi": {"service": "", "service_path": "/#", "attributes": ["temperature", "humidity"]}},
  {"name": "no-vault", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
   "ngsi": {"service": "", "service_path": "/#", "entity_id": "urn:ngsi-ld:Room:vault*"}},
  {"name": "admins", "effect": "allow", "subjects": ["role:admin"], "actions": ["*"],
   "ngsi": {"service": "*", "service_path": "/#"}}
]}}"#;

const DEVICE_OWNERSHIP: &str = r#"{
  "admin_roles": ["platform-admin"],
  "sources": [{"kind": "static", "entities": [
    {"id": "Lamp1", "service": "city", "owner": "alice"},
    {"id": "Lamp.0020", "service": "city", "owner": "bob"}
  ]}]
}"#;

const TOKEN_AUTH: &str = r#"{
  "credentials": {"sources": [{"type": "device_key", "in": "header", "id": "x-device-id", "key": "x-device-key"}]},
  "device_keys": {"devices": {"Lamp.0020": {"key_sha256": ["4fb871485c80f49dae1ba02def42c5aab66a2b8e96a4ac3ec5d5734a09cdf2dc"]}}},
  "realm": "devices"
}"#;

/// The broker a case's path is for (one sidecar fronts one broker, and entity-acl and
/// device-ownership refuse the others' routes): `/ngsi-ld` an NGSI-LD broker, `/ngsi10`
/// FogFlow, anything else Orion.
fn broker_of(path: &str) -> &'static str {
    if path.starts_with("/ngsi-ld/") {
        "ngsi-ld"
    } else if path.starts_with("/ngsi10/") {
        "fogflow"
    } else {
        "orion"
    }
}

/// A filter's configuration for `broker`: entity-acl and device-ownership name it (FogFlow
/// gets entity-acl's FogFlow rules); token-auth has no such setting.
fn for_broker(name: &str, config: &str, broker: &str) -> String {
    let config = if name == "entity-acl" && broker == "fogflow" {
        ENTITY_ACL_FOGFLOW
    } else {
        config
    };
    match (name, config.strip_prefix('{')) {
        ("entity-acl" | "device-ownership", Some(rest)) => {
            format!(r#"{{"broker": "{broker}", {rest}"#)
        }
        _ => config.to_string(),
    }
}

/// Runs the cases of each broker through a chain configured for it.
fn check_budget_per_broker(filters: &[(&str, &str, &str)], cases: &[Case]) {
    for broker in ["orion", "ngsi-ld", "fogflow"] {
        let mine: Vec<&Case> = cases
            .iter()
            .filter(|c| broker_of(&c.path) == broker)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let configs: Vec<(String, String, String)> = filters
            .iter()
            .map(|(n, f, c)| (n.to_string(), f.to_string(), for_broker(n, c, broker)))
            .collect();
        let refs: Vec<(&str, &str, &str)> = configs
            .iter()
            .map(|(n, f, c)| (n.as_str(), f.as_str(), c.as_str()))
            .collect();
        let mut chain = chain(&refs);
        check_budget(&mut chain, &mine);
    }
}

fn chain(filters: &[(&str, &str, &str)]) -> Chain {
    let shared = Arc::new(Shared::new(common::START_NANOS, false));
    let mut chain = Chain::new(
        common::runtime(),
        shared,
        HashSet::new(),
        Box::new(NoCallouts),
    );
    for (name, file, config) in filters {
        let vm = chain.add_filter(spec(name, file, config)).expect("loads");
        assert!(vm.is_serving(), "{name} refused its configuration");
    }
    chain
}

fn list(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix}{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn json_list(f: impl Fn(usize) -> String, n: usize) -> String {
    (0..n).map(f).collect::<Vec<_>>().join(",")
}

/// Ten service paths: Orion's maximum.
fn ten_paths() -> String {
    list("/rooms/floor", 10)
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u32,
}

fn case(
    name: &'static str,
    method: &'static str,
    path: String,
    headers: &[(&'static str, String)],
    body: String,
    status: u32,
) -> Case {
    Case {
        name,
        method,
        path,
        headers: headers.to_vec(),
        body: body.into_bytes(),
        status,
    }
}

fn request(c: &Case) -> HttpRequest {
    let mut headers = common::pairs(&[
        (":method", c.method),
        (":path", &c.path),
        (":authority", "orion.local"),
        (":scheme", "http"),
        ("content-type", "application/json"),
    ]);
    for (k, v) in &c.headers {
        headers.push((k.to_string(), v.as_bytes().to_vec()));
    }
    if !c.body.is_empty() {
        headers.push((
            "content-length".into(),
            c.body.len().to_string().into_bytes(),
        ));
    }
    HttpRequest {
        headers,
        // Envoy hands a body over in pieces; 64 KiB is a common buffer size.
        body: c.body.chunks(64 << 10).map(<[u8]>::to_vec).collect(),
        trailers: Vec::new(),
        properties: BTreeMap::new(),
    }
}

/// A filter naming `n` distinct attributes (`a0>1<sep>a1>1...`), `>` percent-encoded as
/// clients send it: at `n` = 1000 (MAX_NAMED_ATTRIBUTES) it is ~6.9 KB decoded, under the
/// 8192-byte expression cap.
fn filter_names(n: usize, separator: &str) -> String {
    json_list(|i| format!("a{i}%3E1"), n).replace(',', separator)
}

/// A body of `entities` entities with `attrs` attributes each, in v2 (`/v2/op/update`) form.
fn v2_entities(entities: usize, attrs: usize) -> String {
    json_list(
        |i| {
            let a = json_list(|j| format!(r#""attr{j}":{{"value":{j}}}"#), attrs);
            format!(r#"{{"id":"urn:ngsi-ld:Room:{i}","type":"Room",{a}}}"#)
        },
        entities,
    )
}

/// The worst requests for a filter that classifies NGSI (entity-acl, device-ownership), with
/// the headers of the caller, and the status each must get. `granted` is the status of a
/// request the caller may make (an allow, or a filtered list).
fn worst_requests(caller: &[(&'static str, &str)], no_grant: u32) -> Vec<Case> {
    let paths = ten_paths();
    let with = |extra: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        caller
            .iter()
            .chain(extra)
            .map(|(k, v)| (*k, v.to_string()))
            .collect()
    };
    let city = with(&[("fiware-service", "city"), ("fiware-servicepath", &paths)]);
    let city_one = with(&[("fiware-service", "city"), ("fiware-servicepath", "/rooms")]);
    let ld = with(&[("ngsild-tenant", "city")]);
    let sub_attrs = json_list(|j| format!(r#""a{j}""#), 100);
    let sub_entities = json_list(|i| format!(r#"{{"id":"urn:ngsi-ld:Room:{i}"}}"#), 1000);
    let subscription = format!(
        r#"{{"subject":{{"entities":[{sub_entities}]}},"notification":{{"http":{{"url":"http://n.local/"}},"attrs":[{sub_attrs}]}}}}"#
    );
    // 440 entities × 100 attributes: just under 1 MiB (max_body_bytes), 88 000 names.
    let big_batch = format!(
        r#"{{"actionType":"append","entities":[{}]}}"#,
        v2_entities(440, 100)
    );
    assert!(big_batch.len() < 1 << 20, "{}", big_batch.len());
    let too_big = format!(
        r#"{{"actionType":"append","entities":[{}]}}"#,
        v2_entities(500, 100)
    );
    assert!(too_big.len() > 1 << 20);
    let fogflow_query = format!(
        r#"{{"entities":[{}],"attributes":[{sub_attrs}]}}"#,
        json_list(
            |i| format!(r#"{{"id":"urn:ngsi-ld:Room:{i}","type":"Room"}}"#),
            1000
        )
    );
    let ld_batch = format!(
        "[{}]",
        json_list(
            |i| {
                let a = json_list(
                    |j| format!(r#""p{j}":{{"type":"Property","value":{j}}}"#),
                    100,
                );
                format!(r#"{{"id":"urn:ngsi-ld:Room:{i}","type":"Room",{a}}}"#)
            },
            200,
        )
    );
    vec![
        case(
            "the attack: 1000 ids × 1000 attrs × 10 service paths",
            "GET",
            format!(
                "/v2/entities?id={}&type=Room&attrs={}",
                list("urn:ngsi-ld:Room:", 1000),
                list("attr", 1000)
            ),
            &city,
            String::new(),
            400,
        ),
        case(
            "at the caps: 1000 ids × 100 attrs × 10 service paths",
            "GET",
            format!(
                "/v2/entities?id={}&type=Room&attrs={}",
                list("urn:ngsi-ld:Room:", 1000),
                list("attr", 100)
            ),
            &city,
            String::new(),
            no_grant,
        ),
        case(
            "at the caps of filters: 99 ids × (1 attr + a q on 1000 attributes) × 10 service paths",
            "GET",
            format!(
                "/v2/entities?id={}&type=Room&attrs=temperature&q={}",
                list("urn:ngsi-ld:Room:", 99),
                filter_names(1000, ";")
            ),
            &city,
            String::new(),
            no_grant,
        ),
        case(
            "at the caps of filters: NGSI-LD q on 1000 attributes, 16 parentheses deep",
            "GET",
            format!(
                "/ngsi-ld/v1/entities?id={}&type=Room&attrs=temperature&q={}{}{}",
                list("urn:ngsi-ld:Room:", 99),
                "(".repeat(16),
                filter_names(1000, "%7C"),
                ")".repeat(16)
            ),
            &ld,
            String::new(),
            no_grant,
        ),
        case(
            "a filter over its cap: q on 1001 attributes",
            "GET",
            format!(
                "/v2/entities?type=Room&attrs=temperature&q={}",
                filter_names(1001, ";")
            ),
            &city,
            String::new(),
            400,
        ),
        case(
            "one list over its cap: 1001 attrs",
            "GET",
            format!("/v2/entities/Lamp1?attrs={}", list("attr", 1001)),
            &city,
            String::new(),
            400,
        ),
        case(
            "the longest list on one entity, repeated names",
            "GET",
            format!(
                "/v2/entities/urn:ngsi-ld:Room:1?type=Room&attrs={},{}",
                list("attr", 500),
                list("attr", 500)
            ),
            &city,
            String::new(),
            403,
        ),
        case(
            "eleven service paths",
            "GET",
            "/v2/entities/urn:ngsi-ld:Room:1".into(),
            &with(&[
                ("fiware-service", "city"),
                ("fiware-servicepath", &format!("{paths},/x")),
            ]),
            String::new(),
            400,
        ),
        case(
            "NGSI-LD: 1000 ids × 100 attrs",
            "GET",
            format!(
                "/ngsi-ld/v1/entities?id={}&type=Room&attrs={}",
                list("urn:ngsi-ld:Room:", 1000),
                list("attr", 100)
            ),
            &ld,
            String::new(),
            no_grant,
        ),
        case(
            "NGSI-LD batch upsert: 200 entities × 100 properties",
            "POST",
            "/ngsi-ld/v1/entityOperations/upsert".into(),
            &ld,
            ld_batch,
            403,
        ),
        case(
            "FogFlow queryContext: 1000 entities × 100 attributes",
            "POST",
            "/ngsi10/queryContext".into(),
            &city_one,
            fogflow_query,
            no_grant,
        ),
        case(
            "v2 subscription: 1000 entities × 100 attrs",
            "POST",
            "/v2/subscriptions".into(),
            &city_one,
            subscription,
            403,
        ),
        case(
            "v2 batch append just under max_body_bytes: 440 entities × 100 attrs",
            "POST",
            "/v2/op/update".into(),
            &city_one,
            big_batch,
            403,
        ),
        case(
            "v2 batch over max_body_bytes",
            "POST",
            "/v2/op/update".into(),
            &city_one,
            too_big,
            413,
        ),
    ]
}

/// Sends every case `ROUNDS` times; checks statuses, then the budget of every filter.
fn check_budget(chain: &mut Chain, cases: &[&Case]) {
    let upstream = UpstreamResponse {
        body: b"[]".to_vec(),
        ..UpstreamResponse::default()
    };
    for round in 0..ROUNDS {
        for c in cases {
            let outcome = chain.http(request(c), &upstream);
            assert_eq!(
                outcome.status,
                c.status,
                "round {round}, {}: {}",
                c.name,
                common::describe(&outcome, &chain.shared)
            );
        }
    }
    for vm in &mut chain.filters {
        let memory = vm.memory_bytes();
        let usage = vm.usage;
        eprintln!(
            "{}: fuel max per callback {} ({}), fuel total {} over {} callbacks, memory {} bytes",
            vm.spec.name,
            usage.fuel_max_call,
            usage.fuel_max_call_export,
            usage.fuel_total,
            usage.calls,
            memory
        );
        assert!(vm.is_serving(), "{} stopped serving", vm.spec.name);
        assert!(
            usage.fuel_max_call <= FUEL_PER_CALLBACK,
            "{}: a callback ({}) burned {} fuel, over the {FUEL_PER_CALLBACK} budget",
            vm.spec.name,
            usage.fuel_max_call_export,
            usage.fuel_max_call
        );
        assert!(
            memory <= MEMORY_BYTES,
            "{}: linear memory reached {memory} bytes, over the {MEMORY_BYTES} budget",
            vm.spec.name
        );
    }
}

#[test]
fn entity_acl_stays_within_its_budget() {
    let alice = [("x-auth-subject", "alice"), ("x-auth-kind", "jwt")];
    let mut cases = worst_requests(&alice, 403);
    // The same request granted: every (id, path, attribute) is checked and allowed.
    let operator = [
        ("x-auth-subject", "olga"),
        ("x-auth-kind", "jwt"),
        ("x-roles", "operator"),
    ];
    cases.extend(
        worst_requests(&operator, 200)
            .into_iter()
            .filter(|c| c.name.starts_with("at the caps")),
    );
    check_budget_per_broker(&[("entity-acl", "entity_acl.wasm", ENTITY_ACL)], &cases);
}

#[test]
fn device_ownership_stays_within_its_budget() {
    let alice = [("x-auth-subject", "alice"), ("x-auth-kind", "jwt")];
    // Lists are filtered on the way back: the query itself is allowed.
    let cases = worst_requests(&alice, 200);
    check_budget_per_broker(
        &[(
            "device-ownership",
            "device_ownership.wasm",
            DEVICE_OWNERSHIP,
        )],
        &cases,
    );
}

#[test]
fn the_chain_stays_within_its_budget() {
    let lamp = [
        ("x-device-id", "Lamp.0020"),
        ("x-device-key", "K1-lamp-0020-secret-key"),
    ];
    // device-ownership lets the list queries through (it filters answers); entity-acl has no
    // rule for this device on them.
    let cases = worst_requests(&lamp, 403);
    check_budget_per_broker(
        &[
            ("token-auth", "token_auth.wasm", TOKEN_AUTH),
            (
                "device-ownership",
                "device_ownership.wasm",
                DEVICE_OWNERSHIP,
            ),
            ("entity-acl", "entity_acl.wasm", ENTITY_ACL),
        ],
        &cases,
    );
}
