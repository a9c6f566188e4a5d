//! Helpers shared by the integration tests that drive the abi-probe filter through the harness.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use host_harness::abi::Pairs;
use host_harness::chain::{CalloutAnswer, CalloutResolver, Chain, HttpRequest};
use host_harness::host::{CallResponse, PendingCall};
use host_harness::{FailurePolicy, HttpOutcome, Limits, PluginSpec, Runtime, Shared};

/// The clock the tests start at (2023-11-14T22:13:20Z): a plausible wall time, so a guest
/// that checks timestamps sees one.
pub const START_NANOS: u64 = 1_700_000_000_000_000_000;
pub const PLUGIN_NAME: &str = "abi-probe";
pub const VM_ID: &str = "abi-probe-vm";
pub const ROOT_ID: &str = "abi-probe-root";
pub const VM_CONFIGURATION: &str = "abi-probe vm configuration";

/// The probe module. A missing file fails the test: skipping would report green for a
/// contract nobody checked.
pub fn probe_wasm() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip1/release/abi_probe.wasm");
    assert!(
        path.is_file(),
        "{} is missing: build the filters first with `cargo wasm` \
         (cargo build --release --target wasm32-wasip1 -p abi-probe)",
        path.display()
    );
    path
}

/// One engine for the whole test binary: the module is compiled once, not per test.
pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| Arc::new(Runtime::new().expect("wasmtime runtime")))
        .clone()
}

pub fn spec(configuration: &str) -> PluginSpec {
    spec_with_limits(configuration, Limits::default())
}

pub fn spec_with_limits(configuration: &str, limits: Limits) -> PluginSpec {
    PluginSpec {
        name: PLUGIN_NAME.into(),
        root_id: ROOT_ID.into(),
        vm_id: VM_ID.into(),
        wasm: probe_wasm(),
        configuration: configuration.as_bytes().to_vec(),
        vm_configuration: VM_CONFIGURATION.as_bytes().to_vec(),
        limits,
        allow_on_headers_stop_iteration: false,
        failure_policy: FailurePolicy::default(),
        vm_env: Vec::new(),
    }
}

/// A chain with the "backend" cluster and one probe filter; the filter is added even if it
/// rejects its configuration (the tests check how the chain then behaves).
pub fn probe_chain(spec: PluginSpec, resolver: Scripted) -> Chain {
    let shared = Arc::new(Shared::new(START_NANOS, false));
    let clusters: HashSet<String> = ["backend".to_string()].into();
    let mut chain = Chain::new(runtime(), shared, clusters, Box::new(resolver));
    chain.add_filter(spec).expect("probe module loads");
    chain
}

/// Answers callouts per cluster from a script, and keeps every call it was asked.
#[derive(Clone, Default)]
pub struct Scripted {
    answers: HashMap<String, CalloutAnswer>,
    pub calls: Arc<Mutex<Vec<PendingCall>>>,
}

impl Scripted {
    /// Answers nothing: every call is reset.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn answer(mut self, cluster: &str, answer: CalloutAnswer) -> Self {
        self.answers.insert(cluster.to_string(), answer);
        self
    }

    pub fn calls(&self) -> Vec<PendingCall> {
        self.calls.lock().unwrap().clone()
    }
}

impl CalloutResolver for Scripted {
    fn resolve(&mut self, call: &PendingCall, _: &Shared) -> CalloutAnswer {
        self.calls.lock().unwrap().push(call.clone());
        self.answers
            .get(&call.cluster)
            .cloned()
            .unwrap_or(CalloutAnswer::Reset)
    }
}

/// A callout answer with a status, a JSON body and one trailer.
pub fn reply(status: u32, body: &str) -> CalloutAnswer {
    CalloutAnswer::Response(CallResponse {
        headers: vec![
            (":status".into(), status.to_string().into_bytes()),
            ("content-type".into(), b"application/json".to_vec()),
        ],
        body: body.as_bytes().to_vec(),
        trailers: vec![("x-backend-trailer".into(), b"t".to_vec())],
    })
}

pub fn request(method: &str, path: &str) -> HttpRequest {
    HttpRequest {
        headers: pairs(&[
            (":method", method),
            (":path", path),
            (":authority", "probe.local"),
            (":scheme", "http"),
            ("x-request-id", "req-1"),
        ]),
        body: Vec::new(),
        trailers: Vec::new(),
        properties: BTreeMap::new(),
    }
}

pub fn pairs(list: &[(&str, &str)]) -> Pairs {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

pub fn header(pairs: &Pairs, name: &str) -> Option<String> {
    host_harness::chain::header(pairs, name)
}

/// Every `x-probe-*` header that does not say `ok`, as "name: verdict".
pub fn failed_checks(pairs: &Pairs) -> Vec<String> {
    probe_checks(pairs)
        .into_iter()
        .filter(|(_, verdict)| verdict != "ok")
        .map(|(name, verdict)| format!("{name}: {verdict}"))
        .collect()
}

/// The probe's verdicts: `x-probe-<check>` headers, keyed by check name.
pub fn probe_checks(pairs: &Pairs) -> BTreeMap<String, String> {
    pairs
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("x-probe-")
                .map(|name| (name.to_string(), String::from_utf8_lossy(v).into_owned()))
        })
        .collect()
}

/// Explains an outcome in a failing assertion.
pub fn describe(outcome: &HttpOutcome, shared: &Shared) -> String {
    let logs: Vec<String> = shared
        .logs()
        .iter()
        .map(|l| format!("[{}] {}: {}", l.level_name(), l.plugin, l.message))
        .collect();
    format!(
        "status {} local_reply {:?} upstream {} stalled {} reset {}\nlogs:\n{}",
        outcome.status,
        outcome.local_reply.as_ref().map(|r| (r.status, &r.details)),
        outcome.upstream.is_some(),
        outcome.stalled,
        outcome.reset,
        logs.join("\n")
    )
}
