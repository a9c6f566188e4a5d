//! What every bench needs: a chain with one filter, built from target/wasm32-wasip1/release.

// Each bench uses some of these helpers.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use host_harness::chain::NoCallouts;
use host_harness::{Chain, FailurePolicy, Limits, PluginSpec, Runtime, Shared};

/// A chain with `wasm` (a file in target/wasm32-wasip1/release) configured with `config`, or
/// no filter at all; its clock starts at `now_nanos`.
pub fn chain(runtime: &Arc<Runtime>, filter: Option<(&str, &str)>, now_nanos: u64) -> Chain {
    let filters: Vec<(&str, &str)> = filter.into_iter().collect();
    chain_of(runtime, &filters, false, now_nanos)
}

/// A chain of `(wasm, config)` filters in order, with Envoy's
/// `allow_on_headers_stop_iteration` set as given (filters that decide on the body need true).
pub fn chain_of(
    runtime: &Arc<Runtime>,
    filters: &[(&str, &str)],
    allow_on_headers_stop_iteration: bool,
    now_nanos: u64,
) -> Chain {
    chain_with_clusters(
        runtime,
        filters,
        allow_on_headers_stop_iteration,
        now_nanos,
        &[],
        Box::new(NoCallouts),
    )
}

/// [`chain_of`] with clusters the filters may call, answered by `resolver`.
pub fn chain_with_clusters(
    runtime: &Arc<Runtime>,
    filters: &[(&str, &str)],
    allow_on_headers_stop_iteration: bool,
    now_nanos: u64,
    clusters: &[&str],
    resolver: Box<dyn host_harness::chain::CalloutResolver>,
) -> Chain {
    let shared = Arc::new(Shared::new(now_nanos, false));
    let mut chain = Chain::new(
        runtime.clone(),
        shared,
        clusters
            .iter()
            .map(|c| c.to_string())
            .collect::<HashSet<_>>(),
        resolver,
    );
    for (wasm, config) in filters {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/wasm32-wasip1/release")
            .join(wasm);
        assert!(path.exists(), "build the filters first: cargo wasm");
        let vm = chain
            .add_filter(PluginSpec {
                name: wasm.trim_end_matches(".wasm").into(),
                root_id: String::new(),
                vm_id: String::new(),
                wasm: path,
                configuration: config.as_bytes().to_vec(),
                vm_configuration: Vec::new(),
                limits: Limits::default(),
                allow_on_headers_stop_iteration,
                failure_policy: FailurePolicy::default(),
                vm_env: Vec::new(),
            })
            .expect("filter loads");
        assert!(vm.is_serving(), "{:?}", vm.failure);
    }
    chain
}

/// An Orion-style GET with `extra` headers.
pub fn request(extra: &[(&str, &str)]) -> host_harness::HttpRequest {
    let mut headers = vec![
        (":method", "GET"),
        (":path", "/v2/entities?type=Room&limit=10"),
        (":authority", "orion:1026"),
        (":scheme", "http"),
        ("fiware-service", "openiot"),
        ("fiware-servicepath", "/"),
        ("accept", "application/json"),
    ];
    headers.extend_from_slice(extra);
    host_harness::HttpRequest {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..Default::default()
    }
}
