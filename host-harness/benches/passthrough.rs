//! Per-request cost of a filter through the harness: the baseline every filter is compared with.
//! Three chains in one run, so the ratios are meaningful on a noisy machine:
//! no filter (the harness's own driver), the example filter as a pass-through, and the example
//! filter checking a static token.

mod common;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use host_harness::{Runtime, UpstreamResponse};

const START: u64 = 1_767_225_600_000_000_000;

fn bench(c: &mut Criterion) {
    let runtime = Arc::new(Runtime::new().expect("runtime"));
    let upstream = UpstreamResponse::default();
    let cases = [
        ("no_filter", None),
        (
            "passthrough",
            Some(("example.wasm", r#"{"mode":"passthrough"}"#)),
        ),
        (
            "token_list",
            Some((
                "example.wasm",
                r#"{"mode":"token_list","tokens":{"tok-alice":{"user":"alice"}}}"#,
            )),
        ),
    ];
    let mut group = c.benchmark_group("request_through_harness");
    for (name, filter) in cases {
        let mut chain = common::chain(&runtime, filter, START);
        let request = || common::request(&[("x-auth-token", "tok-alice")]);
        let outcome = chain.http(request(), &upstream);
        assert_eq!(outcome.status, 200, "{name}: {outcome:?}");
        group.bench_function(name, |b| b.iter(|| chain.http(request(), &upstream)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
