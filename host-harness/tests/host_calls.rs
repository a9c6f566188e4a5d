//! Host calls per request on load-bench's request (`examples/host_calls.rs` counts them): upper
//! bounds, so a change that adds a crossing of the wasm/host boundary to every request fails
//! here. Counts, not times: they do not depend on the machine's load. In V8 each crossing
//! costs Envoy more than the work behind most of them (BENCHMARKS.md, session 24).
//!
//! Needs the filters built first: `cargo wasm`.

#[path = "../examples/host_calls.rs"]
#[allow(dead_code)] // the example's `main`
mod host_calls;

use host_calls::Row;

fn row<'a>(rows: &'a [Row], variant: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.variant == variant)
        .unwrap_or_else(|| panic!("no row {variant}"))
}

#[test]
fn a_request_costs_no_counter_and_no_log_level_host_call_and_at_most_these_host_calls() {
    let rows = host_calls::measure(host_calls::path_of("list"));
    for r in &rows {
        // Counters reach Envoy in batches on the root's tick (proxy_glue::counters), and the
        // log level is read on the tick: neither costs a request a host call.
        assert_eq!(
            r.calls_to("proxy_increment_metric"),
            0.0,
            "{}: {:?}",
            r.variant,
            r.imports
        );
        assert_eq!(
            r.calls_to("proxy_get_log_level"),
            0.0,
            "{}: {:?}",
            r.variant,
            r.imports
        );
    }
    // Session 23: 1, 17, 47 and 29 (session 24: counters and the log level left the request
    // path; device-ownership no longer writes an answer filtering left as it is).
    for (variant, at_most) in [
        ("passthrough", 0.0),
        ("token_auth", 13.0),
        ("separate", 33.0),
        ("gateway", 17.0),
    ] {
        let r = row(&rows, variant);
        assert!(
            r.host_calls() <= at_most,
            "{variant}: {} host calls per request (at most {at_most}): {:?}",
            r.host_calls(),
            r.imports
        );
    }
}

/// Wasm fuel per request (about one unit per wasm instruction; exact, whatever the machine's
/// load), bounded a little above session 25's figures on the list request (token-auth 62.2k,
/// gateway 104.8k; session 24 ended at 82.3k and 128.8k), so a change that adds thousands of
/// instructions to every request fails here and says where (fuel per callback).
#[test]
fn a_request_costs_at_most_this_much_wasm_fuel() {
    let rows = host_calls::measure(host_calls::path_of("list"));
    for (variant, at_most) in [("token_auth", 66_000.0), ("gateway", 110_000.0)] {
        let r = row(&rows, variant);
        let fuel: f64 = r.fuel_by_callback.iter().map(|(_, fuel)| fuel).sum();
        assert!(
            fuel <= at_most,
            "{variant}: {fuel} fuel per request (at most {at_most}): {:?}",
            r.fuel_by_callback
        );
    }
}
