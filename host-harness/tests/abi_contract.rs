//! The ABI contract: the abi-probe filter calls every host function the SDK (proxy-wasm 0.2.5,
//! ABI 0.2.1) declares, each with the answer Envoy gives, and reports every verdict as an
//! `x-probe-<check>` header. These tests run it through the harness and hold the harness to
//! those answers.
//!
//! Needs the probe built first: `cargo wasm`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use host_harness::{MetricValue, NetEvent, UpstreamResponse};

use common::*;

/// Every `env` import the SDK declares (proxy-wasm 0.2.5, `src/hostcalls.rs`): the whole ABI
/// 0.2.1 host surface a Rust filter can reach.
const SDK_IMPORTS: [&str; 37] = [
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_get_metric",
    "proxy_record_metric",
    "proxy_increment_metric",
];

/// Checks the probe reports on the request (the upstream sees them). Listed so that a check
/// the probe stopped making fails here instead of passing by absence.
const REQUEST_CHECKS: &[&str] = &[
    // start-up (vm_start, configure), reported again on each request
    "vm-configuration",
    "plugin-configuration",
    "vm-configuration-expected",
    "metric-define",
    "tick-period",
    "queue-register",
    // environment
    "log",
    "log-level",
    "current-time",
    "plugin-configuration-outside-configure",
    "vm-configuration-anytime",
    // header maps
    "get-map",
    "get-map-bytes",
    "get-map-value",
    "get-map-value-bytes",
    "get-map-value-missing",
    "set-map-value",
    "set-map-value-bytes",
    "add-map-value",
    "get-map-value-first",
    "remove-map-value",
    "set-map-value-none",
    "map-case-insensitive",
    "set-map",
    "set-map-bytes",
    "map-restored",
    // properties
    "property-request-path",
    "property-plugin-name",
    "property-vm-id",
    "property-root-id",
    "property-missing",
    "property-roundtrip",
    // shared data
    "shared-data-set",
    "shared-data-get",
    "shared-data-cas",
    "shared-data-stale-cas",
    "shared-data-cas-on-new-key",
    // shared queues
    "queue-resolve",
    "queue-resolve-missing",
    "queue-enqueue",
    "queue-dequeue",
    "queue-dequeue-unknown",
    "queue-enqueue-unknown",
    // metrics
    "metric-counter",
    "metric-counter-negative",
    "metric-gauge",
    "metric-histogram",
    "metric-unknown",
    // effective context
    "effective-context-root",
    "effective-context-self",
    "effective-context-unknown",
    // calls with nothing to act on
    "grpc-call",
    "grpc-stream",
    "grpc-send",
    "grpc-cancel",
    "grpc-cancel-stream",
    "grpc-close",
    "grpc-status",
    "foreign-function",
    "done-unsolicited",
    // HTTP callouts
    "http-call-unknown-cluster",
    "http-call-missing-authority",
    "http-call",
    "callout-token",
    "callout-headers",
    "callout-body",
    "callout-trailers",
];

/// Checks the probe reports on the response (the client sees them).
const RESPONSE_CHECKS: &[&str] = &[
    "response-status",
    "response-request-headers-closed",
    "resume-closes-request-headers",
    "response-remove-content-length",
];

const CALLOUT_BODY: &str = r#"{"allowed":true}"#;

fn contract_config() -> String {
    format!(r#"{{"mode": "contract", "expect_vm_configuration": "{VM_CONFIGURATION}"}}"#)
}

fn contract_chain() -> (host_harness::Chain, Scripted) {
    let resolver = Scripted::new().answer("backend", reply(200, CALLOUT_BODY));
    let chain = probe_chain(spec(&contract_config()), resolver.clone());
    (chain, resolver)
}

fn upstream_response() -> UpstreamResponse {
    UpstreamResponse {
        body: br#"{"id":"urn:ngsi-ld:Probe:1"}"#.to_vec(),
        ..UpstreamResponse::default()
    }
}

#[test]
fn probe_needs_no_import_the_harness_lacks() {
    let runtime = runtime();
    let module = runtime.module(&probe_wasm()).expect("probe compiles");
    assert_eq!(runtime.missing_imports(&module), Vec::<String>::new());
}

#[test]
fn probe_imports_every_abi_call() {
    let runtime = runtime();
    let module = runtime.module(&probe_wasm()).expect("probe compiles");
    let env: BTreeSet<String> = module
        .imports()
        .filter(|i| i.module() == "env")
        .map(|i| i.name().to_string())
        .collect();
    let sdk: BTreeSet<String> = SDK_IMPORTS.iter().map(|s| s.to_string()).collect();
    let not_imported: Vec<&String> = sdk.difference(&env).collect();
    let unexpected: Vec<&String> = env.difference(&sdk).collect();
    assert!(
        not_imported.is_empty(),
        "the probe no longer reaches these host calls, so the contract does not cover them: \
         {not_imported:?}"
    );
    assert!(
        unexpected.is_empty(),
        "the probe imports calls outside the SDK's ABI 0.2.1 surface: {unexpected:?}"
    );
    assert!(
        module
            .exports()
            .any(|e| e.name() == "proxy_abi_version_0_2_1"),
        "the probe must declare ABI 0.2.1"
    );
}

#[test]
fn contract_request_every_check_passes() {
    let (mut chain, _) = contract_chain();
    let outcome = chain.http(request("GET", "/probe?q=1"), &upstream_response());
    let context = describe(&outcome, &chain.shared);
    assert_eq!(outcome.status, 200, "{context}");
    let upstream = outcome
        .upstream
        .as_ref()
        .expect("request reached the upstream");

    let request_checks = probe_checks(&upstream.headers);
    let response_checks = probe_checks(&outcome.headers);
    let mut problems = Vec::new();
    for name in REQUEST_CHECKS {
        if !request_checks.contains_key(*name) {
            problems.push(format!("request check {name}: not reported"));
        }
    }
    for name in RESPONSE_CHECKS {
        if !response_checks.contains_key(*name) {
            problems.push(format!("response check {name}: not reported"));
        }
    }
    problems.extend(
        failed_checks(&upstream.headers)
            .into_iter()
            .map(|f| format!("request {f}")),
    );
    problems.extend(
        failed_checks(&outcome.headers)
            .into_iter()
            .map(|f| format!("response {f}")),
    );
    assert!(
        problems.is_empty(),
        "the harness answered {} of the probe's checks differently from Envoy:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn contract_request_makes_its_callout_and_resumes() {
    let (mut chain, resolver) = contract_chain();
    let upstream_response = upstream_response();
    let outcome = chain.http(request("GET", "/probe"), &upstream_response);
    let context = describe(&outcome, &chain.shared);
    assert!(!outcome.stalled, "{context}");

    // Only the well-formed call to a known cluster went out.
    assert_eq!(outcome.callouts.len(), 1, "{context}");
    let call = &outcome.callouts[0];
    assert_eq!(call.cluster, "backend");
    assert_eq!(header(&call.headers, ":path").as_deref(), Some("/contract"));
    assert_eq!(call.body, b"ping");
    let asked = resolver.calls();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        header(&asked[0].trailers, "x-abi-probe-trailer").as_deref(),
        Some("1")
    );
    assert_eq!(asked[0].timeout_ms, 5000);

    // The answer was readable in the callback, and the request went on after it.
    let upstream = outcome
        .upstream
        .as_ref()
        .expect("resumed after the callout");
    assert!(upstream.complete, "{context}");
    assert_eq!(
        header(&upstream.headers, "x-info-callout-status").as_deref(),
        Some("200")
    );
    assert_eq!(
        header(&upstream.headers, "x-info-callout-body").as_deref(),
        Some(CALLOUT_BODY)
    );

    // The response path read and rewrote the response.
    assert_eq!(outcome.status, 200);
    assert_eq!(
        outcome.header("x-info-response-status").as_deref(),
        Some("200")
    );
    assert_eq!(
        outcome.header("content-length"),
        None,
        "the probe removes it"
    );
    let mut expected_body = b"probe:".to_vec();
    expected_body.extend_from_slice(&upstream_response.body);
    assert_eq!(
        String::from_utf8_lossy(&outcome.body),
        String::from_utf8_lossy(&expected_body)
    );
}

#[test]
fn contract_values_match_the_host() {
    let (mut chain, _) = contract_chain();
    let first = chain.http(request("GET", "/one"), &upstream_response());
    chain.advance_clock(1500);
    let second = chain.http(request("GET", "/two"), &upstream_response());

    let info = |outcome: &host_harness::HttpOutcome, name: &str| {
        let upstream = outcome.upstream.as_ref().expect("reached the upstream");
        header(&upstream.headers, &format!("x-info-{name}"))
    };
    assert_eq!(info(&first, "time-nanos"), Some(START_NANOS.to_string()));
    assert_eq!(
        info(&second, "time-nanos"),
        Some((START_NANOS + 1_500_000_000).to_string())
    );
    assert_eq!(info(&first, "plugin-name").as_deref(), Some(PLUGIN_NAME));
    assert_eq!(info(&first, "vm-id").as_deref(), Some(VM_ID));
    assert_eq!(info(&first, "root-id").as_deref(), Some(ROOT_ID));
    assert_eq!(
        info(&first, "log-level").as_deref(),
        Some("2"),
        "the harness runs at info"
    );

    // Shared data outlives the request and is keyed by VM id.
    assert_eq!(info(&first, "shared-count").as_deref(), Some("1"));
    assert_eq!(info(&second, "shared-count").as_deref(), Some("2"));
    let (value, _cas) = chain
        .shared
        .get_shared_data(VM_ID, "abi_probe.requests_seen")
        .expect("the probe's counter is in the shared store");
    assert_eq!(value, b"2");
    assert!(chain
        .shared
        .get_shared_data("other-vm", "abi_probe.requests_seen")
        .is_none());
}

#[test]
fn contract_metrics_logs_and_queue_are_visible() {
    let (mut chain, _) = contract_chain();
    let outcome = chain.http(request("GET", "/probe"), &upstream_response());
    assert_eq!(outcome.status, 200, "{}", describe(&outcome, &chain.shared));

    let shared = chain.shared.clone();
    let metric = |name: &str| shared.metric(name);
    assert_eq!(metric("abi_probe.requests"), Some(MetricValue::Counter(1)));
    assert_eq!(metric("abi_probe.gauge"), Some(MetricValue::Gauge(40)));
    assert_eq!(
        metric("abi_probe.histogram"),
        Some(MetricValue::Histogram(vec![7]))
    );
    assert_eq!(
        metric("abi_probe.streams_logged"),
        Some(MetricValue::Counter(1)),
        "proxy_on_log runs once the stream ends"
    );

    let logs = chain.shared.logs();
    assert!(
        logs.iter().any(|l| l.plugin == PLUGIN_NAME
            && l.level == 2
            && l.message == "abi-probe: contract request"),
        "the probe's log line reaches the host's log: {logs:?}"
    );

    // The request left one item in the queue; its owner hears about it after the stream,
    // as Envoy posts on_queue_ready to the owner's dispatcher.
    assert_eq!(
        metric("abi_probe.queue_items"),
        Some(MetricValue::Counter(0))
    );
    chain.pump_background();
    match metric("abi_probe.queue_ready") {
        Some(MetricValue::Counter(n)) => assert!(n >= 1, "on_queue_ready ran {n} times"),
        other => panic!("queue_ready metric: {other:?}"),
    }
    assert_eq!(
        metric("abi_probe.queue_items"),
        Some(MetricValue::Counter(1))
    );
}

#[test]
fn tcp_mode_prefixes_upstream_bound_data() {
    let mut chain = probe_chain(spec(r#"{"mode": "tcp"}"#), Scripted::new());
    let outcome = chain.connection(
        BTreeMap::new(),
        &[
            NetEvent::Downstream {
                data: b"hello".to_vec(),
                end_stream: false,
            },
            NetEvent::Upstream {
                data: b"world".to_vec(),
                end_stream: false,
            },
            NetEvent::Downstream {
                data: b"again".to_vec(),
                end_stream: true,
            },
        ],
    );
    assert!(!outcome.closed_by_filter, "{:?}", chain.shared.logs());
    assert_eq!(
        String::from_utf8_lossy(&outcome.to_upstream),
        "probe:helloprobe:again"
    );
    assert_eq!(String::from_utf8_lossy(&outcome.to_downstream), "world");

    let metric = |name: &str| chain.shared.metric(name);
    assert_eq!(
        metric("abi_probe.tcp_connections"),
        Some(MetricValue::Counter(1))
    );
    assert_eq!(
        metric("abi_probe.tcp_upstream_bytes"),
        Some(MetricValue::Counter(5))
    );
    assert_eq!(
        metric("abi_probe.tcp_closes"),
        Some(MetricValue::Counter(2)),
        "downstream and upstream close callbacks"
    );
    assert_eq!(
        metric("abi_probe.streams_logged"),
        Some(MetricValue::Counter(1))
    );
}
