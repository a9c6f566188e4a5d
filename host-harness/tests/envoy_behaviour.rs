//! Envoy's behaviour around a plugin, checked with the abi-probe filter: rejected
//! configuration, local replies, traps, resource limits, callouts, body buffering, trailers,
//! ticks. Each test names the Envoy behaviour it holds the harness to.
//!
//! Needs the probe built first: `cargo wasm`.

mod common;

use std::time::{Duration, Instant};

use host_harness::chain::reload_metric;
use host_harness::chain::CalloutAnswer;
use host_harness::{
    FailurePolicy, HttpRequest, Limits, MetricValue, PluginSpec, UpstreamResponse, VmFailure,
};

use common::*;

fn ok_upstream() -> UpstreamResponse {
    UpstreamResponse::default()
}

fn post(chunks: &[&str], trailers: &[(&str, &str)]) -> HttpRequest {
    let mut request = request("POST", "/v2/entities");
    request.body = chunks.iter().map(|c| c.as_bytes().to_vec()).collect();
    request.trailers = pairs(trailers);
    request
}

/// The trap text of a failed VM.
fn trap_of(chain: &host_harness::Chain) -> String {
    match &chain.filters[0].failure {
        Some(VmFailure::Trapped(why)) => why.clone(),
        other => panic!("expected a trapped VM, got {other:?}"),
    }
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[test]
fn rejected_configuration_fails_every_request_closed() {
    for config in [
        "{not json",
        r#"{"mode": "no-such-mode"}"#,
        "",
        r#"{"tick_ms": 5}"#,
    ] {
        let mut chain = probe_chain(spec(config), Scripted::new());
        assert_eq!(
            chain.filters[0].failure,
            Some(VmFailure::ConfigRejected),
            "configuration {config:?}"
        );
        for _ in 0..2 {
            let outcome = chain.http(request("GET", "/"), &ok_upstream());
            assert_eq!(outcome.status, 503, "configuration {config:?}");
            assert!(
                outcome.upstream.is_none(),
                "nothing goes upstream: {config:?}"
            );
        }
    }
}

#[test]
fn rejected_reconfiguration_keeps_the_old_configuration() {
    let mut chain = probe_chain(spec(r#"{"mode": "deny"}"#), Scripted::new());
    let rejected = chain
        .reconfigure(0, spec("{not json"))
        .expect("module loads");
    assert_eq!(rejected, Err(VmFailure::ConfigRejected));
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(
        outcome.status, 403,
        "the deny configuration is still in force"
    );

    let accepted = chain
        .reconfigure(0, spec(r#"{"mode": "buffer"}"#))
        .expect("module loads");
    assert_eq!(accepted, Ok(()));
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(outcome.status, 200);
    assert!(outcome.upstream.is_some());
}

#[test]
fn local_reply_wins_over_continue() {
    let mut chain = probe_chain(spec(r#"{"mode": "deny"}"#), Scripted::new());
    let outcome = chain.http(request("GET", "/v2/entities"), &ok_upstream());
    let context = describe(&outcome, &chain.shared);
    assert_eq!(outcome.status, 403, "{context}");
    assert!(
        outcome.upstream.is_none(),
        "the filter answered Continue after its local reply; nothing may go upstream: {context}"
    );
    assert_eq!(outcome.local_reply.as_ref().map(|r| r.status), Some(403));
    assert_eq!(
        outcome.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(outcome.header("x-abi-probe").as_deref(), Some("deny"));
    let body = json(&outcome.body);
    assert_eq!(body["error"], "Forbidden");
    assert_eq!(body["description"], "abi-probe deny mode");
    assert!(chain.filters[0].is_serving());
}

#[test]
fn close_stream_resets_the_request() {
    let mut chain = probe_chain(spec(r#"{"mode": "reset"}"#), Scripted::new());
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    assert!(outcome.reset, "{}", describe(&outcome, &chain.shared));
    assert!(outcome.upstream.is_none());
    assert_eq!(outcome.status, 0, "a reset stream has no response");
    assert!(chain.filters[0].is_serving(), "a reset is not a VM failure");
}

#[test]
fn trap_fails_the_stream_and_the_vm_stays_failed() {
    let mut chain = probe_chain(
        PluginSpec {
            failure_policy: FailurePolicy::FailClosed,
            ..spec(r#"{"mode": "trap"}"#)
        },
        Scripted::new(),
    );
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(outcome.status, 503, "{}", describe(&outcome, &chain.shared));
    assert!(outcome.upstream.is_none());
    assert!(
        trap_of(&chain).contains("unreachable"),
        "{}",
        trap_of(&chain)
    );
    assert!(
        chain
            .shared
            .logs()
            .iter()
            .any(|l| l.message.contains("wasm trap")),
        "the trap is logged"
    );

    // FAIL_CLOSED: a crashed VM serves nothing more, however long one waits; later requests
    // fail closed without reaching it, and nothing is reloaded.
    for _ in 0..2 {
        chain.advance_clock(10_000);
        let later = chain.http(request("GET", "/"), &ok_upstream());
        assert_eq!(later.status, 503);
        assert!(later.upstream.is_none());
    }
    assert_eq!(chain.filters[0].reloads, 0);
    assert_eq!(reload_counter(&chain, "success"), 0);
}

/// The probe in pass-through mode, with the test-only trap trigger `x-probe-trap: 1`.
const TRAPPABLE: &str = r#"{"mode": "buffer", "trap_header": "x-probe-trap"}"#;

fn trap_request() -> HttpRequest {
    let mut request = request("GET", "/");
    request.headers.extend(pairs(&[("x-probe-trap", "1")]));
    request
}

fn reload_counter(chain: &host_harness::Chain, event: &str) -> u64 {
    match chain.shared.metric(&reload_metric(PLUGIN_NAME, event)) {
        Some(MetricValue::Counter(n)) => n,
        other => panic!("{} is {other:?}", reload_metric(PLUGIN_NAME, event)),
    }
}

/// Envoy's FAIL_RELOAD (measured in tests/e2e/test_recovery.py): the request that meets the
/// trap gets 503; while the VM was loaded less than the reload backoff (1 s base) ago, later
/// requests still get 503 (vm_reload_backoff); the next one after it starts a fresh VM
/// (vm_reload_success) with the same configuration and a fresh root context, and is served.
#[test]
fn fail_reload_refuses_during_the_backoff_then_serves_from_a_fresh_vm() {
    let mut chain = probe_chain(spec(TRAPPABLE), Scripted::new());
    for n in 1..=2 {
        let served = chain.http(request("GET", "/"), &ok_upstream());
        assert_eq!(served.status, 200, "{}", describe(&served, &chain.shared));
        assert_eq!(
            served.header("x-vm-stream").as_deref(),
            Some(&*n.to_string())
        );
    }

    let trapped = chain.http(trap_request(), &ok_upstream());
    assert_eq!(trapped.status, 503, "{}", describe(&trapped, &chain.shared));
    assert!(trapped.upstream.is_none());
    assert!(
        trap_of(&chain).contains("unreachable"),
        "{}",
        trap_of(&chain)
    );

    chain.advance_clock(999);
    let too_soon = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(
        too_soon.status, 503,
        "within the backoff the VM stays failed"
    );
    assert!(too_soon.upstream.is_none());
    assert_eq!(reload_counter(&chain, "backoff"), 1);
    assert_eq!(reload_counter(&chain, "success"), 0);

    chain.advance_clock(1);
    let fresh = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(fresh.status, 200, "{}", describe(&fresh, &chain.shared));
    assert!(fresh.upstream.is_some());
    // A fresh root context: its stream count starts again; configured again (the probe
    // serves only with its configuration parsed in on_configure).
    assert_eq!(fresh.header("x-vm-stream").as_deref(), Some("1"));
    assert!(chain.filters[0].is_serving());
    assert_eq!(chain.filters[0].reloads, 1);
    assert_eq!(reload_counter(&chain, "success"), 1);
    assert_eq!(reload_counter(&chain, "failure"), 0);

    // And it can fail and recover again.
    assert_eq!(chain.http(trap_request(), &ok_upstream()).status, 503);
    chain.advance_clock(1000);
    let again = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-vm-stream").as_deref(), Some("1"));
    assert_eq!(chain.filters[0].reloads, 2);
}

/// The backoff counts from the VM's last load, not from the failure (Envoy: a VM that ran for
/// a while is reloaded by the very next request; measured 0.2 s in tests/e2e). The trapping
/// request itself is never let through.
#[test]
fn fail_reload_restarts_a_long_running_vm_on_the_next_request() {
    let mut chain = probe_chain(spec(TRAPPABLE), Scripted::new());
    chain.advance_clock(5000);
    let trapped = chain.http(trap_request(), &ok_upstream());
    assert_eq!(trapped.status, 503);
    assert!(trapped.upstream.is_none());
    assert_eq!(trapped.body, b"wasm_fail_stream");

    let next = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(next.status, 200, "{}", describe(&next, &chain.shared));
    assert_eq!(next.header("x-vm-stream").as_deref(), Some("1"));
    assert_eq!(reload_counter(&chain, "backoff"), 0);
    assert_eq!(reload_counter(&chain, "success"), 1);
}

/// A network filter (as mqtt-acl in front of Mosquitto) under FAIL_RELOAD: the connection that
/// meets the trap is closed, never passed through; a later connection gets a fresh VM.
#[test]
fn fail_reload_restarts_a_network_filter_for_the_next_connection() {
    fn connect(chain: &mut host_harness::Chain, data: &[u8]) -> host_harness::NetOutcome {
        let event = host_harness::NetEvent::Downstream {
            data: data.to_vec(),
            end_stream: false,
        };
        chain.connection(Default::default(), &[event])
    }
    let mut chain = probe_chain(
        spec(r#"{"mode": "tcp", "trap_data": "TRAP"}"#),
        Scripted::new(),
    );
    assert_eq!(connect(&mut chain, b"hello").to_upstream, b"probe:hello");
    let trapped = connect(&mut chain, b"TRAP now");
    assert!(trapped.closed_by_filter, "{trapped:?}");
    assert!(trapped.to_upstream.is_empty(), "{trapped:?}");
    // Loaded at the start (clock 0), trapped at 0: within the backoff, still refused.
    assert!(connect(&mut chain, b"hello").closed_by_filter);
    chain.advance_clock(1000);
    assert_eq!(connect(&mut chain, b"hello").to_upstream, b"probe:hello");
    assert_eq!(chain.filters[0].reloads, 1);
    assert_eq!(reload_counter(&chain, "success"), 1);
}

/// A configuration rejected at start is no run-time failure: FAIL_RELOAD does not retry it
/// (Envoy refuses such a plugin when it loads); every request stays refused.
#[test]
fn fail_reload_does_not_restart_a_plugin_that_never_started() {
    let mut chain = probe_chain(spec(r#"{"mode": "nonsense"}"#), Scripted::new());
    assert!(!chain.filters[0].is_serving());
    chain.advance_clock(10_000);
    let refused = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(refused.status, 503);
    assert_eq!(chain.filters[0].reloads, 0);
    assert_eq!(reload_counter(&chain, "success"), 0);
}

#[test]
fn fuel_exhaustion_stops_a_spinning_filter() {
    let limits = Limits {
        fuel_per_call: 10_000_000,
        ..Limits::default()
    };
    let mut chain = probe_chain(
        spec_with_limits(r#"{"mode": "spin"}"#, limits),
        Scripted::new(),
    );
    assert!(
        chain.filters[0].is_serving(),
        "start-up fits in the fuel budget"
    );
    let started = Instant::now();
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    let took = started.elapsed();
    assert_eq!(outcome.status, 503, "{}", describe(&outcome, &chain.shared));
    assert!(outcome.upstream.is_none());
    assert!(trap_of(&chain).contains("fuel"), "{}", trap_of(&chain));
    assert!(took < Duration::from_secs(10), "the loop ran {took:?}");
}

#[test]
fn memory_cap_traps_a_growing_filter() {
    let capped = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let config = r#"{"mode": "grow", "grow_mib": 64}"#;
    let mut chain = probe_chain(spec_with_limits(config, capped), Scripted::new());
    assert!(
        chain.filters[0].is_serving(),
        "the probe starts within 16 MiB"
    );
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(outcome.status, 503, "{}", describe(&outcome, &chain.shared));
    assert!(outcome.upstream.is_none());
    trap_of(&chain);

    // The same allocation under the default cap is fine: the limit, not the probe, failed it.
    let mut roomy = probe_chain(spec(config), Scripted::new());
    let outcome = roomy.http(request("GET", "/"), &ok_upstream());
    assert_eq!(outcome.status, 200, "{}", describe(&outcome, &roomy.shared));
    assert!(outcome.upstream.is_some());
}

#[test]
fn callout_reset_is_answered_by_the_filter() {
    // No scripted answer: the call to "backend" is reset, the guest sees zero headers.
    let mut chain = probe_chain(spec(r#"{"mode": "callout"}"#), Scripted::new());
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    let context = describe(&outcome, &chain.shared);
    assert_eq!(outcome.callouts.len(), 1, "{context}");
    assert_eq!(outcome.status, 503, "{context}");
    assert!(outcome.upstream.is_none(), "{context}");
    // The filter's reply, not the host failing the stream: the filter saw the failure and
    // its reason (proxy_get_status: BrokenConnection, "reset").
    assert_eq!(json(&outcome.body)["error"], "ServiceUnavailable");
    assert_eq!(
        outcome.header("x-callout-failure").as_deref(),
        Some("reset")
    );
    assert_eq!(
        outcome.header("x-callout-status-code").as_deref(),
        Some("11")
    );
    assert!(chain.filters[0].is_serving());
}

#[test]
fn callout_success_lets_the_request_through() {
    let resolver = Scripted::new().answer("backend", reply(200, r#"{"allowed":true}"#));
    let mut chain = probe_chain(spec(r#"{"mode": "callout"}"#), resolver.clone());
    let outcome = chain.http(request("GET", "/v2/entities"), &ok_upstream());
    let context = describe(&outcome, &chain.shared);
    assert_eq!(outcome.status, 200, "{context}");
    let upstream = outcome.upstream.expect("resumed after the callout");
    assert!(upstream.complete);
    assert_eq!(
        header(&upstream.headers, "x-callout").as_deref(),
        Some("ok")
    );
    let calls = resolver.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        header(&calls[0].headers, ":path").as_deref(),
        Some("/authorize")
    );
}

#[test]
fn callout_refusal_is_forbidden() {
    let resolver = Scripted::new().answer("backend", reply(401, "{}"));
    let mut chain = probe_chain(spec(r#"{"mode": "callout"}"#), resolver);
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    assert_eq!(outcome.status, 403, "{}", describe(&outcome, &chain.shared));
    assert!(outcome.upstream.is_none());
}

#[test]
fn body_is_buffered_across_chunks() {
    let mut chain = probe_chain(spec(r#"{"mode": "buffer"}"#), Scripted::new());
    let outcome = chain.http(post(&["abc", "def", "ghi"], &[]), &ok_upstream());
    let context = describe(&outcome, &chain.shared);
    assert_eq!(outcome.status, 200, "{context}");
    let upstream = outcome.upstream.as_ref().expect("reached the upstream");
    assert!(upstream.complete);
    assert_eq!(upstream.body, b"abcdefghi", "every chunk, once, in order");
    assert_eq!(outcome.header("x-body-calls").as_deref(), Some("3"));
    // The last callback saw the whole body, and its size argument said so.
    assert_eq!(
        outcome.header("x-body-len").as_deref(),
        Some("9"),
        "{context}"
    );
    assert_eq!(outcome.header("x-body-size-arg").as_deref(), Some("9"));
}

#[test]
fn request_body_ending_with_trailers() {
    let mut chain = probe_chain(spec(r#"{"mode": "buffer"}"#), Scripted::new());
    let outcome = chain.http(
        post(&["abc", "def"], &[("x-checksum", "42")]),
        &ok_upstream(),
    );
    let context = describe(&outcome, &chain.shared);
    assert_eq!(outcome.status, 200, "{context}");
    let upstream = outcome.upstream.as_ref().expect("reached the upstream");
    assert!(upstream.complete);
    assert_eq!(upstream.body, b"abcdef");
    assert_eq!(
        header(&upstream.trailers, "x-checksum").as_deref(),
        Some("42")
    );
    assert_eq!(
        header(&upstream.trailers, "x-abi-probe-trailer").as_deref(),
        Some("seen"),
        "trailers are writable in their callback"
    );
    // No body callback had end_of_stream: the trailers callback read the buffered body.
    assert_eq!(outcome.header("x-body-calls").as_deref(), Some("2"));
    assert_eq!(
        outcome.header("x-body-len").as_deref(),
        Some("6"),
        "{context}"
    );
    assert!(
        chain
            .shared
            .logs()
            .iter()
            .any(|l| l.message == "abi-probe: 1 trailers arrived; buffered body is 6 bytes"),
        "{context}"
    );
}

#[test]
fn unknown_cluster_is_a_bad_argument() {
    let resolver = Scripted::new().answer("backend", reply(200, "{}"));
    let mut chain = probe_chain(spec(r#"{"mode": "contract"}"#), resolver.clone());
    let outcome = chain.http(request("GET", "/"), &ok_upstream());
    let upstream = outcome.upstream.as_ref().expect("reached the upstream");
    let checks = probe_checks(&upstream.headers);
    assert_eq!(
        checks.get("http-call-unknown-cluster").map(String::as_str),
        Some("ok"),
        "proxy_http_call to an undefined cluster answers BadArgument"
    );
    assert_eq!(
        checks
            .get("http-call-missing-authority")
            .map(String::as_str),
        Some("ok"),
        "proxy_http_call without :authority answers BadArgument"
    );
    assert!(
        resolver.calls().iter().all(|c| c.cluster == "backend"),
        "a refused call never goes out"
    );
}

#[test]
fn ticks_follow_the_clock_and_may_call_out() {
    let resolver = Scripted::new().answer("backend", reply(200, "{}"));
    let config = r#"{"mode": "contract", "tick_ms": 1000, "tick_callout": true}"#;
    let mut chain = probe_chain(spec(config), resolver.clone());
    assert_eq!(
        chain.shared.metric("abi_probe.ticks"),
        Some(MetricValue::Counter(0))
    );

    chain.advance_clock(3500);
    assert_eq!(
        chain.shared.metric("abi_probe.ticks"),
        Some(MetricValue::Counter(3))
    );
    // Callouts from the root context have no stream; the harness answers them in the
    // background and the root's on_http_call_response sees each answer.
    assert_eq!(
        chain.shared.metric("abi_probe.tick_callouts"),
        Some(MetricValue::Counter(3))
    );
    let calls = resolver.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls
        .iter()
        .all(|c| header(&c.headers, ":path").as_deref() == Some("/tick")));

    chain.advance_clock(500);
    assert_eq!(
        chain.shared.metric("abi_probe.ticks"),
        Some(MetricValue::Counter(4)),
        "the half period left over counts toward the next tick"
    );
}

#[test]
fn without_a_tick_period_no_tick_fires() {
    let mut chain = probe_chain(spec(r#"{"mode": "contract"}"#), Scripted::new());
    chain.advance_clock(60_000);
    assert_eq!(
        chain.shared.metric("abi_probe.ticks"),
        Some(MetricValue::Counter(0))
    );
}

/// Envoy's default (`allow_on_headers_stop_iteration: false`): a filter that paused in its
/// header callback does not see the body until it continues; then the body goes through it.
/// Its body callback answering Continue cannot release the request early.
#[test]
fn by_default_a_body_waits_for_a_filter_paused_at_headers() {
    let resolver = Scripted::new().answer("backend", reply(200, r#"{"allowed":true}"#));
    let mut chain = probe_chain(spec(r#"{"mode": "callout"}"#), resolver);
    let outcome = chain.http(post(&["{\"id\":", "\"Room1\"}"], &[]), &ok_upstream());
    let context = describe(&outcome, &chain.shared);
    assert_eq!(outcome.status, 200, "{context}");
    let upstream = outcome.upstream.expect("resumed after the callout");
    assert_eq!(
        header(&upstream.headers, "x-callout").as_deref(),
        Some("ok"),
        "the headers waited for the decision: {context}"
    );
    assert_eq!(upstream.body, b"{\"id\":\"Room1\"}");
}

/// With `allow_on_headers_stop_iteration: true` the body reaches the paused filter, and a
/// Continue from its body callback lets headers and body go on before the decision: a filter
/// that decides in a callout must pause its body callback too (token-auth does).
#[test]
fn with_stop_iteration_allowed_a_body_continue_releases_the_request_early() {
    let resolver = Scripted::new().answer("backend", CalloutAnswer::Reset);
    let mut spec = spec(r#"{"mode": "callout"}"#);
    spec.allow_on_headers_stop_iteration = true;
    let mut chain = probe_chain(spec, resolver);
    let outcome = chain.http(post(&["{\"id\":\"Room1\"}"], &[]), &ok_upstream());
    let context = describe(&outcome, &chain.shared);
    let upstream = outcome
        .upstream
        .expect("the body callback's Continue released the request before the callout answered");
    assert_eq!(header(&upstream.headers, "x-callout"), None, "{context}");
}

/// Envoy: a root context's tick may make a connection's context effective
/// (`proxy_set_effective_context`) and close it (`proxy_close_stream`); the connection closes
/// then, after what was already written to the client (mqtt-acl's refusing CONNACK). Checked
/// with mqtt_acl.wasm, which closes refused connections from its tick.
#[test]
fn a_tick_closes_a_connection_made_effective() {
    use host_harness::NetEvent;
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip1/release/mqtt_acl.wasm");
    assert!(
        wasm.is_file(),
        "{} is missing: build the filters first with `cargo wasm`",
        wasm.display()
    );
    let config = r#"{"device_keys": {"devices": {"d": {"key_sha256":
        ["0000000000000000000000000000000000000000000000000000000000000000"]}}},
        "acl": {"rules": []}}"#;
    let run = |events: &[NetEvent]| {
        let mut spec = spec(config);
        spec.wasm = wasm.clone();
        let mut chain = probe_chain(spec, Scripted::new());
        chain.connection(BTreeMap::new(), events)
    };
    // An anonymous MQTT 3.1.1 CONNECT is refused; the broker's CONNACK becomes 0x05.
    let connect = b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c1".to_vec();
    let mut events = vec![
        NetEvent::Downstream {
            data: connect,
            end_stream: false,
        },
        NetEvent::Upstream {
            data: vec![0x20, 0x02, 0x00, 0x00],
            end_stream: false,
        },
    ];
    let open = run(&events);
    assert!(!open.closed_by_filter, "no tick yet: still open");
    assert_eq!(open.to_downstream, vec![0x20, 0x02, 0x00, 0x05]);
    events.push(NetEvent::AdvanceClock { millis: 300 });
    let closed = run(&events);
    assert!(closed.closed_by_filter, "the tick closed the connection");
    assert_eq!(
        closed.to_downstream,
        vec![0x20, 0x02, 0x00, 0x05],
        "what was written before the close reached the client"
    );
}

/// Envoy: a network filter's new-connection callback runs before the TLS handshake, so the
/// peer certificate (`connection.subject_peer_certificate`, ...) is not known there; it is
/// from the first data on (found by mqtt-acl's end-to-end test with client certificates).
#[test]
fn peer_certificate_is_known_from_the_first_data_not_at_new_connection() {
    use host_harness::NetEvent;
    use std::collections::BTreeMap;
    let mut chain = probe_chain(spec(r#"{"mode": "tcp"}"#), Scripted::new());
    let mut properties = BTreeMap::new();
    properties.insert("connection.mtls".to_string(), vec![1]);
    properties.insert(
        "connection.subject_peer_certificate".to_string(),
        b"CN=lamp-01".to_vec(),
    );
    chain.connection(
        properties,
        &[NetEvent::Downstream {
            data: b"hello".to_vec(),
            end_stream: false,
        }],
    );
    let logs: Vec<String> = chain.shared.logs().into_iter().map(|l| l.message).collect();
    let at = |when: &str| {
        logs.iter()
            .find(|l| l.contains(&format!("peer certificate at {when}")))
            .cloned()
            .unwrap_or_default()
    };
    assert!(at("new connection").ends_with("Ok(None)"), "{logs:?}");
    assert!(at("data").contains("Some([67, 78, 61"), "{logs:?}");
}
