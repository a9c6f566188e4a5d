//! Fuzzing every filter through the harness, with the release `.wasm` Envoy loads.
//!
//! Structure-aware, seeded generators (tests/fuzz/generate.rs) build NGSI requests of every
//! dialect (odd header bytes, repeated headers, tenant headers, bodies from a grammar then
//! mutated, chunked, with trailers), tokens, callout answers (IdP discovery, JWKS,
//! introspection, the broker's ownership lookups: valid, malformed, huge, wrong types, odd
//! header bytes, resets, timeouts) and MQTT 3.1.1/5 streams (built, mutated, split, both
//! directions). Every case checks:
//!
//! 1. the VM never traps (`PluginVm::failure` stays `None`; after a trap the chain is rebuilt);
//! 2. no 5xx but the documented 503 for a dependency failure (a callout reset, timed out or
//!    answered badly);
//! 3. where the pure core can be called natively, the filter agrees with it: entity-acl's
//!    status equals `policy::entity_acl`'s for the same request and configuration; mqtt-acl's
//!    bytes each way and its close equal `policy::mqtt_acl::Session`'s; token-auth and
//!    device-ownership never let through what must not pass (a bad token; a lookup that
//!    failed);
//! 4. each VM stays within a stated memory and fuel-per-callback budget over the run.
//!
//! entity-acl and device-ownership run one chain per `broker` setting (orion, ngsi-ld,
//! fogflow): each request goes to its dialect's broker, one in six also to another broker,
//! which must refuse it (no lookup, nothing forwarded) if it serves no route of that API.
//! `fuzz-broker` lines give each broker's requests, statuses and peak memory/fuel.
//!
//! ```text
//! cargo test -p host-harness --test fuzz_filters -- --nocapture          # CI: fixed seed
//! FUZZ_SEED=1234abcd FUZZ_CASES=5000 cargo test -p host-harness --test fuzz_filters
//! FUZZ_SEED=1234abcd FUZZ_CASE=17 cargo test -p host-harness --test fuzz_filters entity_acl
//! scripts/fuzz 10m                                                       # random seeds
//! ```
//!
//! Known findings fixed on other branches are tolerated and counted behind
//! `run::TOLERATE_KNOWN_FINDINGS` (the lead turns it off once the fixes are merged;
//! `FUZZ_STRICT=1` turns it off for a run).

// Test code: helpers may panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "fuzz/generate.rs"]
mod generate;
#[path = "fuzz/run.rs"]
mod run;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use host_harness::chain::{CalloutAnswer, CalloutResolver, NoCallouts};
use host_harness::host::{CallResponse, PendingCall};
use host_harness::{Chain, HttpRequest, NetEvent, Runtime, Shared, UpstreamResponse};
use rand::Rng as _;
use serde_json::{json, Value};

use generate::{chance, pick, Rng};
use run::{describe_request, escape, failure, is_utf8, Budget, Known, Report};

/// One engine for the whole test binary: each module is compiled once.
pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| Arc::new(Runtime::new().expect("wasmtime runtime")))
        .clone()
}

/// Memory and fuel budgets. Linear memory: the filters start at about 1-2 MiB; 32 MiB leaves
/// room for a 64 KiB body limit, caches and allocator slack, and catches a leak per request.
/// Fuel: an RS256 verification is the costliest callback (~tens of millions); 500 million is
/// a quarter of the harness's per-callback cap.
const BUDGET: Budget = Budget {
    memory_bytes: 32 << 20,
    fuel_per_call: 500_000_000,
};

fn pairs(list: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect()
}

// ================================ HTTP requests ================================

/// A generated request, and facts about it the properties need.
struct Generated {
    request: HttpRequest,
    /// The API the request was generated for (before any mutation of its path).
    dialect: generate::Dialect,
    /// `ids × attrs` of a huge list query (0 for an ordinary request).
    expansion: usize,
}

/// Extra headers: tenant headers (valid, many, odd), content headers, repeated and odd ones.
/// Bytes that are not UTF-8 go into one case in ten (`raw`): they trap the VM today (a known
/// finding), and a trap ends the case before anything else is checked.
fn common_headers(rng: &mut Rng, headers: &mut Vec<(String, Vec<u8>)>, body_len: usize, raw: bool) {
    if chance(rng, 0.85) {
        let v = generate::header_value(rng, generate::SERVICES, raw);
        headers.push(("fiware-service".into(), v));
        if chance(rng, 0.03) {
            headers.push(("fiware-service".into(), b"openiot".to_vec()));
        }
    }
    if chance(rng, 0.8) {
        let v = if chance(rng, 0.05) {
            // Many service paths.
            let n = rng.gen_range(2..20);
            (0..n)
                .map(|i| format!("/p{i}"))
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes()
        } else {
            generate::header_value(rng, generate::SERVICE_PATHS, raw)
        };
        headers.push(("fiware-servicepath".into(), v));
        if chance(rng, 0.03) {
            headers.push(("fiware-servicepath".into(), b"/".to_vec()));
        }
    }
    if body_len > 0 && chance(rng, 0.8) {
        headers.push((
            "content-type".into(),
            pick(
                rng,
                &["application/json", "application/ld+json", "text/plain", ""],
            )
            .as_bytes()
            .to_vec(),
        ));
    }
    if chance(rng, 0.3) {
        let declared = match rng.gen_range(0..4) {
            0 => body_len.to_string(),
            1 => (body_len + rng.gen_range(1..100)).to_string(),
            2 => "99999999999999999999999".into(),
            _ => pick(rng, &["-1", "abc", "", "70000"]).into(),
        };
        headers.push(("content-length".into(), declared.into_bytes()));
    }
    for _ in 0..rng.gen_range(0..3) {
        let name = if chance(rng, 0.5) {
            pick(
                rng,
                &[
                    "accept",
                    "link",
                    "x-forwarded-for",
                    "user-agent",
                    "ngsild-tenant",
                ],
            )
            .to_string()
        } else {
            // Names with odd characters (the harness carries names as text).
            generate::odd_text(rng, 10).to_ascii_lowercase()
        };
        let value = if raw {
            generate::odd_bytes(rng, 30)
        } else {
            generate::odd_text(rng, 30).into_bytes()
        };
        headers.push((name, value));
    }
}

/// Identity headers as token-auth would set them (or as a client might forge them, which
/// token-auth would have removed: entity-acl alone must still decide them correctly).
fn identity_headers(rng: &mut Rng, headers: &mut Vec<(String, Vec<u8>)>, raw: bool) {
    if chance(rng, 0.1) {
        return;
    }
    let subject = pick(rng, generate::SUBJECTS);
    headers.push(("x-auth-subject".into(), generate::pct(subject).into_bytes()));
    if chance(rng, 0.02) {
        headers.push(("x-auth-subject".into(), b"bob".to_vec()));
    }
    headers.push((
        "x-auth-kind".into(),
        generate::header_value(
            rng,
            &[
                "jwt",
                "opaque_token",
                "device_key",
                "client_certificate",
                "wizard",
            ],
            false,
        ),
    ));
    if chance(rng, 0.6) {
        let roles = generate::header_value(
            rng,
            &[
                "citizen",
                "operator",
                "device",
                "citizen,operator",
                "ad%2Cmin",
                ",,",
            ],
            raw,
        );
        headers.push(("x-roles".into(), roles));
    }
    if chance(rng, 0.3) {
        headers.push((
            "x-organizations".into(),
            generate::header_value(rng, &["facility", "maintenance", "facility,city"], raw),
        ));
    }
    if chance(rng, 0.3) {
        headers.push((
            "x-auth-tenant".into(),
            generate::header_value(rng, &["smartcity", "openiot", "%2F"], raw),
        ));
    }
}

/// An NGSI request of any dialect through entity-acl or device-ownership.
fn ngsi_request(rng: &mut Rng) -> Generated {
    let (method, path, dialect, expansion) = if chance(rng, 0.01) {
        let (path, n) = generate::huge_query(rng);
        ("GET".to_string(), path, generate::Dialect::V2, n)
    } else {
        let (m, p, d) = generate::ngsi_target(rng);
        (m, p, d, 0)
    };
    let body = if matches!(method.as_str(), "POST" | "PATCH" | "PUT") || chance(rng, 0.05) {
        let value = generate::body_for(rng, &path, dialect);
        let mut bytes = generate::body_bytes(rng, &value);
        if chance(rng, 0.02) {
            // Over entity-acl's 64 KiB limit.
            bytes.extend(std::iter::repeat_n(b' ', 70_000));
        }
        bytes
    } else {
        Vec::new()
    };
    let mut headers = vec![
        (":method".to_string(), method.into_bytes()),
        (":path".to_string(), path.into_bytes()),
        (":authority".to_string(), b"orion:1026".to_vec()),
        (":scheme".to_string(), b"http".to_vec()),
    ];
    let raw = chance(rng, 0.1);
    identity_headers(rng, &mut headers, raw);
    common_headers(rng, &mut headers, body.len(), raw);
    // Header order must not matter (pseudo-headers first, as Envoy gives them).
    let (pseudo, mut rest): (Vec<_>, Vec<_>) =
        headers.into_iter().partition(|(k, _)| k.starts_with(':'));
    if chance(rng, 0.3) {
        use rand::seq::SliceRandom;
        rest.shuffle(rng);
    }
    let headers: Vec<_> = pseudo.into_iter().chain(rest).collect();
    let trailers = if chance(rng, 0.08) {
        vec![("x-trailer".to_string(), generate::odd_bytes(rng, 8))]
    } else {
        Vec::new()
    };
    Generated {
        request: HttpRequest {
            headers,
            body: generate::chunks(rng, &body),
            trailers,
            properties: BTreeMap::new(),
        },
        expansion,
        dialect,
    }
}

/// A header whose value (or name) is not UTF-8: the known trap class.
fn has_non_utf8_header(request: &HttpRequest) -> bool {
    request.headers.iter().any(|(_, v)| !is_utf8(v))
}

/// Runs one request, checks "no trap" and "no 5xx without a dependency failure", and returns
/// the outcome if the VM survived. `dependency` tells how the callouts of this request were
/// answered (a 503 is legitimate only after a failed one).
fn send(
    report: &mut Report,
    case: u64,
    chain: &mut Chain,
    generated: &Generated,
    upstream: &UpstreamResponse,
    dependency: &dyn Fn() -> DependencyLog,
) -> Option<host_harness::HttpOutcome> {
    let outcome = chain.http(generated.request.clone(), upstream);
    let log = dependency();
    if let Some(why) = failure(chain) {
        let known = if has_non_utf8_header(&generated.request) {
            Some(Known::NonUtf8RequestHeader)
        } else if log.non_utf8_header {
            Some(Known::NonUtf8CalloutHeader)
        } else if generated.expansion > 50_000 {
            Some(Known::HugeQueryExpansion)
        } else {
            None
        };
        report.finding(
            case,
            known,
            format!(
                "VM failed ({why}); request {}",
                describe_request(&generated.request)
            ),
        );
        return None;
    }
    let status = outcome.status;
    let legit_503 = status == 503 && log.failed;
    if (500..600).contains(&status) && !legit_503 && status != upstream.status {
        report.finding(
            case,
            None,
            format!(
                "status {status} without a dependency failure (body {}); request {}",
                escape(&outcome.body),
                describe_request(&generated.request)
            ),
        );
    }
    if status == 0 && !outcome.stalled {
        report.finding(
            case,
            None,
            format!(
                "no answer at all; request {}",
                describe_request(&generated.request)
            ),
        );
    }
    Some(outcome)
}

// ================================ brokers ================================

/// The brokers entity-acl and device-ownership can sit in front of (their `broker` setting).
const BROKERS: [&str; 3] = ["orion", "ngsi-ld", "fogflow"];

/// The broker a generated request is meant for: its dialect's broker (other paths, `/version`
/// and the like, go to the brokers in turn).
fn home_broker(dialect: generate::Dialect, case: u64) -> usize {
    match dialect {
        generate::Dialect::V2 => 0,
        generate::Dialect::Ld => 1,
        generate::Dialect::FogFlow => 2,
        generate::Dialect::Other => (case % 3) as usize,
    }
}

/// Another broker that also gets this request now and then (one case in six), to check that it
/// refuses the routes it does not serve. Drawn from its own stream, so that a case's request
/// and answers are those of the case whatever is drawn here.
fn cross_broker(settings: &run::Settings, target: &str, case: u64, home: usize) -> Option<usize> {
    let mut rng = settings.rng(&format!("x-{target}"), case);
    chance(&mut rng, 1.0 / 6.0).then(|| (home + rng.gen_range(1..3)) % 3)
}

/// True if `broker` serves no route of the API named by the path's first segment (decoded), so
/// the request must be refused before it reaches the broker. FogFlow serves parts of NGSI v2
/// and NGSI-LD: those are left to the other checks.
fn foreign_api(broker: &str, request: &HttpRequest) -> bool {
    let path = host_harness::chain::header(&request.headers, ":path").unwrap_or_default();
    let first = path
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    let first = percent_encoding::percent_decode_str(first).decode_utf8_lossy();
    match broker {
        "orion" => matches!(first.as_ref(), "ngsi-ld" | "ngsi10" | "ngsi9"),
        "ngsi-ld" => matches!(first.as_ref(), "v2" | "v1" | "ngsi10" | "ngsi9"),
        _ => false,
    }
}

/// One chain per broker, with the figures the run reports for each.
struct BrokerChains {
    chains: Vec<Chain>,
    cases: [u64; 3],
    max_memory: [usize; 3],
    max_fuel: [(u64, &'static str); 3],
    /// How many requests got each status, per broker: shows each broker decided its dialects
    /// (200s and 403s), not only refused them.
    statuses: [BTreeMap<u32, u64>; 3],
}

impl BrokerChains {
    fn new(build: impl Fn(usize) -> Chain) -> BrokerChains {
        BrokerChains {
            chains: (0..3).map(build).collect(),
            cases: [0; 3],
            max_memory: [0; 3],
            max_fuel: [(0, ""); 3],
            statuses: Default::default(),
        }
    }

    /// Notes the figures of broker `b`'s chain (before it is rebuilt, and at the end).
    fn note(&mut self, b: usize) {
        for vm in self.chains[b].filters.iter_mut() {
            self.max_memory[b] = self.max_memory[b].max(vm.memory_bytes());
            if vm.usage.fuel_max_call > self.max_fuel[b].0 {
                self.max_fuel[b] = (vm.usage.fuel_max_call, vm.usage.fuel_max_call_export);
            }
        }
    }

    /// Checks every chain's budget and prints one line per broker.
    fn finish(&mut self, report: &mut Report) {
        for (b, broker) in BROKERS.iter().enumerate() {
            self.note(b);
            report.check_budget(u64::MAX, &mut self.chains[b], BUDGET);
            let statuses: Vec<String> = self.statuses[b]
                .iter()
                .map(|(status, n)| format!("{status}:{n}"))
                .collect();
            println!(
                "fuzz-broker target={} broker={} requests={} statuses=[{}] max_memory_bytes={} max_fuel_per_call={} ({})",
                report.target, broker, self.cases[b], statuses.join(","), self.max_memory[b],
                self.max_fuel[b].0, self.max_fuel[b].1
            );
        }
    }
}

// ================================ entity-acl ================================

const ENTITY_ACL_CONFIG: &str = r#"{
  "mode": "enforce",
  "max_body_bytes": 65536,
  "acl": {"rules": [
    {"name": "citizens-read", "effect": "allow", "subjects": ["role:citizen"],
     "actions": ["read"], "ngsi": {"service": "smartcity", "service_path": "/#"}},
    {"name": "own-device", "effect": "allow", "subjects": ["role:device"],
     "actions": ["write"],
     "ngsi": {"service": "smartcity", "service_path": "/devices/#", "entity_id": "%u"}},
    {"name": "rooms", "effect": "allow", "subjects": ["user:alice", "group:facility"],
     "actions": ["read", "create", "write", "delete"],
     "ngsi": {"service": "smartcity", "service_path": "/rooms/#",
              "entity_id": "urn:ngsi-ld:Room:*", "entity_type": "Room",
              "attributes": ["temperature", "humidity"]}},
    {"name": "tenant", "effect": "allow", "subjects": ["authenticated"],
     "actions": ["read"], "ngsi": {"service": "%t", "service_path": "/#"}},
    {"name": "quantumleap-subscriptions", "effect": "allow", "subjects": ["role:operator"],
     "actions": ["subscribe", "register"],
     "ngsi": {"service": "smartcity", "service_path": "/#",
              "endpoint_prefix": "http://quantumleap:8668/v2/"}},
    {"name": "operators", "effect": "allow", "subjects": ["role:operator"],
     "actions": ["*"], "ngsi": {"service": "openiot", "service_path": "/#"}},
    {"name": "no-vault", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
     "ngsi": {"service": "*", "service_path": "/#", "entity_id": "urn:ngsi-ld:Room:vault*"}}
  ]}
}"#;

/// entity-acl's decision computed natively with `policy`, exactly as the filter gathers the
/// request (headers lowercased, in order; the first `:method`/`:path`; the whole body). None
/// when the request cannot be represented natively (a header that is not UTF-8).
fn entity_acl_expected(acl: &policy::entity_acl::EntityAcl, request: &HttpRequest) -> Option<u32> {
    let mut headers = Vec::new();
    for (k, v) in &request.headers {
        headers.push((k.to_ascii_lowercase(), String::from_utf8(v.clone()).ok()?));
    }
    let first = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (method, path) = (first(":method"), first(":path"));
    let identity = match acl.identity_headers.parse(&headers) {
        Ok(identity) => identity,
        Err(_) => return Some(400),
    };
    let declared_too_large = first("content-length")
        .parse::<usize>()
        .is_ok_and(|n| n > acl.max_body_bytes);
    let body = request.body.concat();
    if declared_too_large || body.len() > acl.max_body_bytes {
        return Some(413);
    }
    let verdict = acl.decide(identity.as_ref(), &method, &path, &headers, &body);
    Some(match verdict.decision {
        policy::Decision::Allow(_) => 200,
        policy::Decision::Deny(reason) => reason.status(),
    })
}

/// FogFlow keys entities by id alone: its rules name no type, tenant or service path.
const ENTITY_ACL_FOGFLOW_CONFIG: &str = r#"{
  "mode": "enforce",
  "broker": "fogflow",
  "max_body_bytes": 65536,
  "acl": {"rules": [
    {"name": "citizens-read", "effect": "allow", "subjects": ["role:citizen"],
     "actions": ["read"], "ngsi": {"service": "", "service_path": "/#"}},
    {"name": "own-device", "effect": "allow", "subjects": ["role:device"],
     "actions": ["write"], "ngsi": {"service": "", "service_path": "/#", "entity_id": "%u"}},
    {"name": "rooms", "effect": "allow", "subjects": ["user:alice", "group:facility"],
     "actions": ["read", "create", "write", "delete"],
     "ngsi": {"service": "*", "service_path": "/#", "entity_id": "urn:ngsi-ld:Room:*",
              "attributes": ["temperature", "humidity"]}},
    {"name": "operator-subscriptions", "effect": "allow", "subjects": ["role:operator"],
     "actions": ["subscribe", "register"],
     "ngsi": {"service": "", "service_path": "/#",
              "endpoint_prefix": "http://quantumleap:8668/v2/"}},
    {"name": "no-vault", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
     "ngsi": {"service": "*", "service_path": "/#", "entity_id": "urn:ngsi-ld:Room:vault*"}}
  ]}
}"#;

/// entity-acl's configuration for broker `BROKERS[b]`.
fn entity_acl_config(b: usize) -> String {
    match BROKERS[b] {
        "fogflow" => ENTITY_ACL_FOGFLOW_CONFIG.to_string(),
        broker => ENTITY_ACL_CONFIG.replacen(
            "\"mode\": \"enforce\",",
            &format!("\"mode\": \"enforce\", \"broker\": \"{broker}\","),
            1,
        ),
    }
}

fn entity_acl_chain(b: usize) -> Chain {
    run::chain(
        &[("entity_acl.wasm", &entity_acl_config(b), true)],
        &[],
        Box::new(NoCallouts),
    )
}

/// Every request goes to the chain of its dialect's broker, and one in six also to another
/// broker's chain, which must refuse a route of an API it does not serve.
#[test]
fn entity_acl() {
    let settings = run::settings(600);
    let mut report = Report::new("entity-acl", &settings);
    let acls: Vec<_> = (0..3)
        .map(|b| {
            policy::entity_acl::EntityAcl::from_json(entity_acl_config(b).as_bytes())
                .expect("the fuzz configuration is valid")
        })
        .collect();
    let upstream = UpstreamResponse::default();
    let mut brokers = BrokerChains::new(entity_acl_chain);
    report.vms_started += 3;
    let mut agreed = 0u64;
    for case in settings.case_numbers() {
        let mut rng = settings.rng("entity-acl", case);
        let generated = ngsi_request(&mut rng);
        report.cases += 1;
        let home = home_broker(generated.dialect, case);
        let targets =
            std::iter::once(home).chain(cross_broker(&settings, "entity-acl", case, home));
        for b in targets {
            brokers.cases[b] += 1;
            let chain = &mut brokers.chains[b];
            let Some(outcome) = send(
                &mut report,
                case,
                chain,
                &generated,
                &upstream,
                &DependencyLog::default,
            ) else {
                brokers.note(b);
                brokers.chains[b] = entity_acl_chain(b);
                report.vms_started += 1;
                continue;
            };
            *brokers.statuses[b].entry(outcome.status).or_default() += 1;
            let broker = BROKERS[b];
            if outcome.upstream.is_some() && foreign_api(broker, &generated.request) {
                report.finding(
                    case,
                    None,
                    format!(
                        "broker {broker}: a route of an API it does not serve reached it (status {}); request {}",
                        outcome.status,
                        describe_request(&generated.request)
                    ),
                );
            }
            // The native decision of a huge expansion would take gigabytes: only the VM is run.
            if generated.expansion > 50_000 {
                continue;
            }
            if let Some(expected) = entity_acl_expected(&acls[b], &generated.request) {
                if outcome.status != expected {
                    report.finding(
                        case,
                        None,
                        format!(
                            "broker {broker}: entity-acl answered {} where policy decides {expected} (body {}); request {}",
                            outcome.status,
                            escape(&outcome.body),
                            describe_request(&generated.request)
                        ),
                    );
                } else {
                    agreed += 1;
                }
            }
            if outcome.status == 200 && outcome.upstream.as_ref().is_none_or(|u| !u.complete) {
                report.finding(
                    case,
                    None,
                    format!(
                        "broker {broker}: answered 200 but the request did not reach the broker whole"
                    ),
                );
            }
        }
    }
    brokers.finish(&mut report);
    println!("entity-acl: {agreed} decisions compared equal to policy's");
    report.finish();
}

/// ngsi_gateway.wasm with only `entity_acl` runs the very stage entity_acl.wasm wraps: on the
/// same hostile requests it must answer the same statuses and pass the same ones upstream.
#[test]
fn ngsi_gateway_entity_acl_stage_answers_as_entity_acl() {
    let settings = run::settings(300);
    let mut report = Report::new("ngsi-gateway", &settings);
    let upstream = UpstreamResponse::default();
    let b = 0;
    let gateway_config = format!("{{\"entity_acl\": {}}}", entity_acl_config(b));
    let gateway_chain = || {
        run::chain(
            &[("ngsi_gateway.wasm", &gateway_config, true)],
            &[],
            Box::new(NoCallouts),
        )
    };
    let mut alone = entity_acl_chain(b);
    let mut gateway = gateway_chain();
    report.vms_started += 2;
    let mut agreed = 0u64;
    for case in settings.case_numbers() {
        let mut rng = settings.rng("ngsi-gateway", case);
        let generated = ngsi_request(&mut rng);
        report.cases += 1;
        let dependency = DependencyLog::default;
        let a = send(
            &mut report,
            case,
            &mut alone,
            &generated,
            &upstream,
            &dependency,
        );
        let g = send(
            &mut report,
            case,
            &mut gateway,
            &generated,
            &upstream,
            &dependency,
        );
        let (Some(a), Some(g)) = (a, g) else {
            alone = entity_acl_chain(b);
            gateway = gateway_chain();
            report.vms_started += 2;
            continue;
        };
        if (a.status, a.upstream.is_some()) != (g.status, g.upstream.is_some()) {
            report.finding(
                case,
                None,
                format!(
                    "entity-acl answered {} (upstream {}), the gateway {} (upstream {}); request {}",
                    a.status,
                    a.upstream.is_some(),
                    g.status,
                    g.upstream.is_some(),
                    describe_request(&generated.request)
                ),
            );
        } else {
            agreed += 1;
        }
    }
    println!("ngsi-gateway: {agreed} answers equal to entity-acl's");
    report.finish();
}

// ================================ device-ownership ================================

const DEVICE_OWNERSHIP_CONFIG: &str = r#"{
  "sources": [{"kind": "broker", "cluster": "orion", "authority": "orion:1026", "timeout_ms": 1000}],
  "cache": {"max_entries": 100, "ttl_secs": 60, "negative_ttl_secs": 5}
}"#;

/// How a dependency answered during one request.
#[derive(Debug, Default, Clone)]
struct DependencyLog {
    /// An answer that was not a clean one: reset, timeout, 5xx, malformed body or header.
    failed: bool,
    /// An answer with a header that is not UTF-8.
    non_utf8_header: bool,
    /// token-auth: the introspection answer said active.
    active_answered: bool,
    calls: u32,
}

/// A callout answer drawn per call: the intended one most of the time, else broken.
fn broken_answer(rng: &mut Rng, log: &mut DependencyLog) -> CalloutAnswer {
    log.failed = true;
    match rng.gen_range(0..9) {
        0 => CalloutAnswer::Reset,
        1 => response(504, &[], b"upstream request timeout"),
        2 => response(
            pick(rng, &[500, 502, 503, 429]),
            &[],
            b"{\"error\":\"InternalError\"}",
        ),
        3 => response(200, &[], &generate::odd_bytes(rng, 40)),
        4 => {
            let v = generate::json_value(rng, 3);
            response(200, &[], &serde_json::to_vec(&v).unwrap())
        }
        5 => response(200, &[], &vec![b'['; 100_000]),
        6 => {
            let big = format!("{{\"owner\": \"{}\"}}", "a".repeat(2_000_000));
            response(200, &[], big.as_bytes())
        }
        7 => {
            log.non_utf8_header = true;
            let value = [b'x', 0xFF, 0xFE];
            response(200, &[("x-odd", &value[..])], b"{}")
        }
        _ => response(pick(rng, &[0, 99, 600, 1000]), &[], b"{}"),
    }
}

fn response(status: u32, headers: &[(&str, &[u8])], body: &[u8]) -> CalloutAnswer {
    let mut all = vec![
        (":status".to_string(), status.to_string().into_bytes()),
        ("content-type".to_string(), b"application/json".to_vec()),
    ];
    all.extend(pairs(headers));
    CalloutAnswer::Response(CallResponse {
        headers: all,
        body: body.to_vec(),
        trailers: Vec::new(),
    })
}

/// The broker answering device-ownership's lookups: owner records, 404s, and broken answers,
/// drawn from the case's stream. A record is the entity looked up, in the lookup's API (v2 and
/// NGSI-LD keyValues `{"id", ...}`, NGSI10 a contextElement) with the id the broker decodes
/// from the path: a real broker answers a lookup of `lamp-01` with `lamp-01`, and the filter
/// refuses (503) anything else as a broken answer.
struct Broker {
    rng: Arc<Mutex<Option<Rng>>>,
    log: Arc<Mutex<DependencyLog>>,
}

impl CalloutResolver for Broker {
    fn resolve(&mut self, call: &PendingCall, shared: &Shared) -> CalloutAnswer {
        let mut guard = self.rng.lock().unwrap();
        let rng = guard.get_or_insert_with(|| <Rng as rand::SeedableRng>::seed_from_u64(0));
        let mut log = self.log.lock().unwrap();
        log.calls += 1;
        let path = host_harness::chain::header(&call.headers, ":path").unwrap_or_default();
        let encoded = path
            .split('?')
            .next()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("");
        let id = percent_encoding::percent_decode_str(encoded)
            .decode_utf8_lossy()
            .into_owned();
        match rng.gen_range(0..10) {
            0..=5 => {
                let owner = pick(rng, &["alice", "bob", "carol"]);
                let delegations = chance(rng, 0.3).then(|| {
                    json!([{"user": "bob", "access": pick(rng, &["read", "read_write", "READ_ACCESS"])}])
                });
                let record = if path.starts_with("/ngsi10/") {
                    let mut attributes =
                        vec![json!({"name": "owner", "type": "string", "value": owner})];
                    if let Some(d) = delegations {
                        attributes
                            .push(json!({"name": "delegations", "type": "array", "value": d}));
                    }
                    json!({"entityId": {"id": id, "type": "Lamp", "isPattern": false},
                           "attributes": attributes})
                } else {
                    let mut record = json!({"id": id, "type": "Lamp", "owner": owner});
                    if let Some(d) = delegations {
                        record["delegations"] = d;
                    }
                    record
                };
                response(200, &[], record.to_string().as_bytes())
            }
            6 => response(404, &[], b"{\"error\":\"NotFound\"}"),
            _ => {
                let answer = broken_answer(rng, &mut log);
                if let CalloutAnswer::Response(r) = &answer {
                    if r.headers.iter().any(|(_, v)| v == b"504") {
                        shared.advance_nanos(u64::from(call.timeout_ms) * 1_000_000);
                    }
                }
                answer
            }
        }
    }
}

/// The broker's answer to the request (device-ownership filters list answers by owner): a
/// well-formed entity list, or (`true`: a broken dependency) garbage, a wrong shape, an
/// owner of the wrong type.
fn broker_answer(rng: &mut Rng) -> (UpstreamResponse, bool) {
    let (body, broken) = match rng.gen_range(0..10) {
        0 => (generate::odd_bytes(rng, 50), true),
        1 => (
            serde_json::to_vec(&generate::json_value(rng, 3)).unwrap(),
            true,
        ),
        2 => (
            br#"[{"id": "Lamp1", "type": "Lamp", "owner": 5}, {"id": "x"}]"#.to_vec(),
            true,
        ),
        _ => {
            let items: Vec<Value> = (0..rng.gen_range(0..5))
                .map(|_| {
                    json!({"id": pick(rng, generate::ENTITY_IDS), "type": "Lamp",
                                "owner": pick(rng, &["alice", "bob"])})
                })
                .collect();
            (serde_json::to_vec(&items).unwrap(), false)
        }
    };
    let status = pick(rng, &[200, 200, 200, 200, 404, 500]);
    let upstream = UpstreamResponse {
        status,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body,
        trailers: Vec::new(),
    };
    (upstream, broken && status == 200)
}

/// device-ownership's configuration for broker `BROKERS[b]`.
fn device_ownership_config(b: usize) -> String {
    DEVICE_OWNERSHIP_CONFIG.replacen(
        "{\n",
        &format!("{{\n  \"broker\": \"{}\",\n", BROKERS[b]),
        1,
    )
}

/// As entity-acl's: each request through its dialect's broker's chain (so the lookups of every
/// API are fuzzed), one in six also through another broker's, which must refuse a route of an
/// API it does not serve without looking anything up.
#[test]
fn device_ownership() {
    let settings = run::settings(600);
    let mut report = Report::new("device-ownership", &settings);
    let rng_slot: Arc<Mutex<Option<Rng>>> = Arc::new(Mutex::new(None));
    let log: Arc<Mutex<DependencyLog>> = Arc::default();
    let build = |b: usize| {
        run::chain(
            &[("device_ownership.wasm", &device_ownership_config(b), true)],
            &["orion"],
            Box::new(Broker {
                rng: rng_slot.clone(),
                log: log.clone(),
            }),
        )
    };
    let mut brokers = BrokerChains::new(build);
    report.vms_started += 3;
    for case in settings.case_numbers() {
        let mut rng = settings.rng("device-ownership", case);
        // The broker draws from its own stream for this case.
        *rng_slot.lock().unwrap() = Some(settings.rng("device-ownership-broker", case));
        let generated = ngsi_request(&mut rng);
        let (upstream, mut upstream_broken) = broker_answer(&mut rng);
        // The well-formed list generated is NGSI v2's shape; for NGSI-LD and NGSI10 answers it
        // is the wrong shape, so a 503 for them counts as a broken dependency.
        let path =
            host_harness::chain::header(&generated.request.headers, ":path").unwrap_or_default();
        upstream_broken |= upstream.status == 200 && !path.starts_with("/v2/");
        report.cases += 1;
        let home = home_broker(generated.dialect, case);
        // A cached answer may decide later requests; let the cache expire now and then.
        if chance(&mut rng, 0.1) {
            brokers.chains[home].advance_clock(61_000);
        }
        let targets =
            std::iter::once(home).chain(cross_broker(&settings, "device-ownership", case, home));
        for b in targets {
            brokers.cases[b] += 1;
            *log.lock().unwrap() = DependencyLog::default();
            let dependency = || {
                let mut log = log.lock().unwrap().clone();
                log.failed |= upstream_broken;
                log
            };
            let outcome = send(
                &mut report,
                case,
                &mut brokers.chains[b],
                &generated,
                &upstream,
                &dependency,
            );
            let Some(outcome) = outcome else {
                brokers.note(b);
                brokers.chains[b] = build(b);
                report.vms_started += 1;
                continue;
            };
            *brokers.statuses[b].entry(outcome.status).or_default() += 1;
            let broker = BROKERS[b];
            // A lookup that failed must stop the request before the broker (a broken *answer*
            // of the broker comes after it reached the broker).
            let dep = log.lock().unwrap().clone();
            if dep.failed && outcome.upstream.is_some() {
                report.finding(
                    case,
                    None,
                    format!(
                        "broker {broker}: a lookup failed ({} calls) yet the request reached the broker (status {}); request {}",
                        dep.calls,
                        outcome.status,
                        describe_request(&generated.request)
                    ),
                );
            }
            if foreign_api(broker, &generated.request)
                && (dep.calls > 0 || outcome.upstream.is_some())
            {
                report.finding(
                    case,
                    None,
                    format!(
                        "broker {broker}: a route of an API it does not serve was looked up ({} calls) or reached it (status {}); request {}",
                        dep.calls,
                        outcome.status,
                        describe_request(&generated.request)
                    ),
                );
            }
        }
    }
    brokers.finish(&mut report);
    report.finish();
}

// ================================ token-auth ================================

const ISSUER: &str = "https://idp.example/realms/city";

fn token_auth_config() -> String {
    json!({
        "jwt_providers": [{
            "issuer": ISSUER, "audiences": ["orion"], "algorithms": ["RS256", "ES256"],
            "claims": {"subject": "sub", "roles": ["realm_access.roles"], "groups": ["groups"]},
            "remote": {"cluster": "idp", "authority": "idp.example",
                       "path": "/realms/city/.well-known/openid-configuration",
                       "discovery": true, "refresh_secs": 600}
        }],
        "introspection": {
            "kind": "rfc7662", "cluster": "keycloak", "authority": "idp.example",
            "path": "/realms/city/protocol/openid-connect/token/introspect",
            "credentials": {"client_id": "envoy", "client_secret": "s3cret"},
            "timeout_ms": 2000, "positive_ttl_s": 300, "negative_ttl_s": 10
        },
        "realm": "orion"
    })
    .to_string()
}

fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/jwt")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tokens() -> &'static BTreeMap<String, String> {
    static TOKENS: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    TOKENS.get_or_init(|| serde_json::from_str(&fixture("tokens.json")).expect("tokens.json"))
}

/// Fixture tokens that verify against the fixture keys (rsa-1, ec-1; rsa-2 after rotation).
const GOOD_TOKENS: &[&str] = &[
    "valid_rs256",
    "valid_es256",
    "no_roles",
    "list_injection",
    "rotated_rsa2",
    // The duplicate-member tests' control: the same claims, no member repeated.
    "duplicates_control",
    // authorized_parties' fixtures (the fuzzed chain requires no party, so they verify).
    "azp_portal",
    "azp_other",
    "client_id_portal",
    "azp_other_client_id_portal",
];

/// The IdP of one chain's life: how discovery and the JWKS answer (fixed per chain), and the
/// introspection answer of the current request.
struct IdpScript {
    discovery: CalloutAnswer,
    jwks: CalloutAnswer,
    /// Discovery and JWKS both answer cleanly (rotated keys count as clean).
    keys_clean: bool,
    keys_rotated: bool,
    introspection: CalloutAnswer,
    /// The current introspection answer is broken (malformed, wrong types, reset, 5xx...).
    introspection_broken: bool,
    /// The current introspection answer says active (whatever token was sent).
    introspection_active: bool,
    /// The IdP said a token was active, in this chain's life (answers are cached).
    ever_active: bool,
    /// Discovery or JWKS answered with a header that is not UTF-8.
    keys_non_utf8: bool,
    log: DependencyLog,
}

struct Idp(Arc<Mutex<IdpScript>>);

impl CalloutResolver for Idp {
    fn resolve(&mut self, call: &PendingCall, shared: &Shared) -> CalloutAnswer {
        let mut s = self.0.lock().unwrap();
        s.log.calls += 1;
        let path = host_harness::chain::header(&call.headers, ":path").unwrap_or_default();
        let answer = if call.cluster == "keycloak" {
            if s.introspection_active {
                s.ever_active = true;
                s.log.active_answered = true;
            } else if s.introspection_broken {
                s.log.failed = true;
            }
            s.introspection.clone()
        } else if path.contains("openid-configuration") {
            if !s.keys_clean {
                s.log.failed = true;
            }
            s.discovery.clone()
        } else {
            if !s.keys_clean {
                s.log.failed = true;
            }
            s.jwks.clone()
        };
        if let CalloutAnswer::Response(r) = &answer {
            if r.headers.iter().any(|(_, v)| !is_utf8(v)) {
                s.log.non_utf8_header = true;
                if call.cluster != "keycloak" {
                    s.keys_non_utf8 = true;
                }
            }
            if r.headers.iter().any(|(k, v)| k == ":status" && v == b"504") {
                shared.advance_nanos(u64::from(call.timeout_ms) * 1_000_000);
            }
        }
        answer
    }
}

fn idp_script(rng: &mut Rng) -> IdpScript {
    let discovery_doc =
        json!({"issuer": ISSUER, "jwks_uri": format!("{ISSUER}/protocol/openid-connect/certs")});
    let rotated = chance(rng, 0.2);
    let jwks_doc = fixture(if rotated {
        "jwks-rotated.json"
    } else {
        "jwks.json"
    });
    let mut log = DependencyLog::default();
    let clean = chance(rng, 0.6);
    let (discovery, jwks) = if clean {
        (
            response(200, &[], discovery_doc.to_string().as_bytes()),
            response(200, &[], jwks_doc.as_bytes()),
        )
    } else {
        let mut mutate = |good: &[u8]| -> CalloutAnswer {
            match rng.gen_range(0..5) {
                0 => response(200, &[], good),
                1 => {
                    // Valid JSON, wrong types or wrong issuer.
                    let doc = pick(
                        rng,
                        &[
                            json!({"issuer": 5, "jwks_uri": []}),
                            json!({"issuer": "https://evil.example", "jwks_uri": "https://evil.example/certs"}),
                            json!({"keys": "none"}),
                            json!({"keys": [{"kty": "RSA", "kid": "rsa-1", "n": "AA", "e": "AQAB", "alg": "RS256"}]}),
                            json!({"keys": [{"kty": "oct", "kid": "rsa-1", "k": "c2VjcmV0"}]}),
                        ],
                    );
                    response(200, &[], doc.to_string().as_bytes())
                }
                2 => {
                    let mut bytes = good.to_vec();
                    let cut = rng.gen_range(0..=bytes.len());
                    bytes.truncate(cut);
                    response(200, &[], &bytes)
                }
                _ => broken_answer(rng, &mut log),
            }
        };
        (
            mutate(discovery_doc.to_string().as_bytes()),
            mutate(jwks_doc.as_bytes()),
        )
    };
    IdpScript {
        discovery,
        jwks,
        keys_clean: clean,
        keys_rotated: rotated,
        introspection: CalloutAnswer::Reset,
        introspection_broken: false,
        ever_active: false,
        introspection_active: false,
        keys_non_utf8: false,
        log: DependencyLog::default(),
    }
}

/// What the credential of a token-auth request is.
#[derive(Debug, Clone, PartialEq)]
enum Credential {
    None,
    /// A fixture token, by name, possibly mutated (then it must never pass).
    Fixture {
        name: String,
        mutated: bool,
    },
    Opaque(String),
    /// Garbage: passes only if the IdP's introspection answer says it is active.
    Other,
    /// Two credentials, or a scheme other than Bearer: never passes.
    Refused,
}

fn token_auth_request(rng: &mut Rng, script: &mut IdpScript) -> (Generated, Credential) {
    let mut generated = ngsi_request(rng);
    generated.expansion = 0;
    let headers = &mut generated.request.headers;
    let (token, credential): (Vec<u8>, Credential) = match rng.gen_range(0..10) {
        0 => (Vec::new(), Credential::None),
        1..=4 => {
            let names: Vec<&String> = tokens().keys().collect();
            let name = pick(rng, &names).clone();
            let mut token = tokens()[&name].clone().into_bytes();
            let mutated = chance(rng, 0.3);
            if mutated {
                // Change the payload (between the dots): the signature covers its text.
                let first = token.iter().position(|b| *b == b'.').unwrap_or(0);
                let second = token
                    .iter()
                    .rposition(|b| *b == b'.')
                    .unwrap_or(token.len());
                if second > first + 1 {
                    let i = rng.gen_range(first + 1..second);
                    let old = token[i];
                    let new = pick(rng, b"AQgw_-z9=.");
                    token[i] = if new == old { b'B' } else { new };
                }
            }
            (token, Credential::Fixture { name, mutated })
        }
        5..=6 => {
            let t = format!("opaque-{}", rng.gen_range(0..5));
            (t.clone().into_bytes(), Credential::Opaque(t))
        }
        7 => {
            // JWT-shaped garbage.
            let parts: Vec<String> = (0..rng.gen_range(1..5))
                .map(|_| generate::odd_text(rng, 20))
                .collect();
            (parts.join(".").into_bytes(), Credential::Other)
        }
        _ if chance(rng, 0.3) => (generate::odd_bytes(rng, 40), Credential::Other),
        _ => (generate::odd_text(rng, 40).into_bytes(), Credential::Other),
    };
    let mut credential = credential;
    if credential != Credential::None {
        match rng.gen_range(0..10) {
            0..=5 => {
                let mut v = b"Bearer ".to_vec();
                v.extend(&token);
                headers.push(("authorization".into(), v));
            }
            6..=7 => headers.push(("x-auth-token".into(), token.clone())),
            8 => {
                headers.push((
                    "authorization".into(),
                    [b"Bearer ".as_slice(), &token].concat(),
                ));
                headers.push(("x-auth-token".into(), token.clone()));
                credential = Credential::Refused;
            }
            _ => {
                // The scheme is case-insensitive (RFC 7235): "bearer " may pass; the others not.
                let scheme = pick(rng, &[&b"bearer "[..], b"Basic ", b"Bearer", b"Bearer\t"]);
                headers.push(("authorization".into(), [scheme, &token].concat()));
                if scheme == b"Basic " || scheme == b"Bearer" {
                    credential = Credential::Refused;
                } else if scheme == b"Bearer\t" {
                    credential = Credential::Other;
                }
            }
        }
    }
    // The introspection answer for this request.
    script.introspection_broken = false;
    script.introspection_active = false;
    script.introspection = match rng.gen_range(0..10) {
        0..=4 => {
            script.introspection_active = true;
            response(
                200,
                &[],
                json!({"active": true, "sub": pick(rng, &["alice", "bob"]), "exp": START_SECS_PLUS_DAY,
                       "realm_access": {"roles": ["operator"]}})
                .to_string()
                .as_bytes(),
            )
        }
        5 => response(200, &[], b"{\"active\": false}"),
        6 => {
            script.introspection_broken = true;
            response(
                200,
                &[],
                pick(
                    rng,
                    &[
                        &br#"{"active": "true", "sub": "alice"}"#[..],
                        br#"{"active": true}"#,
                        br#"{"active": true, "sub": 5}"#,
                        br#"{"active": true, "sub": "alice", "exp": 1}"#,
                    ],
                ),
            )
        }
        _ => {
            script.introspection_broken = true;
            broken_answer(rng, &mut DependencyLog::default())
        }
    };
    (generated, credential)
}

const START_SECS_PLUS_DAY: u64 = run::START_SECS + 86_400;

#[test]
fn token_auth() {
    let settings = run::settings(300);
    let mut report = Report::new("token-auth", &settings);
    let config = token_auth_config();
    let upstream = UpstreamResponse::default();
    // A chain lives for 16 cases: its IdP answers (discovery, JWKS) are drawn at its start.
    const CASES_PER_CHAIN: u64 = 16;
    let mut current: Option<(Chain, Arc<Mutex<IdpScript>>)> = None;
    for case in settings.case_numbers() {
        let mut rng = settings.rng("token-auth", case);
        if case % CASES_PER_CHAIN == 0 || current.is_none() {
            if let Some((mut chain, _)) = current.take() {
                report.check_budget(case, &mut chain, BUDGET);
            }
            let epoch = case / CASES_PER_CHAIN;
            let mut chain_rng = settings.rng("token-auth-idp", epoch);
            let script = Arc::new(Mutex::new(idp_script(&mut chain_rng)));
            let chain = run::chain(
                &[("token_auth.wasm", &config, false)],
                &["idp", "keycloak"],
                Box::new(Idp(script.clone())),
            );
            report.vms_started += 1;
            if let Some(why) = failure(&chain) {
                let known = script.lock().unwrap().keys_non_utf8;
                report.finding(
                    case,
                    known.then_some(Known::NonUtf8CalloutHeader),
                    format!("token-auth failed at start ({why})"),
                );
                current = None;
                continue;
            }
            current = Some((chain, script));
        }
        let (chain, script) = current.as_mut().unwrap();
        let (generated, credential) = {
            let mut s = script.lock().unwrap();
            s.log = DependencyLog::default();
            token_auth_request(&mut rng, &mut s)
        };
        report.cases += 1;
        let keys_clean = script.lock().unwrap().keys_clean;
        // Keys that never arrived cleanly are a dependency failure for every JWT after them.
        let dependency = || {
            let s = script.lock().unwrap();
            let mut log = s.log.clone();
            log.failed |= !s.keys_clean;
            log.non_utf8_header |= s.keys_non_utf8;
            log
        };
        let outcome = send(&mut report, case, chain, &generated, &upstream, &dependency);
        let s = script.lock().unwrap();
        let Some(outcome) = outcome else {
            drop(s);
            current = None;
            continue;
        };
        if outcome.upstream.is_none() {
            continue;
        }
        // It passed: it must have carried a credential that may pass.
        // The IdP vouches for whatever token it is asked about; active answers are cached
        // (positive_ttl_s), so a token let through without a callout was vouched for before.
        let vouched = s.log.active_answered || (s.log.calls == 0 && s.ever_active);
        let may_pass = match &credential {
            Credential::Fixture {
                name,
                mutated: false,
            } => {
                GOOD_TOKENS.contains(&name.as_str())
                    && (name != "rotated_rsa2" || s.keys_rotated || !keys_clean)
            }
            // A mutated JWT (a '.' added, say) may no longer look like one: token-auth then
            // introspects it as an opaque token.
            Credential::Fixture { mutated: true, .. }
            | Credential::Opaque(_)
            | Credential::Other => vouched,
            Credential::None | Credential::Refused => false,
        };
        // A token cached as verified earlier in this chain may pass again: only fixture tokens
        // that verify can be cached, so the rule above already covers them.
        if !may_pass {
            report.finding(
                case,
                None,
                format!(
                    "a request with credential {credential:?} reached the broker (keys clean {keys_clean}, rotated {}); request {}",
                    s.keys_rotated,
                    describe_request(&generated.request)
                ),
            );
        }
        let upstream_req = outcome.upstream.as_ref().unwrap();
        let forged = upstream_req
            .headers
            .iter()
            .filter(|(k, _)| k == "x-auth-subject")
            .count();
        if forged != 1 {
            report.finding(
                case,
                None,
                format!(
                    "{forged} x-auth-subject headers reached the broker; request {}",
                    describe_request(&generated.request)
                ),
            );
        }
    }
    if let Some((mut chain, _)) = current.take() {
        report.check_budget(u64::MAX, &mut chain, BUDGET);
    }
    report.finish();
}

// ================================ mqtt-acl ================================

const MQTT_SECRET: &str = "0123456789abcdef0123456789abcdef";

fn mqtt_config() -> String {
    json!({
        // The fuzz tokens carry no `aud`: the explicit opt-out, as the mqtt-acl scenarios do.
        "jwt_providers": [{"issuer": "https://idp.example.org", "algorithms": ["HS256"],
                           "allow_any_audience": true,
                           "hmac_secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}],
        "device_keys": {"devices": {"lamp-01": {"key_sha256": ["3b256f451f98330c67236eb5cbc1b61fe284e2c01ece772d555ad736af2ffc9c"]}}},
        "acl": {"rules": [
            {"name": "devices", "effect": "allow", "subjects": ["authenticated"], "actions": ["*"], "mqtt": {"topic": "devices/#"}},
            {"name": "own-inbox", "effect": "allow", "subjects": ["authenticated"], "actions": ["*"], "mqtt": {"topic": "users/%u/#"}},
            {"name": "no-secrets", "effect": "deny", "subjects": ["anyone"], "actions": ["*"], "mqtt": {"topic": "devices/+/secret"}}
        ]},
        "ownership": {"topic_template": "devices/{device}/#",
                      "devices": {"lamp-01": {"owner": "alice", "delegations": [{"user": "bob", "access": "read"}]}}},
        "on_forbidden_publish": "drop",
        "max_packet_bytes": 4096,
        "max_topic_aliases": 10
    })
    .to_string()
}

fn hs256_token(rng: &mut Rng) -> String {
    use jwt_simple::prelude::*;
    let key = HS256Key::from_bytes(MQTT_SECRET.as_bytes());
    let exp = if chance(rng, 0.8) { 3600 } else { 0 };
    let claims = Claims::create(jwt_simple::prelude::Duration::from_secs(exp))
        .with_issuer(pick(
            rng,
            &["https://idp.example.org", "https://evil.example"],
        ))
        .with_subject(pick(rng, &["alice", "bob", "lamp-01"]));
    // The harness clock, not the wall clock, is what the filter checks against.
    let mut claims = claims;
    claims.issued_at = Some(UnixTimeStamp::from_secs(run::START_SECS));
    claims.expires_at = Some(UnixTimeStamp::from_secs(run::START_SECS + exp));
    claims.invalid_before = Some(UnixTimeStamp::from_secs(run::START_SECS));
    key.authenticate(claims).expect("token")
}

fn mqtt_topic(rng: &mut Rng) -> String {
    pick(
        rng,
        &[
            "devices/lamp-01/state",
            "devices/lamp-02/state",
            "devices/lamp-01/secret",
            "users/alice/x",
            "users/bob/x",
            "devices/#",
            "devices/+/state",
            "#",
            "$SYS/x",
            "",
            "a\u{0}b",
            "$share/g/devices/#",
        ],
    )
    .to_string()
}

fn mqtt_properties(rng: &mut Rng, publish: bool) -> policy::mqtt::Properties {
    use policy::mqtt::Property;
    let mut props = Vec::new();
    for _ in 0..rng.gen_range(0..3) {
        props.push(match rng.gen_range(0..5) {
            0 if publish => Property::TopicAlias(rng.gen_range(0..15)),
            1 => Property::UserProperty(generate::odd_text(rng, 5), generate::odd_text(rng, 5)),
            2 if publish => Property::MessageExpiryInterval(rng.gen()),
            3 => Property::ReceiveMaximum(rng.gen_range(1..100)),
            _ => Property::UserProperty("k".into(), "v".into()),
        });
    }
    policy::mqtt::Properties(props)
}

/// A client stream: CONNECT (JWT, device key, nothing, garbage), then PUBLISH/SUBSCRIBE/
/// UNSUBSCRIBE/PINGREQ/DISCONNECT, encoded with policy's codec, then maybe mutated.
fn mqtt_client_stream(rng: &mut Rng) -> (Vec<u8>, policy::mqtt::ProtocolVersion) {
    use policy::mqtt::*;
    let version = if chance(rng, 0.5) {
        ProtocolVersion::V311
    } else {
        ProtocolVersion::V5
    };
    let (username, password): (Option<String>, Option<Vec<u8>>) = match rng.gen_range(0..5) {
        0 | 1 => (Some(hs256_token(rng)), None),
        2 => (
            Some("lamp-01".into()),
            Some(pick(rng, &[&b"k1-secret"[..], b"wrong"]).to_vec()),
        ),
        3 => (None, None),
        _ => (
            Some(generate::odd_text(rng, 30)),
            Some(generate::odd_bytes(rng, 10)),
        ),
    };
    let connect = Packet::Connect(Connect {
        version,
        bridge: chance(rng, 0.1),
        client_id: pick(rng, &["lamp-01", "web-alice", "", "c\u{e9}"]).to_string(),
        clean_start: chance(rng, 0.8),
        keep_alive: 60,
        username,
        password,
        will: chance(rng, 0.2).then(|| Will {
            topic: mqtt_topic(rng),
            payload: b"offline".to_vec(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::new(),
        }),
        properties: if version == ProtocolVersion::V5 {
            mqtt_properties(rng, false)
        } else {
            Properties::new()
        },
    });
    let mut packets = vec![connect];
    for _ in 0..rng.gen_range(0..6) {
        let qos = pick(rng, &[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]);
        let v5 = version == ProtocolVersion::V5;
        packets.push(match rng.gen_range(0..6) {
            0..=2 => Packet::Publish(Publish {
                dup: false,
                qos,
                retain: chance(rng, 0.1),
                topic: mqtt_topic(rng),
                packet_id: (qos != QoS::AtMostOnce).then(|| rng.gen_range(1..100)),
                properties: if v5 {
                    mqtt_properties(rng, true)
                } else {
                    Properties::new()
                },
                payload: generate::odd_bytes(rng, 20),
            }),
            3 => Packet::Subscribe(Subscribe {
                packet_id: rng.gen_range(1..100),
                properties: Properties::new(),
                filters: (0..rng.gen_range(1..3))
                    .map(|_| Subscription {
                        filter: mqtt_topic(rng),
                        options: SubscriptionOptions::qos(qos),
                    })
                    .collect(),
            }),
            4 => Packet::Unsubscribe(Unsubscribe {
                packet_id: rng.gen_range(1..100),
                properties: Properties::new(),
                filters: vec![mqtt_topic(rng)],
            }),
            _ => pick(
                rng,
                &[
                    Packet::PingReq,
                    Packet::Disconnect(Disconnect {
                        reason_code: 0,
                        properties: Properties::new(),
                    }),
                ],
            ),
        });
    }
    let mut bytes = Vec::new();
    for packet in &packets {
        // Invalid combinations (an empty topic without alias, say) do not encode: the raw
        // mutations below cover bad bytes.
        if let Ok(encoded) = encode(packet, version) {
            bytes.extend(encoded);
        }
    }
    mutate_stream(rng, &mut bytes);
    (bytes, version)
}

/// Breaks a stream now and then: a flipped byte (lengths, flags, properties), a cut, garbage,
/// an oversized remaining length.
fn mutate_stream(rng: &mut Rng, bytes: &mut Vec<u8>) {
    match rng.gen_range(0..12) {
        0 if !bytes.is_empty() => {
            let i = rng.gen_range(0..bytes.len());
            bytes[i] = rng.gen();
        }
        1 => {
            let cut = rng.gen_range(0..=bytes.len());
            bytes.truncate(cut);
        }
        2 => {
            let at = rng.gen_range(0..=bytes.len());
            let garbage = generate::odd_bytes(rng, 16);
            bytes.splice(at..at, garbage);
        }
        3 => bytes.extend([0x30, 0xFF, 0xFF, 0xFF, 0x7F]),
        4 if bytes.len() > 1 => {
            // A remaining-length byte changed.
            bytes[1] = bytes[1].wrapping_add(rng.gen_range(1..4));
        }
        _ => {}
    }
}

/// The broker's side: CONNACK (accepting or not), SUBACK, PUBLISH deliveries, PINGRESP.
fn mqtt_broker_stream(rng: &mut Rng, version: policy::mqtt::ProtocolVersion) -> Vec<u8> {
    use policy::mqtt::*;
    let v5 = version == ProtocolVersion::V5;
    let mut bytes = encode_connack(version, pick(rng, &[0, 0, 0, 5, 0x87]));
    for _ in 0..rng.gen_range(0..4) {
        let packet = match rng.gen_range(0..4) {
            0 => Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: mqtt_topic(rng),
                packet_id: None,
                properties: if v5 {
                    mqtt_properties(rng, true)
                } else {
                    Properties::new()
                },
                payload: b"x".to_vec(),
            }),
            1 => Packet::SubAck(SubAck {
                packet_id: rng.gen_range(1..100),
                properties: Properties::new(),
                codes: vec![0],
            }),
            2 => Packet::PubAck(PublishResponse {
                packet_id: rng.gen_range(1..100),
                reason_code: 0,
                properties: Properties::new(),
            }),
            _ => Packet::PingResp,
        };
        if let Ok(encoded) = encode(&packet, version) {
            bytes.extend(encoded);
        }
    }
    mutate_stream(rng, &mut bytes);
    bytes
}

/// Splits both streams into segments and interleaves them: the client's CONNECT goes first.
fn mqtt_events(rng: &mut Rng, client: &[u8], broker: &[u8]) -> Vec<NetEvent> {
    let mut client_chunks = generate::chunks(rng, client);
    let mut broker_chunks = generate::chunks(rng, broker);
    client_chunks.reverse();
    broker_chunks.reverse();
    let mut events = Vec::new();
    if let Some(first) = client_chunks.pop() {
        events.push(NetEvent::Downstream {
            data: first,
            end_stream: false,
        });
    }
    while !client_chunks.is_empty() || !broker_chunks.is_empty() {
        let from_client =
            !client_chunks.is_empty() && (broker_chunks.is_empty() || chance(rng, 0.5));
        if from_client {
            let data = client_chunks.pop().unwrap();
            events.push(NetEvent::Downstream {
                data,
                end_stream: false,
            });
        } else {
            let data = broker_chunks.pop().unwrap();
            events.push(NetEvent::Upstream {
                data,
                end_stream: false,
            });
        }
    }
    events
}

/// What policy's session does with the same events: bytes each way, and whether it closed.
fn mqtt_expected(
    acl: &policy::mqtt_acl::MqttAcl,
    connection_id: u64,
    events: &[NetEvent],
) -> (Vec<u8>, Vec<u8>, bool) {
    use policy::mqtt_acl::{Env, Session};
    let mut session = Session::new(acl, None, connection_id);
    let env = Env {
        policy: acl,
        now: run::START_SECS,
    };
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for event in events {
        let (out, sink) = match event {
            NetEvent::Downstream { data, .. } => (session.on_client_bytes(data, &env), &mut up),
            NetEvent::Upstream { data, .. } => (session.on_broker_bytes(data, &env), &mut down),
            NetEvent::AdvanceClock { .. } => continue,
        };
        if out.close.is_some() {
            return (up, down, true);
        }
        sink.extend(out.forward);
    }
    (up, down, false)
}

#[test]
fn mqtt_acl() {
    let settings = run::settings(1000);
    let mut report = Report::new("mqtt-acl", &settings);
    let config = mqtt_config();
    let acl = policy::mqtt_acl::MqttAcl::from_json(config.as_bytes())
        .expect("the fuzz configuration is valid");
    let build = || {
        run::chain(
            &[("mqtt_acl.wasm", &config, false)],
            &[],
            Box::new(NoCallouts),
        )
    };
    let mut chain = build();
    report.vms_started += 1;
    let mut agreed = 0u64;
    for case in settings.case_numbers() {
        let mut rng = settings.rng("mqtt-acl", case);
        let (client, version) = mqtt_client_stream(&mut rng);
        let broker = mqtt_broker_stream(&mut rng, version);
        let events = mqtt_events(&mut rng, &client, &broker);
        let connection_id = case + 1;
        let properties: BTreeMap<String, Vec<u8>> = [(
            "connection.id".to_string(),
            connection_id.to_le_bytes().to_vec(),
        )]
        .into();
        report.cases += 1;
        let outcome = chain.connection(properties, &events);
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let describe = || {
            events
                .iter()
                .map(|e| match e {
                    NetEvent::Downstream { data, .. } => {
                        format!("{{ downstream_hex = \"{}\" }}", hex(data))
                    }
                    NetEvent::Upstream { data, .. } => {
                        format!("{{ upstream_hex = \"{}\" }}", hex(data))
                    }
                    NetEvent::AdvanceClock { millis } => {
                        format!("{{ advance_clock_ms = {millis} }}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",\n  ")
        };
        if let Some(why) = failure(&chain) {
            report.finding(
                case,
                None,
                format!("VM failed ({why}); events [\n  {}\n]", describe()),
            );
            report.note_usage(&mut chain);
            chain = build();
            report.vms_started += 1;
            continue;
        }
        let (up, down, closed) = mqtt_expected(&acl, connection_id, &events);
        if (up.as_slice(), down.as_slice(), closed)
            != (
                outcome.to_upstream.as_slice(),
                outcome.to_downstream.as_slice(),
                outcome.closed_by_filter,
            )
        {
            report.finding(
                case,
                None,
                format!(
                    "mqtt-acl differs from policy's session:\n  upstream {} vs {}\n  downstream {} vs {}\n  closed {} vs {closed}\n  events [\n  {}\n]",
                    hex(&outcome.to_upstream), hex(&up), hex(&outcome.to_downstream), hex(&down),
                    outcome.closed_by_filter, describe()
                ),
            );
        } else {
            agreed += 1;
        }
    }
    report.check_budget(u64::MAX, &mut chain, BUDGET);
    println!("mqtt-acl: {agreed} connections byte-for-byte equal to policy's session");
    report.finish();
}
