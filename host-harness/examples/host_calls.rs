//! Host calls and guest callbacks per request, for the request `envoy/load-bench.py` sends
//! (a Room list with a cached RS256 token, as wrk sends it through Envoy) and the same stage
//! configurations (`envoy/bench-stages.json`): token-auth alone, the three separate filters,
//! and ngsi-gateway. The counts are exact (they do not depend on the machine's load), so they
//! say what a change saves even when wall-time runs are noisy.
//!
//!     cargo wasm && cargo run -p host-harness --example host_calls [-- --verbose] [--path P]
//!
//! `--path` is the request's path as load-bench's `--paths` names it: `list` (the default, a
//! Room list whose answer device-ownership filters), `entity` (one Room the caller owns) or a
//! path. `--verbose` prints every callback by name. The fuel column is the wasm the filters ran
//! (about one unit per instruction, in wasmtime): their own compute, beside the crossings.
//! `tests/host_calls.rs` holds the counts (of `list`) to upper bounds.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use host_harness::chain::NoCallouts;
use host_harness::{Chain, FailurePolicy, HttpRequest, Limits, PluginSpec, Runtime, Shared};
use host_harness::{HttpOutcome, UpstreamResponse};
use serde_json::Value;

/// Requests measured per chain, after one warm-up request (which fills the token cache).
const REQUESTS: u64 = 10;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_json(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).expect(path);
    serde_json::from_str(&text).expect(path)
}

/// The stage configurations load-bench.py uses, with the fixture keys.
fn stage_configs() -> Value {
    let mut configs = read_json("envoy/bench-stages.json");
    let jwks = read_json("tests/fixtures/jwt/jwks.json");
    for provider in configs["token_auth"]["jwt_providers"]
        .as_array_mut()
        .expect("jwt_providers")
    {
        provider["jwks"] = jwks.clone();
    }
    configs
}

/// load-bench's requests by name (its `PATHS`), or a path as is.
pub fn path_of(name: &str) -> &str {
    match name {
        "list" => "/v2/entities?type=Room&limit=10",
        "entity" => "/v2/entities/urn:ngsi-ld:Room:2?type=Room",
        path => path,
    }
}

/// The request as Envoy hands it to the filters for wrk's GET (Envoy adds
/// `x-forwarded-proto` and `x-request-id`).
fn request(token: &str, path: &str) -> HttpRequest {
    let auth = format!("Bearer {token}");
    let headers = [
        (":authority", "127.0.0.1:10000"),
        (":path", path),
        (":method", "GET"),
        (":scheme", "http"),
        ("authorization", auth.as_str()),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
    ];
    HttpRequest {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..Default::default()
    }
}

/// One filter of a chain: plugin name, wasm file, configuration, decides on the body.
type Filter<'a> = (&'a str, &'a str, &'a Value, bool);

fn chain(runtime: &Arc<Runtime>, filters: &[Filter]) -> Chain {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    let shared = Arc::new(Shared::new(now.as_nanos() as u64, false));
    let mut chain = Chain::new(
        runtime.clone(),
        shared,
        HashSet::new(),
        Box::new(NoCallouts),
    );
    for (name, wasm, config, body) in filters {
        // `$HOST_HARNESS_WASM_DIR` (as for scenarios) measures other builds, e.g. a baseline.
        let dir = std::env::var_os("HOST_HARNESS_WASM_DIR").map_or_else(
            || root().join("target/wasm32-wasip1/release"),
            PathBuf::from,
        );
        let path = dir.join(wasm);
        assert!(path.exists(), "build the filters first: cargo wasm");
        let vm = chain
            .add_filter(PluginSpec {
                name: name.to_string(),
                root_id: String::new(),
                vm_id: String::new(),
                wasm: path,
                configuration: config.to_string().into_bytes(),
                vm_configuration: Vec::new(),
                limits: Limits::default(),
                allow_on_headers_stop_iteration: *body,
                failure_policy: FailurePolicy::default(),
                vm_env: Vec::new(),
            })
            .expect("filter loads");
        assert!(vm.is_serving(), "{name}: {:?}", vm.failure);
    }
    chain
}

/// Every VM's host calls and callbacks so far, by name (fuel under `fuel`).
fn counts(chain: &Chain) -> (BTreeMap<&'static str, u64>, BTreeMap<&'static str, u64>) {
    let (mut imports, mut callbacks) = (BTreeMap::new(), BTreeMap::new());
    for vm in &chain.filters {
        *callbacks.entry(FUEL).or_default() += vm.usage.fuel_total;
        for (name, n) in vm.state().host_calls.borrow().iter() {
            *imports.entry(*name).or_default() += n;
        }
        for (name, n) in &vm.callbacks {
            *callbacks.entry(*name).or_default() += n;
        }
    }
    (imports, callbacks)
}

/// Fuel burned so far by every VM, by callback.
fn fuel_by_export(chain: &Chain) -> BTreeMap<&'static str, u64> {
    let mut fuel = BTreeMap::new();
    for vm in &chain.filters {
        for (name, n) in &vm.fuel_by_export {
            *fuel.entry(*name).or_default() += n;
        }
    }
    fuel
}

fn per_request(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> Vec<(&'static str, f64)> {
    after
        .iter()
        .map(|(name, n)| {
            let delta = n - before.get(name).copied().unwrap_or(0);
            (*name, delta as f64 / REQUESTS as f64)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

/// The key under which [`counts`] keeps the fuel the guests burned (about one unit per wasm
/// instruction): the filters' own compute, beside their host calls.
const FUEL: &str = "fuel";

fn total(counts: &[(&'static str, f64)]) -> f64 {
    counts
        .iter()
        .filter(|(name, _)| *name != FUEL)
        .map(|(_, n)| n)
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

fn fuel(counts: &[(&'static str, f64)]) -> f64 {
    counts
        .iter()
        .find(|(name, _)| *name == FUEL)
        .map_or(0.0, |(_, n)| *n)
}

fn short(name: &str) -> &str {
    name.trim_start_matches("proxy_")
}

/// One chain's figures per request.
pub struct Row {
    pub variant: &'static str,
    /// Host calls by import (`proxy_...`), per request.
    pub imports: Vec<(&'static str, f64)>,
    /// Guest callbacks by export, per request, and the fuel under [`FUEL`].
    pub callbacks: Vec<(&'static str, f64)>,
    /// Fuel per request by callback.
    pub fuel_by_callback: Vec<(&'static str, f64)>,
}

impl Row {
    /// Host calls per request, all imports together.
    pub fn host_calls(&self) -> f64 {
        total(&self.imports)
    }

    /// Host calls per request to `import` (`proxy_set_property`).
    pub fn calls_to(&self, import: &str) -> f64 {
        self.imports
            .iter()
            .find(|(name, _)| *name == import)
            .map_or(0.0, |(_, n)| *n)
    }
}

/// Runs load-bench's request for `path` through each chain (one warm-up, then [`REQUESTS`])
/// and counts.
pub fn measure(path: &str) -> Vec<Row> {
    let runtime = Arc::new(Runtime::new().expect("runtime"));
    let configs = stage_configs();
    let tokens = read_json("tests/fixtures/jwt/tokens.json");
    let token = tokens["valid_rs256"].as_str().expect("valid_rs256");
    let gateway = serde_json::json!({
        "token_auth": configs["token_auth"],
        "device_ownership": configs["device_ownership"],
        "entity_acl": configs["entity_acl"],
    });
    // Without device-ownership: what that stage adds is the difference to `gateway`.
    let gateway_without_ownership = serde_json::json!({
        "token_auth": configs["token_auth"],
        "entity_acl": configs["entity_acl"],
    });
    let passthrough = serde_json::json!({"mode": "passthrough"});
    // token-auth's host calls on an allowed request with no decision (load-bench's `floor`).
    let floor = serde_json::json!({"mode": "identity_floor"});
    let variants: Vec<(&'static str, Vec<Filter>)> = vec![
        (
            "passthrough",
            vec![("example", "example.wasm", &passthrough, false)],
        ),
        ("floor", vec![("example", "example.wasm", &floor, false)]),
        (
            "token_auth",
            vec![(
                "token-auth",
                "token_auth.wasm",
                &configs["token_auth"],
                false,
            )],
        ),
        (
            "separate",
            vec![
                (
                    "token-auth",
                    "token_auth.wasm",
                    &configs["token_auth"],
                    false,
                ),
                (
                    "device-ownership",
                    "device_ownership.wasm",
                    &configs["device_ownership"],
                    true,
                ),
                (
                    "entity-acl",
                    "entity_acl.wasm",
                    &configs["entity_acl"],
                    true,
                ),
            ],
        ),
        (
            "gateway:token_auth+entity_acl",
            vec![(
                "ngsi-gateway",
                "ngsi_gateway.wasm",
                &gateway_without_ownership,
                true,
            )],
        ),
        (
            "gateway",
            vec![("ngsi-gateway", "ngsi_gateway.wasm", &gateway, true)],
        ),
    ];
    // The answer load-bench's Envoy gives (direct_response "[]").
    let upstream = UpstreamResponse {
        body: b"[]".to_vec(),
        ..Default::default()
    };
    let mut rows = Vec::new();
    for (variant, filters) in &variants {
        let mut chain = chain(&runtime, filters);
        let check = |outcome: &HttpOutcome| {
            assert_eq!(outcome.status, 200, "{variant}: {outcome:?}");
        };
        check(&chain.http(request(token, path), &upstream));
        let (imports_before, callbacks_before) = counts(&chain);
        let fuel_before = fuel_by_export(&chain);
        for _ in 0..REQUESTS {
            check(&chain.http(request(token, path), &upstream));
        }
        let (imports_after, callbacks_after) = counts(&chain);
        rows.push(Row {
            variant,
            imports: per_request(&imports_before, &imports_after),
            callbacks: per_request(&callbacks_before, &callbacks_after),
            fuel_by_callback: per_request(&fuel_before, &fuel_by_export(&chain)),
        });
    }
    rows
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let verbose = args.iter().any(|a| a == "--verbose");
    let path = args
        .iter()
        .position(|a| a == "--path")
        .and_then(|i| args.get(i + 1))
        .map_or("list", String::as_str);
    let path = path_of(path);
    println!("request: GET {path}\n");
    println!(
        "| filter chain | host calls per request | guest callbacks per request | \
         wasm fuel per request (~instructions) | host calls by import |"
    );
    println!("|---|---:|---:|---:|---|");
    for row in measure(path) {
        let by_import = row
            .imports
            .iter()
            .map(|(name, n)| format!("{} {n}", short(name)))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {} | {} | {} | {:.0} | {by_import} |",
            row.variant,
            row.host_calls(),
            total(&row.callbacks),
            fuel(&row.callbacks)
        );
        if verbose {
            for (name, n) in row.callbacks.iter().filter(|(name, _)| *name != FUEL) {
                let burned = row
                    .fuel_by_callback
                    .iter()
                    .find(|(f, _)| f == name)
                    .map_or(0.0, |(_, f)| *f);
                println!("|   callback {} | | {n} | {burned:.0} | |", short(name));
            }
        }
    }
}
