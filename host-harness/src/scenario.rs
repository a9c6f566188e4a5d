//! Scenario files: a chain of filters, the clusters they call, and a sequence of steps with
//! expected outcomes. Format: TOML (see tests/scenarios/README.md for the reference).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;

use crate::abi::Pairs;
use crate::chain::{header, CalloutAnswer, CalloutResolver, Chain, HttpOutcome, HttpRequest};
use crate::chain::{CalloutRecord, MultiNetEvent, NetEvent, NetOutcome, UpstreamResponse};
use crate::host::{CallResponse, PendingCall};
use crate::shared::{MetricValue, Shared};
use crate::vm::{FailurePolicy, Limits, PluginSpec, Runtime};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Clock start, seconds since the epoch (default 2026-01-01T00:00:00Z).
    #[serde(default = "default_start")]
    pub clock_start: u64,
    #[serde(default, rename = "filter")]
    pub filters: Vec<FilterDef>,
    #[serde(default, rename = "cluster")]
    pub clusters: BTreeMap<String, ClusterDef>,
    #[serde(default)]
    pub upstream: UpstreamDef,
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
}

fn default_start() -> u64 {
    1_767_225_600
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FilterDef {
    pub name: String,
    /// A bare file name is looked up in the wasm directory; a path is relative to the scenario.
    pub wasm: String,
    #[serde(default)]
    pub root_id: String,
    #[serde(default)]
    pub vm_id: String,
    /// Configuration as a TOML table, handed to the plugin as JSON.
    pub config: Option<toml::Value>,
    /// Configuration as a raw string, handed over as is (for malformed-config scenarios).
    pub config_json: Option<String>,
    pub fuel: Option<u64>,
    pub memory_mb: Option<usize>,
    /// The configuration must be rejected (every request then gets 503).
    #[serde(default)]
    pub expect_rejected: bool,
    /// A log line written while the filter starts must contain this (e.g. why it refused its
    /// configuration).
    pub expect_log: Option<String>,
    /// Envoy's plugin option of that name (default false, as in Envoy).
    #[serde(default)]
    pub allow_on_headers_stop_iteration: bool,
    /// Envoy's `failure_policy` after a trap: "reload" (default, as our templates) or
    /// "fail_closed".
    #[serde(default)]
    pub failure_policy: FailurePolicyDef,
    /// With "reload": how long after the VM's last load a request may start a fresh VM
    /// (default 1000, Envoy's backoff base).
    pub reload_backoff_ms: Option<u64>,
    /// The VM's environment variables (WASI `environ`), as Envoy's
    /// `vm_config.environment_variables` gives them: `{ NAME = "value" }`.
    #[serde(default)]
    pub vm_env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicyDef {
    #[default]
    Reload,
    FailClosed,
}

fn failure_policy(def: &FilterDef) -> Result<FailurePolicy> {
    match (def.failure_policy, def.reload_backoff_ms) {
        (FailurePolicyDef::Reload, backoff) => Ok(FailurePolicy::Reload {
            backoff_ms: backoff.unwrap_or(FailurePolicy::DEFAULT_RELOAD_BACKOFF_MS),
        }),
        (FailurePolicyDef::FailClosed, None) => Ok(FailurePolicy::FailClosed),
        (FailurePolicyDef::FailClosed, Some(_)) => bail!(
            "filter {}: reload_backoff_ms goes with failure_policy = \"reload\"",
            def.name
        ),
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ClusterDef {
    /// Forward callouts to a real HTTP server, e.g. "http://127.0.0.1:8080".
    pub live: Option<String>,
    #[serde(default, rename = "response")]
    pub responses: Vec<CannedResponse>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct CannedResponse {
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    /// Matches only calls whose body contains this text (e.g. the token being introspected).
    pub body_contains: Option<String>,
    /// Matches only calls carrying each of these headers with exactly this value (names in
    /// any case; e.g. the `authorization` a token request must send).
    #[serde(default)]
    pub request_headers: BTreeMap<String, HeaderValue>,
    /// Answer at most this many calls, then let later entries match (e.g. key rotation).
    pub times: Option<u32>,
    #[serde(default = "ok_status")]
    pub status: u32,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub body: String,
    /// The body as hex instead (any bytes, e.g. a Latin-1 answer); replaces `body`.
    #[serde(default)]
    pub body_hex: Option<HexBytes>,
    #[serde(default)]
    pub delay_ms: u64,
    /// "reset" (the guest sees zero headers) or "timeout" (Envoy's 504 after the timeout).
    pub fail: Option<String>,
}

fn ok_status() -> u32 {
    200
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct UpstreamDef {
    #[serde(default = "ok_status")]
    pub status: u32,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default = "empty_json")]
    pub body: String,
    /// Response trailers (the body then ends without end_of_stream, as in HTTP/2 or gRPC).
    #[serde(default)]
    pub trailers: Headers,
}

fn upstream_response(def: &UpstreamDef) -> UpstreamResponse {
    UpstreamResponse {
        status: def.status,
        headers: def.headers.pairs(),
        body: def.body.clone().into_bytes(),
        trailers: def.trailers.pairs(),
    }
}

fn empty_json() -> String {
    "{}".into()
}

impl Default for UpstreamDef {
    fn default() -> Self {
        UpstreamDef {
            status: 200,
            headers: Headers::default(),
            body: empty_json(),
            trailers: Headers::default(),
        }
    }
}

/// Headers as a table (`{ name = "value" }`) or, to repeat a name, a list of pairs.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum Headers {
    Table(BTreeMap<String, HeaderValue>),
    Pairs(Vec<(String, HeaderValue)>),
}

/// A header value: a string (its UTF-8 bytes), or `{ hex = "636166e9" }` for any bytes (a
/// Latin-1 `caf\xE9`, obs-text Envoy accepts in HTTP/1.1).
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(try_from = "RawHeaderValue")]
pub struct HeaderValue(pub Vec<u8>);

#[derive(Deserialize)]
#[serde(untagged)]
enum RawHeaderValue {
    Text(String),
    Hex { hex: String },
}

impl TryFrom<RawHeaderValue> for HeaderValue {
    type Error = String;
    fn try_from(raw: RawHeaderValue) -> std::result::Result<Self, String> {
        match raw {
            RawHeaderValue::Text(text) => Ok(HeaderValue(text.into_bytes())),
            RawHeaderValue::Hex { hex: digits } => hex(&digits)
                .map(HeaderValue)
                .map_err(|e| format!("header value: {e}")),
        }
    }
}

/// Bytes written as hex digits (whitespace allowed), checked when the scenario is read.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(try_from = "String")]
pub struct HexBytes(pub Vec<u8>);

impl TryFrom<String> for HexBytes {
    type Error = String;
    fn try_from(digits: String) -> std::result::Result<Self, String> {
        hex(&digits).map(HexBytes).map_err(|e| e.to_string())
    }
}

impl std::fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(f, "{text:?}"),
            Err(_) => {
                write!(f, "{{hex = \"")?;
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                write!(f, "\"}}")
            }
        }
    }
}

impl Default for Headers {
    fn default() -> Self {
        Headers::Pairs(Vec::new())
    }
}

impl Headers {
    fn pairs(&self) -> Pairs {
        match self {
            Headers::Table(t) => t
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.0.clone()))
                .collect(),
            Headers::Pairs(p) => p
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.0.clone()))
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub name: String,
    pub request: Option<RequestDef>,
    /// Requests in flight at the same time (see [`ConcurrentDef`]).
    #[serde(default)]
    pub concurrent: Vec<ConcurrentDef>,
    pub connection: Option<ConnectionDef>,
    /// Several TCP connections open at once (see [`ConnectionsDef`]); their events are the
    /// step's `events`.
    #[serde(default)]
    pub connections: Vec<ConnectionsDef>,
    /// The events of `connections`, each naming its connection (`conn`).
    #[serde(default)]
    pub events: Vec<NetEventDef>,
    pub advance_clock_ms: Option<u64>,
    pub reconfigure: Option<ReconfigureDef>,
    /// What the upstream answers in this step, instead of the scenario's `[upstream]`.
    pub upstream: Option<UpstreamDef>,
    #[serde(default)]
    pub expect: Expect,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RequestDef {
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default = "authority")]
    pub authority: String,
    #[serde(default = "scheme")]
    pub scheme: String,
    #[serde(default)]
    pub headers: Headers,
    pub body: Option<String>,
    #[serde(default)]
    pub body_chunks: Vec<String>,
    #[serde(default)]
    pub trailers: Headers,
    #[serde(default)]
    pub tls: TlsDef,
    /// Extra properties by dotted name, as strings.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Repeat the request this many times (all must meet the expectation).
    pub repeat: Option<u32>,
}

fn get() -> String {
    "GET".into()
}
fn authority() -> String {
    "broker.example".into()
}
fn scheme() -> String {
    "http".into()
}

/// One of several requests in flight at once: all their downstream data arrives before any
/// callout is answered.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrentDef {
    pub request: RequestDef,
    /// The client goes away before any callout is answered.
    #[serde(default)]
    pub abandon: bool,
    /// What this request must see (step-level `expect` checks callouts, metrics and logs).
    #[serde(default)]
    pub expect: Expect,
}

/// The downstream connection's TLS facts, as Envoy exposes them in `connection.*`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TlsDef {
    #[serde(default)]
    pub mtls: bool,
    pub subject_peer_certificate: Option<String>,
    pub uri_san_peer_certificate: Option<String>,
    pub dns_san_peer_certificate: Option<String>,
    pub sha256_peer_certificate_digest: Option<String>,
    pub tls_version: Option<String>,
    pub source_address: Option<String>,
}

impl TlsDef {
    fn properties(&self) -> BTreeMap<String, Vec<u8>> {
        let mut p = BTreeMap::new();
        p.insert("connection.mtls".into(), vec![self.mtls as u8]);
        let strings = [
            (
                "connection.subject_peer_certificate",
                &self.subject_peer_certificate,
            ),
            (
                "connection.uri_san_peer_certificate",
                &self.uri_san_peer_certificate,
            ),
            (
                "connection.dns_san_peer_certificate",
                &self.dns_san_peer_certificate,
            ),
            (
                "connection.sha256_peer_certificate_digest",
                &self.sha256_peer_certificate_digest,
            ),
            ("connection.tls_version", &self.tls_version),
            ("source.address", &self.source_address),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                p.insert(key.into(), v.clone().into_bytes());
            }
        }
        p
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConnectionDef {
    #[serde(default)]
    pub tls: TlsDef,
    pub events: Vec<NetEventDef>,
}

/// One of several connections open at once in a step.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsDef {
    /// Events name the connection by this.
    pub name: String,
    #[serde(default)]
    pub tls: TlsDef,
    /// What this connection must see (data, closed); the step's `expect` checks callouts,
    /// metrics and logs.
    #[serde(default)]
    pub expect: Expect,
}

/// One thing that happens on a TCP connection. Data is given as text or hex.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetEventDef {
    /// With `connections`: the connection it happens on.
    pub conn: Option<String>,
    /// With `connections`: every callout made so far is answered now.
    #[serde(default)]
    pub answer_callouts: bool,
    /// With `connections`: the client closes the connection.
    #[serde(default)]
    pub close: bool,
    pub downstream: Option<String>,
    pub downstream_hex: Option<String>,
    pub upstream: Option<String>,
    pub upstream_hex: Option<String>,
    pub advance_clock_ms: Option<u64>,
    #[serde(default)]
    pub end_stream: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconfigureDef {
    pub filter: String,
    pub config: Option<toml::Value>,
    pub config_json: Option<String>,
    pub wasm: Option<String>,
    #[serde(default = "yes")]
    pub expect_accepted: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub status: Option<u32>,
    /// Whether the request (or any of it) reached the upstream.
    pub upstream: Option<bool>,
    #[serde(default)]
    pub upstream_headers: BTreeMap<String, HeaderValue>,
    #[serde(default)]
    pub upstream_headers_absent: Vec<String>,
    pub upstream_body: Option<String>,
    #[serde(default)]
    pub response_headers: BTreeMap<String, HeaderValue>,
    #[serde(default)]
    pub response_headers_absent: Vec<String>,
    pub body: Option<String>,
    pub body_contains: Option<String>,
    /// Every field given must be present in the JSON body with this value.
    pub body_json: Option<toml::Value>,
    pub callouts: Option<usize>,
    /// The most test-clock time (ms) the step's requests or connections may take, from after
    /// `advance_clock_ms`: time passes only when nothing else moves (to the next tick, or by a
    /// callout's `delay_ms`), so this bounds how long a waiting request waited for a tick.
    pub elapsed_ms_at_most: Option<u64>,
    /// How often the filters called these host functions during the step (by import name,
    /// `proxy_set_buffer_bytes`; summed over every filter): what the request cost in
    /// crossings, or whether a filter wrote a buffer or a header at all.
    #[serde(default)]
    pub host_calls: BTreeMap<String, u64>,
    pub log_contains: Option<String>,
    /// Counter or gauge values (a histogram compares its number of samples), as Envoy's stats
    /// show them once the filters flushed what they counted (they hold counts back until their
    /// tick; the harness asks them to flush before reading).
    #[serde(default)]
    pub metrics: BTreeMap<String, i64>,
    /// The same, as the host holds them right now, before any flush the step did not cause:
    /// what Envoy's stats show between two ticks.
    #[serde(default)]
    pub metrics_unflushed: BTreeMap<String, i64>,
    // TCP
    pub upstream_data: Option<String>,
    pub upstream_data_hex: Option<String>,
    pub downstream_data: Option<String>,
    pub downstream_data_hex: Option<String>,
    pub closed: Option<bool>,
}

/// One step's verdict.
#[derive(Debug)]
pub struct StepReport {
    pub name: String,
    pub failures: Vec<String>,
    /// What the step's request (its first repetition) got, for `host-harness run --outcomes`.
    pub request: Option<RequestOutcome>,
}

/// One request's outcome as a client and the broker saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RequestOutcome {
    pub status: u32,
    /// Whether the request reached the upstream.
    pub upstream: bool,
    /// The `error` field of an NGSI error body, if the answer had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RequestOutcome {
    fn of(outcome: &HttpOutcome) -> Self {
        let error = serde_json::from_slice::<serde_json::Value>(&outcome.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
        RequestOutcome {
            status: outcome.status,
            upstream: outcome.upstream.is_some(),
            error,
        }
    }
}

/// A scenario's verdicts, or why it could not run.
#[derive(Debug)]
pub struct ScenarioReport {
    pub file: PathBuf,
    pub name: String,
    pub steps: Vec<StepReport>,
    pub error: Option<String>,
}

impl ScenarioReport {
    pub fn passed(&self) -> usize {
        self.steps.iter().filter(|s| s.failures.is_empty()).count()
    }
    pub fn failed(&self) -> usize {
        self.steps.len() - self.passed() + usize::from(self.error.is_some())
    }
}

pub struct RunOptions {
    pub wasm_dir: PathBuf,
    pub echo_logs: bool,
}

pub fn load(path: &Path) -> Result<Scenario> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Runs one scenario file.
pub fn run_file(runtime: &Arc<Runtime>, path: &Path, options: &RunOptions) -> ScenarioReport {
    let mut report = ScenarioReport {
        file: path.to_path_buf(),
        name: path.display().to_string(),
        steps: Vec::new(),
        error: None,
    };
    let scenario = match load(path) {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(format!("{e:#}"));
            return report;
        }
    };
    report.name = scenario.name.clone();
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    if let Err(e) = run(runtime, &scenario, &base, options, &mut report.steps) {
        report.error = Some(format!("{e:#}"));
    }
    report
}

fn resolve_wasm(name: &str, base: &Path, options: &RunOptions) -> PathBuf {
    if name.contains('/') {
        base.join(name)
    } else {
        options.wasm_dir.join(name)
    }
}

fn config_bytes(config: &Option<toml::Value>, raw: &Option<String>) -> Result<Vec<u8>> {
    match (config, raw) {
        (Some(_), Some(_)) => bail!("give either config or config_json, not both"),
        (Some(value), None) => Ok(serde_json::to_vec(value)?),
        (None, Some(raw)) => Ok(raw.clone().into_bytes()),
        (None, None) => Ok(b"{}".to_vec()),
    }
}

fn plugin_spec(def: &FilterDef, base: &Path, options: &RunOptions) -> Result<PluginSpec> {
    let mut limits = Limits::default();
    if let Some(fuel) = def.fuel {
        limits.fuel_per_call = fuel;
    }
    if let Some(mb) = def.memory_mb {
        limits.memory_bytes = mb << 20;
    }
    Ok(PluginSpec {
        name: def.name.clone(),
        root_id: def.root_id.clone(),
        vm_id: def.vm_id.clone(),
        wasm: resolve_wasm(&def.wasm, base, options),
        configuration: config_bytes(&def.config, &def.config_json)
            .with_context(|| format!("filter {}", def.name))?,
        vm_configuration: Vec::new(),
        limits,
        allow_on_headers_stop_iteration: def.allow_on_headers_stop_iteration,
        failure_policy: failure_policy(def)?,
        vm_env: def
            .vm_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

fn run(
    runtime: &Arc<Runtime>,
    scenario: &Scenario,
    base: &Path,
    options: &RunOptions,
    reports: &mut Vec<StepReport>,
) -> Result<()> {
    let shared = Arc::new(Shared::new(
        scenario.clock_start * 1_000_000_000,
        options.echo_logs,
    ));
    let clusters: HashSet<String> = scenario.clusters.keys().cloned().collect();
    let resolver = ScenarioResolver {
        clusters: scenario.clusters.clone(),
        used: BTreeMap::new(),
    };
    let mut chain = Chain::new(
        runtime.clone(),
        shared.clone(),
        clusters,
        Box::new(resolver),
    );
    let mut specs = Vec::new();
    for def in &scenario.filters {
        let spec = plugin_spec(def, base, options)?;
        specs.push(spec.clone());
        let logs_before = shared.log_count();
        let vm = chain.add_filter(spec)?;
        let rejected = !vm.is_serving();
        let mut failures = Vec::new();
        let unexpectedly_refused = rejected && !def.expect_rejected;
        if rejected != def.expect_rejected {
            failures.push(match &vm.failure {
                Some(f) => format!("filter {} did not start: {f}", def.name),
                None => format!(
                    "filter {} accepted a configuration it should reject",
                    def.name
                ),
            });
        }
        if unexpectedly_refused {
            // The filter's own words say why (without --verbose), and the steps are not run:
            // every request would only get the 503 of a plugin that is not serving.
            failures.extend(
                shared
                    .logs_since(logs_before)
                    .iter()
                    .map(|l| format!("{} said: {}", l.plugin, l.message)),
            );
            failures.push(format!(
                "{} steps not run (a filter that refused its configuration answers every request with 503)",
                scenario.steps.len()
            ));
        }
        if let Some(want) = &def.expect_log {
            let logs = shared.logs_since(logs_before);
            if !logs.iter().any(|l| l.message.contains(want.as_str())) {
                let seen: Vec<String> = logs.iter().map(|l| l.message.clone()).collect();
                failures.push(format!(
                    "no start-up log line contains {want:?}; logged {seen:?}"
                ));
            }
        }
        reports.push(StepReport {
            name: format!("load filter {}", def.name),
            failures,
            request: None,
        });
        if unexpectedly_refused {
            return Ok(());
        }
    }
    let scenario_upstream = upstream_response(&scenario.upstream);
    for (n, step) in scenario.steps.iter().enumerate() {
        let step_upstream = step.upstream.as_ref().map(upstream_response);
        let upstream = step_upstream.as_ref().unwrap_or(&scenario_upstream);
        let name = if step.name.is_empty() {
            format!("step {}", n + 1)
        } else {
            step.name.clone()
        };
        let logs_before = shared.log_count();
        let mut failures = Vec::new();
        if options.echo_logs {
            // The filters' log lines (echoed as they happen) then sit under their step.
            eprintln!("-- {name}");
        }
        if let Some(ms) = step.advance_clock_ms {
            chain.advance_clock(ms);
        }
        if let Some(re) = &step.reconfigure {
            reconfigure(&mut chain, &mut specs, re, base, options, &mut failures)?;
        }
        let host_calls_before = host_calls(&chain);
        let started_nanos = shared.now_nanos();
        let mut request_outcome = None;
        if let Some(req) = &step.request {
            for _ in 0..req.repeat.unwrap_or(1).max(1) {
                let outcome = chain.http(http_request(req), upstream);
                check_http(&step.expect, &outcome, &mut failures);
                request_outcome.get_or_insert_with(|| RequestOutcome::of(&outcome));
            }
        }
        if !step.concurrent.is_empty() {
            let requests = step
                .concurrent
                .iter()
                .map(|c| (http_request(&c.request), c.abandon))
                .collect();
            let outcomes = chain.http_concurrent(requests, upstream);
            for (n, (def, outcome)) in step.concurrent.iter().zip(&outcomes).enumerate() {
                let mut mine = Vec::new();
                check_http(&def.expect, outcome, &mut mine);
                failures.extend(mine.into_iter().map(|f| format!("request {}: {f}", n + 1)));
            }
            if let (Some(n), Some(first)) = (step.expect.callouts, outcomes.first()) {
                if first.callouts.len() != n {
                    failures.push(format!(
                        "expected {n} callouts in this step, got {}",
                        first.callouts.len()
                    ));
                }
            }
        }
        if let Some(conn) = &step.connection {
            let events = conn
                .events
                .iter()
                .map(net_event)
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("step {name}"))?;
            let outcome = chain.connection(conn.tls.properties(), &events);
            check_net(&step.expect, &outcome, &mut failures)?;
            check_callouts(step.expect.callouts, &outcome.callouts, &mut failures);
        }
        if !step.connections.is_empty() {
            let events = multi_net_events(&step.connections, &step.events)
                .with_context(|| format!("step {name}"))?;
            let properties = step
                .connections
                .iter()
                .map(|c| c.tls.properties())
                .collect();
            let (outcomes, made) = chain.connections(properties, &events);
            for (def, outcome) in step.connections.iter().zip(&outcomes) {
                let mut mine = Vec::new();
                check_net(&def.expect, outcome, &mut mine)?;
                failures.extend(
                    mine.into_iter()
                        .map(|f| format!("connection {}: {f}", def.name)),
                );
            }
            check_callouts(step.expect.callouts, &made, &mut failures);
        } else if !step.events.is_empty() {
            bail!("step {name}: events without connections (a single connection's events go in [step.connection])");
        }
        if let Some(most) = step.expect.elapsed_ms_at_most {
            let took = shared.now_nanos().saturating_sub(started_nanos) / 1_000_000;
            if took > most {
                failures.push(format!(
                    "the step took {took} ms of test-clock time, expected at most {most} ms"
                ));
            }
        }
        // Host calls first: the flush below is the harness's, not the step's.
        check_host_calls(
            &step.expect.host_calls,
            &host_calls_before,
            &host_calls(&chain),
            &mut failures,
        );
        check_metrics(&step.expect.metrics_unflushed, &shared, &mut failures);
        if !step.expect.metrics.is_empty() {
            chain.flush_counters();
        }
        check_common(&step.expect, &shared, logs_before, &mut failures);
        reports.push(StepReport {
            name,
            failures,
            request: request_outcome,
        });
    }
    Ok(())
}

fn reconfigure(
    chain: &mut Chain,
    specs: &mut [PluginSpec],
    re: &ReconfigureDef,
    base: &Path,
    options: &RunOptions,
    failures: &mut Vec<String>,
) -> Result<()> {
    let index = specs
        .iter()
        .position(|s| s.name == re.filter)
        .ok_or_else(|| anyhow!("reconfigure: no filter named {}", re.filter))?;
    let mut spec = specs[index].clone();
    if re.config.is_some() || re.config_json.is_some() {
        spec.configuration = config_bytes(&re.config, &re.config_json)?;
    }
    if let Some(wasm) = &re.wasm {
        spec.wasm = resolve_wasm(wasm, base, options);
    }
    match chain.reconfigure(index, spec.clone())? {
        Ok(()) => {
            specs[index] = spec;
            if !re.expect_accepted {
                failures.push(format!("new configuration of {} was accepted", re.filter));
            }
        }
        Err(why) => {
            if re.expect_accepted {
                failures.push(format!(
                    "new configuration of {} rejected: {why}",
                    re.filter
                ));
            }
        }
    }
    Ok(())
}

fn http_request(def: &RequestDef) -> HttpRequest {
    let mut headers: Pairs = vec![
        (":method".into(), def.method.clone().into_bytes()),
        (":path".into(), def.path.clone().into_bytes()),
        (":authority".into(), def.authority.clone().into_bytes()),
        (":scheme".into(), def.scheme.clone().into_bytes()),
    ];
    headers.extend(def.headers.pairs());
    let mut body: Vec<Vec<u8>> = def
        .body_chunks
        .iter()
        .map(|c| c.clone().into_bytes())
        .collect();
    if let Some(b) = &def.body {
        body.insert(0, b.clone().into_bytes());
    }
    if !body.is_empty() && header(&headers, "content-length").is_none() {
        let len: usize = body.iter().map(Vec::len).sum();
        headers.push(("content-length".into(), len.to_string().into_bytes()));
    }
    let mut properties = def.tls.properties();
    for (k, v) in &def.properties {
        properties.insert(k.clone(), v.clone().into_bytes());
    }
    HttpRequest {
        headers,
        body,
        trailers: def.trailers.pairs(),
        properties,
    }
}

fn hex(text: &str) -> Result<Vec<u8>> {
    let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !clean.len().is_multiple_of(2) {
        bail!("hex data has an odd number of digits");
    }
    (0..clean.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&clean[i..i + 2], 16).map_err(|e| anyhow!("bad hex {clean}: {e}"))
        })
        .collect()
}

/// The events of several connections: each names its connection (`conn`), except
/// `answer_callouts` and clock steps.
fn multi_net_events(conns: &[ConnectionsDef], defs: &[NetEventDef]) -> Result<Vec<MultiNetEvent>> {
    let index = |name: &str| {
        conns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| anyhow!("no connection named {name:?} in [[step.connections]]"))
    };
    for (n, c) in conns.iter().enumerate() {
        if conns[..n].iter().any(|d| d.name == c.name) {
            bail!("two connections named {:?}", c.name);
        }
    }
    defs.iter()
        .map(|def| {
            if def.answer_callouts {
                return Ok(MultiNetEvent::AnswerCallouts);
            }
            if def.conn.is_none() {
                if let Some(millis) = def.advance_clock_ms {
                    return Ok(MultiNetEvent::On(0, NetEvent::AdvanceClock { millis }));
                }
                bail!("an event of [[step.connections]] names its connection (conn = \"...\")");
            }
            let c = index(def.conn.as_deref().unwrap_or_default())?;
            if def.close {
                return Ok(MultiNetEvent::Close(c));
            }
            Ok(MultiNetEvent::On(c, net_event_data(def)?))
        })
        .collect()
}

fn net_event(def: &NetEventDef) -> Result<NetEvent> {
    if def.conn.is_some() || def.answer_callouts || def.close {
        bail!("conn, answer_callouts and close are for [[step.connections]] events");
    }
    net_event_data(def)
}

fn net_event_data(def: &NetEventDef) -> Result<NetEvent> {
    let text = |s: &Option<String>| s.as_ref().map(|s| s.clone().into_bytes());
    let hexed = |s: &Option<String>| s.as_deref().map(hex).transpose();
    if let Some(data) = text(&def.downstream).or(hexed(&def.downstream_hex)?) {
        return Ok(NetEvent::Downstream {
            data,
            end_stream: def.end_stream,
        });
    }
    if let Some(data) = text(&def.upstream).or(hexed(&def.upstream_hex)?) {
        return Ok(NetEvent::Upstream {
            data,
            end_stream: def.end_stream,
        });
    }
    if let Some(millis) = def.advance_clock_ms {
        return Ok(NetEvent::AdvanceClock { millis });
    }
    bail!("a connection event needs downstream, upstream or advance_clock_ms")
}

fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    // Cut by characters: binary data (WebSocket frames) makes replacement characters, and a
    // byte index could fall inside one.
    if text.chars().count() > 300 {
        let head: String = text.chars().take(300).collect();
        format!("{head}… ({} bytes)", bytes.len())
    } else {
        text.into_owned()
    }
}

fn check_headers(
    what: &str,
    pairs: Option<&Pairs>,
    want: &BTreeMap<String, HeaderValue>,
    absent: &[String],
    failures: &mut Vec<String>,
) {
    for (name, value) in want {
        let got = pairs.and_then(|p| {
            p.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| HeaderValue(v.clone()))
        });
        match got {
            Some(got) if got == *value => {}
            Some(got) => {
                failures.push(format!("{what} header {name}: expected {value}, got {got}"))
            }
            None => failures.push(format!(
                "{what} header {name}: expected {value}, but it is missing"
            )),
        }
    }
    for name in absent {
        if let Some(got) = pairs.and_then(|p| header(p, name)) {
            failures.push(format!(
                "{what} header {name} should be absent, but is {got:?}"
            ));
        }
    }
}

fn check_http(expect: &Expect, outcome: &HttpOutcome, failures: &mut Vec<String>) {
    if outcome.stalled {
        let why = outcome
            .stall_reason
            .as_deref()
            .unwrap_or("nothing resumed it");
        failures.push(format!("the stream stalled: {why}"));
    }
    failures.extend(outcome.contract_violations.iter().cloned());
    if let Some(status) = expect.status {
        if outcome.status != status {
            let detail = if outcome.reset {
                " (stream reset)".to_string()
            } else {
                format!(" (body: {})", show(&outcome.body))
            };
            failures.push(format!(
                "expected status {status}, got {}{detail}",
                outcome.status
            ));
            failures.extend(outcome.hints.iter().map(|h| format!("hint: {h}")));
        }
    }
    let reached = outcome.upstream.is_some();
    if let Some(want) = expect.upstream {
        if want != reached {
            failures.push(if want {
                "expected the request to reach the upstream; it did not".into()
            } else {
                "expected nothing to reach the upstream, but the request did".into()
            });
        }
    }
    let upstream_headers = outcome.upstream.as_ref().map(|u| &u.headers);
    if (!expect.upstream_headers.is_empty() || expect.upstream_body.is_some()) && !reached {
        failures.push("upstream expectations given, but nothing reached the upstream".into());
    } else {
        check_headers(
            "upstream",
            upstream_headers,
            &expect.upstream_headers,
            &expect.upstream_headers_absent,
            failures,
        );
    }
    if let (Some(want), Some(up)) = (&expect.upstream_body, &outcome.upstream) {
        if up.body != want.as_bytes() {
            failures.push(format!(
                "upstream body: expected {want:?}, got {:?}",
                show(&up.body)
            ));
        }
    }
    check_headers(
        "response",
        Some(&outcome.headers),
        &expect.response_headers,
        &expect.response_headers_absent,
        failures,
    );
    if let Some(want) = &expect.body {
        if outcome.body != want.as_bytes() {
            failures.push(format!(
                "body: expected {want:?}, got {:?}",
                show(&outcome.body)
            ));
        }
    }
    if let Some(want) = &expect.body_contains {
        if !String::from_utf8_lossy(&outcome.body).contains(want.as_str()) {
            failures.push(format!(
                "body should contain {want:?}, got {:?}",
                show(&outcome.body)
            ));
        }
    }
    if let Some(want) = &expect.body_json {
        match serde_json::from_slice::<serde_json::Value>(&outcome.body) {
            Ok(got) => {
                let want = serde_json::to_value(want).unwrap_or_default();
                json_subset("body", &want, &got, failures);
            }
            Err(e) => failures.push(format!("body is not JSON ({e}): {:?}", show(&outcome.body))),
        }
    }
    check_callouts(expect.callouts, &outcome.callouts, failures);
}

/// `callouts`: how many callouts the step made.
fn check_callouts(want: Option<usize>, made: &[CalloutRecord], failures: &mut Vec<String>) {
    let Some(n) = want else {
        return;
    };
    if made.len() != n {
        let shown: Vec<String> = made
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c.cluster,
                    header(&c.headers, ":path").unwrap_or_default()
                )
            })
            .collect();
        failures.push(format!(
            "expected {n} callouts, got {}: {shown:?}",
            made.len()
        ));
    }
}

/// Every field of `want` must be in `got` with the same value (recursively for objects).
fn json_subset(
    at: &str,
    want: &serde_json::Value,
    got: &serde_json::Value,
    failures: &mut Vec<String>,
) {
    match (want, got) {
        (serde_json::Value::Object(w), serde_json::Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => json_subset(&format!("{at}.{k}"), wv, gv, failures),
                    None => failures.push(format!("{at}.{k}: expected {wv}, missing")),
                }
            }
        }
        _ if want == got => {}
        _ => failures.push(format!("{at}: expected {want}, got {got}")),
    }
}

fn check_net(expect: &Expect, outcome: &NetOutcome, failures: &mut Vec<String>) -> Result<()> {
    let cases = [
        (
            "upstream",
            &expect.upstream_data,
            &expect.upstream_data_hex,
            &outcome.to_upstream,
        ),
        (
            "downstream",
            &expect.downstream_data,
            &expect.downstream_data_hex,
            &outcome.to_downstream,
        ),
    ];
    for (what, text, hexed, got) in cases {
        let want = match (text, hexed) {
            (Some(t), _) => Some(t.clone().into_bytes()),
            (None, Some(h)) => Some(hex(h)?),
            _ => None,
        };
        if let Some(want) = want {
            if *got != want {
                failures.push(format!(
                    "{what} data: expected {:?}, got {:?}",
                    show(&want),
                    show(got)
                ));
            }
        }
    }
    if let Some(closed) = expect.closed {
        if closed != outcome.closed_by_filter {
            failures.push(format!(
                "expected the connection {}closed by a filter",
                if closed { "" } else { "not " }
            ));
        }
    }
    Ok(())
}

/// Host calls made so far by every filter of the chain, by import name.
fn host_calls(chain: &Chain) -> BTreeMap<&'static str, u64> {
    let mut calls = BTreeMap::new();
    for vm in &chain.filters {
        for (name, n) in vm.state().host_calls.borrow().iter() {
            *calls.entry(*name).or_default() += n;
        }
    }
    calls
}

fn check_host_calls(
    want: &BTreeMap<String, u64>,
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
    failures: &mut Vec<String>,
) {
    for (name, want) in want {
        let count = |calls: &BTreeMap<&'static str, u64>| calls.get(name.as_str()).copied();
        let got = count(after)
            .unwrap_or(0)
            .saturating_sub(count(before).unwrap_or(0));
        if got != *want {
            failures.push(format!(
                "host calls {name}: expected {want} in this step, got {got}"
            ));
        }
    }
}

/// Compares metric values with what the host holds.
fn check_metrics(want: &BTreeMap<String, i64>, shared: &Shared, failures: &mut Vec<String>) {
    for (name, want) in want {
        let got = match shared.metric(name) {
            Some(MetricValue::Counter(v)) => v as i64,
            Some(MetricValue::Gauge(v)) => v,
            Some(MetricValue::Histogram(values)) => values.len() as i64,
            None => {
                failures.push(format!(
                    "metric {name}: expected {want}, but it is not defined"
                ));
                continue;
            }
        };
        if got != *want {
            failures.push(format!("metric {name}: expected {want}, got {got}"));
        }
    }
}

fn check_common(expect: &Expect, shared: &Shared, logs_before: usize, failures: &mut Vec<String>) {
    check_metrics(&expect.metrics, shared, failures);
    if let Some(want) = &expect.log_contains {
        let logs = shared.logs_since(logs_before);
        if !logs.iter().any(|l| l.message.contains(want.as_str())) {
            let seen: Vec<String> = logs.iter().map(|l| l.message.clone()).collect();
            failures.push(format!(
                "no log line contains {want:?}; this step logged {seen:?}"
            ));
        }
    }
}

/// Answers callouts from the scenario's clusters: canned responses matched in order, or a
/// real HTTP server on loopback. Failures are delivered as Envoy delivers them.
struct ScenarioResolver {
    clusters: BTreeMap<String, ClusterDef>,
    /// How often each (cluster, response index) has answered.
    used: BTreeMap<(String, usize), u32>,
}

/// Envoy answers a callout that timed out with a 504 of its own.
fn envoy_timeout() -> CalloutAnswer {
    CalloutAnswer::Response(CallResponse {
        headers: vec![
            (":status".into(), b"504".to_vec()),
            ("content-type".into(), b"text/plain".to_vec()),
        ],
        body: b"upstream request timeout".to_vec(),
        trailers: Vec::new(),
    })
}

/// Envoy answers a callout whose upstream refused the connection with a 503 of its own.
fn envoy_connect_failure() -> CalloutAnswer {
    CalloutAnswer::Response(CallResponse {
        headers: vec![
            (":status".into(), b"503".to_vec()),
            ("content-type".into(), b"text/plain".to_vec()),
        ],
        body: b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            .to_vec(),
        trailers: Vec::new(),
    })
}

impl CalloutResolver for ScenarioResolver {
    fn resolve(&mut self, call: &PendingCall, shared: &Shared) -> CalloutAnswer {
        let Some(cluster) = self.clusters.get(&call.cluster) else {
            return CalloutAnswer::Reset;
        };
        if let Some(base) = &cluster.live {
            return live_call(base, call);
        }
        let method = header(&call.headers, ":method").unwrap_or_default();
        let path = header(&call.headers, ":path").unwrap_or_default();
        let body = String::from_utf8_lossy(&call.body);
        let found = cluster.responses.iter().enumerate().find(|(i, r)| {
            let used = self.used.get(&(call.cluster.clone(), *i)).copied();
            r.method
                .as_ref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&method))
                && r.path_prefix
                    .as_ref()
                    .is_none_or(|p| path.starts_with(p.as_str()))
                && r.body_contains
                    .as_ref()
                    .is_none_or(|b| body.contains(b.as_str()))
                && r.request_headers.iter().all(|(name, want)| {
                    call.headers
                        .iter()
                        .any(|(n, v)| n.eq_ignore_ascii_case(name) && *v == want.0)
                })
                && r.times.is_none_or(|t| used.unwrap_or(0) < t)
        });
        let Some((index, canned)) = found else {
            // No scripted answer: the cluster has no healthy host, as Envoy would say.
            return envoy_connect_failure();
        };
        *self.used.entry((call.cluster.clone(), index)).or_insert(0) += 1;
        let timeout = call.timeout_ms as u64;
        if canned.fail.as_deref() == Some("timeout") || (timeout > 0 && canned.delay_ms >= timeout)
        {
            shared.advance_nanos(timeout * 1_000_000);
            return envoy_timeout();
        }
        shared.advance_nanos(canned.delay_ms * 1_000_000);
        if canned.fail.as_deref() == Some("reset") {
            return CalloutAnswer::Reset;
        }
        let mut headers = vec![(
            ":status".to_string(),
            canned.status.to_string().into_bytes(),
        )];
        headers.extend(canned.headers.pairs());
        CalloutAnswer::Response(CallResponse {
            headers,
            body: match &canned.body_hex {
                Some(bytes) => bytes.0.clone(),
                None => canned.body.clone().into_bytes(),
            },
            trailers: Vec::new(),
        })
    }
}

fn live_call(base: &str, call: &PendingCall) -> CalloutAnswer {
    let method = header(&call.headers, ":method").unwrap_or_else(|| "GET".into());
    let path = header(&call.headers, ":path").unwrap_or_else(|| "/".into());
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let timeout = if call.timeout_ms == 0 {
        None
    } else {
        Some(Duration::from_millis(call.timeout_ms as u64))
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(timeout)
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = ureq::http::Request::builder()
        .method(method.as_str())
        .uri(&url);
    for (k, v) in &call.headers {
        if !k.starts_with(':') && k != "content-length" {
            request = request.header(k.as_str(), v.as_slice());
        }
    }
    let Ok(request) = request.body(call.body.clone()) else {
        return CalloutAnswer::Reset;
    };
    match agent.run(request) {
        Ok(mut response) => {
            let mut headers = vec![(
                ":status".to_string(),
                response.status().as_u16().to_string().into_bytes(),
            )];
            for (k, v) in response.headers() {
                headers.push((k.as_str().to_string(), v.as_bytes().to_vec()));
            }
            let body = response.body_mut().read_to_vec().unwrap_or_default();
            CalloutAnswer::Response(CallResponse {
                headers,
                body,
                trailers: Vec::new(),
            })
        }
        Err(ureq::Error::Timeout(_)) => envoy_timeout(),
        Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => envoy_timeout(),
        Err(ureq::Error::Io(_))
        | Err(ureq::Error::ConnectionFailed)
        | Err(ureq::Error::HostNotFound) => envoy_connect_failure(),
        Err(_) => CalloutAnswer::Reset,
    }
}

/// Prints a report the way `host-harness run` does; returns (passed, failed).
pub fn print_report(report: &ScenarioReport, out: &mut impl std::io::Write) -> (usize, usize) {
    let file = report.file.display();
    let _ = writeln!(out, "== {} ({file})", report.name);
    for step in &report.steps {
        if step.failures.is_empty() {
            let _ = writeln!(out, "PASS {}", step.name);
        } else {
            let _ = writeln!(out, "FAIL {}", step.name);
            for f in &step.failures {
                let _ = writeln!(out, "     - {f}");
            }
        }
    }
    if let Some(e) = &report.error {
        let _ = writeln!(out, "FAIL scenario could not run: {e}");
    }
    (report.passed(), report.failed())
}
