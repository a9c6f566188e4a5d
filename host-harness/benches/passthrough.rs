//! Per-request cost of a filter through the harness: the baseline every filter is compared with.
//! Three chains in one run, so the ratios are meaningful on a noisy machine:
//! no filter (the harness's own driver), the example filter as a pass-through, and the example
//! filter checking a static token.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use host_harness::chain::NoCallouts;
use host_harness::{Chain, HttpRequest, Limits, PluginSpec, Runtime, Shared, UpstreamResponse};

fn chain(runtime: &Arc<Runtime>, config: Option<&str>) -> Chain {
    let shared = Arc::new(Shared::new(1_767_225_600_000_000_000, false));
    let mut chain = Chain::new(
        runtime.clone(),
        shared,
        HashSet::new(),
        Box::new(NoCallouts),
    );
    if let Some(config) = config {
        let wasm = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/wasm32-wasip1/release/example.wasm");
        assert!(wasm.exists(), "build the filters first: cargo wasm");
        let vm = chain
            .add_filter(PluginSpec {
                name: "example".into(),
                root_id: String::new(),
                vm_id: String::new(),
                wasm,
                configuration: config.as_bytes().to_vec(),
                vm_configuration: Vec::new(),
                limits: Limits::default(),
            })
            .expect("filter loads");
        assert!(vm.is_serving(), "{:?}", vm.failure);
    }
    chain
}

fn request() -> HttpRequest {
    let headers = [
        (":method", "GET"),
        (":path", "/v2/entities?type=Room&limit=10"),
        (":authority", "orion:1026"),
        (":scheme", "http"),
        ("x-auth-token", "tok-alice"),
        ("fiware-service", "openiot"),
        ("fiware-servicepath", "/"),
        ("accept", "application/json"),
    ];
    HttpRequest {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let runtime = Arc::new(Runtime::new().expect("runtime"));
    let upstream = UpstreamResponse::default();
    let cases = [
        ("no_filter", None),
        ("passthrough", Some(r#"{"mode":"passthrough"}"#)),
        (
            "token_list",
            Some(r#"{"mode":"token_list","tokens":{"tok-alice":{"user":"alice"}}}"#),
        ),
    ];
    let mut group = c.benchmark_group("request_through_harness");
    for (name, config) in cases {
        let mut chain = chain(&runtime, config);
        let outcome = chain.http(request(), &upstream);
        assert_eq!(outcome.status, 200, "{name}: {outcome:?}");
        group.bench_function(name, |b| b.iter(|| chain.http(request(), &upstream)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
